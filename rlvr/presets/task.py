"""The synthetic task's own presets: Qwen3 architectures over a small tokenizer trained on the task's chats.

`micro` (~1M parameters) learns the task on a laptop CPU in minutes; `small` (~25M parameters) is for harder
problems on one GPU.
"""

from __future__ import annotations

from collections.abc import Callable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast, Qwen3Config

from rlvr.presets.qwen3 import CHATML_TEMPLATE
from rlvr.thoughts import THINK_END, THINK_START

# The micro tokenizer's added tokens, in Qwen3's roles: pad, ChatML control tokens (special), thought tags
# (non-special, so `skip_special_tokens=True` keeps them).
MICRO_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    (THINK_START, False),
    (THINK_END, False),
)
_MICRO_MAX_TOKENS = 512
_MICRO_PAD_ROWS_TO = 64  # embedding rows past the tokenizer, as Qwen3 has: ids that are no token


def _micro_corpus() -> list[str]:
    """Chats of the synthetic task with the default instruction: the words whose merges the tokenizer
    learns."""
    from rlvr.rewards import DEFAULT_INSTRUCTION
    from rlvr.synthetic import generate

    return [
        f"system\nuser\n{problem.question} {DEFAULT_INSTRUCTION}\nassistant\n{problem.reference}\n"
        for problem in generate(64, seed=0)
    ]


def micro_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE over the synthetic task's chats: any text encodes without unknowns, digits stay single
    tokens (so numbers are spelled digit by digit), and the task's few words become single tokens.

    The BPE trainer is deterministic for a fixed corpus, so the same code always yields the same ids.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_MICRO_MAX_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(_micro_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
        chat_template=CHATML_TEMPLATE,
    )
    for content, special in MICRO_ADDED_TOKENS:
        tokenizer.add_tokens([AddedToken(content, special=special, normalized=False)], special_tokens=special)
    tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
    return tokenizer


def _task_model(**shape) -> Callable[[], tuple[Qwen3Config, PreTrainedTokenizerBase]]:
    """A Qwen3 of the given shape over the synthetic task's own small tokenizer."""

    def build():
        tokenizer = micro_tokenizer()
        rows = -(-len(tokenizer) // _MICRO_PAD_ROWS_TO) * _MICRO_PAD_ROWS_TO
        config = Qwen3Config(
            vocab_size=rows,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
            bos_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **shape,
        )
        return config, tokenizer

    return build


TASK_PRESETS: dict[str, Callable[[], tuple[Qwen3Config, PreTrainedTokenizerBase]]] = {
    "micro": _task_model(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
    ),
    # ~25M parameters on the same tokenizer: the GPU scale's model, for multi-step, multi-digit problems
    "small": _task_model(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
    ),
}
