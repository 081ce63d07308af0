"""``harness replay SWEEP.yaml --grid FILE.parquet``: how good is the search? A sweep file's sampler
and pruner run against a recorded benchmark of learning curves (``bench/grid.py``) instead of a GPU,
as HPO research measures strategies on tabular benchmarks (LCBench, YAHPO Gym): hundreds of
searches in seconds of CPU.

Each replayed search is a real Optuna study (in memory) with the sweep's sampler and pruner, built
by the same code the driver uses (``study.make_sampler``, ``make_pruner``, ``suggest``). A trial's
parameters are looked up in the grid (a sampled value off the recorded points is snapped to the
nearest one, in log space for a log range); it gets the recorded curve of that config for one of
its seeds, drawn at random, and at each recorded milestone the harness's own pruning decision
(``pruning.judge``: Optuna's pruner, or the harness's dominance rule) says whether it stops
there. It is charged its recorded GPU-seconds: the run's fixed cost (spawn, import, load) plus
training and validation up to the milestone where it stopped, so a pruned trial costs its share.

Regret is the final validation loss of the incumbent (the best complete trial so far, as the
search saw it: the loss of the seed it drew) minus the grid's best config's mean final loss over
its seeds; ``config_regret`` is the incumbent config's own mean minus that, its true distance
(not monotone: a lucky seed can make a worse config the incumbent). A search has *reached* the
best when its regret is within one seed standard deviation of the best config's final loss.

Per strategy the table gives: the repeats, the median trials per search and share pruned, the
fraction of repeats that reached the best within 15% of the full grid's GPU-seconds (the cost of
running every config once, mean over its seeds), the median GPU-seconds to reach it (a repeat that
never does counts as never: when most never do, the median is "not reached"), that against random
search without pruning, and the median regret at 15% and at the end. Searches run until they
have spent ``budget_fraction`` of the full grid. Torch-free, except the ``gp`` sampler (Optuna's
GPSampler imports torch).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import polars as pl

from harness import params as hp
from harness.errors import HarnessError
from harness.files import atomic_path, write_text_atomic
from harness.sweep import pruning
from harness.sweep.config import Choices, PrunerConfig, Range, SamplerConfig, SweepConfig
from harness.sweep.study import make_pruner, make_sampler, suggest

REACH_FRACTION = 0.15  # "reached within 15% of the full grid's GPU-seconds"
DEFAULT_STRATEGIES = ("random", "tpe", "tpe+median", "tpe+hyperband", "tpe+dominance", "random+median", "gp",
                      "cmaes")
SLOW = {"gp": 10}  # samplers this slow replay at most this many repeats by default (the table says so)
SAMPLERS = SamplerConfig.model_fields["name"].annotation.__args__
PRUNERS = PrunerConfig.model_fields["name"].annotation.__args__


@dataclass(frozen=True)
class Run:
    """One recorded run: a config's curve for one seed."""

    milestones: list[float]
    losses: list[float]
    gpu_s: list[float]       # training and validation up to each milestone, x devices
    fixed_gpu_s: float       # before the first step, x devices
    tokens_per_s: list[float | None]
    peak_mem_mib: float | None


@dataclass
class Grid:
    """The recorded benchmark, read from its Parquet file (``bench/grid.py`` wrote it)."""

    path: Path
    axes: list[str]                                   # the parameters it varies
    values: dict[str, list[Any]]                      # each axis's recorded values (None left out)
    runs: dict[tuple, list[Run]]                      # config key -> its seeds' runs
    unit: str
    card: str
    mean_final: dict[tuple, float] = field(default_factory=dict)
    best: tuple = ()
    best_mean: float = math.nan
    best_std: float = 0.0
    full_gpu_s: float = 0.0

    def key(self, config: dict[str, Any]) -> tuple:
        shown = hp.applicable(config)
        return tuple(shown.get(a) for a in self.axes)

    def name(self, key: tuple) -> str:
        return " ".join(f"{a}={v:g}" if isinstance(v, float) else f"{a}={v}"
                        for a, v in zip(self.axes, key) if v is not None)


