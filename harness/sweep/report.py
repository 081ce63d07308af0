"""Tables from the Optuna storage alone: ``trials.parquet``, ``summary.md`` and ``curves.png``.

``harness report results/<study>`` rebuilds all three. The storage is the study folder's
``study.db`` unless ``--storage`` names another (a URL with a password is never written here).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typing

import optuna
import polars as pl

from harness import params
from harness.records import METRIC_TYPES, RECORD_TYPES
from harness.sweep.best import best_trial

from harness.files import atomic_path, write_text_atomic
from harness.sweep.storage import default_storage, make_storage
from harness.sweep.study import superseded

def _dtype(annotation) -> pl.DataType:
    """The Polars type of a record field: whole numbers stay integers."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if args else annotation
    if typing.get_origin(base) is list:
        return pl.List(_dtype(typing.get_args(base)[0]))
    return {int: pl.Int64, float: pl.Float64, bool: pl.Boolean, str: pl.Utf8}[base]


COLUMNS: dict[str, pl.DataType] = {
    "number": pl.Int64, "state": pl.Utf8, "feasible": pl.Boolean, "duration_s": pl.Float64,
    **{name: _dtype(t) for name, t in RECORD_TYPES.items()},
    **{name: _dtype(t) for name, t in METRIC_TYPES.items()},
}
PARAM_TYPES = {int: pl.Int64, float: pl.Float64, bool: pl.Boolean, str: pl.Utf8}


def trials_frame(study: optuna.Study) -> pl.DataFrame:
    """One row per trial: its number and state, every field of its record (each with its type),
    and one ``param_<name>`` column per searched parameter (empty where the trial's method ignores
    it: a full fine-tuning trial has no LoRA rank, alpha or dropout)."""
    trials = study.get_trials(deepcopy=False)
    param_names = sorted({k for t in trials for k in t.params})
    retried = superseded(trials)
    rows = []
    for t in trials:
        row: dict[str, Any] = {name: t.user_attrs.get(name) for name in COLUMNS}
        row.update(number=t.number, state=t.state.name, feasible=all(v <= 0 for v in t.constraints.values()),
                   duration_s=t.duration.total_seconds() if t.duration else None)
        if t.number in retried and not row["outcome"]:
            row["outcome"] = "stale_retried"  # its driver died; a retry ran its parameters
        row["outcome"] = row["outcome"] or t.state.name.lower()
        method = row["method"] or t.params.get("method")
        for p, v in params.applicable({"method": method, **t.params}).items():
            if p in param_names:
                row[f"param_{p}"] = v
        rows.append(row)
    schema = dict(COLUMNS)
    schema.update({f"param_{p}": PARAM_TYPES.get(params.TYPES.get(p), pl.Float64) for p in param_names})
    return pl.DataFrame(rows, schema=schema, orient="row") if rows else pl.DataFrame(schema=schema)


def _md(df: pl.DataFrame) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)

    head = "| " + " | ".join(df.columns) + " |\n|" + "---|" * len(df.columns) + "\n"
    return head + "".join("| " + " | ".join(cell(v) for v in r) + " |\n" for r in df.iter_rows())


