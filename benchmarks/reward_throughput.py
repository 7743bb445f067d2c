"""Reward throughput: completions scored per second by the accuracy and format rewards, on completions of the
form the demo's policy writes, called as TRL's trainer calls them (one batch of a rollout at a time).

    python benchmarks/reward_throughput.py [--problems 200] [--batch 64] [--repeats 3] [--thread] [--costly]

The completions are the worked solutions of the demo's synthetic task (`synthetic:count=6000,digits=1,
errors=0.3`, what the warm start imitates) tokenized by `micro`'s tokenizer, in three kinds per problem: as
written (their answer is right), with the boxed answer off by one (wrong), and cut off before the answer (no
answer), so a third of them are correct, as early in GRPO. `--thread` scores from another thread, as a server
worker or a thread pool would. `--costly` scores one GRPO group of 8 answers instead, one of each shape whose
value sympy would compute for seconds (a tower, a bracketed base, a product exponent, a factorial, a binomial,
a fraction of a factorial, a root of a large number, a power of a sum). Prints the first batch's seconds (the
reader starting) and the median rate over the repeats once warm.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import threading
import time

from rlvr import load_model
from rlvr.dataset import load_split
from rlvr.preprocess import Options, preprocess
from rlvr.rewards import reward_functions

DEMO_SOURCE = "synthetic:count={count},digits=1,errors=0.3"
BOXED = re.compile(r"\\boxed\{(-?\d+)\}")
COSTLY = ["9^{9^{9}}", "(2^{10})^{10^{7}}", "9^{999*9999}", "1000000!", "\\binom{10^{6}}{10^{5}}",
          "\\frac{1000000!}{2}", "\\sqrt{2^{3000}+1}", "(x+1)^{200}"]  # fmt: skip


def completions(problems: int) -> tuple[list[str], list[str]]:
    """(completion texts, their problems' solutions): right, wrong and cut off, per problem."""
    with tempfile.TemporaryDirectory() as scratch:
        preprocess(DEMO_SOURCE.format(count=problems), scratch, Options(test_size=0, instruction=""))
        frame = load_split(scratch, "train").frame
    texts, solutions = [], []
    for reference, solution in zip(frame["reference"], frame["solution"], strict=True):
        wrong = BOXED.sub(lambda m: f"\\boxed{{{int(m[1]) + 1}}}", reference)
        cut = reference[: reference.index("</think>")]
        texts += [reference, wrong, cut]
        solutions += [solution] * 3
    return texts, solutions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64, help="completions per reward call (one rollout)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--thread", action="store_true", help="score from a thread other than the main one")
    parser.add_argument("--costly", action="store_true", help="score one group of costly answers instead")
    args = parser.parse_args()

    _, tokenizer = load_model("micro")
    if args.costly:
        texts = [f"<think>so</think>\n\nThe answer is \\boxed{{{answer}}}." for answer in COSTLY]
        solutions = ["7"] * len(texts)
    else:
        texts, solutions = completions(args.problems)
    ids = [tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eos_token_id] for t in texts]
    starts = range(0, len(ids), args.batch)
    batches = [(ids[i : i + args.batch], solutions[i : i + args.batch]) for i in starts]
    rewards = reward_functions(tokenizer)

    def score(batch_ids, batch_solutions) -> list[float]:
        texts = [""] * len(batch_ids)  # the rewards read ids; TRL also passes the decoded text
        scores = [reward(texts, completion_ids=batch_ids, solution=batch_solutions) for reward in rewards]
        return [sum(values) for values in zip(*scores, strict=True)]

    def measure() -> dict:
        started = time.perf_counter()
        score(*batches[0])
        first = time.perf_counter() - started
        rates, total = [], 0.0
        for _ in range(args.repeats):
            started = time.perf_counter()
            total = sum(sum(score(*batch)) for batch in batches)
            rates.append(len(ids) / (time.perf_counter() - started))
        return {"first_batch_s": round(first, 3), "completions_per_s": round(statistics.median(rates), 1),
                "rates": [round(r, 1) for r in rates], "reward_sum": total}  # fmt: skip

    result: dict = {}
    if args.thread:
        worker = threading.Thread(target=lambda: result.update(measure()))
        worker.start()
        worker.join()
    else:
        result = measure()
    print(json.dumps({"completions": len(ids), "batch": args.batch, "thread": args.thread, **result}))


if __name__ == "__main__":
    main()
