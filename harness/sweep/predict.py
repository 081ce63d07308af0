"""A trial's peak GPU memory, predicted before it runs: an analytic model of the parts, and a
calibration fitted from the trials that finished on this GPU and software.

Torch-free: the driver imports it (and ``harness predict`` prints it for a sweep file).

What is predicted is the same number a trial is judged by (:func:`harness.worker.metrics.peak_memory`):
CUDA ``max_memory_reserved``, what the caching allocator took from the card, plus, as a separate
part, the CUDA context that every process holds outside the allocator. So:

- ``Prediction.total_mib``: everything the card must hold for the trial (context included): compare
  it with a card's memory;
- ``Prediction.peak_mib``: the same without the context: compare it with a trial's measured
  ``peak_mem_mib`` and with ``memory_budget_mib`` (which caps the allocator, not the context).

Every constant below was checked against the peaks of real trials in ``bench/RESULTS.md``
(random-init Mistral-7B-v0.3 and Mistral-1B presets, Unsloth 2026.10.9, torch 2.11, H100 and H200):
``tests/test_predict.py`` compares the model with them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import scipy.optimize

from harness import params as hp
from harness.data.presets import PRESETS, is_preset
from harness.errors import HarnessError

MIB = 2**20

# -- constants (each one named in Prediction's docstring) -------------------------------------------

# `import unsloth` initialises CUDA; nvidia-smi shows the process holding 718 MiB before any tensor
# (bench/RESULTS.md, "Fixed cost per 7B trial", H100). Outside the allocator: not in peak_mem_mib.
CUDA_CONTEXT_MIB = 718.0
# cuBLAS workspaces, RoPE tables, kernel scratch: what a trial allocates whatever its shape (about
# 50-100 MiB left over in the 7B trials once weights, adapters and activations are counted).
FIXED_OVERHEAD_MIB = 100.0
# Reserved over allocated: the caching allocator rounds blocks up and keeps freed ones. Unsloth's
# trials measured 1.013-1.023 (7B, checkpointing unsloth / true / off); 0.02 of what is allocated.
ALLOCATOR_FRACTION = 0.02
# bytes per weight (and per activation element) by dtype; "auto" is bf16 on a CUDA GPU.
DTYPE_BYTES = {"auto": 2, "bfloat16": 2, "float16": 2, "float32": 4}
# bitsandbytes NF4 with double quantization: 4 bits per weight plus its block scales (an 8-bit scale
# per 64 weights, with fp32 second-level scales per 256 blocks): 0.5 + 1/64 + 4/(64*256) bytes.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
# LoRA adapters are kept in fp32 (PEFT casts them up): the weight, its gradient, AdamW's two
# moments (4 + 4 + 8 bytes), and AdamW's foreach step, which allocates one more copy (4 bytes).
LORA_STATE_BYTES = 4 + 4 + 8
LORA_STEP_BYTES = 4
# Full fine-tuning trains the weights in their own dtype (torch.optim.AdamW keeps its moments in the
# parameter's dtype: no fp32 master copy): per weight, a gradient (1x the dtype), two moments (2x)
# and the foreach step's scratch (1x). The 1B full trial's 10,704 MiB is 4.1x its 2,104 MiB of
# weights, and fp32 moments (8 bytes) would not fit in it.
FULL_GRAD_STATE_FACTOR = 1 + 2
FULL_STEP_FACTOR = 1
# Activations. A decoder layer (Llama / Mistral / Qwen2, Unsloth's fused kernels) saves, per token,
# 4h + 2*q + 2*kv + 2i elements: the inputs and outputs of its two RMSNorms (4h), Q and the attention
# output (q = heads x head_dim each), K and V (kv = kv_heads x head_dim each), and the MLP's gate and
# up projections (i each; SwiGLU's product is recomputed in the backward), plus r per LoRA adapter.
# For Mistral-7B that is 27 bytes per hidden unit per token in bf16; the 7B trials without
# checkpointing measured 29.
# Recomputing one layer in the backward (checkpointing) holds its saved set again plus the gradients
# flowing through it: about twice the set. Without checkpointing the set is already there, and the
# backward adds the gradients: once the set.
RECOMPUTE_FACTOR = 2.0
NO_RECOMPUTE_FACTOR = 1.0
# The residual stream outside the layers during the backward: its gradient in fp32 and the bf16
# hidden state, about 8 bytes per hidden unit per token (the 7B and 1B trials left 9).
RESIDUAL_BYTES = 8
# Logits: bf16 logits and their bf16 gradient, 4 bytes per token per vocabulary entry. Unsloth's
# cross-entropy kernel computes the loss in fp32 inside the kernel and writes the gradient in
# place, so no fp32 copy of the logits is ever made. (fp32 logits plus an fp32 gradient, 8 bytes,
# would put the 1B LoRA trial 30% over its measured 2,928 MiB.)
LOGITS_BYTES = 4
# Validation runs EVAL_BATCH_SIZE rows (harness.worker.loop.EVAL_BATCH_SIZE) with no gradient:
# bf16 logits only (2 bytes), which can exceed the training step's transient at batch size 1.
EVAL_BATCH_SIZE = 8
EVAL_LOGITS_BYTES = 2

GROUPS: dict[str, tuple[str, ...]] = {
    # what the model holds whatever the batch; its adapters' or weights' training state; what
    # grows with the tokens of a micro-batch
    "fixed": ("weights", "overhead"),
    "optimizer": ("trainable", "optimizer_step"),
    "activations": ("saved_activations", "transient"),
}
PARTS = ("cuda_context", *itertools.chain.from_iterable(GROUPS.values()), "allocator")


# -- architecture ------------------------------------------------------------------------------------

_ARCH_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def _arch_from_config(cfg: Mapping[str, Any], where: str) -> dict:
    missing = [k for k in _ARCH_KEYS if not cfg.get(k)]
    if missing:
        raise HarnessError(f"{where}: no {', '.join(missing)} in the model's config: cannot predict its memory")
    heads = int(cfg["num_attention_heads"])
    return dict(
        model_type=cfg.get("model_type", ""),
        hidden_size=int(cfg["hidden_size"]), intermediate_size=int(cfg["intermediate_size"]),
        num_hidden_layers=int(cfg["num_hidden_layers"]), num_attention_heads=heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or heads), vocab_size=int(cfg["vocab_size"]),
        head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        # Qwen2 has biases on Q, K and V; Llama-style configs say so with attention_bias.
        attention_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
    )


def _hub_cached_config(name: str) -> Path | None:
    """config.json of a hub id already in the local Hugging Face cache (newest snapshot)."""
    import os

    hub = os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "hub"
    snaps = Path(hub) / f"models--{name.replace('/', '--')}" / "snapshots"
    found = sorted(snaps.glob("*/config.json"), key=lambda p: p.stat().st_mtime) if snaps.is_dir() else []
    return found[-1] if found else None


def architecture(cfg_or_model_name: Any, sweep_dir: str | Path | None = None) -> dict:
    """The shape memory depends on, as a plain dict: hidden_size, intermediate_size,
    num_hidden_layers, num_attention_heads, num_key_value_heads, vocab_size, head_dim,
    tie_word_embeddings, attention_bias (and model_type).

    ``cfg_or_model_name``: a :class:`SweepConfig` or a model name as ``model.name`` takes it: a
    preset (no file read), a local folder with a config.json (relative names are tried from the
    current folder, then from ``sweep_dir``), or a hub id already in the local Hugging Face cache.
    Anything else raises :class:`HarnessError`: a hub id's shape is not fetched over the network.
    """
    name = cfg_or_model_name if isinstance(cfg_or_model_name, str) else cfg_or_model_name.model.name
    if is_preset(name):
        return _arch_from_config(PRESETS[name], f"preset {name}")
    candidates = [Path(name).expanduser()]
    if sweep_dir is not None and not candidates[0].is_absolute():
        candidates.append(Path(sweep_dir) / name)
    config = next((c / "config.json" for c in candidates if (c / "config.json").is_file()), None)
    if config is None and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name):
        config = _hub_cached_config(name)
    if config is None:
        raise HarnessError(
            f"{name}: not a preset ({', '.join(PRESETS)}), not a local folder with a config.json, and not in "
            "the local Hugging Face cache: its memory cannot be predicted (download the model, or give a folder)")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise HarnessError(f"{config}: cannot read the model's config ({err})") from None
    data = data.get("text_config", data) if isinstance(data, dict) else {}
    return _arch_from_config(data, str(config))


def _linears(arch: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """One decoder layer's linear layers, by the names target_modules uses: (d_in, d_out)."""
    h, i = arch["hidden_size"], arch["intermediate_size"]
    q = arch["num_attention_heads"] * arch["head_dim"]
    kv = arch["num_key_value_heads"] * arch["head_dim"]
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def parameter_counts(arch: Mapping[str, Any]) -> dict[str, int]:
    """``linear``: the decoder layers' linear weights (what 4-bit quantizes); ``other``: embeddings,
    the LM head (unless tied), norms and biases; ``total``: both."""
    h, v, layers = arch["hidden_size"], arch["vocab_size"], arch["num_hidden_layers"]
    lin = _linears(arch)
    linear = layers * sum(a * b for a, b in lin.values())
    bias = layers * (lin["q_proj"][1] + 2 * lin["k_proj"][1]) if arch.get("attention_bias") else 0
    other = v * h * (1 if arch.get("tie_word_embeddings") else 2) + layers * 2 * h + h + bias
    return {"linear": linear, "other": other, "total": linear + other}


