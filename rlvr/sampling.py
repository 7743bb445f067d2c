"""The sampling rules: which options each use of the sampler may take, and the request the fast decoder
serves.

Training and evaluation sample under the same thought constraint, but they may not ask for the same things:

- **Training** scores every sampled token with the GRPO loss, which computes log-probs under the masked
  softmax at the sampling temperature (`rlvr.logprobs`). Any option that reshapes that distribution (top-k,
  top-p, min-p, penalties, ...) would make the loss score another distribution than the one sampled, so
  training refuses it (`training_changes`), and the temperature the loss scores at must be the one that
  samples.
- **Evaluation** scores no loss, so it may also truncate the distribution with top-k and top-p, as papers'
  protocols do (e.g. T = 0.6, top-p 0.95). The fast decoder applies them exactly as Hugging Face's warpers do,
  in their order: the thought mask first, then temperature, then top-k, then top-p (`Sampling`).

The fast decoder (`rlvr.rollout`) and the GRPO trainer (`rlvr.grpo`) both ask this module; it imports nothing
but `rlvr.errors`, so asking it loads no model code.

Generation configs are read through their `to_dict()` and `do_sample`: an allowlist (`HARMLESS_FIELDS`) names
the fields that may hold any value, `SAMPLING_NEUTRAL` the values that leave the distribution alone; any other
field that is set counts as a change, so an option added to Hugging Face later is refused until it is listed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

from rlvr.errors import InputError

# Generation fields that may hold any value: they change neither which tokens may be drawn nor their
# probabilities, and the fast path honours them (lengths, special ids, cache and compile settings).
HARMLESS_FIELDS = frozenset(
    {
        "max_length",
        "max_new_tokens",
        "do_sample",
        "temperature",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "decoder_start_token_id",
        "use_cache",
        "cache_implementation",
        "cache_config",
        "max_cache_len",
        "compile_config",
        "disable_compile",
        "transformers_version",
        "_from_model_config",
        "early_stopping",
        "length_penalty",
        "num_assistant_tokens",
        "num_assistant_tokens_schedule",
        "assistant_confidence_threshold",
        "assistant_lookbehind",
        "target_lookbehind",
        "prefill_chunk_size",
    }
)
# Fields that change the sampled distribution unless they hold one of these values (None always does nothing).
SAMPLING_NEUTRAL = {
    "top_k": (0,),
    "top_p": (1.0,),
    "min_p": (0.0,),
    "top_h": (),
    "typical_p": (1.0,),
    "epsilon_cutoff": (0.0,),
    "eta_cutoff": (0.0,),
    "repetition_penalty": (1.0,),
    "encoder_repetition_penalty": (1.0,),
    "no_repeat_ngram_size": (0,),
    "encoder_no_repeat_ngram_size": (0,),
    "min_length": (0,),
    "min_new_tokens": (0,),
    "renormalize_logits": (False,),
    "remove_invalid_values": (False,),
    "guidance_scale": (1.0,),
    "num_beams": (1,),
    "num_beam_groups": (1,),
    "diversity_penalty": (0.0,),
    "bad_words_ids": (),
    "suppress_tokens": (),
    "begin_suppress_tokens": (),
    "sequence_bias": (),
    "forced_bos_token_id": (),
    "forced_eos_token_id": (),
    "exponential_decay_length_penalty": (),
    "watermarking_config": (),
    "penalty_alpha": (),
    "dola_layers": (),
    "constraints": (),
    "force_words_ids": (),
    "token_healing": (False,),
    "low_memory": (False,),
    "use_mtp": (False,),
}
# Fields that leave the distribution alone but ask for output or stopping rules the fast path does not give.
OUTPUT_NEUTRAL = {
    "num_return_sequences": (1,),
    "output_attentions": (False,),
    "output_hidden_states": (False,),
    "output_scores": (False,),
    "output_logits": (False,),
    "return_dict_in_generate": (False,),
    "stop_strings": (),
    "max_time": (),
    "is_assistant": (False,),
    "prompt_lookup_num_tokens": (),
    "max_matching_ngram_size": (),
    "assistant_early_exit": (),
    "speculation_type": (),
    "assistant_ensemble_weight": (),
    "continuous_batching_config": (),
}
# Fields that act only when sampling (`generate`'s warpers): greedy decoding ignores them.
WARPERS = frozenset({"top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff"})
# The warpers evaluation may use: the fast decoder applies them as Hugging Face's do.
EVALUATION_WARPERS = frozenset({"top_k", "top_p"})
_HANDLED_KWARGS = {"input_ids", "attention_mask", "generation_config"}


class GenerationFields(Protocol):
    """What is read of a generation config (`transformers.GenerationConfig` is one)."""

    do_sample: bool
    temperature: float | None
    max_new_tokens: int | None

    def to_dict(self) -> dict[str, Any]: ...


def _unneutral(config: GenerationFields, neutral: dict, exempt: frozenset = frozenset()) -> list[str]:
    values = config.to_dict()
    ignored = (frozenset() if config.do_sample else WARPERS) | exempt
    return [
        f"{name}={values[name]!r}"
        for name in sorted(neutral.keys() - ignored)
        if values.get(name) is not None and values[name] not in neutral[name]
    ]


def distribution_changes(config: GenerationFields) -> list[str]:
    """`name=value` for each field of a resolved generation config that changes the sampled distribution away
    from the masked softmax at `temperature`, which is what the GRPO loss scores. An allowlist: a field that
    is neither harmless nor known with its neutral values counts as a change whenever it is set."""
    known = HARMLESS_FIELDS | SAMPLING_NEUTRAL.keys() | OUTPUT_NEUTRAL.keys()
    unknown = [f"{k}={v!r}" for k, v in config.to_dict().items() if k not in known and v is not None]
    return _unneutral(config, SAMPLING_NEUTRAL) + sorted(unknown)


def training_changes(config: GenerationFields, temperature: float) -> list[str]:
    """What a training rollout would sample differently from what its loss scores at `temperature`: every
    `distribution_changes` entry, and another temperature. The temperature has one value in training, the
    trainer's: the rollouts' request carries it, and the loss head reads it from that request."""
    changes = distribution_changes(config)
    if config.temperature != temperature:
        changes.append(f"temperature={config.temperature}")
    return changes


def evaluation_changes(config: GenerationFields) -> list[str]:
    """What the fast decoder cannot serve for an evaluation: `distribution_changes` less top-k and top-p."""
    return [c for c in distribution_changes(config) if c.split("=", 1)[0] not in EVALUATION_WARPERS]


def plain_request(config: GenerationFields, kwargs: dict) -> bool:
    """Whether a `generate` call (its config resolved as `generate` resolves it) asks for nothing but sampling
    (or greedy decoding) at a temperature, to a token budget: the training requests that `model.generate`
    sends to the fast path, which records each token's log-prob under exactly that distribution."""
    if set(kwargs) - _HANDLED_KWARGS or kwargs.get("input_ids") is None or config.max_new_tokens is None:
        return False
    return not distribution_changes(config) and not _unneutral(config, OUTPUT_NEUTRAL)


