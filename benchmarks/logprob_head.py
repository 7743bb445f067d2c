"""Time and memory of the constrained log-prob head alone: the fused head against the heads it replaced.

    python benchmarks/logprob_head.py                          # qwen3-0.6b-shape, N = 151646, 4096 tokens
    python benchmarks/logprob_head.py --preset tiny-qwen3 --tokens 1024   # on a CPU

Heads (`--heads`, default all three):
- `fused`: `rlvr.logprobs.constrained_token_logprobs`, tiles recomputed in the backward pass (compiled on a
  GPU);
- `previous`: the head before it: tokens split by thought state with `nonzero`; outside a thought TRL's
  chunked kernel over the tokenizer's rows, inside checkpointed chunks of 2**26 fp32 logits over all rows;
- `materialised`: the whole (tokens, vocabulary) logits, masked and normalised at once.

Inputs as the training forward gives them: fp32 hidden states (T, hidden) and an fp32 unembedding of the
preset's rows plus `--reasoning-vocab-size` reasoning rows (HF's N(0, 0.02) init), under bf16 autocast on a
GPU (fp32 on a CPU, where training runs without autocast too). Tokens are sequences of `--sequence`
positions whose first `--inside` share lies inside a thought; labels are allowed ids drawn uniformly. Per
head: one warm-up pass (it compiles), then the median of `--repeats` forward + backward passes (a loss on
the log-probs; the entropy computed, as TRL asks, without a gradient) and of no-grad forwards (the
old-policy pass); peak memory above the inputs (GPU: allocated bytes; CPU: the resident set's high-water
mark, each head in a fresh process). Prints one JSON line per head.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from trl.kernels import ChunkedLogProbFunction
from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

from rlvr.logprobs import constrained_token_logprobs
from rlvr.presets import PRESETS
from rlvr.vocab import ReasoningVocab

HEADS = ("fused", "previous", "materialised")
_PREVIOUS_CHUNK = 2**26


def previous_head(hidden, weight, labels, vocab, inside, temperature):
    """The head `fused` replaced, as it was: split by state, TRL's kernel outside, checkpointed chunks
    inside."""
    log_probs = hidden.new_zeros(labels.shape, dtype=torch.float32)
    entropies = hidden.new_zeros(labels.shape, dtype=torch.float32)
    forbidden = vocab.forbidden_table(weight.device)[1]
    for state in (False, True):
        index = torch.nonzero(inside == state).flatten()
        if index.numel() == 0:
            continue
        if state:
            chunk = max(1, _PREVIOUS_CHUNK // weight.shape[0])
            parts = [
                checkpoint(
                    _masked_chunk,
                    hidden[index[start : start + chunk]],
                    weight,
                    labels[index[start : start + chunk]],
                    forbidden,
                    temperature,
                    use_reentrant=False,
                )
                if torch.is_grad_enabled()
                else _masked_chunk(
                    hidden[index[start : start + chunk]],
                    weight,
                    labels[index[start : start + chunk]],
                    forbidden,
                    temperature,
                )
                for start in range(0, index.numel(), chunk)
            ]
            lp, ent = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        else:
            lp, ent, *_ = ChunkedLogProbFunction.apply(
                hidden[index],
                weight[: vocab.tokenizer_size],
                None,
                labels[index],
                temperature,
                _CHUNKED_LOGPROB_CHUNK_SIZE,
                None,
                1.0,
                ("log_probs", "entropy"),
            )
        log_probs = log_probs.index_copy(0, index, lp)
        entropies = entropies.index_copy(0, index, ent)
    return log_probs, entropies


def _masked_chunk(hidden, weight, labels, forbidden, temperature):
    logits = (F.linear(hidden, weight).float() / temperature).masked_fill(
        forbidden, torch.finfo(torch.float32).min
    )
    log_z = logits.logsumexp(-1)
    probs = torch.softmax(logits, -1)
    return logits.gather(-1, labels[:, None]).squeeze(-1) - log_z, log_z - (probs * logits).sum(-1)


def materialised_head(hidden, weight, labels, vocab, inside, temperature):
    """All logits at once: the cost every chunked head avoids."""
    logits = vocab.mask_logits(F.linear(hidden, weight).float() / temperature, inside)
    log_p = logits.log_softmax(-1)
    return log_p.gather(-1, labels[:, None]).squeeze(-1), -(log_p.exp() * logits).sum(-1) + logits.logsumexp(
        -1
    )


def fused_head(hidden, weight, labels, vocab, inside, temperature):
    return constrained_token_logprobs(hidden, weight, None, labels, vocab, inside, temperature)


def _inputs(args, device):
    config, tokenizer = PRESETS[args.preset]()
    vocab = ReasoningVocab.for_tokenizer(tokenizer, config.vocab_size, args.reasoning_vocab_size)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, config.hidden_size, generator=generator)
    weight = torch.randn(vocab.total_size, config.hidden_size, generator=generator) * 0.02
    position = torch.arange(args.tokens) % args.sequence
    inside = position < args.inside * args.sequence
    allowed = [(~row).nonzero().squeeze(1) for row in vocab.forbidden_table("cpu")]  # per state
    draws = [ids[torch.randint(len(ids), (args.tokens,), generator=generator)] for ids in allowed]
    labels = torch.where(inside, draws[1], draws[0])
    advantages = torch.randn(args.tokens, generator=generator)
    hidden, weight = hidden.to(device).requires_grad_(), weight.to(device).requires_grad_()
    return vocab, hidden, weight, labels.to(device), inside.to(device), advantages.to(device)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device) -> int:
    """Start a new peak-memory window; returns the bytes in use now. On a CPU: the resident set, whose
    high-water mark Linux resets on request (`clear_refs`); with every allocation above 64 KiB mapped on its
    own (MALLOC_MMAP_THRESHOLD_, set by `main`), freed memory leaves the resident set at once."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def _peak(device) -> int:
    return torch.cuda.max_memory_allocated() if device == "cuda" else _status_kib("VmHWM") * 1024