def lora_parameters(arch: Mapping[str, Any], rank: int, targets: Iterable[str]) -> int:
    """r * (d_in + d_out) per adapted linear layer, over every decoder layer (A is r x d_in, B d_out x r)."""
    targets = set(targets)
    return arch["num_hidden_layers"] * sum(rank * (a + b) for n, (a, b) in _linears(arch).items() if n in targets)


# -- the analytic model ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Prediction:
    """A trial's predicted peak GPU memory, in MiB, by part. T is the micro-batch's tokens
    (batch_size x max_seq_length: the worst case, every row full), L the decoder layers, h the
    hidden size, i the MLP's intermediate size, V the vocabulary, P the model's parameters, a the
    bytes of an activation element (the compute dtype: 2 for bf16/fp16, 4 for fp32).

    - ``cuda_context``: :data:`CUDA_CONTEXT_MIB`, held by the process outside the allocator (not
      part of a measured ``peak_mem_mib``; part of what a card must hold).
    - ``weights``: P x the dtype's bytes (:data:`DTYPE_BYTES`); with ``load_in_4bit`` (LoRA only)
      the decoder's linear weights take :data:`NF4_BYTES` each and embeddings, head and norms stay
      in the compute dtype.
    - ``overhead``: :data:`FIXED_OVERHEAD_MIB` (cuBLAS workspaces, RoPE tables, kernel scratch).
    - ``trainable``: LoRA, its parameters r x (d_in + d_out) per adapted layer per decoder layer,
      each with :data:`LORA_STATE_BYTES` (fp32 weight, gradient, AdamW's two moments); full, every
      weight's gradient and AdamW's two moments in the weights' dtype
      (:data:`FULL_GRAD_STATE_FACTOR` x the weights).
    - ``optimizer_step``: the scratch AdamW's foreach step allocates, one more copy of what it
      trains (:data:`LORA_STEP_BYTES` per adapter parameter; the weights again for full).
    - ``saved_activations``: what the forward keeps for the backward, all layers at once.
      Checkpointing off: every layer's saved set, L x T x s x a, where s = 4h + 2q + 2kv + 2i
      (+ r per LoRA adapter) elements per token (see the constants' comments); ``true``
      (standard checkpointing): each layer's input only, L x T x h x a; ``unsloth``: those inputs
      are offloaded to CPU memory, so nothing stays on the GPU.
    - ``transient``: the largest of three moments that never coexist: (1) one layer's backward,
      T x s x a x :data:`RECOMPUTE_FACTOR` (its recomputed set and the gradients through it;
      :data:`NO_RECOMPUTE_FACTOR` without checkpointing) plus the residual stream,
      T x h x :data:`RESIDUAL_BYTES`; (2) the loss, T x V x :data:`LOGITS_BYTES` (logits and
      their gradient); (3) validation, :data:`EVAL_BATCH_SIZE` x max_seq_length x V x
      :data:`EVAL_LOGITS_BYTES`.
    - ``allocator``: :data:`ALLOCATOR_FRACTION` of all the above but the context: reserved over
      allocated.

    ``grad_accum``, ``packing`` and ``batching`` change nothing: micro-batches run one after
    another, and a packed or padded row is at most max_seq_length tokens either way (a
    padding-free micro-batch of batch_size rows is at most batch_size x max_seq_length tokens
    long); ``max_tokens_per_batch``, when set, is T.
    """

    total_mib: float
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def peak_mib(self) -> float:
        """What a trial measures as ``peak_mem_mib`` (CUDA max reserved): the total without the
        context. ``memory_budget_mib`` caps this number."""
        return self.total_mib - self.parts.get("cuda_context", 0.0)

    def groups(self) -> dict[str, float]:
        """The parts summed by :data:`GROUPS`, each with its share of the allocator's overhead:
        the terms a :class:`Calibration` scales."""
        return _groups(self.parts)

    def to_dict(self) -> dict[str, Any]:
        return {"total_mib": round(self.total_mib, 1), "peak_mib": round(self.peak_mib, 1),
                "parts": {k: round(v, 1) for k, v in self.parts.items()}}


