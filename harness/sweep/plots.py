"""The report's figures beyond the loss curves: parameter importance, parallel coordinates,
throughput and memory against each searched parameter, and the Pareto front of a multi-objective
study. Matplotlib (Agg) and Optuna's matplotlib plots; each figure is written atomically.

Torch-free: the report imports it.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import optuna
import polars as pl

from harness.files import atomic_path

# How a trial ended (``outcome`` in trials.parquet), as a colour.
OUTCOME_COLORS = {"complete": "tab:green", "pruned": "tab:orange", "oom": "tab:purple", "over_budget": "tab:pink",
                  "not_converged": "tab:brown", "running": "tab:gray"}
FAILED_COLOR = "tab:red"


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, out: Path) -> None:
    """Write ``fig`` to ``out`` (a reader never sees half a PNG) and free it."""
    plt = pyplot()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, bbox_inches="tight")
    plt.close(fig)


@contextlib.contextmanager
def optuna_plotting() -> Iterator[None]:
    """Around Optuna's matplotlib plots: no ExperimentalWarning, and the style sheet some of them
    switch on (``ggplot``) undone afterwards, so it does not leak into the other figures."""
    pyplot()
    import matplotlib

    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield


def plot_importance(importances: dict[str, float], target: str, title: str, out: Path) -> None:
    """Horizontal bars, the most important parameter on top."""
    plt = pyplot()
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(names) + 1.4), dpi=110)
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    for i, n in enumerate(names):
        ax.annotate(f"{importances[n]:.2f}", (importances[n], i), xytext=(3, 0), textcoords="offset points",
                    va="center", fontsize=8)
    ax.set(xlabel=f"importance for {target} (sums to 1)", title=title,
           xlim=(0, max(1.0, max(importances.values()) * 1.15)))
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    save(fig, out)


def plot_parallel(study: optuna.Study, params: list[str], target: Callable[[optuna.trial.FrozenTrial], float] | None,
                  target_name: str, title: str, out: Path) -> None:
    """Optuna's parallel-coordinate plot: one line per trial through its parameters to its value."""
    with optuna_plotting():
        ax = optuna.visualization.matplotlib.plot_parallel_coordinate(study, params=params, target=target,
                                                                      target_name=target_name)
        fig = ax.figure
        fig.set_size_inches(max(7.0, 1.6 * (len(params) + 1)), 4.5)
        ax.set_title(title)
        save(fig, out)


def plot_pareto(study: optuna.Study, target_names: list[str], title: str, out: Path) -> None:
    """Optuna's Pareto-front plot (2D for two objectives, 3D for three); infeasible trials greyed."""
    constrained = any(t.constraints for t in study.get_trials(deepcopy=False))
    with optuna_plotting():
        ax = optuna.visualization.matplotlib.plot_pareto_front(
            study, target_names=target_names,
            constraints_func=(lambda t: list(t.constraints.values()) or [0.0]) if constrained else None)
        fig = ax.figure
        fig.set_size_inches(7, 5.5)
        ax.set_title(title)
        save(fig, out)


def _categorical(values: list[Any], dist: optuna.distributions.BaseDistribution | None) -> bool:
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return True
    if dist is not None:
        return False
    return any(isinstance(v, (str, bool)) for v in values)


def _color(outcome: str | None) -> str:
    return OUTCOME_COLORS.get(outcome or "", FAILED_COLOR)


def plot_params(df: pl.DataFrame, distributions: dict[str, optuna.distributions.BaseDistribution], title: str,
                out: Path) -> bool:
    """Tokens/s (top row) and peak memory (bottom row) against each searched parameter, one point
    per trial coloured by its outcome; log x for log-range parameters, categories as categories.
    False (nothing written) when there is no parameter or no measurement to show."""
    param_cols = [c for c in df.columns if c.startswith("param_")]
    metrics = [("tokens_per_s", "tokens/s"), ("peak_mem_mib", "peak memory (MiB)")]
    if not param_cols or not any(df.get_column(m).drop_nulls().len() for m, _ in metrics):
        return False
    plt = pyplot()
    from matplotlib.ticker import NullFormatter

    n = len(param_cols)
    fig, axes = plt.subplots(2, n, figsize=(max(6.0, 3.2 * n), 6.2), dpi=110, squeeze=False)
    shown: dict[str, str] = {}
    for j, col in enumerate(param_cols):
        name = col.removeprefix("param_")
        dist = distributions.get(name)
        present = df.filter(pl.col(col).is_not_null())
        xs = present.get_column(col).to_list()
        categorical = _categorical(xs, dist)
        if categorical:
            order = (list(dist.choices) if isinstance(dist, optuna.distributions.CategoricalDistribution)
                     else sorted(set(xs), key=lambda v: (str(type(v)), v)))
            seen = [c for c in order if c in set(xs)] or sorted(set(xs), key=str)
            position = {c: i for i, c in enumerate(seen)}
        for i, (metric, label) in enumerate(metrics):
            ax = axes[i][j]
            rows = present.filter(pl.col(metric).is_not_null())
            x = rows.get_column(col).to_list()
            y = rows.get_column(metric).to_list()
            outcomes = rows.get_column("outcome").to_list()
            if categorical:
                x = [position.get(v, math.nan) for v in x]
                ax.set_xticks(range(len(seen)), [str(c) for c in seen])
                ax.set_xlim(-0.5, len(seen) - 0.5)
            elif getattr(dist, "log", False):
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())  # decades only: minor labels overlap
            ax.scatter(x, y, c=[_color(o) for o in outcomes], s=22, alpha=0.8, edgecolors="none")
            for o in outcomes:
                shown.setdefault(o or "?", _color(o))
            ax.grid(alpha=0.3)
            if i == len(metrics) - 1:
                ax.set_xlabel(name)
            if j == 0:
                ax.set_ylabel(label)
    for o, c in shown.items():
        axes[0][0].scatter([], [], color=c, label=o)
    if shown:
        axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    save(fig, out)
    return True
