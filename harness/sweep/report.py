"""Tables and figures from the Optuna storage alone: ``trials.parquet``, ``summary.md``,
``curves.png``, and (see :mod:`harness.sweep.plots`) ``importance.png``, ``parallel.png``,
``params.png`` and, for a multi-objective study, ``pareto.png``.

``harness report results/<study>`` rebuilds them all. The storage is the study folder's
``study.db`` unless ``--storage`` names another (a URL with a password is never written here).
"""

from __future__ import annotations

import json
import logging
import math
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import optuna
import polars as pl

from harness import params
from harness.sweep import gpu_budget, plots
from harness.records import METRIC_TYPES, RECORD_TYPES
from harness.sweep.best import best_trial, feasible
from harness.sweep.efficiency import Efficiency, measure

from harness.files import atomic_path, write_text_atomic
from harness.sweep.storage import curve, default_storage, make_storage
from harness.sweep.study import superseded

log = logging.getLogger(__name__)

def _dtype(annotation) -> pl.DataType:
    """The Polars type of a record field: whole numbers stay integers."""
    if typing.get_origin(annotation) is typing.Literal:  # its arguments are its values
        return pl.Utf8
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if args else annotation
    if typing.get_origin(base) is list:
        return pl.List(_dtype(typing.get_args(base)[0]))
    return {int: pl.Int64, float: pl.Float64, bool: pl.Boolean, str: pl.Utf8}[base]


COLUMNS: dict[str, pl.DataType] = {
    "number": pl.Int64, "state": pl.Utf8, "feasible": pl.Boolean, "duration_s": pl.Float64,
    "enqueued": pl.Boolean,  # a config the sweep file queued first (a baseline), not a sampled one
    **{name: _dtype(t) for name, t in RECORD_TYPES.items()},
    **{name: _dtype(t) for name, t in METRIC_TYPES.items()},
}
PARAM_TYPES = {int: pl.Int64, float: pl.Float64, bool: pl.Boolean, str: pl.Utf8}


def trials_frame(study: optuna.Study) -> pl.DataFrame:
    """One row per trial: its number and state, every field of its record (each with its type),
    the study's ``sweep_efficiency`` (the same on every row; empty without a recorded run), and one
    ``param_<name>`` column per searched parameter (empty where the trial's method ignores it: a
    full fine-tuning trial has no LoRA rank, alpha or dropout)."""
    trials = study.get_trials(deepcopy=False)
    measured = measure(study)
    efficiency = measured.efficiency if measured else None
    param_names = sorted({k for t in trials for k in t.params})
    retried = superseded(trials)
    rows = []
    for t in trials:
        row: dict[str, Any] = {name: t.user_attrs.get(name) for name in COLUMNS}
        row.update(number=t.number, state=t.state.name, feasible=feasible(t), enqueued=bool(t.user_attrs.get("enqueued")),
                   duration_s=t.duration.total_seconds() if t.duration else None, sweep_efficiency=efficiency)
        if t.number in retried and not row["outcome"] and t.state == optuna.trial.TrialState.FAIL:
            row["outcome"] = "stale"  # failed by an older version when its driver died: no record of its own
        method = row["method"] or t.params.get("method")
        # typed: a study begun by an older sweep file holds packing as true/false (params.LEGACY).
        for p, v in params.applicable({"method": method, **params.typed(t.params)}).items():
            if p in param_names:
                row[f"param_{p}"] = v
        rows.append(row)
    schema = {**COLUMNS, "sweep_efficiency": pl.Float64}
    schema.update({f"param_{p}": PARAM_TYPES.get(params.TYPES.get(p), pl.Float64) for p in param_names})
    return pl.DataFrame(rows, schema=schema, orient="row") if rows else pl.DataFrame(schema=schema)