def load_grid(path: Path) -> Grid:
    """Read a recorded grid; its best config, seed spread and full cost."""
    try:
        frame = pl.read_parquet(path)
    except FileNotFoundError:
        raise HarnessError(f"{path}: grid file not found (record one with bench/grid.py)") from None
    except Exception as err:  # noqa: BLE001 - polars raises several kinds for a file that is not Parquet
        raise HarnessError(f"{path}: not a Parquet grid ({type(err).__name__})") from None
    need = {"seed", "milestone_index", "milestone", "val_loss", "gpu_seconds", "fixed_gpu_s"}
    if missing := sorted(need - set(frame.columns)):
        raise HarnessError(f"{path}: not a recorded grid, no column {missing[0]} (bench/grid.py writes them)")
    axes = [c.removeprefix("param_") for c in frame.columns if c.startswith("param_")]
    if not axes:
        raise HarnessError(f"{path}: no param_<name> column: the grid varies nothing")
    runs: dict[tuple, list[Run]] = {}
    cols = [f"param_{a}" for a in axes]
    for (*key, _seed), rows in frame.sort("milestone_index").group_by([*cols, "seed"], maintain_order=True):
        key = tuple(hp.typed({a: v})[a] if v is not None else None for a, v in zip(axes, key))
        runs.setdefault(key, []).append(Run(
            milestones=rows["milestone"].to_list(), losses=rows["val_loss"].to_list(),
            gpu_s=rows["gpu_seconds"].to_list(), fixed_gpu_s=float(rows["fixed_gpu_s"][0] or 0.0),
            tokens_per_s=rows["tokens_per_s"].to_list() if "tokens_per_s" in rows.columns else [None] * rows.height,
            peak_mem_mib=rows["peak_mem_mib"][0] if "peak_mem_mib" in rows.columns else None))
    values = {a: sorted({k[i] for k in runs if k[i] is not None}, key=_order) for i, a in enumerate(axes)}
    grid = Grid(path=path, axes=axes, values=values, runs=runs,
                unit=str(frame["budget_unit"][0]) if "budget_unit" in frame.columns else "tokens",
                card=str(frame["card"][0]) if "card" in frame.columns else "?")
    grid.mean_final = {k: float(np.mean([r.losses[-1] for r in rs])) for k, rs in runs.items()}
    grid.best = min(grid.mean_final, key=grid.mean_final.get)
    finals = [r.losses[-1] for r in runs[grid.best]]
    grid.best_mean = grid.mean_final[grid.best]
    grid.best_std = float(np.std(finals, ddof=1)) if len(finals) > 1 else 0.0
    grid.full_gpu_s = float(sum(np.mean([r.fixed_gpu_s + r.gpu_s[-1] for r in rs]) for rs in runs.values()))
    return grid


def _order(v: Any) -> Any:
    return (0, v) if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, str(v))


@dataclass(frozen=True)
class Space:
    """The sweep's search space over the grid: what each sampled value becomes."""

    snap: dict[str, list[Any]]   # a searched range: the recorded values inside it, to snap to
    log: dict[str, bool]
    fixed: dict[str, Any]        # grid axes the sweep fixes (checked to be recorded values)

    def config(self, sampled: dict[str, Any]) -> dict[str, Any]:
        out = dict(sampled)
        for name, points in self.snap.items():
            v = out[name]
            dist = (lambda p: abs(math.log(p) - math.log(v))) if self.log[name] else (lambda p: abs(p - v))
            out[name] = min(points, key=dist)
        return out


