"""Where forgetscore keeps what it computes once and reuses (models, prepared data, Fisher, losses)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$FORGETSCORE_CACHE``, else ``~/.cache/forgetscore``."""
    root = os.environ.get("FORGETSCORE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "forgetscore"