def _cell(v: Any) -> str:
    """A Markdown table cell. Floats to four significant figures, by hand: Polars' own float formats
    either fix the decimals (at 4, learning rates 1.45e-05 and 0.000145 print as 0.0000 and 0.0001)
    or print every digit (8.2537123)."""
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v).replace("|", "\\|").replace("\n", " ")  # neither may end a cell or a row


def _md(df: pl.DataFrame) -> str:
    """``df`` as a Markdown table, laid out by Polars; every row, column and character shown."""
    cells = {name: [_cell(v) for v in df.get_column(name)] for name in df.columns}
    longest = max(map(len, [*df.columns, *(c for column in cells.values() for c in column)]), default=1)  # names too
    with pl.Config(tbl_formatting="MARKDOWN", tbl_hide_column_data_types=True, tbl_hide_dataframe_shape=True,
                   tbl_rows=-1, tbl_cols=-1, tbl_width_chars=-1, fmt_str_lengths=max(longest, 1)):
        return str(pl.DataFrame(cells, schema=dict.fromkeys(df.columns, pl.String))) + "\n"


def _value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


MAX_VALUES = 6  # a parameter with more distinct values than this is binned in the per-parameter table
LINEAR_BINS = 5


def _log_bin(v: float) -> tuple[float, float]:
    """The third of a decade ``v`` falls in: 1–2.2, 2.2–4.6, 4.6–10 times a power of ten."""
    k = math.floor(math.log10(v) * 3 + 1e-9)
    return 10 ** (k / 3), 10 ** ((k + 1) / 3)


def _binner(values: pl.Series, dist: optuna.distributions.BaseDistribution | None) -> Callable[[Any], tuple] | None:
    """How to bin a numeric parameter's values for the per-parameter table: None for a row per
    value (a categorical parameter, or a whole-number one with few values), else a function from a
    value to its bin's (low, high). A continuous float is always binned: by thirds of a decade over
    a log range, otherwise in ~5 equal-width bins."""
    if isinstance(dist, optuna.distributions.CategoricalDistribution) or not values.dtype.is_numeric():
        return None
    continuous = isinstance(dist, optuna.distributions.FloatDistribution) and dist.step is None
    if not continuous and values.n_unique() <= MAX_VALUES:
        return None
    lo, hi = float(values.min()), float(values.max())
    if isinstance(dist, (optuna.distributions.FloatDistribution, optuna.distributions.IntDistribution)):
        log = dist.log
        lo, hi = min(lo, dist.low), max(hi, dist.high)
    else:  # not in the storage's distributions: log when the values span two decades or more
        log = lo > 0 and hi / lo >= 100
    if log and lo > 0:
        return _log_bin
    if hi <= lo:
        return lambda v: (v, v)
    width = (hi - lo) / LINEAR_BINS
    return lambda v: (lo + min(int((v - lo) / width), LINEAR_BINS - 1) * width,
                      lo + (min(int((v - lo) / width), LINEAR_BINS - 1) + 1) * width)


def _bin_label(low: float, high: float) -> str:
    return f"{low:.2g}" if low == high else f"{low:.2g}–{high:.2g}"


