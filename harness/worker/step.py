"""Training arithmetic, importable without Unsloth: the data budget, the learning-rate schedule
and one optimizer step's token-weighted gradient accumulation. ``loop.py`` trains with these;
``tests/test_arithmetic.py`` checks them on small torch models."""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass

import numpy as np
import torch

from harness.worker.batching import predicted_tokens
from harness.worker.distributed import Dist

UNITS = ("tokens", "examples", "steps")


@dataclass(frozen=True)
class DataBudget:
    """How much a trial trains, in one unit: non-padding ``tokens``, ``examples`` (rows, or packed
    sequences), or optimizer ``steps``; validated every ``eval_every`` of the same unit.

    Every trial of a study is measured against the same budget, so with ``tokens`` or
    ``examples`` trials that differ in batch size still see the same amount of data, and the pruner
    compares them at the same data milestones. ``steps`` is the explicit exception: a step of a
    larger batch holds more data.
    """

    unit: str
    total: float
    eval_every: float

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"unknown budget unit {self.unit!r}")
        if self.total <= 0 or self.eval_every <= 0:
            raise ValueError("a budget and its evaluation cadence must be positive")

    def position(self, tokens: int, examples: int, steps: int) -> float:
        """Where training stands, in the budget's unit."""
        return {"tokens": tokens, "examples": examples, "steps": steps}[self.unit]

    def milestone(self, index: int) -> int:
        """The ``index``-th evaluation point (1-based) as a whole number of units: what the pruner
        sees as the step, so every trial reports at the same points."""
        return int(round(min(self.total, index * self.eval_every)))

    def milestones(self) -> int:
        return math.ceil(self.total / self.eval_every - 1e-9)


def lr_factor(progress: float, warmup_fraction: float) -> float:
    """The learning rate's multiplier at ``progress`` (0 to 1) through the budget: a linear
    warm-up over the first ``warmup_fraction``, then a linear decay to zero at the budget's end.
    Driven by data seen, not by steps, so its length follows the budget whatever the batch size."""
    progress = min(max(progress, 0.0), 1.0)
    if warmup_fraction > 0 and progress < warmup_fraction:
        return (progress + 1e-12) / warmup_fraction
    return max(0.0, (1.0 - progress) / max(1e-12, 1.0 - warmup_fraction))


def step_timing(durations: list[float], warmup_steps: int) -> tuple[float | None, float | None]:
    """(``warmup_s``, ``steady_step_s``) of a run whose optimizer steps took ``durations`` seconds.

    ``steady_step_s`` is the median duration of the steps after the first ``warmup_steps``;
    ``warmup_s`` is what those first steps took beyond that pace (the sum of their duration less
    ``steady_step_s``, at least 0). Both None when no step came after the warm-up.
    """
    steady = durations[warmup_steps:]
    if not steady:
        return None, None
    # The median: one slow step (an evaluation's allocator churn, a recompile) does not move it.
    pace = statistics.median(steady)
    return max(0.0, sum(d - pace for d in durations[:warmup_steps])), pace


def seed_everything(seed: int) -> None:
    """One seed for everything random in a trial: Python, NumPy and torch (CPU and CUDA): model
    init, LoRA init, dropout. (The batch order has its own generator, seeded from the same seed.)"""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def accumulate(model, micro_batches: list[dict[str, torch.Tensor]], dist: Dist = Dist()) -> tuple[float, int]:
    """Forward and backward over one step's micro-batches; (the step's loss, its loss tokens).

    Each micro-batch's mean loss is weighted by its share of the step's predicted tokens (summed
    over all ranks), so the gradient equals that of the token-mean loss over the whole step,
    whatever the split into micro-batches, their padding or the number of processes.

    With several processes every trainable parameter leaves with a gradient (zeros where this rank
    had nothing to predict), so ``Dist.sum_gradients`` all-reduces the same tensors on every rank.
    """
    counts = [predicted_tokens(b) for b in micro_batches]
    n_total = max(1, int(dist.sum(float(sum(counts)))[0]))
    step_loss = 0.0
    for batch, n in zip(micro_batches, counts):
        if n == 0:
            continue  # nothing to predict (every label masked): its mean loss would be 0/0
        loss = model(**batch).loss * (n / n_total)
        loss.backward()
        step_loss += float(loss.detach())
    if dist.world > 1:
        for p in model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
    return dist.sum(step_loss)[0], n_total
