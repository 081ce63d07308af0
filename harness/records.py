"""The trial record: what a trial process hands its driver.

A worker sends the driver a :class:`TrialReport` at the end of each trial: what happened (its
seeds' curves, its measurements, the exception that ended it), never a verdict. The driver alone
decides the trial's outcome, from that report and what its launcher saw of the process
(:func:`harness.sweep.outcome.decide`), as a :class:`TrialResult`, turns it into the trial's final
Optuna state (:func:`harness.sweep.study.record_result`), and the report reads the same fields
back from the storage, with each field's type, into ``trials.parquet``.

Torch-free: the driver imports it.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

State = Literal["complete", "pruned", "infeasible", "fail"]
Outcome = Literal["complete", "pruned", "oom", "predicted_oom", "over_budget", "not_converged", "crash", "hang",
                  "nonfinite_loss", "error", "infrastructure", "interrupted", "stale"]

# How a trial ended (``outcome``) and the Optuna state it becomes: every outcome the tables show.
OUTCOME_STATE: dict[Outcome, State] = {
    "complete": "complete",
    "pruned": "pruned",
    "oom": "infeasible",          # out of memory: a property of the config, an Optuna constraint
    "predicted_oom": "infeasible",  # predicted over the memory budget or the card: not run (sweep/predict.py)
    "over_budget": "infeasible",  # over memory_budget_mib
    "not_converged": "infeasible",  # time_to_target: the target loss not reached within the budget
    "crash": "fail",              # ended without a result (signal, segfault, exit)
    "hang": "fail",               # no progress for budget.hang_timeout_s: killed
    "nonfinite_loss": "fail",
    "error": "fail",              # an exception in the trial after training started
    "infrastructure": "fail",     # the process died before training: retried, not counted
    "interrupted": "fail",        # Ctrl-C: retried on the next run, not counted
    "stale": "fail",              # its driver died (heartbeat lost): retried, not counted
}
# Failures that say nothing about the configuration: the trial is run again with the same
# parameters and does not use up n_trials.
RETRIED_OUTCOMES = frozenset({"infrastructure", "interrupted", "stale"})
assert set(OUTCOME_STATE) == set(typing.get_args(Outcome))


@dataclass
class Metrics:
    """A trial's measurements (see the README's metrics table). None where not measured."""

    device: str | None = None
    gpu_name: str | None = None
    dtype: str | None = None
    world_size: int | None = None
    method: str | None = None           # lora | full: how the trial trained (also when the sweep fixes it)
    trainable_params: int | None = None  # weights the optimizer updated: the adapters (lora), every weight (full)
    total_params: int | None = None      # every weight of the model as trained (the adapters included)
    val_loss: float | None = None
    tokens_per_s: float | None = None
    padded_tokens_per_s: float | None = None
    padding_fraction: float | None = None  # padded tokens / computed tokens, over the first seed's training
    tokens_per_s_per_gpu: float | None = None
    peak_mem_mib: float | None = None
    peak_alloc_mib: float | None = None
    peak_reserved_mib: float | None = None
    peak_rss_mib: float | None = None
    peak_mem_mib_per_gpu: list[float] | None = None
    mem_at_failure_mib: float | None = None
    oom_error: str | None = None
    train_s: float | None = None
    eval_s: float | None = None
    steps: int | None = None
    tokens_trained: int | None = None
    examples_trained: int | None = None
    budget_unit: str | None = None   # tokens | examples | steps (an epochs budget is counted in tokens)
    budget: float | None = None
    best_val_loss: float | None = None
    val_loss_start: float | None = None  # before training: the base model's validation loss
    predicted_mem_mib: float | None = None  # the calibrated prediction of peak_mem_mib, made before it ran
    predicted_total_mib: float | None = None  # the same with the CUDA context: what the card must hold
    pruning_saved_s: float | None = None  # a pruned trial: the training seconds its remaining budget would have taken
    time_to_target: float | None = None  # tokens or seconds (objective.measure); None: not reached
    seed_values: list[float] | None = None  # the objective per seed, when seeds > 1
    value_std: float | None = None      # their standard deviation (n - 1)
    fixed_s: float | None = None
    spawn_s: float | None = None
    import_s: float | None = None
    setup_s: float | None = None
    load_s: float | None = None
    preimport_s: float | None = None
    worker_trial: int | None = None  # warm workers: this trial's number within its worker (1: its first)
    base_reused: bool | None = None  # warm workers: the base was already loaded by an earlier trial
    resident_worker: bool | None = None  # run by a worker that `harness warm up` started, kept between studies
    # Concurrent trials (concurrent_trials > 1): the trials it shared the GPU with, and how many
    # trials its iterations held (mean and most).
    shared_with: list[int] | None = None
    pack_size_mean: float | None = None
    pack_size_max: int | None = None
    # Steady pace and warm-up (worker/step.step_timing), from the first seed's run. Speed is known
    # once steps settle; what the first steps cost beyond that pace is paid again by every trial.
    steady_step_s: float | None = None  # median optimizer step after budget.timing_warmup_steps
    warmup_s: float | None = None       # the first timing_warmup_steps' time beyond steady_step_s (>= 0)
    # The training time the trial would have taken at steady pace: steps x steady_step_s, summed
    # over its seeds. The numerator of the sweep efficiency (sweep/efficiency.py), times world_size.
    train_steady_s: float | None = None

    def update(self, **values: Any) -> None:
        for key, value in values.items():
            if key not in METRIC_TYPES:
                raise KeyError(f"no metric named {key!r}")
            setattr(self, key, value)

    def present(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class TrialResult:
    """One trial's record. ``outcome`` decides its Optuna state (``OUTCOME_STATE``)."""

    number: int
    outcome: Outcome
    value: float | None = None       # the objective (validation loss) when complete or pruned
    values: list[float] | None = None  # every objective, in the study's order (multi-objective studies)
    pruned_by: str | None = None     # median | hyperband (Optuna's, one objective) | loss | dominance (sweep/pruning.py)
    reason: str | None = None        # why it failed or is infeasible, one line first
    log_tail: str | None = None      # the last lines of trials/<n>/log.txt
    start_method: str | None = None  # warm | fork
    seed: int | None = None          # the trial's seed (the first, when seeds > 1)
    seeds: list[int] | None = None
    host: str | None = None
    pid: int | None = None
    reached_training: bool = False   # False: the process died before its first step
    metrics: Metrics = field(default_factory=Metrics)
    # Every seed's validation curve, in seed order: per milestone {milestone, tokens, seconds
    # (training + evaluation so far), val_loss, tokens_per_s}. The pruner and the tables see only
    # the first seed's; the recorded benchmark (bench/grid.py) needs each seed's, with its time.
    # Stored as a user attribute, not a column (RECORD_TYPES leaves it out).
    seed_curves: list[list[dict]] | None = None

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOME_STATE:
            raise ValueError(f"unknown outcome {self.outcome!r}; known: {', '.join(OUTCOME_STATE)}")
        if isinstance(self.metrics, dict):
            self.metrics = Metrics(**self.metrics)

    @property
    def state(self) -> State:
        return OUTCOME_STATE[self.outcome]

    @property
    def retried(self) -> bool:
        return self.outcome in RETRIED_OUTCOMES

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "TrialResult":
        return cls(**json.loads(text))

    def user_attrs(self) -> dict[str, Any]:
        """What the driver stores on the Optuna trial: every field but the metrics' Nones."""
        attrs = {k: v for k, v in dataclasses.asdict(self).items() if k != "metrics" and v is not None}
        attrs.pop("number", None)
        if self.reason is not None:
            attrs["reason"] = self.reason[-4000:]
        if self.log_tail is not None:
            attrs["log_tail"] = self.log_tail[-4000:]
        return {**attrs, **self.metrics.present()}


