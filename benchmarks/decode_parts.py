"""The parts of an evaluation's decode step, each timed alone at the step's shape: block attention of one
layer (under candidate Triton options, its bytes against the copy bandwidth) and the sampling head (thought
mask, temperature, the top-p draws) over the whole vocabulary, with the unembedding product beside it.

    python benchmarks/decode_parts.py            # 500 rows x 1280 columns, qwen3-0.6b-shape, N = 151646
    python benchmarks/decode_parts.py --sweep    # ... and every candidate option of the attention kernel
    python benchmarks/decode_parts.py --rows 64 --columns 640 --mean-columns 350

Rows see spans of the ring of random length (uniform around `--mean-columns`, wrapping at the end), as slots
refilled at different times do. A part's time is the median over `--repeats` calls after warm-up ones, each
compiled alone (`dynamic=False`, as the decode step is): a lower bound for the same work inside the step,
whose compiler may fuse across parts. Prints one JSON line per part.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from profiling import COPY_BYTES_PER_S

from rlvr import block_attention, fused_decode, rollout
from rlvr.sampling import Sampling

CANDIDATES = (  # (BLOCK_N, num_stages, num_warps[, SPLIT_KV]); the first is the project's default
    block_attention.KERNEL_OPTIONS,
    {},  # torch's own choice
    {"BLOCK_N": 64, "num_stages": 2, "num_warps": 2},
    {"BLOCK_N": 64, "num_stages": 3, "num_warps": 2},
    {"BLOCK_N": 64, "num_stages": 3, "num_warps": 4},
    {"BLOCK_N": 64, "num_stages": 4, "num_warps": 4},
    {"BLOCK_N": 32, "num_stages": 3, "num_warps": 2},
    {"BLOCK_N": 32, "num_stages": 4, "num_warps": 2},
    {"BLOCK_N": 64, "num_stages": 3, "num_warps": 2, "SPLIT_KV": 2},
    {"BLOCK_N": 64, "num_stages": 3, "num_warps": 4, "SPLIT_KV": 4},
)


def timed(fn, repeats: int) -> float:
    """Median milliseconds of `fn()` over `repeats` calls, after three that warm up (and compile)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def spans(rows: int, columns: int, mean: int, device) -> torch.Tensor:
    """(rows, columns) bool: each row sees one span of the ring, of a length uniform in [mean/6, 11 mean/6)
    (capped at the ring), starting anywhere."""
    generator = torch.Generator().manual_seed(0)
    low = max(1, mean // 6)
    lengths = torch.randint(low, 2 * mean - low, (rows,), generator=generator).clamp(max=columns)
    starts = torch.randint(0, columns, (rows,), generator=generator)
    offsets = (torch.arange(columns)[None, :] - starts[:, None]) % columns
    return (offsets < lengths[:, None]).to(device)


def attention(args, device) -> None:
    heads, kv_heads, dim = args.heads, args.kv_heads, args.head_dim
    generator = torch.Generator(device=device).manual_seed(1)
    shape = (args.rows, kv_heads, args.columns, dim)
    key = torch.randn(shape, generator=generator, device=device, dtype=torch.bfloat16)
    value = torch.randn(shape, generator=generator, device=device, dtype=torch.bfloat16)
    query = torch.randn(args.rows, heads, 1, dim, generator=generator, device=device, dtype=torch.bfloat16)
    visible = spans(args.rows, args.columns, args.mean_columns, device)
    blocks_read = int(visible.view(args.rows, -1, block_attention.BLOCK).any(-1).sum())
    bytes_read = blocks_read * block_attention.BLOCK * kv_heads * dim * 2 * 2  # K and V, bf16
    reference, default = None, block_attention.KERNEL_OPTIONS
    for options in CANDIDATES if args.sweep else CANDIDATES[:1]:
        torch._dynamo.reset()
        block_attention.KERNEL_OPTIONS = dict(options)

        def layer(q, k, v, seen):
            return block_attention.attend(q, k, v, block_attention.block_mask(seen), dim**-0.5)

        compiled = torch.compile(layer, dynamic=False)
        try:
            output = compiled(query, key, value, visible)
            ms = timed(lambda: compiled(query, key, value, visible), args.repeats)  # noqa: B023
        except Exception as error:  # an option the kernel refuses: say so and go on
            failed = {"part": "attention", "options": options, "error": str(error)[:300]}
            print(json.dumps(failed), flush=True)
            continue
        reference = output if reference is None else reference
        print(
            json.dumps(
                {
                    "part": "attention",
                    "options": options or "torch's own",
                    "rows": args.rows,
                    "columns": args.columns,
                    "mean_columns_read": round(blocks_read * block_attention.BLOCK / args.rows, 1),
                    "ms_per_layer": round(ms, 4),
                    "ms_per_step": round(ms * args.layers, 3),
                    "gb_read": round(bytes_read / 1e9, 3),
                    "tb_per_s": round(bytes_read / ms / 1e9, 2),
                    "floor_ms_per_layer": round(1000 * bytes_read / COPY_BYTES_PER_S, 4),
                    "largest_difference_from_first": float((output.float() - reference.float()).abs().max()),
                }
            ),
            flush=True,
        )
    block_attention.KERNEL_OPTIONS = default


def sampling(args, device) -> None:
    vocab = args.vocab
    generator = torch.Generator(device=device).manual_seed(2)
    hidden = torch.randn(args.rows, args.hidden, generator=generator, device=device, dtype=torch.bfloat16)
    weight = torch.randn(vocab, args.hidden, generator=generator, device=device, dtype=torch.bfloat16) * 0.05
    logits = hidden @ weight.T
    rows = -(-vocab // fused_decode.HEAD_ROWS) * fused_decode.HEAD_ROWS  # as the decoding copy pads its head
    padded_weight = torch.nn.functional.pad(weight, (0, 0, 0, rows - vocab))
    padded_logits = hidden @ padded_weight.T
    inside = torch.rand(args.rows, generator=generator, device=device) < 0.5
    forbidden = torch.zeros(2, vocab, dtype=torch.bool, device=device)
    forbidden[0, vocab // 2 :] = True  # outside a thought: the reasoning rows are forbidden
    padded_forbidden = torch.nn.functional.pad(forbidden, (0, rows - vocab), value=True)
    keys = torch.randint(0, 2**32, (args.rows,), generator=generator, device=device)
    force = torch.zeros(args.rows, dtype=torch.bool, device=device)
    inv_temperature = torch.tensor(1 / args.temperature, device=device)
    rule = rollout.Rule.of(Sampling(args.temperature, top_p=args.top_p))
    logits_bytes = args.rows * vocab * 2

    def head():
        return hidden @ weight.T

    def choose():
        return rollout.choose(logits.float(), inside, forbidden, inv_temperature, keys, force, rule)

    def padded_head():
        return hidden @ padded_weight.T

    def padded_choose():
        return rollout.choose(
            padded_logits.float(), inside, padded_forbidden, inv_temperature, keys, force, rule
        )

    def one_read():
        return logits.float().logsumexp(-1)

    def noise():
        return rollout._gumbel(keys, vocab).argmax(-1)

    def noise32():  # the same hash rounds in wrapping int32 arithmetic (a candidate, not the project's noise)
        x = keys.to(torch.int32)[:, None] ^ torch.arange(vocab, device=device, dtype=torch.int32)
        for multiplier in rollout._MIXERS:
            x = (x ^ ((x >> 15) & 0x1FFFF)) * multiplier
        x = x ^ ((x >> 16) & 0xFFFF)
        uniform = (x.float() + 2.0**31 + 0.5) * 2.0**-32
        return (-(-torch.log1p(-uniform.clamp(max=1.0 - 2.0**-24))).log()).argmax(-1)

    torch._dynamo.reset()
    parts = (
        ("unembedding", head), ("unembedding, padded head", padded_head), ("one read", one_read),
        ("noise", noise), ("noise, int32", noise32), ("choose", choose),
        ("choose, padded head", padded_choose),
    )  # fmt: skip
    for name, fn in parts:
        eager = name.startswith("unembedding")  # one library product: nothing to compile
        ms = timed(fn if eager else torch.compile(fn, dynamic=False), args.repeats)
        print(
            json.dumps(
                {
                    "part": f"sampling: {name}",
                    "rows": args.rows,
                    "vocab": vocab,
                    "rule": rule._asdict(),
                    "ms": round(ms, 4),
                    "reads_of_the_bf16_logits": round(ms / (1000 * logits_bytes / COPY_BYTES_PER_S), 2),
                }
            ),
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--columns", type=int, default=1280)
    parser.add_argument("--mean-columns", type=int, default=612)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151936 + 151646)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="time every candidate option of the kernel")
    parser.add_argument("--parts", default="attention,sampling")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("decode_parts.py times GPU kernels; no CUDA device is visible")
    if args.columns % block_attention.BLOCK:
        parser.error(f"--columns must be a multiple of {block_attention.BLOCK}")
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__}), flush=True)
    for part in args.parts.split(","):
        {"attention": attention, "sampling": sampling}[part](args, "cuda")


if __name__ == "__main__":
    main()
