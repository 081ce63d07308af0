"""The Optuna side of the driver: sampler, pruner, the search space as ``suggest_*`` calls, what
counts towards ``n_trials``, and a trial's record as its final Optuna state (:func:`record_result`).
"""

from __future__ import annotations

import warnings
from typing import Any

import optuna

from harness import params
from harness.records import TrialResult
from harness.sweep.config import Choices, Range, SweepConfig
from harness.sweep.storage import make_storage, retried_numbers

optuna.logging.set_verbosity(optuna.logging.WARNING)
# Heartbeats and their retry callback are marked experimental; we rely on them on purpose.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# The driver beats the heartbeat itself around ask/tell (Optuna expects optimize() to do it).
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


def make_sampler(cfg: SweepConfig, seed: int | None = None) -> optuna.samplers.BaseSampler:
    """``seed`` defaults to the study seed; drivers joining one study pass their own so they do not
    all draw alike."""
    s, seed = cfg.sampler, cfg.seed if seed is None else seed
    if s.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.name == "grid":
        grid = {name: _grid_values(dim) for name, dim in cfg.search_space.searched().items()}
        return optuna.samplers.GridSampler(grid, seed=seed)
    if s.name == "gp":
        # Optuna's Gaussian-process sampler; it imports torch (here, in the driver) on first use.
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=s.n_startup_trials,
                                         warn_independent_sampling=False)
    if s.name == "cmaes":
        # Categorical dimensions (method, a choices list) are drawn at random beside CMA-ES, which
        # searches the numeric ranges; with_margin keeps it off a stepped or integer range's edges.
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=s.n_startup_trials, with_margin=True,
                                            warn_independent_sampling=False)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=s.n_startup_trials)


def make_pruner(cfg: SweepConfig) -> optuna.pruners.BasePruner:
    """Optuna's pruner for ``median`` and ``hyperband``; ``dominance`` is the harness's own rule,
    decided in sweep/pruning.py, so Optuna's is a no-op for it."""
    p = cfg.pruner
    if p.name in ("none", "dominance"):
        return optuna.pruners.NopPruner()
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, p.n_warmup_steps or cfg.budget.eval_every))
    return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)


def _grid_values(dim: Choices | Range) -> list[Any]:
    if isinstance(dim, Choices):
        return list(dim.choices)
    n = int(round((dim.high - dim.low) / dim.step)) + 1
    return [dim.low + i * dim.step for i in range(n)]


def suggest(trial: optuna.Trial, cfg: SweepConfig) -> dict[str, Any]:
    """Sample every searched dimension on ``trial``; fixed values are added as they are."""
    values: dict[str, Any] = {}
    for name, dim in cfg.search_space.searched().items():
        if isinstance(dim, Choices):
            values[name] = trial.suggest_categorical(name, dim.choices)
        elif name in params.INTEGER:
            values[name] = trial.suggest_int(name, int(dim.low), int(dim.high), step=int(dim.step or 1), log=dim.log)
        else:
            values[name] = trial.suggest_float(name, dim.low, dim.high, step=dim.step, log=dim.log)
    values.update(cfg.search_space.fixed())
    return params.typed(values)


def trial_params(trial: optuna.trial.BaseTrial | optuna.trial.FrozenTrial, cfg: SweepConfig) -> dict[str, Any]:
    """A trial's full hyperparameters: what was sampled plus the fixed values."""
    return params.typed({**cfg.search_space.fixed(), **trial.params})


def run_seed(study_seed: int, trials_so_far: int, joiner: int = 0) -> int:
    """The sampler's seed for one run of the driver: derived from the study's seed and how many
    trials the study already holds (and the joining driver, when several share it), so a resumed
    study draws new parameters instead of replaying the first run's, and stays reproducible."""
    return (study_seed * 1_000_003 + trials_so_far * 7919 + joiner) % 2**32


def create_study(cfg: SweepConfig, storage_url: str, joiner: int = 0) -> optuna.Study:
    """The driver's handle on the study: with heartbeats, so dead drivers' trials get retried, and
    a sampler seeded for this run (:func:`run_seed`)."""
    storage = make_storage(storage_url, cfg.fault_tolerance)
    objectives = cfg.all_objectives()
    study = optuna.create_study(study_name=cfg.study, storage=storage, directions=[o.direction for o in objectives],
                                load_if_exists=True)
    study.set_metric_names([o.metric for o in objectives])  # so optuna-dashboard labels the axes
    if cfg.multi_objective:
        study.set_user_attr("prefer", cfg.preferred_index())  # which value picks best/ from the front
    seed = run_seed(cfg.seed, len(study.get_trials(deepcopy=False)), joiner)
    return optuna.load_study(study_name=cfg.study, storage=storage, sampler=make_sampler(cfg, seed),
                             pruner=make_pruner(cfg))


