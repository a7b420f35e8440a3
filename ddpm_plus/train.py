"""``python -m ddpm_plus.train`` (and ``accelerate launch -m ddpm_plus.train``): the trainer's entry point.

The trainer itself is :mod:`ddpm_plus.trainer`.
"""

from .trainer.loop import main

if __name__ == "__main__":
    main()
