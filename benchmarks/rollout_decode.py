"""Milliseconds per decode step of a rollout: the fast path (compiled static-cache step) against HF
`generate`, on a decoding copy with fused projections or without.

    python benchmarks/rollout_decode.py                       # qwen3-0.6b-shape, 64 x 512 new tokens, N = 0
    python benchmarks/rollout_decode.py --batch 64,256 --fused both --repeats 1 --budget 300
    python benchmarks/rollout_decode.py --reasoning-vocab-size 151646 --new-tokens 4096
    python benchmarks/rollout_decode.py --attention sdpa      # decode under the model's own SDPA attention
    python benchmarks/rollout_decode.py --profile             # plus kernels of one rollout and the floor
    python benchmarks/rollout_decode.py --top-p 0.95 --temperature 0.6 --reasoning-vocab-size 151646 \
        --batch 500 --new-tokens 1024 --profile                # evaluation's path: keyed noise, top-p
    python benchmarks/rollout_decode.py --top-p 0.95 --temperature 0.6 --reasoning-vocab-size 151646 \
        --batch 500 --new-tokens 1024 --waves 3 --profile      # ... with slots refilled, as an evaluation

Builds the preset with random weights in fp32 (as training holds it), attaches the reasoning vocabulary and
turns fast rollouts on with a bf16 decoding copy, exactly as the GRPO trainer does; `--fused false` keeps the
copy's projections apart (as before `rlvr.fused_decode`). Random weights never emit EOS, so every rollout
decodes all `--new-tokens`. Each configuration (batch x fused) gets a fresh copy and compiles its own step;
`--budget` starts none once less than `--reserve` seconds are left. Prints one JSON line per configuration:
per-step milliseconds (median of `--repeats` rollouts after a warm-up one that compiles), tokens/s, peak GPU
memory, and with `--hf` the same for `generate` under bf16 autocast. `--top-p` below 1 decodes through
evaluation's path instead (`FastRollout.sample`: noise keyed per sequence, top-p, `--waves` samples per
prompt through `--batch` slots, so the first wave starts together and each later one refills the slots as
the one before ends), which training's `generate` cannot ask for. There a step is counted as `--batch`
tokens: `--waves` x `--new-tokens` steps per rollout, and `loop_s_per_rollout` splits the loop's host
time by part (`rlvr.rollout.LoopTimes`: `wait` is the host waiting for the device; the rest leaves the
device idle once the steps it queued are done).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import profiling
import torch
from transformers import GenerationConfig

from rlvr import block_attention, fused_decode, rollout
from rlvr.models import load_model
from rlvr.sampling import Sampling
from rlvr.surgery import enable_fast_rollouts


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="qwen3-0.6b-shape")
    parser.add_argument("--reasoning-vocab-size", type=int, default=0)
    parser.add_argument(
        "--batch", default="64", help="sequences per rollout; a comma-separated list runs each"
    )
    parser.add_argument(
        "--fused",
        default="true",
        help="decode on a copy with fused QKV and gate/up projections: true, false, or both",
    )
    parser.add_argument(
        "--blocks",
        default="true",
        help="the compiled step attends by cache blocks (rlvr.block_attention): true (the default), false "
        "(dense over the whole ring), or both",
    )
    parser.add_argument(
        "--kernel-options",
        choices=("project", "torch", "both"),
        default="project",
        help="block attention's Triton options: the project's (rlvr.block_attention.KERNEL_OPTIONS), "
        "torch's own choice, or both, one after the other",
    )
    parser.add_argument("--top-p", type=float, default=1.0, help="below 1: evaluation's path, with top-p")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--prompt-length", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--waves",
        type=int,
        default=1,
        help="with --top-p below 1: samples per prompt, so slots are refilled this many times over",
    )
    parser.add_argument(
        "--attention",
        choices=("decode", "sdpa"),
        default="decode",
        help="decode: the rollout's packed grouped-query attention; sdpa: the model's own",
    )
    parser.add_argument(
        "--kv-bucket",
        type=int,
        default=rollout.KV_BUCKET,
        help="cache positions a decode step reads, rounded up to this; 0 reads the whole cache",
    )
    parser.add_argument("--hf", action="store_true", help="also time HF generate (slow)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile one more rollout: GPU kernel time against wall time, the top kernels, and the floor "
        "set by the bytes a step must move",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=0,
        help="seconds: start no further configuration once less than --reserve of them is left (0: no limit)",
    )
    parser.add_argument(
        "--reserve", type=float, default=75, help="seconds one configuration is expected to take"
    )
    args = parser.parse_args()
    if args.waves < 1 or (args.waves > 1 and args.top_p >= 1):
        parser.error("--waves must be at least 1, and above 1 only with --top-p below 1 (evaluation's path)")
    choices = {"true": [True], "false": [False], "both": [True, False]}
    for option in ("fused", "blocks"):
        if getattr(args, option) not in choices:
            parser.error(f"--{option} must be true, false or both")
    fused_choices, block_choices = choices[args.fused], choices[args.blocks]
    kernel_choices = ["project", "torch"] if args.kernel_options == "both" else [args.kernel_options]
    project_options = dict(block_attention.KERNEL_OPTIONS)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # a CPU run only checks that the script works
    if args.attention == "sdpa":
        rollout.DECODE_ATTENTION = "sdpa"
    rollout.KV_BUCKET = args.kv_bucket or 1 << 30
    deadline = time.monotonic() + args.budget if args.budget else None

    model, tokenizer = load_model(args.preset, args.reasoning_vocab_size, device=device)
    fusable = fused_decode.FUSABLE
    for batch in (int(b) for b in args.batch.split(",")):
        configurations = ((f, b, k) for f in fused_choices for b in block_choices for k in kernel_choices)
        for fused, blocks, kernel in configurations:
            if deadline is not None and deadline - time.monotonic() < args.reserve:
                skipped = {"batch": batch, "fused": fused, "blocks": blocks, "kernel_options": kernel}
                print(json.dumps({"skipped": skipped, "reason": "budget"}), flush=True)
                continue
            fused_decode.FUSABLE = fusable if fused else {}
            block_attention.KERNEL_OPTIONS = project_options if kernel == "project" else {}
            measure(model, tokenizer, args, batch, fused, blocks, device)
            model.fast_rollout = None  # the next configuration builds its own copy and compiles its own step
            torch._dynamo.reset()
            if device == "cuda":
                torch.cuda.empty_cache()


def measure(model, tokenizer, args, batch: int, fused: bool, blocks: bool, device: str) -> None:
    """One rollout configuration: a fresh decoding copy (fused or not) and its compiled step (attending by
    blocks or densely), timed."""
    enable_fast_rollouts(model, dtype=torch.bfloat16)
    model.fast_rollout.blocks = blocks if device == "cuda" else False  # eagerly, a step reads what is in use
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, len(tokenizer) - 1000, (batch, args.prompt_length), generator=generator).to(
        device
    )
    mask = torch.ones_like(prompt)
    mask[: batch // 2, : args.prompt_length // 4] = 0  # left padding in half the rows, as in a batch
    # top_k=0 and top_p=1.0 as TRL passes them: left unset, `generate` would fill in its default top_k=50,
    # and the request would go to HF `generate` instead of the fast path
    config = GenerationConfig(
        do_sample=True,
        temperature=args.temperature,
        max_new_tokens=args.new_tokens,
        top_k=0,
        top_p=1.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )

    def fast():
        if args.top_p < 1:  # evaluation's path: FastRollout.sample, keyed noise and top-p
            rows = [
                row[mask_row.bool()].tolist() for row, mask_row in zip(prompt.cpu(), mask.cpu(), strict=True)
            ]
            sampled = model.fast_rollout.sample(
                rows, Sampling(args.temperature, top_p=args.top_p), samples=args.waves,
                max_new_tokens=args.new_tokens,
                stop_ids=[], pad_id=tokenizer.pad_token_id, seed=0, batch_size=batch, device=device,
            )  # fmt: skip
            assert all(s.emitted == args.new_tokens for p in sampled for s in p), "a sequence stopped early"
            return
        served = model.fast_rollout.calls
        out = model.generate(input_ids=prompt, attention_mask=mask, generation_config=config)
        assert out.shape[1] == args.prompt_length + args.new_tokens, out.shape
        assert model.fast_rollout.calls == served + 1, "the request fell back to HF generate"

    compile_seconds = _timed(fast)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.fast_rollout.loop = rollout.LoopTimes()
    seconds = statistics.median(_timed(fast) for _ in range(args.repeats))
    loop = model.fast_rollout.loop  # evaluation's path only: its loop's host time, by part
    steps = args.waves * args.new_tokens  # steps of `batch` tokens each
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "preset": args.preset,
        "reasoning_vocab_size": args.reasoning_vocab_size,
        "batch": batch,
        "fused": fused,
        "blocks": bool(model.fast_rollout.blocks),
        "new_tokens": args.new_tokens,
        "waves": args.waves,
        "sampling": {"temperature": args.temperature, "top_p": args.top_p} if args.top_p < 1 else "training",
        "attention": args.attention,
        "kv_bucket": args.kv_bucket,
        "kernel_options": block_attention.KERNEL_OPTIONS or "torch's own",
        "first_rollout_s": round(compile_seconds, 2),
        "fast_ms_per_step": round(1000 * seconds / steps, 3),
        "fast_tokens_per_s": round(batch * steps / seconds),
        "fast_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
    }
    if loop.steps:
        result["loop_s_per_rollout"] = {
            name: round(value / args.repeats, 3) for name, value in loop.metrics("loop").items()
            if name.endswith("_s")
        }  # fmt: skip
    if args.hf:

        def plain():
            with torch.autocast(device, dtype=torch.bfloat16):
                type(model).generate(model, input_ids=prompt, attention_mask=mask, generation_config=config)

        plain()
        hf = _timed(plain)
        result.update(
            hf_ms_per_step=round(1000 * hf / args.new_tokens, 3),
            hf_tokens_per_s=round(batch * args.new_tokens / hf),
        )
    result["compiler"] = compiler_counts()
    print(json.dumps(result), flush=True)

    if args.profile:
        with profiling.window(host=True) as profile:
            fast()
        floor = decode_floor(model, args, batch)
        if profile:  # empty on a CPU
            profile["ms_per_step"] = round(1000 * profile["wall_s"] / steps, 3)
            profile["kernel_ms_per_step"] = round(1000 * profile["kernel_s"] / steps, 3)
            profile["runtime_calls_per_step"] = {
                call: round(count / steps, 1) for call, count in profile["runtime_calls"].items()
            }
        shape = {"batch": batch, "fused": fused, "blocks": bool(model.fast_rollout.blocks)}
        print(json.dumps({"profile": profile, "floor": floor, **shape}), flush=True)


def compiler_counts() -> dict:
    """What the compiler did so far in this process: graphs compiled, graph breaks, recompilations, and
    compiled graphs that run without a CUDA graph (`TORCH_LOGS=perf_hints` logs why)."""
    from torch._dynamo.utils import counters

    return {
        "unique_graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
        "recompiles": counters["recompiles"].get("total", 0) if "recompiles" in counters else 0,
        "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
    }


def decode_floor(model, args, batch: int) -> dict:
    """The bytes one decode step must move at the least, averaged over the rollout, and the time that takes
    at the measured copy bandwidth: the decoding copy's weights (the tied head read whole once), the cache
    positions in use (rounded up to the KV bucket, as the step reads them), and one write and one read of the
    fp32 logits."""
    config = model.config
    runner = model.fast_rollout._shadow or model
    weights = sum(p.numel() * p.element_size() for p in runner.parameters())
    head_dim = getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    per_position = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 2  # K and V, bf16
    bucket = -(-args.prompt_length // rollout.PROMPT_BUCKET) * rollout.PROMPT_BUCKET
    kv_bucket = args.kv_bucket or 1 << 30
    length = bucket + args.new_tokens
    visible = [min(length, -(-(bucket + t) // kv_bucket) * kv_bucket) for t in range(1, args.new_tokens)]
    kv = batch * per_position * sum(visible) / len(visible)
    logits = 2 * batch * model.get_output_embeddings().weight.shape[0] * 4
    total = weights + kv + logits
    return {
        "weights_gb": round(weights / 1e9, 3),
        "kv_gb": round(kv / 1e9, 3),
        "logits_gb": round(logits / 1e9, 3),
        "floor_ms_per_step": round(1000 * total / profiling.COPY_BYTES_PER_S, 3),
        "floor_tokens_per_s": round(batch * profiling.COPY_BYTES_PER_S / total),
    }


if __name__ == "__main__":
    main()
