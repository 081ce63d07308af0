"""``harness rerun DIR --top N --seeds K``: retrain a finished study's best N configs with K fresh
seeds each, and say whether the best is distinguishable from the runner-up.

The rerun is a study of its own (``<study>-rerun``, beside the original) whose trials are the top
configs, queued in rank order, each trained once per seed (``seeds: K``) on the same budget.
Whether the best beats the runner-up is decided by a percentile bootstrap of the difference of
their seed means (10,000 resamples, 95% interval): distinguishable when the interval excludes
zero. Welch's t statistic is shown beside it. Torch-free.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from rich.console import Console

from harness.errors import HarnessError
from harness.files import write_text_atomic
from harness.sweep.best import best_trial, feasible
from harness.sweep.config import SweepConfig
from harness.sweep.storage import default_storage, make_storage

FRESH_SEED_OFFSET = 10_000  # rerun seeds start here past the study's, so none was used before


def top_configs(study: optuna.Study, n: int) -> list[optuna.trial.FrozenTrial]:
    """The study's best ``n`` complete, feasible trials with distinct parameters, best first."""
    best = best_trial(study)
    if best is None:
        raise HarnessError(f"study '{study.study_name}' has no complete trial to rerun")
    minimize = study.direction == optuna.study.StudyDirection.MINIMIZE
    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if feasible(t) and t.value is not None and math.isfinite(t.value)]
    done.sort(key=lambda t: t.value if minimize else -t.value)
    picked: list[optuna.trial.FrozenTrial] = []
    for t in done:
        if all(t.params != p.params for p in picked):
            picked.append(t)
        if len(picked) == n:
            break
    return picked


def bootstrap_difference(a: list[float], b: list[float], resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of mean(b) − mean(a)."""
    rng = np.random.default_rng(seed)
    xa, xb = np.asarray(a, float), np.asarray(b, float)
    diffs = (rng.choice(xb, (resamples, len(xb))).mean(axis=1) - rng.choice(xa, (resamples, len(xa))).mean(axis=1))
    low, high = np.percentile(diffs, [2.5, 97.5])
    return float(low), float(high)


def welch_t(a: list[float], b: list[float]) -> float | None:
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        return None
    return (statistics.fmean(b) - statistics.fmean(a)) / math.sqrt(va + vb)


def compare(rows: list[dict[str, Any]], minimize: bool = True) -> dict[str, Any]:
    """Rank the rerun configs by their seed means; the best against the runner-up."""
    ranked = sorted(rows, key=lambda r: r["mean"] if minimize else -r["mean"])
    out: dict[str, Any] = {"ranked": ranked}
    if len(ranked) >= 2:
        best, second = ranked[0], ranked[1]
        low, high = (bootstrap_difference(best["values"], second["values"]) if minimize
                     else bootstrap_difference(second["values"], best["values"]))
        out.update(difference=abs(second["mean"] - best["mean"]), interval=(low, high),
                   welch_t=welch_t(best["values"], second["values"]), distinguishable=low > 0)
    return out


def report_markdown(study_name: str, seeds: int, result: dict[str, Any]) -> str:
    lines = [f"# Rerun of `{study_name}`: top {len(result['ranked'])} configs, {seeds} fresh seeds each", "",
             "| rank | original trial | mean | std | values | params |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(result["ranked"], 1):
        lines.append(f"| {i} | {r['original']} | {r['mean']:.4f} | {r['std']:.4f} | "
                     f"{', '.join(f'{v:.4f}' for v in r['values'])} | "
                     f"{', '.join(f'{k}={v:.3g}' if isinstance(v, float) else f'{k}={v}' for k, v in r['params'].items())} |")
    if "interval" in result:
        low, high = result["interval"]
        t = result["welch_t"]
        verdict = ("**distinguishable**: the runner-up is worse in 95% of bootstrap resamples"
                   if result["distinguishable"] else
                   "**not distinguishable** at this number of seeds: the interval includes zero")
        lines += ["", f"Best vs runner-up: the runner-up's mean is worse by {result['difference']:.4f} "
                      f"(95% bootstrap interval of the difference {low:+.4f} to {high:+.4f}"
                      + (f", Welch's t = {t:.2f}" if t is not None else "") + f"): {verdict}."]
    return "\n".join(lines) + "\n"


def rerun(study_dir: Path, top: int, seeds: int, console: Console,
          storage_url: str | None = None) -> tuple[dict[str, Any], Path]:
    """Queue the top configs in a new study, run it, and compare. Returns the comparison and the
    report it wrote (``rerun.md`` in the rerun's folder)."""
    from harness.sweep.driver import run_sweep
    from harness.sweep.report import build_report, study_name

    if seeds < 2:
        raise HarnessError("--seeds: a noise band needs at least 2 seeds")
    study_dir = Path(study_dir)
    try:
        cfg = SweepConfig.model_validate_json((study_dir / "sweep.json").read_text())
    except OSError:
        raise HarnessError(f"{study_dir}: no sweep.json here (expected results/<study>)") from None
    url = storage_url or default_storage(study_dir)
    study = optuna.load_study(study_name=study_name(study_dir), storage=make_storage(url))
    if cfg.multi_objective:
        raise HarnessError("harness rerun compares one objective; this study has several (its answer is the Pareto "
                           "front in summary.md)")
    configs = top_configs(study, top)
    rerun_cfg = SweepConfig.model_validate({
        **cfg.model_dump(), "study": f"{cfg.study}-rerun", "seed": cfg.seed + FRESH_SEED_OFFSET, "seeds": seeds,
        "n_trials": len(configs), "pruner": {"name": "none"}, "sampler": {"name": "random"},
        "storage": storage_url,
    })
    rerun_dir = study_dir.parent / rerun_cfg.study
    rerun_dir.mkdir(parents=True, exist_ok=True)
    rerun_url = storage_url or default_storage(rerun_dir.resolve())
    target = optuna.create_study(study_name=rerun_cfg.study, storage=make_storage(rerun_url),
                                 direction=cfg.objective.direction, load_if_exists=True)
    if not target.get_trials(deepcopy=False):
        for t in configs:  # in rank order: trial i of the rerun is the original's i-th best
            target.enqueue_trial(t.params, user_attrs={"original_trial": t.number})
    console.print(f"rerunning the top {len(configs)} configs of {cfg.study} with {seeds} fresh seeds each "
                  f"(seeds {rerun_cfg.seed}..{rerun_cfg.seed + seeds - 1})")
    # Relative data paths are taken from the original sweep file's folder, as the study did.
    sweep_dir = Path(json.loads((study_dir / "study.json").read_text()).get("sweep_dir") or ".")
    run_sweep(rerun_cfg, sweep_dir, study_dir.parent, console)
    build_report(rerun_dir, storage_url)
    rows = []
    for t in optuna.load_study(study_name=rerun_cfg.study, storage=make_storage(rerun_url)).get_trials(deepcopy=False):
        values = t.user_attrs.get("seed_values")
        if t.state == optuna.trial.TrialState.COMPLETE and values:
            # The trial's value is already its seeds' mean, and value_std their spread.
            rows.append({"trial": t.number, "original": t.user_attrs.get("original_trial"), "params": t.params,
                         "values": values, "mean": t.value, "std": t.user_attrs["value_std"]})
    result = compare(rows, cfg.objective.direction == "minimize")
    write_text_atomic(rerun_dir / "rerun.md", report_markdown(cfg.study, seeds, result))
    return result, rerun_dir / "rerun.md"
