"""Decode attention that reads only the cache blocks a row can see.

The compiled decode step works on one cache shape: every row's keys and values span the whole ring, and a
mask says which columns each row sees. Dense attention reads all of it at every step, so once a batch is large
a step costs the whole cache's bytes however short its sequences are (an evaluation of 500 slots x 1280
columns of a 0.6B-shaped model moves 73 GB per step, about 15 ms at an H200's bandwidth, while its sequences
fill half of it on average). Here the mask becomes a FlexAttention block mask over blocks of `BLOCK` columns:
a block no position of the row sees is never read, a block it sees whole skips the mask, a block it sees in
part applies it. A row then reads its own sequence's columns, rounded out to whole blocks.

On by default for compiled steps on a GPU; `RLVR_DECODE_ATTENTION=dense` attends over the whole ring instead.
Two things it needs, both found on one H200 (BENCHMARKS.md): the step must be compiled with static shapes
(a graph recompiled with symbolic shapes gave outputs off by whole units), and the query and key/value head
counts must be powers of two (at 9 query heads over 3 key/value heads, SmolLM2-135M's shape, the compiled
kernel's output was wrong even with static shapes); other models attend densely.
"""

from __future__ import annotations

import inspect
import os

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from rlvr.errors import InputError

BLOCK = 64  # cache columns per block; a ring and every visible slice of it are whole multiples of it
QUERY_BLOCK = 128  # one block of queries: a decode step has a single query position
# Triton options of the decode kernel, passed to `flex_attention` as `kernel_options` (empty: torch's own
# choice). On one H200 under torch 2.11, torch's choice read an evaluation's 500 rows of blocks at 2.7
# TB/s and these options at 3.1 TB/s, and were faster at 64 rows too (`benchmarks/decode_parts.py --sweep`,
# BENCHMARKS.md)
KERNEL_OPTIONS: dict = {"BLOCK_N": 64, "num_stages": 2, "num_warps": 2}
ENV = "RLVR_DECODE_ATTENTION"
CHOICES = ("blocks", "dense")
# torch releases before `compute_q_blocks` always build the transposed (query-side) index, which only a
# backward pass reads; a decode step skips it where it can
_SKIPS_QUERY_SIDE = "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters


def wanted() -> bool:
    """Whether compiled decode steps use block attention: `$RLVR_DECODE_ATTENTION` (blocks, the default, or
    dense)."""
    choice = os.environ.get(ENV, "blocks").strip().lower() or "blocks"
    if choice not in CHOICES:
        raise InputError(
            f"{ENV}={os.environ[ENV]!r} is neither dense nor blocks; unset it or pass one of them."
        )
    return choice == "blocks"


def supports(config) -> bool:
    """Whether a model's attention fits the block kernel: a head size FlexAttention compiles for (a power of
    two from 16 to 256), and query and key/value head counts that are powers of two with whole groups (the
    shapes measured exact on a GPU; 9 over 3 was not)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    powers = all(_power_of_two(n) for n in (head_dim, heads, kv_heads))
    return powers and 16 <= head_dim <= 256 and heads >= kv_heads


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _listed(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, 1) int32 counts and (B, 1, 1, blocks) int32 indices of the chosen blocks of each row, the chosen
    ones first in column order (the kernel reads the first `count` of them)."""
    blocks = chosen.shape[-1]
    order = torch.arange(blocks, device=chosen.device, dtype=torch.int32)
    # unique sort keys, so the order needs no stable sort: chosen blocks by index, then the others
    keys = torch.where(chosen, order, order + blocks)
    indices = keys.argsort(-1).to(torch.int32)
    return chosen.sum(-1, dtype=torch.int32)[:, None, None], indices[:, None, None, :]


def block_mask(visible: torch.Tensor) -> BlockMask:
    """The block mask of `visible` (B, L) bool, the cache columns each row's one query sees; L must be a
    multiple of BLOCK."""
    batch, length = visible.shape
    if length % BLOCK:
        raise ValueError(f"a block mask needs a multiple of {BLOCK} columns, got {length}")
    blocks = visible.view(batch, length // BLOCK, BLOCK)
    seen, whole = blocks.any(-1), blocks.all(-1)

    def mask_mod(b, h, q, kv):
        return visible[b, kv]

    extra = {"compute_q_blocks": False} if _SKIPS_QUERY_SIDE else {}
    return BlockMask.from_kv_blocks(
        *_listed(seen & ~whole),
        *_listed(whole),
        BLOCK_SIZE=(QUERY_BLOCK, BLOCK),
        mask_mod=mask_mod,
        seq_lengths=(1, length),
        **extra,
    )


def attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: BlockMask, scale
) -> torch.Tensor:
    """One query position per row, (B, Hq, 1, D), against the first `mask`'s length columns of (B, Hkv, L, D)
    keys and values (query heads share key/value heads in groups, as grouped-query attention has them).
    Returns (B, 1, Hq, D), the layout Hugging Face's attention functions return."""
    length = mask.seq_lengths[1]
    key, value = key[:, :, :length], value[:, :, :length]
    extra = {"kernel_options": dict(KERNEL_OPTIONS)} if KERNEL_OPTIONS else {}
    output = flex_attention(
        query, key, value, block_mask=mask, scale=scale, enable_gqa=query.shape[1] != key.shape[1], **extra
    )
    return output.transpose(1, 2)