def marginals(df: pl.DataFrame, param_cols: list[str],
              distributions: dict[str, optuna.distributions.BaseDistribution] | None = None) -> pl.DataFrame:
    """Per parameter value or bin: trials, mean and best val_loss. A continuous float parameter is
    binned (thirds of a decade over a log range such as the learning rate's, else ~5 equal-width
    bins); a categorical or whole-number parameter with few values keeps a row per value.
    ``distributions`` (the study's, by parameter name) says which is which; without them a float
    column with more than a few values is binned."""
    distributions = distributions or {}
    done = df.filter(pl.col("val_loss").is_not_null() & pl.col("outcome").is_in(["complete", "pruned"]))
    parts = []
    for col in param_cols:
        name = col.removeprefix("param_")
        present = done.filter(pl.col(col).is_not_null())  # trials whose method ignores it (full: no LoRA rank)
        values = present.get_column(col)
        if not values.len():
            continue
        binner = _binner(values, distributions.get(name))
        if binner is None:
            keys = [(_value(v), v) for v in values.to_list()]
        else:
            keys = [(_bin_label(*b), b[0]) for b in map(binner, values.to_list())]
        parts.append(
            present.with_columns(pl.Series("value", [k for k, _ in keys], dtype=pl.Utf8),
                                 pl.Series("_order", [o for _, o in keys]))
            .group_by("value")
            .agg(pl.len().alias("trials"), pl.col("val_loss").mean().alias("mean_val_loss"),
                 pl.col("val_loss").min().alias("best_val_loss"), pl.col("_order").min().alias("_order"))
            .sort("_order").drop("_order")
            .with_columns(pl.lit(name).alias("parameter"))
            .select("parameter", "value", pl.col("trials").cast(pl.Int64), "mean_val_loss", "best_val_loss")
        )
    return pl.concat(parts) if parts else pl.DataFrame()


def budget_lines(study: optuna.Study) -> list[str]:
    """What every trial was given and how trials are ranked, in words."""
    b = study.user_attrs.get("budget")
    if not b:
        return []
    lines = [f"Budget: {b['text']}."]
    if b["unit"] == "steps":
        lines.append("A step budget gives a trial with a larger batch more data, so it favours large batches; "
                     "`budget: {tokens: N}` compares trials at equal data.")
    else:
        lines.append(f"Every trial trains on the same amount of data and is validated and pruned at the same "
                     f"{'token' if b['unit'] in ('tokens', 'epochs') else 'example'} milestones.")
    o = b["objective"]
    if o["metric"] == "time_to_target":
        lines.append(f"Objective: {o['measure']} to reach validation loss {o['target']:g} (lower is better); "
                     f"a trial that does not reach it is not converged and never the best.")
    if b.get("seeds", 1) > 1:
        lines.append(f"Each config ran with {b['seeds']} seeds; its value is their mean, ± their standard deviation.")
    return [" ".join(lines)]


def multi_objective(study: optuna.Study) -> bool:
    return len(study.directions) > 1


def objective_names(study: optuna.Study) -> list[str]:
    """The objectives' names as the study was told them (``set_metric_names``), else numbered."""
    names = study.metric_names
    if names and len(names) == len(study.directions):
        return list(names)
    return ["objective"] if len(study.directions) == 1 else [f"objective {i}" for i in range(len(study.directions))]


def distributions(study: optuna.Study) -> dict[str, optuna.distributions.BaseDistribution]:
    """Each searched parameter's distribution, as its trials recorded it."""
    out: dict[str, optuna.distributions.BaseDistribution] = {}
    for t in study.get_trials(deepcopy=False):
        out.update(t.distributions)
    return out


def _finite(t: optuna.trial.FrozenTrial) -> bool:
    return t.values is not None and all(math.isfinite(v) for v in t.values)


def copy_of(study: optuna.Study, keep: Callable[[optuna.trial.FrozenTrial], bool],
            constraints: bool = False) -> optuna.Study:
    """An in-memory study holding ``study``'s complete trials that ``keep`` accepts, for Optuna's
    importance and plots (which read every complete trial: an infeasible trial is stored complete
    with the worst value). Their constraints go along only with ``constraints``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        copy = optuna.create_study(directions=study.directions)
        if study.metric_names:
            copy.set_metric_names(list(study.metric_names))
    copy.add_trials([optuna.trial.create_trial(
        params=t.params, distributions=t.distributions, values=t.values, user_attrs=t.user_attrs,
        system_attrs=dict(t.system_attrs) if constraints else None, intermediate_values=t.intermediate_values)
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)) if keep(t)])
    return copy


def feasible_study(study: optuna.Study) -> optuna.Study:
    """The complete, feasible trials with finite values: what importance and parallel coordinates read."""
    return copy_of(study, lambda t: _finite(t) and feasible(t))


def varying(study: optuna.Study) -> list[str]:
    """The parameters that take more than one value over ``study``'s trials, in name order."""
    seen: dict[str, set[str]] = {}
    for t in study.get_trials(deepcopy=False):
        for k, v in t.params.items():
            seen.setdefault(k, set()).add(repr(v))
    return sorted(k for k, vs in seen.items() if len(vs) > 1)