def check_sampling(temperature: float, num_samples: int) -> None:
    """Refuse a non-finite or negative temperature, and several samples that greedy decoding would repeat."""
    if not math.isfinite(temperature):
        raise InputError(
            f"temperature={temperature} is not a finite number; pass e.g. 0.6, or 0 for greedy decoding."
        )
    if temperature < 0:
        raise InputError(
            f"temperature={temperature} is negative; pass 0 for greedy decoding or a positive value."
        )
    if temperature == 0 and num_samples > 1:
        raise InputError(
            f"temperature=0 decodes greedily, so the num_samples={num_samples} samples would be identical; "
            "pass num_samples=1 or a positive temperature."
        )


@dataclass(frozen=True)
class Sampling:
    """What the fast decoder samples from, in Hugging Face's order: the thought mask, then `temperature`
    (0: greedy, which ignores the rest), then `top_k` (0: off), then `top_p` (1: off).

    `top_k` keeps the tokens whose score is at least the k-th largest; `top_p` then keeps the most probable
    tokens, in order, while the mass before them is below `top_p` (so at least one), and renormalises.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def truncates(self) -> bool:
        """Whether top-k or top-p reshape the distribution (only when sampling)."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1)

    def check(self, num_samples: int = 1) -> Sampling:
        """This request, refused with one line naming the option when it is not one."""
        check_sampling(self.temperature, num_samples)
        if not 0 < self.top_p <= 1:  # NaN fails this too
            raise InputError(
                f"top_p={self.top_p} is not in (0, 1]; pass e.g. 0.95, or 1 to turn nucleus sampling off."
            )
        if self.top_k < 0:
            raise InputError(f"top_k={self.top_k} is negative; pass 0 to turn top-k sampling off.")
        return self

    @classmethod
    def from_config(cls, config: GenerationFields) -> Sampling:
        """The request a resolved generation config makes (greedy when it does not sample)."""
        if not config.do_sample:
            return cls(temperature=0.0)
        values = config.to_dict()
        return cls(
            temperature=float(values.get("temperature") or 1.0),
            top_p=float(values["top_p"]) if values.get("top_p") is not None else 1.0,
            top_k=int(values.get("top_k") or 0),
        )