def _types(cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


METRIC_TYPES: dict[str, Any] = _types(Metrics)
RECORD_TYPES: dict[str, Any] = {k: v for k, v in _types(TrialResult).items()
                                 if k not in ("metrics", "number", "seed_curves")}


@dataclass
class SeedRun:
    """One seed's training within a trial, as its worker saw it."""

    seed: int
    val_loss: float | None = None       # at its last validation
    stopped_by: str | None = None       # what the driver answered at a validation: "pruned" | "converged"
    history: list[dict] = field(default_factory=list)  # per validation: milestone, val_loss, tokens, seconds...
    train_s: float = 0.0


@dataclass
class TrialReport:
    """What a worker tells its driver about one trial: facts, no verdict (the driver decides the
    outcome: :func:`harness.sweep.outcome.decide`)."""

    number: int
    runs: list[SeedRun] = field(default_factory=list)  # each seed that trained, in order
    metrics: Metrics = field(default_factory=Metrics)
    failure: str | None = None   # an exception ended it: "oom" | "nonfinite_loss" | "error"
    reason: str | None = None    # that exception, one line first
    reached_training: bool = False
    seed: int | None = None
    seeds: list[int] | None = None
    host: str | None = None
    pid: int | None = None
    weights_saved: bool = False  # trials/<n>/weights holds what it trained

    def __post_init__(self) -> None:
        if isinstance(self.metrics, dict):
            self.metrics = Metrics(**self.metrics)
        self.runs = [SeedRun(**r) if isinstance(r, dict) else r for r in self.runs]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrialReport":
        return cls(**data)
