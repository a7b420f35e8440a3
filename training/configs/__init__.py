"""The trainer's YAML presets, installed as the package ``ddpm_plus.presets`` (see pyproject.toml):
``--config digits`` (or ``ddpm_cifar10``, ``iddpm_cifar10``) reads ``<name>.yaml`` from here."""