def _status_kib(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1])


def measure(args, name: str) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vocab, hidden, weight, labels, inside, advantages = _inputs(args, device)
    head = {"fused": fused_head, "previous": previous_head, "materialised": materialised_head}[name]
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def train_pass():
        hidden.grad = weight.grad = None
        with autocast:
            log_probs, entropy = head(hidden, weight, labels, vocab, inside, args.temperature)
        (log_probs * advantages).sum().backward()
        return entropy

    def no_grad_pass():
        with torch.no_grad(), autocast:
            head(hidden, weight, labels, vocab, inside, args.temperature)

    def timed(fn):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - start

    first = timed(train_pass)  # compiles, and maps in the code every later pass runs
    base = _reset_peak(device)
    train = statistics.median(timed(train_pass) for _ in range(args.repeats))
    no_grad = statistics.median(timed(no_grad_pass) for _ in range(args.repeats))
    peak = _peak(device) - base
    return {
        "head": name,
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "preset": args.preset,
        "vocabulary_rows": vocab.total_size,
        "tokens": args.tokens,
        "inside_share": args.inside,
        "first_pass_s": round(first, 3),
        "forward_backward_s": round(train, 4),
        "no_grad_forward_s": round(no_grad, 4),
        "peak_gib": round(peak / 2**30, 3),
        "logits_gib_if_materialised": round(args.tokens * vocab.total_size * 4 / 2**30, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="qwen3-0.6b-shape", choices=sorted(PRESETS))
    parser.add_argument("--reasoning-vocab-size", type=int, default=151646)
    parser.add_argument("--tokens", type=int, default=4096, help="scored tokens (one micro-batch of 8 x 512)")
    parser.add_argument("--sequence", type=int, default=512)
    parser.add_argument("--inside", type=float, default=0.5, help="share of each sequence inside a thought")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--heads", default=",".join(HEADS), help=f"comma-separated, of {', '.join(HEADS)}")
    args = parser.parse_args()
    heads = [h for h in args.heads.split(",") if h]
    if unknown := set(heads) - set(HEADS):
        parser.error(f"unknown heads {sorted(unknown)}; choose from {', '.join(HEADS)}")
    if (
        len(heads) > 1 and not torch.cuda.is_available()
    ):  # a fresh process per head: its own RSS high-water mark
        for name in heads:
            command = [sys.executable, __file__, *_without_heads(sys.argv[1:]), "--heads", name]
            subprocess.run(command, check=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
        return
    for name in heads:
        print(json.dumps(measure(args, name)), flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _without_heads(argv: list[str]) -> list[str]:
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--heads":
            skip = True
        elif not item.startswith("--heads="):
            out.append(item)
    return out


if __name__ == "__main__":
    main()
