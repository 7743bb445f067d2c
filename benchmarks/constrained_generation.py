"""Cost of the thought constraint in generation: constrained vs unconstrained vs a naive re-decoding
constraint.

    python benchmarks/constrained_generation.py [--batch 8] [--new-tokens 256] [--repeats 3]

tiny-qwen3 with N = 151646 reasoning rows, sampling on CPU. "unconstrained" is the same expanded model with
the constraint detached from `generate`; "naive" decodes every sequence to text at every step and searches for
the tags, the approach the incremental thought state replaces.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from rlvr import load_model


class NaiveThoughtConstraint(LogitsProcessor):
    def __init__(self, tokenizer, vocab):
        self.tokenizer, self.vocab = tokenizer, vocab

    def __call__(self, input_ids, scores):
        texts = self.tokenizer.batch_decode(input_ids)
        inside = torch.tensor([t.rfind("<think>") > t.rfind("</think>") for t in texts])
        return self.vocab.mask_logits(scores, inside)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model, tokenizer = load_model("tiny-qwen3", reasoning_vocab_size=151646)
    model.eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 12 * 7 + 5? Think first."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    batch = tokenizer([prompt + "<think>\n"] * args.batch, return_tensors="pt")
    generate_kwargs = dict(
        **batch,
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=True,
        top_k=0,
        top_p=1.0,
    )

    def constrained():
        torch.manual_seed(0)
        model.generate(**generate_kwargs)

    constrained_hook = model._get_logits_processor

    def detached(extra_processors):
        """Generate with the constraint detached, plus `extra_processors`."""
        del model._get_logits_processor  # back to the class's own processor list
        try:
            torch.manual_seed(0)
            model.generate(**generate_kwargs, logits_processor=LogitsProcessorList(extra_processors))
        finally:
            model._get_logits_processor = constrained_hook

    def naive():
        detached([NaiveThoughtConstraint(tokenizer, model.reasoning_vocab)])

    with torch.inference_mode():
        results = {
            "unconstrained": timed(lambda: detached([]), args.repeats),
            "constrained": timed(constrained, args.repeats),
            "naive": timed(naive, args.repeats),
        }
    tokens = args.batch * args.new_tokens
    print(
        f"tiny-qwen3, N=151646, batch {args.batch} x {args.new_tokens} new tokens, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}"
    )
    for name, seconds in results.items():
        print(f"{name:>14}: {seconds:7.2f} s  ({tokens / seconds:7.1f} tokens/s)")
    print(f"constrained / unconstrained = {results['constrained'] / results['unconstrained']:.3f}")
    print(f"naive / constrained         = {results['naive'] / results['constrained']:.2f}")


if __name__ == "__main__":
    main()