@dataclass
class Analysis:
    """What importance and parallel coordinates read: the complete, feasible trials, the first
    objective (``target`` for Optuna: lower is better for importance) and the parameters that vary.
    ``skipped`` says why there is nothing to show (None when there is)."""

    study: optuna.Study
    target_name: str
    target: Callable[[optuna.trial.FrozenTrial], float] | None
    params: list[str]
    skipped: str | None
    importances: dict[str, float] | None = None


def analyse(study: optuna.Study) -> Analysis:
    """Parameter importance (Optuna's default evaluator, PED-ANOVA) of the first objective over the
    complete, feasible trials; for a multi-objective study the first objective is named."""
    kept = feasible_study(study)
    name = objective_names(study)[0]
    target = None
    if multi_objective(study):
        # PED-ANOVA ranks a target as lower-is-better: a maximized objective is negated.
        sign = -1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1.0
        target = lambda t: sign * t.values[0]  # noqa: E731
    n = len(kept.trials)
    searched = varying(kept)
    skipped = None
    if n < 2:
        skipped = f"Fewer than 2 complete, feasible trials ({n}): no parameter importance or parallel coordinates."
    elif not searched:
        skipped = ("No parameter varies over the complete, feasible trials: no parameter importance or parallel "
                   "coordinates.")
    a = Analysis(kept, name, target, searched, skipped)
    if skipped is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # few trials: PED-ANOVA warns that its quantiles coincide
            a.importances = optuna.importance.get_param_importances(kept, params=searched, target=target)
    return a


def importance_lines(study: optuna.Study, a: Analysis) -> list[str]:
    lines = ["## Parameter importance", ""]
    if a.importances is None:
        return lines + [a.skipped or "", ""]
    which = (f"the first objective, {a.target_name}" if multi_objective(study) else a.target_name)
    lines += [f"How much each searched parameter decides {which}, over {len(a.study.trials)} complete, feasible "
              f"trials (Optuna's parameter importance, PED-ANOVA; the importances sum to 1; with few trials they "
              f"say little). Plot: `importance.png`; parallel coordinates: `parallel.png`.", "",
              _md(pl.DataFrame({"parameter": list(a.importances), "importance": list(a.importances.values())},
                               schema={"parameter": pl.Utf8, "importance": pl.Float64})), ""]
    return lines


def pareto_lines(study: optuna.Study, study_dir: Path | None = None) -> list[str]:
    """The Pareto front (``study.best_trials``: complete, feasible, not dominated) as a table, and
    which of its trials was kept as ``best/`` when ``best/trial.json`` says so."""
    names = objective_names(study)
    front = sorted(study.best_trials, key=lambda t: t.number)
    lines = ["## Pareto front", ""]
    if not front:
        return lines + ["No complete, feasible trial yet.", ""]
    goals = ", ".join(f"{n} ({'lower' if d == optuna.study.StudyDirection.MINIMIZE else 'higher'} is better)"
                      for n, d in zip(names, study.directions))
    pnames = sorted({k for t in front for k in t.params})
    rows = [[t.number, *t.values, *[_value(t.params[p]) if p in t.params else None for p in pnames]] for t in front]
    table = pl.DataFrame(rows, schema={"number": pl.Int64, **{n: pl.Float64 for n in names},
                                       **{p: pl.Utf8 for p in pnames}}, orient="row")
    lines += [f"Objectives: {goals}. The trials no other complete, feasible trial beats on every objective "
              f"({len(front)}); plot: `pareto.png`.", "", _md(table), ""]
    chosen = _chosen_number(study_dir)
    if chosen is not None:
        lines += [f"The chosen trial, whose weights are in `best/`: trial {chosen} (`best/trial.json`).", ""]
    return lines


