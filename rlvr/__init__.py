"""rlvr: GRPO with verifiable math rewards and an optional reasoning vocabulary.

The top-level names load lazily, so tools that only need a submodule (the SLURM backend, the CLI's --help)
do not pay for importing torch and transformers.
"""

from importlib import import_module

__all__ = ["ReasoningVocab", "ReasoningVocabError", "load_model", "save_model"]
__version__ = "0.1.0"

_HOMES = {
    "ReasoningVocab": "rlvr.vocab",
    "ReasoningVocabError": "rlvr.vocab",
    "load_model": "rlvr.models",
    "save_model": "rlvr.models",
}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'rlvr' has no attribute {name!r}")
    return getattr(import_module(_HOMES[name]), name)
