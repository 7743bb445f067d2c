"""Where rlvr keeps what it builds once and reuses: rebuilt tokenizers, compiled decode steps, SLURM job
directories.

Kept free of heavy imports, so the SLURM backend can ask for it without loading torch or transformers.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "RLVR_CACHE"


def cache_dir() -> Path:
    """The cache directory: `$RLVR_CACHE`, else `~/.cache/rlvr`."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "rlvr"))
