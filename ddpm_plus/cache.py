"""Where ddpm_plus caches downloads and computed files (classifier weights, Inception weights, reference
statistics), and the file hash that identifies weights in cache keys and model cards."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["default_cache_dir", "file_sha256"]


def default_cache_dir() -> Path:
    """``$DDPM_PLUS_CACHE`` or ``$XDG_CACHE_HOME/ddpm_plus`` (default ``~/.cache/ddpm_plus``)."""
    if os.environ.get("DDPM_PLUS_CACHE"):
        return Path(os.environ["DDPM_PLUS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ddpm_plus"


def file_sha256(path) -> str:
    """Hex SHA-256 of a file's bytes, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()
