"""Where the project keeps what it computes once: model copies, cached rollouts, bases."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root: ``$DRRL_CACHE_DIR``, else ``$XDG_CACHE_HOME/drrl-gym`` or ``~/.cache``."""
    explicit = os.environ.get("DRRL_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "drrl-gym"
