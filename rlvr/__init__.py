"""rlvr: GRPO with verifiable math rewards and an optional reasoning vocabulary."""

from rlvr.models import load_model, save_model
from rlvr.vocab import ReasoningVocab, ReasoningVocabError

__all__ = ["ReasoningVocab", "ReasoningVocabError", "load_model", "save_model"]
__version__ = "0.1.0"
