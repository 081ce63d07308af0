"""The training step, readable in one page: Unsloth LoRA or full fine-tuning, dynamic padding,
periodic validation.

A trial process imports unsloth before this module (``trial.import_training_stack``), since it
patches transformers and peft; this module imports neither at load time, so a process that trains
with plain transformers + PEFT (``bench/literature.py``) can use the same loop unpatched.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from harness.params import TrainParams
from harness.worker import backends
from harness.worker.batching import (Row, batches, collate, collate_for, load_rows, pack,  # noqa: F401
                                     predicted_tokens, token_counts)
from harness.worker.distributed import Dist, init_distributed  # noqa: F401
from harness.worker.step import DataBudget, accumulate, lr_factor, seed_everything, step_timing  # noqa: F401
from harness.worker.metrics import (failure_message, is_out_of_memory, memory_in_use, peak_memory,  # noqa: F401
                                    release_cached_memory, reset_peak_memory)

EVAL_BATCH_SIZE = 8  # fixed across trials so every trial's validation loss is computed alike


@dataclass
class TrainResult:
    val_loss: float | None = None
    val_loss_start: float | None = None  # before the first step: the base model's (LoRA starts at B = 0)
    stopped_by: str | None = None  # what on_eval answered: "pruned" or "converged"; None: ran its budget
    budget_unit: str = "tokens"
    budget: float = 0.0
    steps: int = 0
    tokens_trained: int = 0
    examples_trained: int = 0
    tokens_per_s: float | None = None
    padded_tokens_per_s: float | None = None  # counting padding too: what the GPU actually computed
    tokens_computed: int = 0  # padding included: tokens_trained / tokens_computed is the share that was data
    train_s: float = 0.0
    eval_s: float = 0.0
    history: list[dict] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)  # each optimizer step's duration
    steady_step_s: float | None = None  # the median step after timing_warmup_steps (step.step_timing)
    warmup_s: float | None = None  # what the first timing_warmup_steps took beyond that pace


class NonFiniteLoss(RuntimeError):
    pass


def resolve_device(wanted: str) -> str:
    if wanted == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("the sweep file asks for device: cuda, but no CUDA GPU is visible here")
    return "cuda" if wanted in ("auto", "cuda") and torch.cuda.is_available() else "cpu"


def resolve_dtype(wanted: str, device: str) -> torch.dtype:
    if wanted != "auto":
        return getattr(torch, wanted)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # bf16 matmuls are slow on most CPUs, and fp32 makes CPU results exact


def load_model(model_dir: str, max_seq_length: int, dtype: torch.dtype, load_in_4bit: bool):
    """A model alone, for evaluation: a base to attach a saved adapter to, or a saved full model."""
    import unsloth  # noqa: F401  (before transformers/peft: it patches them)
    from unsloth import FastLanguageModel

    return FastLanguageModel.from_pretrained(
        model_name=model_dir, max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=load_in_4bit,
    )


def load_trainable_model(model_dir: str, p: TrainParams, *, max_seq_length: int, dtype: torch.dtype,
                         load_in_4bit: bool, target_modules: list[str], checkpointing, seed: int):
    """The model a trial trains, by its method: LoRA adapters on a frozen base (``lora``), or the
    whole model (``full``: lora_r, lora_alpha, lora_dropout, target_modules and load_in_4bit do
    not apply). Returns (model, tokenizer)."""
    if p.method == "full":
        return backends.load_unsloth_full(model_dir, max_seq_length=max_seq_length, dtype=dtype,
                                          checkpointing=checkpointing)
    return backends.load_unsloth(
        model_dir, max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=load_in_4bit, lora_r=p.lora_r,
        lora_alpha=p.lora_alpha, lora_dropout=p.lora_dropout, target_modules=target_modules,
        checkpointing=checkpointing, seed=seed,
    )


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters (``parameters()`` yields tied weights once)."""
    tensors = list(model.parameters())
    return sum(t.numel() for t in tensors if t.requires_grad), sum(t.numel() for t in tensors)