def enqueue_first(study: optuna.Study, cfg: SweepConfig) -> int:
    """Queue the sweep file's ``enqueue`` configs on a study that holds no trial yet, so they run
    first; the number queued. A resumed study, or one another worker has started, is left as it is."""
    if not cfg.enqueue or study.get_trials(deepcopy=False):
        return 0
    for config in cfg.enqueue:
        study.enqueue_trial(dict(config), user_attrs={"enqueued": True}, skip_if_exists=True)
    return len(cfg.enqueue)


FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
superseded = retried_numbers


def counted_trials(study: optuna.Study) -> int:
    """Trials that count towards ``n_trials``: all of them, running and waiting ones included,
    except failed trials that a retry replaced (the retry counts in their place)."""
    trials = study.get_trials(deepcopy=False)
    gone = superseded(trials)
    return sum(1 for t in trials if t.number not in gone)


def finished_count(study: optuna.Study) -> int:
    """Trials that have ended (complete, pruned, or failed without a retry)."""
    trials = study.get_trials(deepcopy=False, states=FINISHED)
    gone = superseded(study.get_trials(deepcopy=False))
    return sum(1 for t in trials if t.number not in gone)


def queue_retry(study: optuna.Study, failed: optuna.trial.FrozenTrial, max_retries: int) -> bool:
    """Queue ``failed``'s parameters again as a WAITING trial, at most ``max_retries`` times over
    its history; False when they are used up.

    The retry carries Optuna's own retry bookkeeping (``failed_trial``, ``retry_history``, as its
    heartbeat callback writes them), so the failed trial stops counting towards ``n_trials`` and
    the report can follow the chain. Unlike that callback it does not copy the failed trial's user
    attributes: the retry's record is its own.
    """
    history = [*failed.system_attrs.get("retry_history", []), failed.number]
    if len(history) > max_retries:
        return False
    study.add_trial(optuna.create_trial(
        state=optuna.trial.TrialState.WAITING, params=failed.params, distributions=failed.distributions,
        system_attrs={**failed.system_attrs, "failed_trial": failed.system_attrs.get("failed_trial", failed.number),
                      "retry_history": history},
    ))
    return True


def record_result(study: optuna.Study, trial: optuna.Trial, result: TrialResult, max_retries: int,
                  driver: str, memory_budget_mib: float | None = None, target: float | None = None) -> bool:
    """Turn a trial's record into its final Optuna state (only the driver calls this).

    Complete and pruned trials are told as such; infeasible ones (out of memory, over the memory
    budget) get a constraint and are told COMPLETE with the worst value, so TPE learns to avoid the
    region (FAIL or PRUNED would skew it) and ``best_trial`` never picks them. A time-to-target
    trial that did not reach its target is infeasible the same way. Failures are told
    FAIL; those that say nothing about the config (``RETRIED_OUTCOMES``) are queued again.
    Returns whether a retry was queued.
    """
    for key, value in {**result.user_attrs(), "driver": driver}.items():
        trial.set_user_attr(key, value)
    if result.outcome == "over_budget":
        # How far over: a constrained sampler prefers configs that are nearly within budget.
        trial.set_constraint("memory_budget", result.metrics.peak_mem_mib - memory_budget_mib)
    elif result.outcome == "oom":
        trial.set_constraint("memory_budget" if memory_budget_mib else "oom", 1.0)
    elif result.outcome == "predicted_oom":
        trial.set_constraint("predicted_oom", 1.0)
    elif result.outcome == "not_converged":
        # How far from the target it stayed: positive, so never feasible, never best.
        trial.set_constraint("not_converged", max(1e-9, result.metrics.best_val_loss - target)
                             if target is not None and result.metrics.best_val_loss is not None else 1.0)
    worst = [float("inf") if d == optuna.study.StudyDirection.MINIMIZE else float("-inf") for d in study.directions]
    try:
        if result.state == "complete":
            study.tell(trial, result.values if len(worst) > 1 else result.value)
        elif result.state == "infeasible":
            study.tell(trial, worst if len(worst) > 1 else worst[0])
        else:
            study.tell(trial, state=STATES[result.state])
    except RuntimeError as err:
        # GridSampler.after_trial calls study.stop() once the grid is covered, which Optuna allows
        # only inside optimize(); the trial's state is stored all the same (tell's `finally`), and
        # the driver checks is_exhausted() itself.
        if "Study.stop" not in str(err):
            raise
    if result.retried:
        return queue_retry(study, _frozen(study, trial.number), max_retries)
    return False


def _frozen(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


STATES = {"pruned": optuna.trial.TrialState.PRUNED, "fail": optuna.trial.TrialState.FAIL}
