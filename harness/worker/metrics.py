"""Measurements shared by trials and benchmarks: out-of-memory detection, memory use and model FLOPs.

One home for them, so a trial's numbers and ``harness bench``'s numbers mean the same thing.
Imported only inside worker processes (it imports torch; Unsloth, when used, must be imported first).
"""

from __future__ import annotations

import os
import re
import resource
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

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

def release_cached_memory(device: str) -> None:
    """Give the CUDA caching allocator's free blocks back, so the next measurement starts clean."""
    if device == "cuda":
        torch.cuda.empty_cache()


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
#
# Model FLOPs per trained token, counted as the step runs them, from numbers alone (``ModelShape``),
# so the counting is testable without building a model. Notation, used in docstrings and reports:
#   N  parameters outside the input embedding: the decoder layers and the LM head (H·V), not the
#      LoRA adapters. The LM head is counted even when tied to the embedding: its matmul runs.
#   L  decoder layers, H hidden size, V vocabulary, Q sequence length,
#   A  attention width, heads × head dim (= H for Llama, Mistral, Qwen2.5; PaLM writes H),
#   r  LoRA rank, Σ a sum over one decoder layer's adapted linear layers (d_in × d_out each).
# A matmul costs 2 FLOPs per weight per token (one multiply, one add), forward; its backward costs
# as much again for the gradient of its input and once more for the gradient of its weight.

@dataclass(frozen=True)
class ModelShape:
    """The numbers FLOP counting needs: read off a loaded model by :func:`model_shape`, or written
    by hand. Decoder layers are taken to be identical (true of every Llama-style model)."""

    layers: int  # L
    hidden: int  # H: the LM head is an H × V matmul
    vocab: int  # V
    linears: Mapping[str, tuple[int, int]]  # one decoder layer's linear layers: name -> (d_in, d_out)
    attn_width: int | None = None  # A = heads × head dim; None: the hidden size
    other_params: int = 0  # norms and biases: part of N (as in PaLM's count), but no matmul

    @property
    def n(self) -> int:
        """N: every decoder layer's linear weights, the LM head, and the other parameters."""
        return self.layers * sum(i * o for i, o in self.linears.values()) + self.hidden * self.vocab + self.other_params

    def adapter_params(self, rank: int, targets: Iterable[str]) -> int:
        """r·L·Σ(d_in + d_out): a LoRA pair on a d_in × d_out layer is A (r × d_in) and B (d_out × r).
        A target that names no linear layer adds nothing (PEFT skips it too, as long as one matches)."""
        targets = set(targets)
        return self.layers * sum(rank * (i + o) for name, (i, o) in self.linears.items() if name in targets)


def flops_per_token(shape: ModelShape, seq_len: int, *, method: Literal["lora", "full"] = "lora",
                    checkpointing: bool = False, lora_rank: int = 0, lora_targets: Iterable[str] = ()) -> float:
    """Model FLOPs of one trained token (forward and backward), counting what the configuration runs.

    Three parts, each counted as forward + backward (+ one more forward when gradient checkpointing
    recomputes the decoder layers' activations in the backward pass):

    - weights, 2·N per token forward. Their backward always needs the gradient of the activations
      (2·N); it needs the weights' own gradients (2·N more) only when they are trained, so
      LoRA on frozen weights costs 4·N and full training PaLM's 6·N.
    - attention, QKᵀ and AV: 2·A·Q each per token and layer, 4·L·A·Q forward; no weights, and a
      backward of twice the forward (the gradients of both operands of each product), so 12·L·A·Q,
      PaLM's term. Causal kernels skip about half of it; like PaLM we count it all.
    - LoRA adapters, 2·r·L·Σ(d_in + d_out) forward; trained, so their backward is twice that
      (activations and weights): 3× the forward, 6·r·L·Σ(d_in + d_out).

    Checkpointing adds one forward of the decoder layers (not of the LM head, which sits outside
    the checkpointed layers): 2·(N − H·V) + 4·L·A·Q, plus 2·r·L·Σ(d_in + d_out) for the adapters.
    So, per token:

    - LoRA:  4·N + 12·L·A·Q + 6·r·L·Σ(d_in + d_out)  [+ 2·(N − H·V) + 4·L·A·Q + 2·r·L·Σ(d_in + d_out)]
    - full:  6·N + 12·L·A·Q                           [+ 2·(N − H·V) + 4·L·A·Q]

    ``method="full", checkpointing=False`` is PaLM's 6·N + 12·L·A·Q (Chowdhery et al. 2022,
    appendix B), the conventional figure papers report whatever was trained.
    """
    if method not in ("lora", "full"):
        raise ValueError(f"method must be 'lora' or 'full', not {method!r}")
    n = shape.n
    attention = 4 * shape.layers * (shape.attn_width or shape.hidden) * seq_len  # forward, per token
    if method == "full":
        total = 3 * 2 * n + 3 * attention
        adapters = 0
    else:
        adapters = 2 * shape.adapter_params(lora_rank, lora_targets)  # forward, per token
        total = 2 * 2 * n + 3 * attention + 3 * adapters
    if checkpointing:
        total += 2 * (n - shape.hidden * shape.vocab) + attention + adapters
    return float(total)