def match_space(cfg: SweepConfig, grid: Grid, source: str) -> Space:
    """Check the sweep's search space against the grid: every searched key is an axis, every value
    of a choices list or fixed axis was recorded, every range holds a recorded value. Errors name
    the key."""
    searched, fixed = cfg.search_space.searched(), cfg.search_space.fixed()
    snap: dict[str, list[Any]] = {}
    log: dict[str, bool] = {}
    recorded = lambda name: ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in grid.values[name])  # noqa: E731
    for name, dim in searched.items():
        where = f"{source}: search_space.{name}"
        if name not in grid.axes:
            raise HarnessError(f"{where}: the grid {grid.path.name} does not vary it (its axes: {', '.join(grid.axes)})")
        if isinstance(dim, Choices):
            for v in dim.choices:
                if not _recorded(hp.typed({name: v})[name], grid.values[name]):
                    raise HarnessError(f"{where}: {v!r} was not recorded (the grid has {recorded(name)})")
        else:
            inside = [v for v in grid.values[name] if dim.low * (1 - 1e-9) <= v <= dim.high * (1 + 1e-9)]
            if not inside:
                raise HarnessError(f"{where}: no recorded value in [{dim.low:g}, {dim.high:g}] "
                                   f"(the grid has {recorded(name)})")
            snap[name], log[name] = inside, dim.log
    fixed_axes: dict[str, Any] = {}
    for name in grid.axes:
        if name in searched:
            continue
        value = hp.typed({name: fixed.get(name, hp.DEFAULTS.get(name))})[name]
        if name in hp.LORA_ONLY and fixed.get("method") == "full":
            continue
        if not _recorded(value, grid.values[name]):
            raise HarnessError(f"{source}: search_space.{name}: {value!r} was not recorded (the grid has "
                               f"{recorded(name)}); search it or fix it at a recorded value")
        fixed_axes[name] = value
    return Space(snap=snap, log=log, fixed=fixed_axes)


def _recorded(value: Any, values: list[Any]) -> bool:
    if isinstance(value, float):
        return any(isinstance(v, (int, float)) and math.isclose(value, v, rel_tol=1e-6) for v in values)
    return value in values


def _lookup(grid: Grid, config: dict[str, Any]) -> tuple | None:
    """The grid key of a (snapped) config; floats matched within rounding."""
    key = grid.key(config)
    if key in grid.runs:
        return key
    for k in grid.runs:
        if all(a == b or isinstance(a, float) and b is not None and math.isclose(a, b, rel_tol=1e-6)
               for a, b in zip(key, k)):
            return k
    return None


@dataclass(frozen=True)
class Strategy:
    label: str
    sampler: str
    pruner: str


def parse_strategies(text: str | None) -> list[Strategy]:
    """``random,tpe+median,...``: a sampler, optionally + a pruner (none when left out)."""
    out = []
    for item in (text.split(",") if text else DEFAULT_STRATEGIES):
        item = item.strip()
        sampler, _, pruner = item.partition("+")
        pruner = pruner or "none"
        if sampler not in SAMPLERS or sampler == "grid":
            raise HarnessError(f"--strategies: {item!r}: the sampler is one of "
                               f"{', '.join(s for s in SAMPLERS if s != 'grid')}")
        if pruner not in PRUNERS:
            raise HarnessError(f"--strategies: {item!r}: the pruner is one of {', '.join(PRUNERS)}")
        out.append(Strategy(item, sampler, pruner))
    return out


def strategy_config(cfg: SweepConfig, grid: Grid, s: Strategy) -> SweepConfig:
    """The sweep with this strategy's sampler and pruner (their other settings the sweep's), and
    the grid's milestones as its budget (so Hyperband's resources are the recorded ones)."""
    first = min(run.milestones[0] for rs in grid.runs.values() for run in rs)
    last = max(run.milestones[-1] for rs in grid.runs.values() for run in rs)
    unit = {"tokens": "tokens", "examples": "examples", "steps": "max_steps"}.get(grid.unit, "tokens")
    budget = {"tokens": None, "examples": None, "epochs": None, "max_steps": None, unit: last, "eval_every": first}
    return cfg.model_copy(update={
        "sampler": cfg.sampler.model_copy(update={"name": s.sampler}),
        "pruner": cfg.pruner.model_copy(update={"name": s.pruner}),
        "budget": cfg.budget.model_copy(update={k: (int(v) if k != "eval_every" and v is not None and unit != "epochs"
                                                    else v) for k, v in budget.items()}),
    })


