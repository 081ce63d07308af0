"""Which trial is the study's best, decided in one place.

The best trial is Optuna's ``best_trial``: complete, feasible (every constraint at or below zero,
so out-of-memory and over-budget trials never qualify), with the best objective value. The trial
process asks :func:`may_become_best` before saving its weights (``trials/<n>/weights``: a LoRA
adapter, or a full model for ``method: full``); the driver promotes them to ``best/`` with
:func:`promote`; the report names :func:`best_trial`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import optuna

from harness.files import write_json_atomic

WEIGHTS = "weights"  # trials/<n>/weights: what a trial that may be the best saved


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no complete, feasible trial yet
        return None


def may_become_best(study: optuna.Study, value: float) -> bool:
    """Whether a complete, feasible trial with ``value`` would beat the best so far."""
    best = best_trial(study)
    if best is None:
        return True
    return value < best.value if study.direction == optuna.study.StudyDirection.MINIMIZE else value > best.value


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
    write_json_atomic(weights / "trial.json", {"number": best.number, "val_loss": best.value, "params": best.params,
                                               "method": best.user_attrs.get("method")})
    if target.exists():
        os.replace(target, old)
    os.replace(weights, target)
    shutil.rmtree(old, ignore_errors=True)