def flops_formula(method: Literal["lora", "full"] = "lora", checkpointing: bool = False) -> str:
    """The formula :func:`flops_per_token` evaluates for this method and checkpointing, as text."""
    if method == "full":
        return "6·N + 2·(N − H·V) + 16·L·A·Q" if checkpointing else "6·N + 12·L·A·Q"
    return ("4·N + 2·(N − H·V) + 16·L·A·Q + 8·r·L·Σ(d_in + d_out)" if checkpointing
            else "4·N + 12·L·A·Q + 6·r·L·Σ(d_in + d_out)")


def model_shape(model) -> ModelShape:
    """A loaded causal LM's :class:`ModelShape`: bare transformers, or wrapped by PEFT or Unsloth.

    The linear layers are those of decoder layer 0 (the LoRA wrappers' ``base_layer``, not their
    ``lora_A``/``lora_B``), named by their last name part, as ``target_modules`` names them.
    """
    cfg = model.config
    linears: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        inside = re.search(r"(?:^|\.)layers\.0\.(.+)$", name)
        if inside and isinstance(module, torch.nn.Linear) and "lora_" not in name:
            short = inside.group(1).removesuffix(".base_layer").rsplit(".", 1)[-1]  # "self_attn.q_proj" -> "q_proj"
            linears[short] = (module.in_features, module.out_features)
    if not linears:
        raise ValueError(f"{type(model).__name__}: no linear layers found under layers.0, cannot count FLOPs")
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    vocab, hidden = head.shape
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    # Everything else outside the input embedding: norms, biases (named_parameters lists a tied
    # LM head once, as the embedding, so it is not subtracted twice).
    base = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n) - embed.numel()
    tied = head.data_ptr() == embed.data_ptr()
    other = base - cfg.num_hidden_layers * sum(i * o for i, o in linears.values()) - (0 if tied else hidden * vocab)
    return ModelShape(layers=cfg.num_hidden_layers, hidden=hidden, vocab=vocab, linears=linears,
                      attn_width=heads * head_dim, other_params=max(other, 0))


def peak_flops(gpu_name: str | None) -> float | None:
    """Peak dense bf16 FLOP/s of a GPU by its name (data sheet), or None when unknown (or on CPU)."""
    if not gpu_name:
        return None
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu_name), None)


_MEASURED_PEAK: dict[str, float | None] = {}


def measured_peak_flops(device: str, n: int = 8192, warmup: int = 3, iters: int = 20) -> float | None:
    """bf16 FLOP/s this GPU reaches on an n × n × n ``torch.matmul`` (2·n³ FLOPs each), measured
    once per process; None on CPU.

    A data sheet's peak assumes boost clocks that a power-capped or hot card does not hold, so
    MFU against it mixes how well a step uses the card with how fast this card is; against what
    cuBLAS actually delivers here it does not. 23 matmuls of 1.1 TFLOP: about 40 ms on an H100,
    well under a second on the slowest card listed.
    """
    if device != "cuda":
        return None
    if device not in _MEASURED_PEAK:
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)  # random, not zeros: power draw is data dependent
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
        for _ in range(warmup):  # cuBLAS picks its kernel and the clocks ramp up
            torch.matmul(a, b, out=c)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b, out=c)
        torch.cuda.synchronize()
        _MEASURED_PEAK[device] = 2 * n**3 * iters / (time.perf_counter() - t)
        del a, b, c
        torch.cuda.empty_cache()  # hand the 384 MiB back, so they never count as the caller's reserved memory
    return _MEASURED_PEAK[device]


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilization: model FLOP/s (FLOPs per token × tokens/s) over a peak FLOP/s, or
    None where the peak is unknown (on CPU, or a GPU not in ``PEAK_BF16_FLOPS``)."""
    return round(flops_per_token * tokens_per_s / peak, 4) if peak else None