def replay_once(cfg: SweepConfig, grid: Grid, space: Space, seed: int, repeat: int, budget_gpu_s: float,
                max_trials: int) -> list[dict[str, Any]]:
    """One search: trials until ``budget_gpu_s`` is spent (or ``max_trials``); a row per trial."""
    rng = np.random.default_rng([seed, repeat])  # the same draws of seeds for every strategy
    # Named: Hyperband assigns trials to brackets by a hash of the study's name (an unnamed study
    # gets a random one, and the replay would not repeat).
    study = optuna.create_study(study_name=f"replay-{seed}-{repeat}", direction="minimize",
                                sampler=make_sampler(cfg, seed * 100_003 + repeat), pruner=make_pruner(cfg))
    spent, incumbent, incumbent_key = 0.0, math.inf, None
    rows: list[dict[str, Any]] = []
    for number in range(max_trials):
        if spent >= budget_gpu_s:
            break
        trial = study.ask()
        config = space.config({**suggest(trial, cfg), **space.fixed})
        key = _lookup(grid, config)
        if key is None:  # a config the grid could not record (out of memory, failed): nothing learned
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            rows.append(dict(trial=number, config=grid.name(grid.key(config)), missing=True, pruned=False, cost_gpu_s=0.0,
                             spent_gpu_s=spent, loss=None, stopped_at=None, incumbent_loss=incumbent,
                             incumbent_config=None if incumbent_key is None else grid.name(incumbent_key)))
            continue
        runs = grid.runs[key]
        drawn = int(rng.integers(len(runs)))
        run = runs[drawn]
        stop = len(run.losses) - 1
        for i, (milestone, loss) in enumerate(zip(run.milestones, run.losses)):
            decision = pruning.judge(trial, cfg, int(round(milestone)), loss, run.tokens_per_s[i], run.peak_mem_mib)
            if decision.prune and i < len(run.losses) - 1:
                stop = i
                break
        pruned = stop < len(run.losses) - 1
        cost = run.fixed_gpu_s + run.gpu_s[stop]
        spent += cost
        loss = run.losses[stop]
        trial.set_user_attr("val_loss", loss)
        if pruned:
            trial.set_user_attr("pruned_by", cfg.pruner.name)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, loss)
            if loss < incumbent:
                incumbent, incumbent_key = loss, key
        rows.append(dict(trial=number, config=grid.name(key), missing=False, seed_index=drawn, pruned=pruned,
                         stopped_at=run.milestones[stop], loss=loss, cost_gpu_s=cost, spent_gpu_s=spent,
                         incumbent_loss=incumbent,
                         incumbent_config=None if incumbent_key is None else grid.name(incumbent_key),
                         config_regret=(grid.mean_final[incumbent_key] - grid.best_mean) if incumbent_key else None))
    return rows


@dataclass
class Replay:
    grid: Grid
    strategies: list[Strategy]
    repeats: dict[str, int]
    trace: pl.DataFrame      # a row per replayed trial
    table: pl.DataFrame      # a row per strategy
    seconds: float


def replay(cfg: SweepConfig, grid: Grid, strategies: list[Strategy], repeats: int, seed: int = 0,
           budget_fraction: float = 0.5, slow_repeats: dict[str, int] | None = None, source: str = "<sweep>",
           progress: Any = None) -> Replay:
    """Every strategy, ``repeats`` searches each (fewer for a slow sampler: ``slow_repeats``)."""
    if cfg.multi_objective or cfg.objective.metric != "val_loss":
        raise HarnessError(f"{source}: objective: replay ranks configs by val_loss alone (one objective)")
    space = match_space(cfg, grid, source)
    budget = budget_fraction * grid.full_gpu_s
    max_trials = 20 * len(grid.runs)
    slow = SLOW if slow_repeats is None else slow_repeats
    counts = {s.label: min(repeats, slow.get(s.sampler, repeats)) for s in strategies}
    if any(s.sampler == "gp" for s in strategies):
        # GPSampler fits tiny matrices with torch: one thread is faster than a pool (9 s of CPU
        # against 16 for 10 searches on 2 cores), and leaves the other core free. torch comes with
        # the gp sampler anyway.
        import torch

        torch.set_num_threads(1)
    frames = []
    start = time.perf_counter()
    logging.getLogger("optuna").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        # Optuna marks GPSampler, CmaEsSampler's margin and others experimental; replays are many.
        warnings.simplefilter("ignore")
        for s in strategies:
            scfg = strategy_config(cfg, grid, s)
            for r in range(counts[s.label]):
                rows = replay_once(scfg, grid, space, seed, r, budget, max_trials)
                frames.append(pl.DataFrame(rows, infer_schema_length=None).with_columns(
                    strategy=pl.lit(s.label), repeat=pl.lit(r)))
                if progress is not None:
                    progress(s.label, r + 1, counts[s.label])
    trace = pl.concat(frames, how="diagonal_relaxed").with_columns(
        regret=pl.col("incumbent_loss") - grid.best_mean)
    return Replay(grid, strategies, counts, trace, summarize(trace, grid, strategies, counts),
                  time.perf_counter() - start)


