"""Thought tags for models that were not trained with them: `<think>` and `</think>` added as tokens.

rlvr reads every thought from the two tag ids (`rlvr.thoughts`), so a model whose tokenizer spells the tags in
ordinary tokens (Llama, Gemma, SmolLM and most chat models) gets them as tokens of their own when it is
loaded. The rule, the same for every architecture:

- Each missing tag becomes an added token, non-special as Qwen3's are (decoded text keeps it), matched whole
  in any text, chat-templated prompts included. Its id is the next free one, `len(tokenizer)`: where the
  embedding has rows past the tokenizer (padding rows), the tag takes the first of them; otherwise the input
  and output embeddings grow by the rows needed. Either way the tokenizer never outgrows the embedding.
- A new row starts as the mean of the rows of the tokens that spell the tag (`<`, `think`, `>`), in the input
  embedding and, when it is not tied to it, the output embedding (bias likewise): the model first reads the
  tag as it read its text, and scores it no higher than the pieces it replaces.
- The chat template is kept, so prompts render as before and the model opens its thought itself, as
  Qwen3's template has it by default; `enable_thinking=False` adds the empty thought
  `<think>\\n\\n</think>\\n\\n` after the generation prompt, as Qwen3's template does.

The ids added are recorded in the token map (`ReasoningVocab.added_token_ids`), which every saved checkpoint
carries beside a tokenizer that holds the tags at the same ids, so a reload reads the same ids, which the
map's checks against the tokenizer verify (`ReasoningVocab.check_tokenizer`).
"""

from __future__ import annotations

import logging

import torch
from tokenizers import AddedToken
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlvr.thoughts import THINK_END, THINK_START
from rlvr.vocab import ReasoningVocabError, thought_tag_ids

log = logging.getLogger(__name__)

# After Qwen3's template: with `enable_thinking=False` the generation prompt carries an empty thought.
EMPTY_THOUGHT_CLAUSE = (
    "{%- if add_generation_prompt and enable_thinking is defined and enable_thinking is false %}"
    "{{- '" + THINK_START + "\\n\\n" + THINK_END + "\\n\\n' }}"
    "{%- endif %}"
)


def missing_thought_tags(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The tags that are not single tokens of `tokenizer`, which text containing them would not encode to."""
    ids = thought_tag_ids(tokenizer)
    return [
        tag
        for tag, token_id in zip((THINK_START, THINK_END), ids, strict=True)
        if token_id is None or tokenizer.encode(tag, add_special_tokens=False) != [token_id]
    ]


def add_thought_tags(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """Give `tokenizer` (and `model`'s embeddings) the thought tags it lacks, in place; returns the new ids
    (none when it has both)."""
    missing = missing_thought_tags(tokenizer)
    if not missing:
        return ()
    spelled = {tag: tokenizer.encode(tag, add_special_tokens=False) for tag in missing}
    tokenizer.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in missing])
    added = tuple(tokenizer.convert_tokens_to_ids(missing))
    if sorted(added) != list(range(len(tokenizer) - len(missing), len(tokenizer))):
        raise ReasoningVocabError(
            f"adding {missing} to the tokenizer gave ids {list(added)}, not the next free ones; its added "
            "tokens are inconsistent: repair the tokenizer files."
        )
    _grow_embeddings(model, len(tokenizer))
    _initialise_rows(model, {token_id: spelled[tag] for tag, token_id in zip(missing, added, strict=True)})
    _add_empty_thought_clause(tokenizer)
    log.info(
        "the tokenizer had no single-token %s; added as ids %s, rows initialised from the spelled-out tags",
        " and ".join(missing),
        ", ".join(map(str, added)),
    )
    return added


def _grow_embeddings(model: PreTrainedModel, token_ids: int) -> None:
    """Enough embedding rows for `token_ids` ids; padding rows past the tokenizer are used first."""
    rows = model.get_input_embeddings().weight.shape[0]
    if token_ids > rows:
        model.resize_token_embeddings(token_ids, mean_resizing=False)


@torch.no_grad()
def _initialise_rows(model: PreTrainedModel, pieces: dict[int, list[int]]) -> None:
    """Row `id` of the input and output embeddings (and the output bias): the mean of the rows of
    `pieces[id]`."""
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    untied = output is not None and output.weight.data_ptr() != embedding.data_ptr()
    for token_id, spelled in pieces.items():
        embedding[token_id] = embedding[spelled].mean(0)
        if untied:
            output.weight[token_id] = output.weight[spelled].mean(0)
            if getattr(output, "bias", None) is not None:
                output.bias[token_id] = output.bias[spelled].mean()


def _add_empty_thought_clause(tokenizer: PreTrainedTokenizerBase) -> None:
    """Let `enable_thinking=False` render an empty thought after the generation prompt. The clause goes at
    the template's end, which is where the generation prompt is only when the prompt with it extends the
    prompt without it; any other template is kept unchanged."""
    template = tokenizer.chat_template
    if not isinstance(template, str) or "enable_thinking" in template:
        return
    chat = [{"role": "user", "content": "1+1?"}]
    try:
        plain = tokenizer.apply_chat_template(chat, tokenize=False)
        prompted = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    except Exception as error:  # a template that cannot render a user turn is the model's own business
        log.warning("chat template left unchanged: it does not render a user message (%s)", error)
        return
    if prompted.startswith(plain) and prompted != plain:
        tokenizer.chat_template = template + EMPTY_THOUGHT_CLAUSE