def _groups(parts: Mapping[str, float]) -> dict[str, float]:
    raw = {g: sum(parts.get(p, 0.0) for p in names) for g, names in GROUPS.items()}
    allocated = sum(raw.values())
    share = parts.get("allocator", 0.0) / allocated if allocated else 0.0
    return {g: v * (1 + share) for g, v in raw.items()}


def _largest(dim: Any) -> Any:
    """The value of a searched dimension that needs the most memory (its largest)."""
    values = getattr(dim, "choices", None) or [getattr(dim, "high")]
    try:
        return max(values)
    except TypeError:
        return values[0]


def _gc(value: Any) -> str:
    return {True: "true", False: "false"}.get(value, str(value).lower()) if isinstance(value, bool) else str(value).lower()


def trial_values(cfg: Any, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """``params`` completed with the sweep's fixed values, and for a searched dimension they leave
    out, its largest value (the worst case)."""
    out = {n: _largest(d) for n, d in cfg.search_space.searched().items()}
    out.update(cfg.search_space.fixed())
    out.update(params or {})
    return hp.typed(out)


def predict(cfg: Any, params: Mapping[str, Any] | None = None, arch: Mapping[str, Any] | None = None) -> Prediction:
    """Predict the peak GPU memory of one trial of ``cfg`` (a :class:`SweepConfig`) with these
    hyperparameters (a trial's params; missing ones are filled by :func:`trial_values`).

    ``arch``: the model's :func:`architecture`, read from ``cfg.model.name`` when not given (pass
    it when predicting many trials of one sweep). The terms are documented on :class:`Prediction`.
    """
    arch = arch if arch is not None else architecture(cfg)
    p = trial_values(cfg, params)
    m = cfg.model
    full = p.get("method", "lora") == "full"
    quantized = bool(m.load_in_4bit) and not full  # full fine-tuning never loads in 4 bits
    wbytes = DTYPE_BYTES[m.dtype]
    abytes = wbytes  # compute dtype; bitsandbytes computes in bf16 (or the dtype asked for)
    gc = _gc(m.gradient_checkpointing)

    h, i, v, layers = arch["hidden_size"], arch["intermediate_size"], arch["vocab_size"], arch["num_hidden_layers"]
    q = arch["num_attention_heads"] * arch["head_dim"]
    kv = arch["num_key_value_heads"] * arch["head_dim"]
    counts = parameter_counts(arch)
    rank = int(p.get("lora_r") or 0)
    targets = [t for t in m.target_modules if t in _linears(arch)]
    # A micro-batch's tokens: batch_size rows of up to max_seq_length, or the token cap when one is set.
    tokens = int(p.get("max_tokens_per_batch") or 0) or int(p["batch_size"]) * cfg.max_seq_length

    parts: dict[str, float] = {"cuda_context": CUDA_CONTEXT_MIB}
    if quantized:
        parts["weights"] = (counts["linear"] * NF4_BYTES + counts["other"] * wbytes) / MIB
    else:
        parts["weights"] = counts["total"] * wbytes / MIB
    parts["overhead"] = FIXED_OVERHEAD_MIB
    if full:
        parts["trainable"] = counts["total"] * wbytes * FULL_GRAD_STATE_FACTOR / MIB
        parts["optimizer_step"] = counts["total"] * wbytes * FULL_STEP_FACTOR / MIB
    else:
        adapters = lora_parameters(arch, rank, targets)
        parts["trainable"] = adapters * LORA_STATE_BYTES / MIB
        parts["optimizer_step"] = adapters * LORA_STEP_BYTES / MIB

    saved_set = 4 * h + 2 * q + 2 * kv + 2 * i + (0 if full else rank * len(targets))  # elements per token, one layer
    if gc == "false":
        parts["saved_activations"] = layers * tokens * saved_set * abytes / MIB
        layer_backward = tokens * saved_set * abytes * NO_RECOMPUTE_FACTOR
    else:
        parts["saved_activations"] = 0.0 if gc == "unsloth" else layers * tokens * h * abytes / MIB
        layer_backward = tokens * saved_set * abytes * RECOMPUTE_FACTOR
    layer_backward += tokens * h * RESIDUAL_BYTES
    logits = tokens * v * LOGITS_BYTES
    evaluation = EVAL_BATCH_SIZE * cfg.max_seq_length * v * EVAL_LOGITS_BYTES
    parts["transient"] = max(layer_backward, logits, evaluation) / MIB
    parts["allocator"] = ALLOCATOR_FRACTION * sum(parts[k] for k in parts if k != "cuda_context")
    return Prediction(total_mib=sum(parts.values()), parts=parts)


# What trials trained together on one base hold once (the base and the process's fixed costs);
# every other part is each trial's own, all live at once in a combined step.
SHARED_PARTS = ("cuda_context", "weights", "overhead")


def pack_prediction(preds: list[Prediction]) -> Prediction:
    """The peak of trials trained together on one base (concurrent trials): the shared parts once,
    each trial's adapters, optimizer state, activations and transients summed (their micro-batches
    are one combined batch), the allocator's share with them. A conservative sum: the largest
    transient of a combined step is below the sum of the trials' own."""
    names = {name for pred in preds for name in pred.parts}
    parts = {name: (max if name in SHARED_PARTS else sum)(pred.parts.get(name, 0.0) for pred in preds)
             for name in names}
    return Prediction(total_mib=sum(parts.values()), parts=parts)


def over_limit(pred: Prediction, limit_mib: float, margin: float = 0.05, *, include_context: bool = True) -> bool:
    """Whether the prediction, with ``margin`` to spare, goes over ``limit_mib``:
    predicted x (1 + margin) > limit.

    ``include_context=True`` (a card's memory): the predicted total, the CUDA context included.
    ``include_context=False`` (``memory_budget_mib``, which caps the allocator and is checked against
    the measured ``peak_mem_mib``): the total without the context, :attr:`Prediction.peak_mib`.
    """
    predicted = pred.total_mib if include_context else pred.peak_mib
    return predicted * (1 + margin) > limit_mib


# -- calibration -------------------------------------------------------------------------------------

def nnls(rows: list[list[float]], y: list[float]) -> list[float]:
    """Non-negative least squares, min ||X m - y|| with m >= 0 (``scipy.optimize.nnls``)."""
    solution, _ = scipy.optimize.nnls(np.asarray(rows, dtype=float), np.asarray(y, dtype=float))
    return [float(v) for v in solution]


# Pulls each multiplier toward 1, so that a group the finished trials barely tell apart (every
# trial LoRA, say: the optimizer group hardly varies) keeps the analytic model's value instead of
# an arbitrary one. Relative to the data's own scale. Chosen on the H100 grid of
# bench/predictor_check.py (bench/predictor/report.md): fitting three multipliers to a study's
# first three trials, 1e-4 overfitted them (one order's worst error 27% on the 7B preset) where
# 1e-2 to 1e-1 kept every order's worst under 10% on both presets; 0.03 is mid-range.
RIDGE = 0.03


@dataclass(frozen=True)
class Calibration:
    """Multipliers on the analytic model's groups of parts (:data:`GROUPS`: ``fixed``,
    ``optimizer``, ``activations``), fitted from finished trials on one GPU and software.

    :meth:`fit`: three pairs or more, non-negative least squares of the measured peaks (CUDA max
    reserved, ``peak_mem_mib``) on the predicted groups, each group with its share of the
    allocator's overhead, lightly pulled toward 1 (:data:`RIDGE`); one or two pairs, one scale on
    everything (the least-squares ratio); none, the identity. The CUDA context is never scaled:
    the measured peak does not include it.
    """

    multipliers: dict[str, float] = field(default_factory=lambda: {g: 1.0 for g in GROUPS})
    n_pairs: int = 0
    kind: str = "identity"  # identity | scale | groups

    @classmethod
    def fit(cls, pairs: Iterable[tuple[Prediction | Mapping[str, float], float]]) -> "Calibration":
        """From (``Prediction`` or its ``parts``, measured ``peak_mem_mib``) pairs."""
        rows, y = [], []
        for pred, measured in pairs:
            parts = pred.parts if isinstance(pred, Prediction) else pred
            if measured is None or not math.isfinite(float(measured)) or measured <= 0:
                continue
            g = _groups(parts)
            rows.append([g[name] for name in GROUPS])
            y.append(float(measured))
        if not rows:
            return cls()
        if len(rows) < 3:
            predicted = [sum(r) for r in rows]
            s = sum(p * t for p, t in zip(predicted, y)) / sum(p * p for p in predicted)
            return cls({g: s for g in GROUPS}, len(rows), "scale")
        k = len(GROUPS)
        lam = RIDGE * sum(r[c] ** 2 for r in rows for c in range(k)) / k
        aug_rows = rows + [[math.sqrt(lam) if c == j else 0.0 for c in range(k)] for j in range(k)]
        aug_y = y + [math.sqrt(lam)] * k
        sol = nnls(aug_rows, aug_y)
        return cls(dict(zip(GROUPS, sol)), len(rows), "groups")

    def apply(self, pred: Prediction) -> Prediction:
        """The prediction with each group's parts scaled by its multiplier (the allocator's share
        with them); the CUDA context as it was."""
        raw = {g: sum(pred.parts.get(p, 0.0) for p in names) for g, names in GROUPS.items()}
        allocated = sum(raw.values())
        share = pred.parts.get("allocator", 0.0) / allocated if allocated else 0.0
        parts = dict(pred.parts)
        for g, names in GROUPS.items():
            for p in names:
                if p in parts:
                    parts[p] = parts[p] * self.multipliers.get(g, 1.0)
        parts["allocator"] = share * sum(raw[g] * self.multipliers.get(g, 1.0) for g in GROUPS)
        return Prediction(total_mib=sum(parts.values()), parts=parts)

    def to_json(self) -> dict[str, Any]:
        return {"multipliers": self.multipliers, "n_pairs": self.n_pairs, "kind": self.kind}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Calibration":
        return cls({g: float(data["multipliers"].get(g, 1.0)) for g in GROUPS}, int(data.get("n_pairs", 0)),
                   str(data.get("kind", "groups")))


def software_versions() -> dict[str, str]:
    """Installed versions of what shapes a trial's memory (read from package metadata: nothing
    is imported). A package that is not installed is left out."""
    from importlib import metadata

    out = {}
    for name in ("torch", "transformers", "peft", "unsloth", "unsloth_zoo", "bitsandbytes"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def fingerprint_key(gpu_name: str, versions: Mapping[str, str]) -> str:
    """A file-name-safe key for one GPU model and software stack: the GPU's name as a slug, and a
    short hash of the versions, e.g. ``nvidia-h100-80gb-hbm3-3f2a9c1d0b``."""
    slug = re.sub(r"[^a-z0-9]+", "-", (gpu_name or "unknown-gpu").lower()).strip("-") or "gpu"
    digest = hashlib.sha256(json.dumps(dict(sorted(versions.items())), sort_keys=True).encode()).hexdigest()[:10]
    return f"{slug}-{digest}"


def calibration_path(key: str) -> Path:
    from harness.data.sources import cache_root

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", key):
        raise ValueError(f"not a calibration key: {key!r} (use fingerprint_key)")
    return cache_root() / "memory" / f"{key}.json"


def load_calibration(key: str) -> Calibration:
    """The calibration saved under ``key``, or the identity when there is none (or it is unreadable)."""
    path = calibration_path(key)
    try:
        return Calibration.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return Calibration()


def save_calibration(key: str, calib: Calibration) -> Path:
    from harness.files import write_json_atomic

    path = calibration_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, calib.to_json())
    return path


# -- sweep configurations, for `harness predict` ------------------------------------------------------

def _range_value(name: str, dim: Any, rng: random.Random) -> Any:
    if dim.step is not None:
        n = int(round((dim.high - dim.low) / dim.step))
        return dim.low + rng.randint(0, n) * dim.step
    if dim.log:
        value = math.exp(rng.uniform(math.log(dim.low), math.log(dim.high)))
    else:
        value = rng.uniform(dim.low, dim.high)
    return round(value) if name in hp.INTEGER else value


def sweep_configs(cfg: Any, samples: int = 8) -> tuple[list[dict[str, Any]], bool]:
    """The configurations ``harness predict`` shows, and whether they are the whole grid: every
    combination when the search space has only choices and fixed values, otherwise ``samples``
    random draws (seeded by the sweep's seed; ranges uniform, or log-uniform)."""
    searched = cfg.search_space.searched()
    fixed = cfg.search_space.fixed()
    if all(hasattr(d, "choices") for d in searched.values()):
        names = list(searched)
        grid = [dict(zip(names, combo)) for combo in itertools.product(*(searched[n].choices for n in names))]
        return [hp.typed({**fixed, **g}) for g in grid], True
    rng = random.Random(cfg.seed)
    out = []
    for _ in range(samples):
        draw = {n: rng.choice(d.choices) if hasattr(d, "choices") else _range_value(n, d, rng)
                for n, d in searched.items()}
        out.append(hp.typed({**fixed, **draw}))
    return out, False



# -- in a study: predict before each trial, skip what cannot fit, learn from what ran -------------

def card_memory() -> tuple[str | None, float | None]:
    """The first visible GPU's name and total memory (MiB) through NVML; (None, None) without one."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            name = pynvml.nvmlDeviceGetName(handle)
            total = pynvml.nvmlDeviceGetMemoryInfo(handle).total / MIB
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no library, no driver, no device: nothing to check against
        return None, None
    return (name.decode() if isinstance(name, bytes) else name), float(total)


class StudyMemory:
    """The driver's memory predictor for one study.

    Before a trial starts: its peak memory predicted by the analytic model, calibrated by the
    measured peaks of this study's finished GPU trials (or, before any, by the calibration cached
    for this GPU and software); a config predicted over ``memory_budget_mib`` (the allocator's
    peak) or over the card (context included), with a ``margin`` of safety, is infeasible without
    running (``predicted_oom``). After a GPU trial: its (prediction, measured peak) pair refits the
    calibration, which is saved to the cache for the next study.

    ``skip`` (``predicted_oom`` in the sweep file): ``auto`` skips on GPU hosts only (the model
    predicts GPU memory; a CPU trial is judged by its RSS), ``on`` always, ``off`` never; the
    prediction is recorded either way.
    """

    def __init__(self, cfg: Any, sweep_dir: Path | None, completed: Iterable[tuple[Mapping, Mapping]] = (),
                 margin: float = 0.05):
        self.cfg, self.margin = cfg, margin
        self.gpu_name, self.card_mib = card_memory()
        try:
            self.arch = architecture(cfg, sweep_dir)
        except HarnessError:
            self.arch = None  # a hub model not in the local cache: no prediction, nothing skipped
        mode = getattr(cfg, "predicted_oom", "auto")
        self.skip = mode == "on" or (mode == "auto" and self.gpu_name is not None)
        self.key = fingerprint_key(self.gpu_name, software_versions()) if self.gpu_name else None
        self.pairs: list[tuple[dict, float]] = []
        for params, attrs in completed:
            self._add(params, attrs)
        self.calibration = (Calibration.fit(self.pairs) if self.pairs else
                            load_calibration(self.key) if self.key else Calibration.fit([]))

    def _add(self, params: Mapping, attrs: Mapping) -> None:
        if self.arch is None or attrs.get("device") != "cuda" or not attrs.get("peak_mem_mib"):
            return
        self.pairs.append((predict(self.cfg, params, self.arch).parts, float(attrs["peak_mem_mib"])))

    def check(self, params: Mapping) -> tuple[Prediction | None, str | None]:
        """(the calibrated prediction, the reason it cannot fit, or None)."""
        if self.arch is None:
            return None, None
        pred = self.calibration.apply(predict(self.cfg, params, self.arch))
        if not self.skip:
            return pred, None
        budget = self.cfg.memory_budget_mib
        if budget and over_limit(pred, budget, self.margin, include_context=False):
            return pred, (f"predicted out of memory: {pred.peak_mib:,.0f} MiB predicted (+{self.margin:.0%} margin) "
                          f"is over memory_budget_mib {budget:,.0f}; not run")
        if self.card_mib and over_limit(pred, self.card_mib, self.margin):
            return pred, (f"predicted out of memory: {pred.total_mib:,.0f} MiB predicted with the CUDA context "
                          f"(+{self.margin:.0%} margin) is over the card's {self.card_mib:,.0f} MiB; not run")
        return pred, None

    def pack_fits(self, params_list: list[Mapping]) -> tuple[bool, str | None]:
        """Whether trials trained together on one base (``concurrent_trials``) are predicted to fit
        (memory_budget_mib, or the card); with the reason when not. Unpredictable: they fit."""
        if self.arch is None or not self.skip or not params_list:
            return True, None
        pred = pack_prediction([self.calibration.apply(predict(self.cfg, p, self.arch)) for p in params_list])
        budget = self.cfg.memory_budget_mib
        if budget and over_limit(pred, budget, self.margin, include_context=False):
            return False, f"a pack of {len(params_list)} predicted at {pred.peak_mib:,.0f} MiB, over memory_budget_mib"
        if self.card_mib and over_limit(pred, self.card_mib, self.margin):
            return False, f"a pack of {len(params_list)} predicted at {pred.total_mib:,.0f} MiB, over the card"
        return True, None

    def learn(self, params: Mapping, attrs: Mapping) -> None:
        before = len(self.pairs)
        self._add(params, attrs)
        if len(self.pairs) > before:
            self.calibration = Calibration.fit(self.pairs)
            if self.key:
                save_calibration(self.key, self.calibration)
