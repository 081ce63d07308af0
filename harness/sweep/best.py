"""Which trial is the study's best, decided in one place.

The best trial is Optuna's ``best_trial``: complete, feasible (every constraint at or below zero,
so out-of-memory and over-budget trials never qualify), with the best objective value. In a
multi-objective study the answer is the Pareto front (``study.best_trials``, feasible trials
only); ``best/`` holds its trial that is best by the preferred objective (``prefer:`` in the sweep
file, stored as the study's ``prefer`` attribute; default the first objective). That trial is also
the best of all feasible trials by that objective, so it is always on the front. The trial
process asks :func:`may_become_best` before saving its weights (``trials/<n>/weights``: a LoRA
adapter, or a full model for ``method: full``); the driver promotes them to ``best/`` with
:func:`promote`; the report names :func:`best_trial`.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import optuna

from harness.files import write_json_atomic

WEIGHTS = "weights"  # trials/<n>/weights: what a trial that may be the best saved


def feasible(trial: optuna.trial.FrozenTrial) -> bool:
    return all(v <= 0 for v in trial.constraints.values())


def pareto_front(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The complete, feasible trials that no other such trial beats on every objective."""
    return sorted((t for t in study.best_trials if feasible(t)), key=lambda t: t.number)


def _preferred(study: optuna.Study) -> int:
    return int(study.user_attrs.get("prefer", 0)) if len(study.directions) > 1 else 0


def _better(study: optuna.Study, a: float, b: float) -> bool:
    minimize = study.directions[_preferred(study)] == optuna.study.StudyDirection.MINIMIZE
    return a < b if minimize else a > b


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    if len(study.directions) > 1:
        front, i = pareto_front(study), _preferred(study)
        chosen = None
        for t in front:  # by number: the earliest wins a tie
            if chosen is None or _better(study, t.values[i], chosen.values[i]):
                chosen = t
        return chosen
    try:
        return study.best_trial
    except ValueError:  # no complete, feasible trial yet
        return None


def top_configs(study: optuna.Study, n: int) -> list[optuna.trial.FrozenTrial]:
    """The study's best ``n`` complete, feasible trials with distinct parameters, best first by the
    preferred objective (``harness rerun`` retrains them; ``warm_start`` queues them first)."""
    i = _preferred(study)
    sign = 1 if study.directions[i] == optuna.study.StudyDirection.MINIMIZE else -1
    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if feasible(t) and t.values and math.isfinite(t.values[i])]
    done.sort(key=lambda t: sign * t.values[i])
    picked: list[optuna.trial.FrozenTrial] = []
    for t in done:
        if all(t.params != p.params for p in picked):
            picked.append(t)
        if len(picked) == n:
            break
    return picked


def may_become_best(study: optuna.Study, value: float | list[float]) -> bool:
    """Whether a complete, feasible trial with ``value`` (a list: every objective's) would beat the
    best so far."""
    best = best_trial(study)
    if best is None:
        return True
    if isinstance(value, list):
        i = _preferred(study)
        return _better(study, value[i], best.values[i])
    return _better(study, value, best.value)


def promote(study: optuna.Study, study_dir: Path, number: int) -> None:
    """Keep trial ``number``'s weights as ``best/`` if it is the best trial; otherwise drop them."""
    weights = study_dir / "trials" / str(number) / WEIGHTS
    if not weights.exists():
        return
    best = best_trial(study)
    if best is None or best.number != number:
        shutil.rmtree(weights, ignore_errors=True)
        return
    target, old = study_dir / "best", study_dir / "best.old"
    shutil.rmtree(old, ignore_errors=True)
    write_json_atomic(weights / "trial.json", {
        "number": best.number, "val_loss": best.user_attrs.get("val_loss", best.values[0]), "params": best.params,
        "method": best.user_attrs.get("method"),
        "values": dict(zip(study.metric_names or [f"objective {i}" for i in range(len(best.values))], best.values)),
    })
    if target.exists():
        os.replace(target, old)
    os.replace(weights, target)
    shutil.rmtree(old, ignore_errors=True)
