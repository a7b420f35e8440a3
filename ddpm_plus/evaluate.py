"""``python -m ddpm_plus.evaluate PIPELINE [flags]`` (and ``accelerate launch -m ddpm_plus.evaluate ...``, which
splits the evaluation over the processes): ``ddpm-plus evaluate``'s entry point as a module.

The command itself is :func:`ddpm_plus.cli.evaluate`; its flags: ``python -m ddpm_plus.evaluate --help``.
"""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
