"""Measurements shared by trials and benchmarks: out-of-memory detection, memory use and model FLOPs.

One home for them, so a trial's numbers and ``harness bench``'s numbers mean the same thing.
Imported only inside worker processes (it imports torch; Unsloth, when used, must be imported first).
"""

from __future__ import annotations

import os
import resource

import torch

MIB = 2**20

# Peak dense bf16 tensor throughput, FLOP/s, by a substring of the device name (vendor data sheets).
# Order matters: the first key found in the name wins, so "H100 PCIe" comes before "H100".
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
                   "A10G": 70e12, "L4": 121e12}


# -- failures --------------------------------------------------------------------------------------

def is_out_of_memory(err: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's RuntimeError."""
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err))


def failure_message(err: BaseException, limit: int = 300) -> str:
    """The first line of an error, cut to ``limit`` characters (CUDA's OOM message runs to a paragraph)."""
    lines = str(err).splitlines()
    return (lines[0] if lines else type(err).__name__)[:limit]


# -- memory ----------------------------------------------------------------------------------------

def reset_peak_memory(device: str) -> None:
    """Start CUDA's peak counters afresh. The peak RSS cannot be reset: it covers the whole process."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def memory_in_use(device: str) -> float:
    """MiB held now: CUDA reserved memory, or this process's resident set on CPU."""
    if device == "cuda":
        return round(torch.cuda.memory_reserved() / MIB, 1)
    with open("/proc/self/statm") as f:
        return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB, 1)


def memory_peaks(device: str) -> dict[str, float]:
    """Each peak measured, in MiB: the process's peak RSS, plus CUDA max allocated/reserved on a GPU."""
    out = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # Linux: KiB
    if device == "cuda":
        out["peak_alloc_mib"] = round(torch.cuda.max_memory_allocated() / MIB, 1)
        out["peak_reserved_mib"] = round(torch.cuda.max_memory_reserved() / MIB, 1)
    return out


def peak_memory(device: str) -> dict[str, float]:
    """``memory_peaks`` plus ``peak_mem_mib``, the one number a trial is judged by: reserved on a GPU
    (what the allocator took from the device), RSS on CPU."""
    out = memory_peaks(device)
    out["peak_mem_mib"] = out["peak_reserved_mib"] if device == "cuda" else out["peak_rss_mib"]
    return out


# -- FLOPs -----------------------------------------------------------------------------------------

def peak_flops(gpu_name: str | None) -> float | None:
    """Peak dense bf16 FLOP/s of a GPU by its name, or None when unknown (or on CPU)."""
    if not gpu_name:
        return None
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu_name), None)


def flops_per_token(model, seq_len: int) -> float:
    """PaLM's estimate (Chowdhery et al. 2022, appendix B): 6·N + 12·L·H·Q, N = parameters outside
    the input embedding, L layers, H hidden size, Q sequence length. It counts weight gradients
    that LoRA skips, so it is the conventional model FLOPs, not the FLOPs actually executed."""
    cfg = model.config
    embed = model.get_input_embeddings().weight.numel()
    n = sum(p.numel() for p in model.parameters()) - embed
    return 6 * n + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


def mfu(model, seq_len: int, tokens_per_s: float, gpu_name: str | None) -> float | None:
    """Model FLOPs utilization: model FLOP/s over the GPU's peak, or None where the peak is unknown."""
    peak = peak_flops(gpu_name)
    return round(flops_per_token(model, seq_len) * tokens_per_s / peak, 4) if peak else None