def reach_times(trace: pl.DataFrame, grid: Grid) -> pl.DataFrame:
    """Per strategy and repeat: the GPU-seconds spent when the regret first came within one seed
    standard deviation of the grid's best (null: never), and the regret at 15% and at the end."""
    at = REACH_FRACTION * grid.full_gpu_s
    threshold = grid.best_std + 1e-12
    return trace.group_by("strategy", "repeat", maintain_order=True).agg(
        trials=pl.len(),
        pruned=pl.col("pruned").sum(),
        reach_gpu_s=pl.col("spent_gpu_s").filter(pl.col("regret") <= threshold).min(),
        regret_15=pl.col("regret").filter(pl.col("spent_gpu_s") <= at).min(),
        regret_end=pl.col("regret").min(),
        config_regret_end=pl.col("config_regret").last(),
        spent=pl.col("spent_gpu_s").max(),
    )


def summarize(trace: pl.DataFrame, grid: Grid, strategies: list[Strategy], counts: dict[str, int]) -> pl.DataFrame:
    per = reach_times(trace, grid)
    at = REACH_FRACTION * grid.full_gpu_s
    rows = []
    for s in strategies:
        p = per.filter(pl.col("strategy") == s.label)
        reach = p["reach_gpu_s"].fill_null(math.inf).to_numpy()
        median_reach = float(np.median(reach))
        # How sure: the median's 95% bootstrap interval over repeats (an element each, so a
        # never-reached repeat stays inf instead of making NaN), and the reach fraction's standard error.
        boots = np.median(np.random.default_rng(0).choice(reach, size=(2000, len(reach))), axis=1)
        lo, hi = np.quantile(boots, [0.025, 0.975], method="inverted_cdf")
        share = float(np.mean(reach <= at))
        regret_15 = p["regret_15"].fill_null(math.inf).to_numpy()
        rows.append(dict(
            strategy=s.label, repeats=counts[s.label], trials=float(p["trials"].median()),
            pruned_share=float((p["pruned"] / p["trials"]).mean()),
            reached_15=share, reached_15_se=math.sqrt(share * (1 - share) / len(reach)),
            median_gpu_s_to_reach=median_reach, median_gpu_s_lo=float(lo), median_gpu_s_hi=float(hi),
            regret_at_15=float(np.median(regret_15)),
            regret_end=float(p["regret_end"].fill_null(math.inf).median()),
            config_regret_end=float(p["config_regret_end"].median()) if p["config_regret_end"].null_count() < p.height
            else math.nan,
        ))
    table = pl.DataFrame(rows)
    base = next((r["median_gpu_s_to_reach"] for r in rows if r["strategy"] == "random"), math.nan)
    return table.with_columns(vs_random=pl.col("median_gpu_s_to_reach") / base if math.isfinite(base) else pl.lit(math.nan))


