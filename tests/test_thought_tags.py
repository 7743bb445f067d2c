"""Models whose tokenizer has no `<think>`/`</think>` tokens get them when loaded (`rlvr.thought_tags`): with
and without padding rows, tied and untied embeddings, recorded so that a reload reads the same ids."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from rlvr import ReasoningVocabError, load_model, save_model, thoughts
from rlvr.presets.qwen3 import CHATML_TEMPLATE
from rlvr.surgery import enable_fast_rollouts
from rlvr.thought_tags import add_thought_tags, missing_thought_tags
from rlvr.thoughts import THINK_END, THINK_START
from rlvr.vocab import TOKEN_MAP_FILE

# ChatML as SmolLM2 writes it: no thought tags anywhere, the generation prompt last
PLAIN_CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHAT = [{"role": "user", "content": "What is 1+1? <think>"}]


def plain_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with ChatML control tokens and no thought tags, as most chat models have."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(["What is 1+1? 2. Let me think: <think> </think>"], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=PLAIN_CHATML)
    control = [
        AddedToken(t, special=True, normalized=False) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    ]
    tokenizer.add_tokens(control, special_tokens=True)
    tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
    return tokenizer


def shape(tokenizer, rows: int) -> dict:
    return dict(
        vocab_size=rows, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip


@pytest.fixture(scope="module")
def untied_llama(tmp_path_factory):
    """A Llama with untied embeddings and exactly the tokenizer's rows: the tags need new rows."""
    tokenizer = plain_tokenizer()
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("untied-llama")
    LlamaForCausalLM(
        LlamaConfig(**shape(tokenizer, len(tokenizer)), tie_word_embeddings=False)
    ).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tied_with_padding(tmp_path_factory):
    """A tied Qwen3 with 13 padding rows past the tokenizer: the tags take the first two of them."""
    tokenizer = plain_tokenizer()
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tied-padded")
    Qwen3ForCausalLM(
        Qwen3Config(**shape(tokenizer, len(tokenizer) + 13), tie_word_embeddings=True)
    ).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def weights(directory) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def test_a_tokenizer_without_tags_gets_both_as_whole_tokens_at_the_next_ids(untied_llama):
    before = AutoTokenizer.from_pretrained(untied_llama)
    assert missing_thought_tags(before) == [THINK_START, THINK_END]
    model, tokenizer = load_model(str(untied_llama))
    n = len(before)
    assert tokenizer.convert_tokens_to_ids([THINK_START, THINK_END]) == [n, n + 1]
    assert len(tokenizer) == n + 2 and missing_thought_tags(tokenizer) == []
    assert tokenizer.encode(f"a{THINK_START}b{THINK_END}c", add_special_tokens=False)[1:4:2] == [n, n + 1]
    # non-special, as Qwen3's: decoded text keeps them
    assert tokenizer.decode([n, n + 1], skip_special_tokens=True) == THINK_START + THINK_END
    vocab = model.reasoning_vocab
    assert (vocab.think_start_id, vocab.think_end_id) == (n, n + 1)
    assert vocab.tokenizer_size == len(tokenizer) == vocab.base_vocab_size == n + 2
    assert set(vocab.control_token_ids) == set(tokenizer.all_special_ids) | set(
        tokenizer.added_tokens_decoder
    )
    assert vocab.added_token_ids == (n, n + 1)
    assert (
        model.get_input_embeddings().weight.shape[0] == model.get_output_embeddings().weight.shape[0] == n + 2
    )
    assert model.config.vocab_size == n + 2


@pytest.mark.parametrize("matrix", ["model.embed_tokens.weight", "lm_head.weight"])
def test_new_rows_start_as_the_mean_of_the_spelled_out_tag(untied_llama, matrix):
    original = weights(untied_llama)[matrix]
    plain = AutoTokenizer.from_pretrained(untied_llama)
    model, tokenizer = load_model(str(untied_llama))
    rows = dict(model.named_parameters())[matrix]
    for tag in (THINK_START, THINK_END):
        pieces = plain.encode(tag, add_special_tokens=False)
        assert len(pieces) > 1
        torch.testing.assert_close(rows[tokenizer.convert_tokens_to_ids(tag)], original[pieces].mean(0))
    torch.testing.assert_close(rows[: len(plain)], original)  # every other row as it was


def test_padding_rows_are_used_first_and_ties_stay_tied(tied_with_padding):
    plain = AutoTokenizer.from_pretrained(tied_with_padding)
    rows = len(plain) + 13
    model, tokenizer = load_model(str(tied_with_padding))
    embedding = model.get_input_embeddings().weight
    assert (
        embedding.shape[0] == rows and model.get_output_embeddings().weight.data_ptr() == embedding.data_ptr()
    )
    assert tokenizer.convert_tokens_to_ids([THINK_START, THINK_END]) == [len(plain), len(plain) + 1]
    vocab = model.reasoning_vocab
    assert (vocab.tokenizer_size, vocab.base_vocab_size) == (len(plain) + 2, rows)
    forbidden = vocab.forbidden_table("cpu")
    assert not forbidden[:, len(plain) : len(plain) + 2].any()  # the tags may be sampled
    assert forbidden[:, len(plain) + 2 : rows].all()  # the rest of the padding stays padding


