"""Memory and failure measurements shared by trials and benchmarks."""

from __future__ import annotations

import os
import resource

import torch


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's RuntimeError."""
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err))


def memory_in_use(device: str) -> float:
    """MiB held now: CUDA reserved memory, or this process's resident set on CPU."""
    if device == "cuda":
        return round(torch.cuda.memory_reserved() / 2**20, 1)
    with open("/proc/self/statm") as f:
        return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def peak_memory(device: str) -> dict[str, float]:
    """Peak memory of this process in MiB: CUDA max allocated/reserved, or peak RSS on CPU."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    out = {"peak_rss_mib": round(rss, 1)}
    if device == "cuda":
        out["peak_alloc_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["peak_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
        out["peak_mem_mib"] = out["peak_reserved_mib"]
    else:
        out["peak_mem_mib"] = out["peak_rss_mib"]
    return out