def markdown(result: Replay, sweep: str, budget_fraction: float) -> str:
    g, t = result.grid, result.table
    fmt = lambda v, spec: "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)  # noqa: E731
    lines = [
        f"# Replay of {sweep} on {g.path.name}",
        "",
        f"Grid: {len(g.runs)} configs ({', '.join(f'{a}: {len(v)}' for a, v in g.values.items())}), "
        f"{min(len(r) for r in g.runs.values())}-{max(len(r) for r in g.runs.values())} seeds each, card {g.card}. "
        f"Best config: {g.name(g.best)}, mean final val_loss {g.best_mean:.4f} (seed sd {g.best_std:.4f}). "
        f"Full grid: {g.full_gpu_s:,.0f} GPU-s (every config once, mean over its seeds; on CPU, CPU-seconds). "
        f"Each search runs until it has spent {budget_fraction:.0%} of that; 15% = {REACH_FRACTION * g.full_gpu_s:,.0f} GPU-s.",
        "",
        "Reached: regret (the incumbent's final val_loss minus the best config's mean) within one seed sd of the best. "
        "`median GPU-s to reach` counts a repeat that never reached it as never (— when most never do); "
        "`vs random` is that against random search without pruning (below 1: cheaper). "
        "`config regret` is the final incumbent config's mean minus the best's.",
        "",
        "| strategy | repeats | trials (median) | pruned | reached ≤15% (± se) | median GPU-s to reach [95% CI] | "
        "vs random | regret at 15% (median) | regret at end (median) | config regret at end (median) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in t.iter_rows(named=True):
        lines.append(f"| {r['strategy']} | {r['repeats']} | {r['trials']:.0f} | {r['pruned_share']:.0%} | "
                     f"{r['reached_15']:.0%} ± {r['reached_15_se']:.0%} | {fmt(r['median_gpu_s_to_reach'], ',.0f')} "
                     f"[{fmt(r['median_gpu_s_lo'], ',.0f')}, {fmt(r['median_gpu_s_hi'], ',.0f')}] | {fmt(r['vs_random'], '.2f')} | "
                     f"{fmt(r['regret_at_15'], '.4f')} | {fmt(r['regret_end'], '.4f')} | "
                     f"{fmt(r['config_regret_end'], '.4f')} |")
    fewer = [f"{label} ({n})" for label, n in result.repeats.items() if n < max(result.repeats.values())]
    if fewer:
        lines += ["", f"Fewer repeats for slow samplers: {', '.join(fewer)} (Optuna's GPSampler fits its Gaussian "
                      "process with torch at every trial, ~0.1-0.3 s a trial on 2 CPU cores): wider intervals."]
    lines += ["", f"{result.trace.height:,} replayed trials in {result.seconds:.1f} s."]
    return "\n".join(lines) + "\n"


def plot(result: Replay, path: Path) -> None:
    """Median regret with its 25-75% band against GPU-seconds spent, one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = result.grid
    xs = np.linspace(0, result.trace["spent_gpu_s"].max(), 200)
    fig, ax = plt.subplots(figsize=(8, 5))
    for s in result.strategies:
        curves = []
        for _, rows in result.trace.filter(pl.col("strategy") == s.label).group_by("repeat", maintain_order=True):
            spent = rows["spent_gpu_s"].to_numpy()
            regret = rows["regret"].fill_null(math.inf).to_numpy()
            idx = np.searchsorted(spent, xs, side="right") - 1
            curves.append(np.where(idx >= 0, regret[np.clip(idx, 0, None)], np.inf))
        stack = np.array(curves)
        with np.errstate(invalid="ignore"):  # inf (no incumbent yet) is a value here: its quantiles are inf or nan
            med = np.quantile(stack, 0.5, axis=0)
            lo, hi = np.quantile(stack, 0.25, axis=0), np.quantile(stack, 0.75, axis=0)
        ok = np.isfinite(med)
        (line,) = ax.plot(xs[ok], med[ok], label=f"{s.label} ({result.repeats[s.label]})")
        band = np.isfinite(hi)
        ax.fill_between(xs[band], lo[band], hi[band], color=line.get_color(), alpha=0.15)
    ax.axvline(REACH_FRACTION * g.full_gpu_s, color="grey", ls=":", lw=1)
    ax.axhline(g.best_std, color="grey", ls="--", lw=1)
    ax.text(REACH_FRACTION * g.full_gpu_s, ax.get_ylim()[1], " 15% of the grid", va="top", fontsize=8, color="grey")
    ax.set_xlabel("GPU-seconds spent" + (" (CPU-seconds: a CPU grid)" if g.card == "cpu" else ""))
    ax.set_ylabel("regret: incumbent val_loss - best config's mean")
    ax.set_title(f"{g.path.name}: median regret, 25-75% band (repeats)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write(result: Replay, out_dir: Path, sweep: str, budget_fraction: float, figures: bool = True) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / "replay.md", "parquet": out_dir / "replay.parquet"}
    write_text_atomic(paths["md"], markdown(result, sweep, budget_fraction))
    with atomic_path(paths["parquet"]) as tmp:
        result.trace.write_parquet(tmp)
    if figures:
        paths["png"] = out_dir / "replay.png"
        plot(result, paths["png"])
    return paths