def _value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def marginals(df: pl.DataFrame, param_cols: list[str]) -> pl.DataFrame:
    """Per parameter value (log-binned to a third of a decade when there are many values): trials, mean and best val_loss."""
    done = df.filter(pl.col("val_loss").is_not_null() & pl.col("outcome").is_in(["complete", "pruned"]))
    parts = []
    for col in param_cols:
        values = done.get_column(col).drop_nulls()
        if values.n_unique() > 6 and values.min() > 0:
            bucket = (pl.col(col).log10() * 3).floor() / 3
            key = pl.format("{}–{}", (10**bucket).round_sig_figs(2), (10 ** (bucket + 1 / 3)).round_sig_figs(2))
        else:
            key = pl.col(col).cast(pl.Utf8)
        parts.append(
            done.filter(pl.col(col).is_not_null())  # trials whose method ignores it (full: no LoRA rank)
            .group_by(key.alias("value"))
            .agg(pl.len().alias("trials"), pl.col("val_loss").mean().alias("mean_val_loss"),
                 pl.col("val_loss").min().alias("best_val_loss"), pl.col(col).min().alias("_order"))
            .sort("_order").drop("_order")
            .with_columns(pl.lit(col.removeprefix("param_")).alias("parameter"))
            .select("parameter", "value", "trials", "mean_val_loss", "best_val_loss")
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


def summary_markdown(study: optuna.Study, df: pl.DataFrame) -> str:
    param_cols = [c for c in df.columns if c.startswith("param_")]
    counts = df.group_by("outcome").len().sort("outcome")
    lines = [f"# Study `{study.study_name}`", "",
             "Trials: " + ", ".join(f"{s} {n}" for s, n in counts.iter_rows()), "", *budget_lines(study), ""]
    if base := study.user_attrs.get("base"):
        r = base["recipe"]
        lines += [f"Base model: pretrained by the harness on {base['corpus']}: {base['tokens_trained']:,} tokens "
                  f"({base['passes']} passes, sequences of {r['seq_len']}, batch {r['batch_size']}, learning rate "
                  f"{r['learning_rate']:g}), held-out loss {base['held_out_loss_initial']:.3f} -> "
                  f"{base['held_out_loss']:.3f}, in {base['seconds']:.0f} s on {base['device']}.", ""]
    complete = df.filter((pl.col("outcome") == "complete") & pl.col("feasible")).sort(
        "value", descending=study.direction == optuna.study.StudyDirection.MAXIMIZE)
    extra = [c for c in ("time_to_target", "value_std") if df.get_column(c).drop_nulls().len()]
    # Where full fine-tuning took part, how many weights each trial trained.
    methods = ["method", "trainable_params"] if (df.get_column("method") == "full").any() else []
    shown = ["number", "val_loss", *extra, *methods, "tokens_per_s", "peak_mem_mib", "train_s",
             *[c for c in param_cols if not (methods and c == "param_method")]]
    chosen = best_trial(study)
    if chosen is not None:
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
        lines += ["## Per parameter", "", "Complete and pruned trials (a pruned trial's loss is its last report).", "",
                  _md(marginals(df, param_cols)), ""]
    data = study.user_attrs.get("data")
    if data:
        cols = ["rows", "tokens", "length_min", "length_median", "length_p95", "length_max", "truncated_share",
                "skipped_empty"]
        table = pl.DataFrame([{"split": name, **{c: float(s.get(c, 0)) for c in cols}} for name, s in data.items()])
        lines += ["## Data", "", "Per split: rows and tokens as trained (after truncation); the length figures are per row before truncation (BOS and EOS included).", "", _md(table), ""]
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


def plot_curves(study: optuna.Study, out: Path) -> None:
    """Validation loss against step for every trial, coloured by how it ended."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"COMPLETE": "tab:green", "PRUNED": "tab:orange", "INFEASIBLE": "tab:purple", "FAIL": "tab:red",
              "RUNNING": "tab:gray"}
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for t in study.get_trials(deepcopy=False):
        if not t.intermediate_values:
            continue
        steps, losses = zip(*sorted(t.intermediate_values.items()))
        kind = "INFEASIBLE" if any(v > 0 for v in t.constraints.values()) else t.state.name
        ax.plot(steps, losses, marker="o", ms=3, color=colors.get(kind, "black"), alpha=0.8)
        ax.annotate(str(t.number), (steps[-1], losses[-1]), fontsize=7, xytext=(3, 0), textcoords="offset points")
    shown = {"INFEASIBLE" if any(v > 0 for v in t.constraints.values()) else t.state.name
             for t in study.get_trials(deepcopy=False) if t.intermediate_values}
    for state, c in colors.items():
        if state in shown:
            ax.plot([], [], color=c, label=state.lower())
    unit = (study.user_attrs.get("budget") or {}).get("unit", "steps")
    ax.set(xlabel={"tokens": "training tokens", "epochs": "training tokens", "examples": "training examples"}.get(
        unit, "optimizer step"), ylabel="validation loss", title=f"{study.study_name}: validation loss by trial")
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


def build_report(study_dir: Path, storage_url: str | None = None) -> dict:
    """Rebuild ``trials.parquet``, ``summary.md`` and ``curves.png`` in ``study_dir`` from the storage."""
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
    write_text_atomic(out["summary"], summary_markdown(study, df))
    plot_curves(study, out["plot"])
    return {**out, "headline": headline(study, df)}


def headline(study: optuna.Study, df: pl.DataFrame) -> str | None:
    """One line for the end of a run: the base model's validation loss and the best trial's."""
    chosen = best_trial(study)
    start = df.get_column("val_loss_start").drop_nulls()
    if chosen is None or not start.len():
        return None
    row = df.filter(pl.col("number") == chosen.number).row(0, named=True)
    lr = row.get("param_learning_rate")
    return (f"validation loss: base model {start[0]:.4f}, best trial {row['number']} {row['val_loss']:.4f} "
            f"({row['val_loss'] - start[0]:+.4f})" + (f" at learning rate {lr:.3g}" if lr is not None else ""))
