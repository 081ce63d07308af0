"""Which trial is the study's best, decided in one place.

The best trial is Optuna's ``best_trial``: complete, feasible (every constraint at or below zero,
so out-of-memory and over-budget trials never qualify), with the best objective value. The trial
process asks :func:`may_become_best` before saving its adapter; the driver promotes that adapter
to ``best/`` with :func:`promote`; the report names :func:`best_trial`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import optuna

from harness.files import write_json_atomic


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
    """Keep trial ``number``'s adapter as ``best/`` if it is the best trial; otherwise drop it."""
    adapter = study_dir / "trials" / str(number) / "adapter"
    if not adapter.exists():
        return
    best = best_trial(study)
    if best is None or best.number != number:
        shutil.rmtree(adapter, ignore_errors=True)
        return
    target, old = study_dir / "best", study_dir / "best.old"
    shutil.rmtree(old, ignore_errors=True)
    write_json_atomic(adapter / "trial.json", {"number": best.number, "val_loss": best.value, "params": best.params})
    if target.exists():
        os.replace(target, old)
    os.replace(adapter, target)
    shutil.rmtree(old, ignore_errors=True)