@torch.no_grad()
def evaluate(model, rows: list[np.ndarray], pad_id: int, device: str, dist: Dist = Dist()) -> float:
    """Mean token-level cross-entropy over all of ``rows`` (in a fixed order; shared out by rank)."""
    was_training = model.training
    model.eval()
    loss_sum, count = 0.0, 0
    batches_ = range(0, len(rows), EVAL_BATCH_SIZE)
    for i in list(batches_)[dist.rank :: dist.world]:
        batch = collate(rows[i : i + EVAL_BATCH_SIZE], pad_id, device)
        n = predicted_tokens(batch)
        if n == 0:
            continue
        loss_sum += float(model(**batch).loss.float()) * n
        count += n
    model.train(was_training)
    loss_sum, count = dist.sum(loss_sum, count)
    return loss_sum / max(count, 1)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train(
    model, train_rows, val_rows, p: TrainParams, *, pad_id: int, device: str, seed: int, max_seq_length: int,
    budget: DataBudget, timing_warmup_steps: int,
    on_step: Callable[[int, float, float], None], on_eval: Callable[[int, float, float | None], str | None],
    dist: Dist = Dist(),
    evaluate_start: bool = False,
) -> TrainResult:
    """Train with AdamW until the data budget is spent (or ``p.epochs`` passes over the data),
    validating at each of the budget's milestones.

    The learning rate warms up and decays over the budget's data (``step.lr_factor``).
    ``on_eval(milestone, val_loss, tokens_per_s)`` (the speed after the warm-up steps, None before
    any timed step) returning a reason (``"pruned"``, ``"converged"``) stops
    training. Validation always runs on the unpacked rows, so packed and padded trials are
    compared alike. ``evaluate_start`` also validates before the first step (``val_loss_start``).

    ``p.packing``, ``p.batching`` and ``p.max_tokens_per_batch`` shape the micro-batches
    (``batching.BatchStream``, ``batching.collate_for``); the budget counts non-padding tokens
    whatever they are, and ``examples`` counts rows (naive packing: its sequences).
    """
    if p.packing == "naive":
        train_rows = pack(train_rows, max_seq_length)
    if not p.max_tokens_per_batch and len(train_rows) < p.batch_size * dist.world:
        raise ValueError(f"the training split has {len(train_rows)} rows, fewer than one batch of {p.batch_size}")
    trainable = [t for t in model.parameters() if t.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=p.learning_rate, weight_decay=p.weight_decay)
    result = TrainResult(budget_unit=budget.unit, budget=budget.total)
    stream = batches(train_rows, p.batch_size, seed, batching=p.batching, max_tokens=p.max_tokens_per_batch,
                     flat=p.packing == "padding_free")
    timed_tokens, timed_padded, timed_s = 0, 0, 0.0
    next_eval = 1
    if evaluate_start:
        t0 = time.perf_counter()
        result.val_loss_start = evaluate(model, val_rows, pad_id, device, dist)  # "before" for the summary
        result.eval_s += time.perf_counter() - t0
    model.train()
    while True:
        progress = budget.position(result.tokens_trained, result.examples_trained, result.steps) / budget.total
        for group in opt.param_groups:
            group["lr"] = p.learning_rate * lr_factor(progress, p.warmup_ratio)
        sync(device)
        t0 = time.perf_counter()
        # Every rank draws every rank's micro-batches and keeps its own: the same order on all ranks.
        drawn = [[next(stream) for _ in range(dist.world)] for _ in range(p.grad_accum)]
        micro = [collate_for(p.packing, rows[dist.rank], pad_id, device) for rows in drawn]
        step_loss, _ = accumulate(model, micro, dist)
        if not math.isfinite(step_loss):
            raise NonFiniteLoss(f"loss became {step_loss} at step {result.steps + 1}")
        dist.sum_gradients(trainable)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        dt = time.perf_counter() - t0
        counts = [token_counts(b) for b in micro]
        tokens, padded = (int(x) for x in dist.sum(sum(c[0] for c in counts), sum(c[1] for c in counts)))
        result.steps += 1
        result.tokens_trained += tokens
        result.tokens_computed += padded
        result.examples_trained += sum(len(rows) for ranks in drawn for rows in ranks)
        result.train_s += dt
        result.step_s.append(dt)
        if result.steps > timing_warmup_steps:
            timed_tokens, timed_padded, timed_s = timed_tokens + tokens, timed_padded + padded, timed_s + dt
        position = budget.position(result.tokens_trained, result.examples_trained, result.steps)
        on_step(result.steps, min(1.0, position / budget.total), step_loss)
        done = position >= budget.total or stream.epochs_done >= p.epochs
        if position >= budget.milestone(next_eval) or done:
            while next_eval < budget.milestones() and position >= budget.milestone(next_eval + 1):
                next_eval += 1  # a step larger than the cadence passes several milestones at once
            milestone = budget.milestone(next_eval) if not done else int(round(min(position, budget.total)))
            t0 = time.perf_counter()
            result.val_loss = evaluate(model, val_rows, pad_id, device, dist)
            result.eval_s += time.perf_counter() - t0
            if timed_s:
                result.tokens_per_s, result.padded_tokens_per_s = timed_tokens / timed_s, timed_padded / timed_s
            elif result.train_s:  # too few steps to leave the warm-up out
                result.tokens_per_s = result.tokens_trained / result.train_s
            result.history.append({"step": result.steps, "milestone": milestone, "train_loss": step_loss,
                                   "val_loss": result.val_loss, "tokens_per_s": result.tokens_per_s,
                                   "tokens": result.tokens_trained, "seconds": result.train_s + result.eval_s})
            next_eval += 1
            stop = dist.decide(on_eval(milestone, result.val_loss, timed_tokens / timed_s if timed_s else None))
            if stop or done:
                result.stopped_by = stop or None
                result.warmup_s, result.steady_step_s = step_timing(result.step_s, timing_warmup_steps)
                return result
