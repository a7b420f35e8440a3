"""Where ddpm_plus caches downloads and computed files (classifier weights, Inception weights, reference
statistics)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_cache_dir"]


def default_cache_dir() -> Path:
    """``$DDPM_PLUS_CACHE`` or ``$XDG_CACHE_HOME/ddpm_plus`` (default ``~/.cache/ddpm_plus``)."""
    if os.environ.get("DDPM_PLUS_CACHE"):
        return Path(os.environ["DDPM_PLUS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ddpm_plus"
