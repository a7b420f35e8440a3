"""Deprecated: use ``ddpm-plus push OUTPUT_DIR --hub_model_id user/repo`` (same flags and exit codes).

Kept so that ``python training/push_to_hub.py ...`` from earlier documentation keeps working.
"""

import sys
import warnings

from ddpm_plus.cli import main

if __name__ == "__main__":
    warnings.warn("training/push_to_hub.py is deprecated: use `ddpm-plus push`", FutureWarning, stacklevel=1)
    sys.exit(main(["push", *sys.argv[1:]]))
