"""What a GPU spent a window of time on: kernel time against wall time, and the kernels that took most of it.

Shared by the benchmarks' `--profile` options. A window's wall time minus its kernel time is time the GPU sat
idle waiting for the host (Python, launches, synchronisations); the kernel table says where the busy part
went, grouped into classes a reader can act on (matrix products, attention, compiled fusions, the rest).
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

# Measured on the H200 machines this project benchmarks on (a device-to-device copy; an 8192^3 bf16 matmul).
COPY_BYTES_PER_S = 4.3e12
BF16_FLOP_PER_S = 788e12

_CLASSES = (
    ("matmul", ("gemm", "xmma", "cutlass", "cublas", "sm90_", "nvjet", "splitk")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "efficient_attention")),
    ("compiled fusion", ("triton_",)),
    (
        "copy/fill",
        ("memcpy", "memset", "copy_", "fill_", "cat", "elementwise_kernel<", "vectorized_elementwise"),
    ),
)


def kernel_class(name: str) -> str:
    lowered = name.lower()
    for label, needles in _CLASSES:
        if any(needle in lowered for needle in needles):
            return label
    return "other"


# Driver and runtime calls that say how the host fed the GPU: kernels launched one by one, graphs replayed,
# copies, and waits.
RUNTIME_CALLS = ("LaunchKernel", "GraphLaunch", "MemcpyAsync", "MemsetAsync", "Synchronize")


@contextlib.contextmanager
def window(host: bool = False):
    """Profile the GPU kernels of the enclosed block; yields a dict filled with `summary` on exit. With
    `host` the host's runtime calls are recorded too (`runtime_calls`: how many kernel launches, graph
    replays, copies and synchronisations), which slows the host a little and so lengthens the window."""
    result: dict = {}
    if not torch.cuda.is_available():
        yield result
        return
    torch.cuda.synchronize()
    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if host else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        yield result
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    result.update(summary(prof, wall))
    if host:
        result["runtime_calls"] = runtime_calls(prof)


def runtime_calls(prof) -> dict[str, int]:
    """How often each of RUNTIME_CALLS was made in the window (summed over the runtime's and the driver's
    spellings, e.g. cudaLaunchKernel and cuLaunchKernelEx)."""
    counts = dict.fromkeys(RUNTIME_CALLS, 0)
    for event in prof.key_averages():
        if event.device_type == DeviceType.CUDA or not event.key.startswith("cu"):
            continue
        for call in RUNTIME_CALLS:
            if call in event.key:
                counts[call] += event.count
    return counts


def summary(prof, wall_s: float, top: int = 12) -> dict:
    """Kernel seconds (total, per class, the `top` kernels by time) against the window's wall seconds."""
    kernels: dict[str, list[float]] = {}
    for event in prof.key_averages():
        if event.device_type != DeviceType.CUDA:  # host events: their time is not the GPU's
            continue
        seconds = event.self_device_time_total / 1e6
        entry = kernels.setdefault(event.key, [0.0, 0])
        entry[0] += seconds
        entry[1] += event.count
    busy = sum(seconds for seconds, _ in kernels.values())
    classes: dict[str, float] = {}
    for name, (seconds, _) in kernels.items():
        label = kernel_class(name)
        classes[label] = classes.get(label, 0.0) + seconds
    ranked = sorted(kernels.items(), key=lambda item: -item[1][0])[:top]
    return {
        "wall_s": round(wall_s, 4),
        "kernel_s": round(busy, 4),
        "gpu_idle_share": round(1 - busy / wall_s, 3) if wall_s > 0 else None,
        "classes_s": {
            label: round(seconds, 4) for label, seconds in sorted(classes.items(), key=lambda i: -i[1])
        },
        "top_kernels": [
            {
                "kernel": name[:90],
                "s": round(seconds, 4),
                "share": round(seconds / busy, 3),
                "calls": int(calls),
            }
            for name, (seconds, calls) in ranked
        ],
    }
