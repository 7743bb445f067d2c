"""Where rlvr keeps what it builds once and reuses: rebuilt tokenizers, converted models, compiled decode
steps, SLURM job directories.

Kept free of heavy imports, so the SLURM backend can ask for it without loading torch or transformers.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

CACHE_ENV = "RLVR_CACHE"


def cache_dir() -> Path:
    """The cache directory: `$RLVR_CACHE`, else `~/.cache/rlvr`."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "rlvr"))


def build_once(target: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """`target`, built by `build(staging_directory)` unless a finished copy (one holding `marker`) is there.

    The build writes into a staging directory beside `target` that is renamed into place only once complete,
    so a killed build leaves nothing that looks finished, and processes building at once all end up with the
    one copy that was renamed first (the builds are deterministic, so any copy is the same).
    """
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    try:
        build(staging)
        os.replace(staging, target)
    except OSError:
        if not (target / marker).exists():  # not another process finishing first: a real failure
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