def _chosen_number(study_dir: Path | None) -> int | None:
    if study_dir is None:
        return None
    try:
        return int(json.loads((Path(study_dir) / "best" / "trial.json").read_text())["number"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _best(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The single best trial, or None (none yet, or a multi-objective study it does not apply to)."""
    try:
        return best_trial(study)
    except (RuntimeError, ValueError):  # Study.best_trial of a multi-objective study
        return None


def memory_budget_line(study: optuna.Study) -> str:
    mib = study.user_attrs.get("memory_budget_mib")
    if mib is None:
        return "Memory budget: none (only the card's memory)."
    return f"Memory budget: {float(mib):,g} MiB per trial (over it: infeasible)."


def summary_markdown(study: optuna.Study, df: pl.DataFrame, study_dir: Path | None = None,
                     analysis: Analysis | None = None) -> str:
    """``summary.md``. ``study_dir`` is where ``best/trial.json`` may name a multi-objective study's
    chosen trial; ``analysis`` the parameter importance when the caller has it already."""
    analysis = analysis or analyse(study)
    param_cols = [c for c in df.columns if c.startswith("param_")]
    counts = df.group_by("outcome").len().sort("outcome")
    lines = [f"# Study `{study.study_name}`", "",
             "Trials: " + ", ".join(f"{s} {n}" for s, n in counts.iter_rows()), "",
             *[x for line in budget_lines(study) for x in (line, "")], memory_budget_line(study), ""]
    if base := study.user_attrs.get("base"):
        r = base["recipe"]
        lines += [f"Base model: pretrained by the harness on {base['corpus']}: {base['tokens_trained']:,} tokens "
                  f"({base['passes']} passes, sequences of {r['seq_len']}, batch {r['batch_size']}, learning rate "
                  f"{r['learning_rate']:g}), held-out loss {base['held_out_loss_initial']:.3f} -> "
                  f"{base['held_out_loss']:.3f}, in {base['seconds']:.0f} s on {base['device']}.", ""]
    complete = df.filter((pl.col("outcome") == "complete") & pl.col("feasible"))
    extra = [c for c in ("time_to_target", "value_std") if df.get_column(c).drop_nulls().len()]
    # Where full fine-tuning took part, how many weights each trial trained.
    methods = ["method", "trainable_params"] if (df.get_column("method") == "full").any() else []
    shown = ["number", "val_loss", *extra, *methods, "tokens_per_s", "peak_mem_mib", "train_s",
             *[c for c in param_cols if not (methods and c == "param_method")]]
    chosen = None if multi_objective(study) else _best(study)
    if multi_objective(study) or (chosen is None and study.best_trials):
        lines += pareto_lines(study, study_dir)
    elif chosen is not None:
        complete = complete.sort("value", descending=study.direction == optuna.study.StudyDirection.MAXIMIZE)
        best = df.filter(pl.col("number") == chosen.number).row(0, named=True)
        start = df.get_column("val_loss_start").drop_nulls()
        before = (f"The base model, before any training: validation loss {start[0]:.4f}; the best trial "
                  f"brought it to {best['val_loss']:.4f} ({best['val_loss'] - start[0]:+.4f}).") if start.len() else ""
        lines += ["## Best trial", "", *([before, ""] if before else []),
                  f"Trial {best['number']}: validation loss **{best['val_loss']:.4f}**"
                  + (f" ± {best['value_std']:.4f} over seeds" if best["value_std"] is not None else "")
                  + (f", time to target **{best['time_to_target']:,.0f}**" if best["time_to_target"] is not None else "")
                  + ", "
                  f"{best['tokens_per_s'] or 0:,.0f} tokens/s, peak memory {best['peak_mem_mib'] or 0:,.0f} MiB "
                  f"on {best['gpu_name'] or best['device']}.", "",
                  "Parameters: " + ", ".join(f"`{c.removeprefix('param_')}={_value(best[c])}`" for c in param_cols
                                             if best[c] is not None), "",
                  ("Full model (every weight trained, " if best["method"] == "full" else "LoRA adapter (")
                  + f"{best['trainable_params'] or 0:,} trainable parameters) and tokenizer: `best/`.", "",
                  "## Top 5", "", _md(complete.head(5).select(shown)), ""]
    else:
        lines += ["No trial completed.", ""]
    if param_cols:
        lines += importance_lines(study, analysis)
        lines += ["## Per parameter", "", "Complete and pruned trials (a pruned trial's loss is its last report); "
                  "a continuous parameter in bins (thirds of a decade over a log range).", "",
                  _md(marginals(df, param_cols, distributions(study))), ""]
    data = study.user_attrs.get("data")
    if data:
        cols = ["rows", "tokens", "length_min", "length_median", "length_p95", "length_max", "truncated_share",
                "skipped_empty"]
        table = pl.DataFrame([{"split": name, **{c: float(s.get(c, 0)) for c in cols}} for name, s in data.items()])
        lines += ["## Data", "", "Per split: rows and tokens as trained (after truncation); the length figures are per row before truncation (BOS and EOS included).", "", _md(table), ""]
    pruned = df.filter(pl.col("outcome") == "pruned")
    if pruned.height:
        saved = pruned.get_column("pruning_saved_s").drop_nulls().sum()
        lines += ["## Pruning", "",
                  f"{pruned.height} trial(s) pruned, saving about {saved:,.0f} s of training (each pruned trial's "
                  f"remaining budget at the pace it had). `median`, `hyperband`: Optuna's pruner (one objective); "
                  f"in multi-objective studies, `loss`: behind the median of the complete trials at the same data "
                  f"milestone, `dominance`: a finished trial is already faster and smaller at a loss this one could "
                  f"not reach (harness/sweep/pruning.py).", "",
                  _md(pruned.select("number", "pruned_by", "val_loss", "tokens_per_s", "peak_mem_mib",
                                    "pruning_saved_s")), ""]
    lines += efficiency_lines(measure(study))
    if spend := gpu_budget.describe(study):
        lines += ["## GPU budget", "", spend + ".", ""]
    infeasible = df.filter(~pl.col("feasible"))
    if infeasible.height:
        lines += ["## Infeasible trials", "", "Out of memory or over `memory_budget_mib`: recorded as infeasible "
                  "(an Optuna constraint), so the sampler steers away from them.", "",
                  _md(infeasible.select("number", "outcome", "peak_mem_mib", "mem_at_failure_mib", *param_cols)), ""]
    failed = df.filter(pl.col("state") == "FAIL")
    if failed.height:
        lines += ["## Failed trials", "", _md(failed.select("number", "outcome", pl.col("reason").str.split("\n").list.first())), ""]
    lines += ["Metrics: validation loss is the mean token-level cross-entropy over the validation split; "
              "tokens/s counts non-padding tokens trained per second, warm-up steps and evaluation excluded; "
              "peak memory is CUDA max reserved (GPU) or peak RSS (CPU).", ""]
    return "\n".join(lines)


def efficiency_lines(e: Efficiency | None) -> list[str]:
    """``summary.md``'s "Sweep efficiency" section: how much of the GPUs' time went to training
    (harness/sweep/efficiency.py); nothing for a study with no recorded run."""
    if e is None:
        return []
    eff = e.efficiency
    table = pl.DataFrame([{
        "sweep_efficiency": eff, "training_gpu_s": e.train_gpu_s, "wall_gpu_s": e.wall_gpu_s, "runs": e.runs,
        "trials": e.trials, "trials_per_hour": e.trials_per_hour, "mean_fixed_s": e.fixed_s,
        "mean_warmup_s": e.warmup_s}], schema={
        "sweep_efficiency": pl.Float64, "training_gpu_s": pl.Float64, "wall_gpu_s": pl.Float64, "runs": pl.Int64,
        "trials": pl.Int64, "trials_per_hour": pl.Float64, "mean_fixed_s": pl.Float64, "mean_warmup_s": pl.Float64})
    held = "the GPUs'" if e.unit == "GPU" else "the CPU's"
    return ["## Sweep efficiency", "",
            (f"**{eff:.1%}** of {held} time went to training: " if eff is not None else "")
            + f"{e.train_gpu_s:,.1f} {e.unit}-s of training at steady pace (each trial's steps × its median step "
            f"after the warm-up) of {e.wall_gpu_s:,.1f} {e.unit}-s held (each run's wall time, from starting its "
            f"launcher to its last trial's end, × its {e.unit}s; a model built on its first use on this machine, "
            f"such as a pretrained base, left out). The rest: each trial's fixed cost (`fixed_s`, to its first "
            f"step) and warm-up (`warmup_s`), evaluation, the study's preparation."
            + (f" In {e.resident_runs} of its {e.runs} runs, slots borrowed resident workers (`harness warm up`): "
               "their import, and a load and compile an earlier study did, are not in the wall time."
               if e.resident_runs else ""), "",
            _md(table), ""]


def plot_curves(study: optuna.Study, out: Path) -> None:
    """Validation loss against step for every trial, coloured by how it ended."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"COMPLETE": "tab:green", "PRUNED": "tab:orange", "INFEASIBLE": "tab:purple", "FAIL": "tab:red",
              "RUNNING": "tab:gray"}
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for t in study.get_trials(deepcopy=False):
        points = curve(t)  # intermediate values, or a multi-objective trial's curve attribute
        if not points:
            continue
        steps, losses = zip(*sorted(points.items()))
        kind = "INFEASIBLE" if any(v > 0 for v in t.constraints.values()) else t.state.name
        ax.plot(steps, losses, marker="o", ms=3, color=colors.get(kind, "black"), alpha=0.8)
        ax.annotate(str(t.number), (steps[-1], losses[-1]), fontsize=7, xytext=(3, 0), textcoords="offset points")
    shown = {"INFEASIBLE" if any(v > 0 for v in t.constraints.values()) else t.state.name
             for t in study.get_trials(deepcopy=False) if curve(t)}
    for state, c in colors.items():
        if state in shown:
            ax.plot([], [], color=c, label=state.lower())
    unit = (study.user_attrs.get("budget") or {}).get("unit", "steps")
    ax.set(xlabel={"tokens": "training tokens", "epochs": "training tokens", "examples": "training examples"}.get(
        unit, "optimizer step"), ylabel="validation loss", title=f"{study.study_name}: validation loss by trial")
    if shown:  # a study with no curve yet (every trial failed before validating) has no legend
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def study_name(study_dir: Path) -> str:
    """The study's name as its driver wrote it in ``study.json`` (the folder may have been copied
    or renamed since); the folder's name when there is none."""
    try:
        return json.loads((study_dir / "study.json").read_text())["study"]
    except (OSError, ValueError, KeyError):
        return study_dir.name


FIGURES = ("importance", "parallel", "params", "pareto")  # build_report's keys for the optional figures


def write_figures(study: optuna.Study, df: pl.DataFrame, study_dir: Path, analysis: Analysis) -> dict[str, Path | None]:
    """``importance.png``, ``parallel.png``, ``params.png`` and ``pareto.png`` in ``study_dir``; None
    for each one there is nothing to show in (its old file, if any, removed). A figure that fails
    is logged and left out: it never costs the tables."""
    out: dict[str, Path | None] = {k: study_dir / f"{k}.png" for k in FIGURES}
    title = study.study_name
    metric = analysis.target_name

    def importance(path: Path) -> bool:
        if analysis.importances is None:
            return False
        plots.plot_importance(analysis.importances, metric, f"{title}: parameter importance", path)
        return True

    def parallel(path: Path) -> bool:
        if analysis.skipped is not None:
            return False
        plots.plot_parallel(analysis.study, analysis.params,
                            (lambda t: t.values[0]) if multi_objective(study) else None, metric,
                            f"{title}: parallel coordinates", path)
        return True

    def params_(path: Path) -> bool:
        return plots.plot_params(df, distributions(study), f"{title}: throughput and memory by parameter", path)

    def pareto(path: Path) -> bool:
        if not multi_objective(study) or len(study.directions) > 3:
            return False
        shown = copy_of(study, _finite, constraints=True)
        if not shown.trials:
            return False
        plots.plot_pareto(shown, objective_names(study), f"{title}: Pareto front", path)
        return True

    for key, draw in {"importance": importance, "parallel": parallel, "params": params_, "pareto": pareto}.items():
        path = out[key]
        try:
            drawn = draw(path)
        except Exception as err:  # noqa: BLE001 - a figure is never worth the report
            log.warning("%s: %s not drawn: %s: %s", study.study_name, path.name, type(err).__name__, err)
            drawn = False
        if not drawn:
            path.unlink(missing_ok=True)  # not left over from an earlier report
            out[key] = None
    return out


def build_report(study_dir: Path, storage_url: str | None = None, figures: bool = True) -> dict:
    """Rebuild ``trials.parquet``, ``summary.md``, ``curves.png`` and the other figures in
    ``study_dir`` from the storage (``figures=False``: the tables alone, seconds sooner). Returns
    their paths (``parquet``, ``summary``, ``plot`` for the curves, and ``importance``,
    ``parallel``, ``params``, ``pareto``: None where skipped), the ``headline`` and the
    ``efficiency`` line (None without a recorded run)."""
    study_dir = Path(study_dir)
    url = storage_url or default_storage(study_dir)
    if storage_url is None and not (study_dir / "study.db").exists():
        raise FileNotFoundError(f"{study_dir}: no study.db here; pass --storage URL for a study kept elsewhere")
    name = study_name(study_dir)
    try:
        study = optuna.load_study(study_name=name, storage=make_storage(url))
    except KeyError:
        raise KeyError(f"the storage holds no study named '{name}'") from None
    df = trials_frame(study)
    out = {"parquet": study_dir / "trials.parquet", "summary": study_dir / "summary.md", "plot": study_dir / "curves.png"}
    with atomic_path(out["parquet"]) as tmp:
        df.write_parquet(tmp)
    analysis = analyse(study)
    write_text_atomic(out["summary"], summary_markdown(study, df, study_dir, analysis))
    if figures:
        plot_curves(study, out["plot"])
        drawn = write_figures(study, df, study_dir, analysis)
    else:
        out["plot"], drawn = None, dict.fromkeys(FIGURES)
    measured = measure(study)
    return {**out, **drawn, "headline": headline(study, df), "efficiency": measured.line() if measured else None}


def headline(study: optuna.Study, df: pl.DataFrame) -> str | None:
    """One line for the end of a run: the base model's validation loss and the best trial's."""
    chosen = _best(study)
    start = df.get_column("val_loss_start").drop_nulls()
    if chosen is None or not start.len():
        return None
    row = df.filter(pl.col("number") == chosen.number).row(0, named=True)
    if row["val_loss"] is None:
        return None
    lr = row.get("param_learning_rate")
    return (f"validation loss: base model {start[0]:.4f}, best trial {row['number']} {row['val_loss']:.4f} "
            f"({row['val_loss'] - start[0]:+.4f})" + (f" at learning rate {lr:.3g}" if lr is not None else ""))