def test_the_chat_template_renders_and_the_thought_opens_in_the_completion(untied_llama):
    model, tokenizer = load_model(str(untied_llama))
    vocab = model.reasoning_vocab
    prompt = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")  # as before: the model opens its thought itself
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert vocab.think_start_id in ids[0].tolist()  # the user's <think> is the tag's id, yet opens nothing
    assert not thoughts.prompt_state(vocab, ids)[0]
    empty = tokenizer.apply_chat_template(
        CHAT, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert empty == prompt + f"{THINK_START}\n\n{THINK_END}\n\n"
    empty_ids = tokenizer(empty, add_special_tokens=False, return_tensors="pt")["input_ids"]
    tail = empty_ids[0, ids.shape[1] :].tolist()
    assert [i for i in tail if i in (vocab.think_start_id, vocab.think_end_id)] == [
        vocab.think_start_id,
        vocab.think_end_id,
    ]
    assert not thoughts.prompt_state(vocab, empty_ids)[0]
    opened = tokenizer(prompt + THINK_START, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert thoughts.prompt_state(vocab, opened)[0]  # a tag in the assistant turn opens the thought
    out = model.generate(**tokenizer(prompt, return_tensors="pt", add_special_tokens=False), max_new_tokens=5)
    assert out.shape[1] > ids.shape[1]


def test_a_saved_model_reloads_with_the_same_ids_map_and_logits(untied_llama, tmp_path):
    model, tokenizer = load_model(str(untied_llama), reasoning_vocab_size=7)
    assert model.reasoning_vocab.base_vocab_size == len(tokenizer)  # the tags first, then the reasoning rows
    save_model(model, tokenizer, tmp_path)
    saved = json.loads((tmp_path / TOKEN_MAP_FILE).read_text())
    assert saved["added_token_ids"] == list(model.reasoning_vocab.added_token_ids)
    assert AutoTokenizer.from_pretrained(tmp_path).convert_tokens_to_ids([THINK_START, THINK_END]) == [
        model.reasoning_vocab.think_start_id,
        model.reasoning_vocab.think_end_id,
    ]
    reloaded, again = load_model(str(tmp_path))
    assert reloaded.reasoning_vocab == model.reasoning_vocab and len(again) == len(tokenizer)
    ids = tokenizer("What is 1+1?<think>", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    # a baseline checkpoint growing a reasoning vocabulary later keeps the record
    baseline, baseline_tokenizer = load_model(str(untied_llama))
    save_model(baseline, baseline_tokenizer, tmp_path / "baseline")
    grown, _ = load_model(str(tmp_path / "baseline"), reasoning_vocab_size=3)
    assert grown.reasoning_vocab.added_token_ids == baseline.reasoning_vocab.added_token_ids


def test_a_map_whose_added_tags_the_tokenizer_lacks_is_refused(untied_llama, tmp_path):
    model, tokenizer = load_model(str(untied_llama))
    save_model(model, tokenizer, tmp_path)
    vocab = json.loads((tmp_path / TOKEN_MAP_FILE).read_text())
    vocab["added_token_ids"] = [3]  # an ordinary token, not an added thought tag
    (tmp_path / TOKEN_MAP_FILE).write_text(json.dumps(vocab))
    with pytest.raises(ReasoningVocabError, match=r"added_token_ids holds \[3\], which are not its thought"):
        load_model(str(tmp_path))


def test_a_tokenizer_with_both_tags_is_left_alone():
    model, tokenizer = load_model("micro")
    size, template = len(tokenizer), tokenizer.chat_template
    assert add_thought_tags(model, tokenizer) == () and model.reasoning_vocab.added_token_ids == ()
    assert len(tokenizer) == size and tokenizer.chat_template == template == CHATML_TEMPLATE


def test_the_fast_rollout_path_decodes_a_tag_added_llama_as_generate_does(untied_llama):
    model, tokenizer = load_model(str(untied_llama), reasoning_vocab_size=5)
    enable_fast_rollouts(model, compile=False)
    tokenizer.padding_side = "left"
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "1+1?" * n}], tokenize=False, add_generation_prompt=True
        )
        for n in (1, 3)
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    config = GenerationConfig(
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    served = model.fast_rollout.calls
    fast = model.eval().generate(**batch, generation_config=config)
    assert model.fast_rollout.calls == served + 1
    assert torch.equal(fast, type(model).generate(model, **batch, generation_config=config))
