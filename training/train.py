"""The trainer from a repository checkout: ``accelerate launch training/train.py --config digits ...``.

The trainer itself is ``ddpm_plus.train`` (installed with ``pip install "ddpm-plus[train]"``); this file only
calls it, so ``accelerate launch -m ddpm_plus.train ...`` and ``ddpm-plus train ...`` do the same.
"""

from ddpm_plus.train import main

if __name__ == "__main__":
    main()
