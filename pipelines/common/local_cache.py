"""This node's cache folder: ``$MOVA_CACHE`` (default ``~/.cache/mova``).

Every process resolves it on its own node: downloaded checkpoints, kept manifest scans and the
prepared real weights live below it, never on a path another node would have to share.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """``$MOVA_CACHE/<parts>`` (default ``~/.cache/mova/<parts>``), not created."""
    root = os.environ.get("MOVA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mova")
    return Path(root).joinpath(*parts)
