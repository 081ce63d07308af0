"""Issue 25: how good is the search? `harness replay` on the shipped CPU grid (real recorded
curves, bench/grid/cpu-tiny.parquet) as a regression check in seconds; the samplers and pruner it
compares (gp, cmaes, dominance) as sweep-file settings; a study warm-started from an earlier one;
and a study under a GPU-hour budget (the last two real tiny studies on CPU)."""

import json
import math
from pathlib import Path

import optuna
import polars as pl
import pytest
import yaml

from conftest import ROOT, run_cli

pytestmark = [pytest.mark.timeout(600), pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")]

GRID = ROOT / "bench" / "grid" / "cpu-tiny.parquet"
SWEEP = ROOT / "bench" / "replay-cpu-tiny.yaml"


@pytest.fixture(scope="module")
def grid():
    from harness.sweep import replay as rp

    return rp.load_grid(GRID)


def sweep_cfg(space=None, **changes):
    """The shipped replay sweep, with ``changes`` and ``space``'s search-space entries (None drops one)."""
    from harness.sweep.config import parse_sweep

    data = {**yaml.safe_load(SWEEP.read_text()), **changes}
    data["search_space"] = {k: v for k, v in {**data["search_space"], **(space or {})}.items() if v is not None}
    return parse_sweep(data, str(SWEEP))


def test_the_shipped_grid_is_a_real_recording(grid):
    frame = pl.read_parquet(GRID)
    # Every config of the grid file, every seed, every milestone; measured, not made up.
    assert len(grid.runs) == 24 and all(len(runs) == 2 for runs in grid.runs.values())
    assert frame.group_by("config", "seed").len()["len"].unique().to_list() == [4]
    assert frame["card"].unique().to_list() == ["cpu"] and frame["gpu_seconds"].min() > 0
    assert frame["val_loss"].is_finite().all() and frame["val_loss"].n_unique() > 100
    assert json.loads(frame["software"][0])["torch"]
    assert grid.full_gpu_s > 0 and grid.best_std > 0


def test_replay_regret_is_monotone_reproducible_and_complete(grid):
    from harness.sweep import replay as rp

    cfg = sweep_cfg()
    strategies = rp.parse_strategies("random,tpe,tpe+median,tpe+hyperband,tpe+dominance,cmaes")
    a = rp.replay(cfg, grid, strategies, repeats=6, seed=3)
    for col in ("strategy", "repeat", "trial", "config", "pruned", "cost_gpu_s", "spent_gpu_s", "incumbent_loss",
                "regret", "config_regret"):
        assert col in a.trace.columns, col
    for col in ("strategy", "repeats", "reached_15", "median_gpu_s_to_reach", "vs_random", "regret_at_15", "regret_end"):
        assert col in a.table.columns, col
    assert a.table["strategy"].to_list() == [s.label for s in strategies]
    # The incumbent's regret never grows within a search, whatever the sampler; spend only grows.
    for (_, _), rows in a.trace.group_by("strategy", "repeat"):
        regret = rows.sort("trial")["regret"].fill_null(math.inf).to_list()
        assert all(b <= x for x, b in zip(regret, regret[1:])), regret
        assert rows.sort("trial")["spent_gpu_s"].is_sorted()
    assert a.trace.filter(pl.col("strategy") == "tpe+median")["pruned"].any()
    assert not a.trace.filter(pl.col("strategy").is_in(["random", "tpe"]))["pruned"].any()
    # The whole search spends about its budget (half the grid) and no search starts after it.
    spent = a.trace.group_by("strategy", "repeat").agg(pl.col("spent_gpu_s").max(), pl.col("cost_gpu_s").max())
    assert (spent["spent_gpu_s"] >= 0.5 * grid.full_gpu_s).all()
    assert (spent["spent_gpu_s"] - spent["cost_gpu_s"] < 0.5 * grid.full_gpu_s).all()
    b = rp.replay(cfg, grid, strategies, repeats=6, seed=3)
    assert a.trace.equals(b.trace)
    c = rp.replay(cfg, grid, strategies[:1], repeats=6, seed=4)
    assert not a.trace.filter(pl.col("strategy") == "random").select(c.trace.columns).equals(c.trace)


def test_replay_cli_writes_table_parquet_and_plot(tmp_path):
    proc = run_cli("replay", str(SWEEP), "--grid", str(GRID), "--repeats", "4", "--strategies", "random,tpe+hyperband",
                   "--results-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "replay-cpu-tiny"
    text = (out / "replay.md").read_text()
    assert "| random |" in text and "| tpe+hyperband |" in text and "reached ≤15%" in text
    assert pl.read_parquet(out / "replay.parquet").height > 8
    assert (out / "replay.png").stat().st_size > 10_000


def test_replay_refuses_a_space_off_the_grid(tmp_path, grid):
    from harness.errors import HarnessError
    from harness.sweep import replay as rp

    with pytest.raises(HarnessError, match=r"s\.yaml: search_space\.lora_r: 64 was not recorded \(the grid has 4, 16\)"):
        rp.match_space(sweep_cfg({"lora_r": {"choices": [4, 64]}}), grid, "s.yaml")
    with pytest.raises(HarnessError, match=r"search_space\.grad_accum: the grid cpu-tiny.parquet does not vary it"):
        rp.match_space(sweep_cfg({"grad_accum": {"choices": [1, 2]}}), grid, "s.yaml")
    with pytest.raises(HarnessError, match=r"search_space\.batch_size: 2 was not recorded \(the grid has 4, 8\); "
                                           r"search it or fix it"):
        rp.match_space(sweep_cfg({"batch_size": 2}), grid, "s.yaml")
    with pytest.raises(HarnessError, match=r"search_space\.learning_rate: no recorded value in \[0\.1, 0\.2\]"):
        rp.match_space(sweep_cfg({"learning_rate": {"low": 0.1, "high": 0.2}}), grid, "s.yaml")
    # A fixed axis narrows the grid to its recorded value.
    assert rp.match_space(sweep_cfg({"batch_size": 8}), grid, "s.yaml").fixed == {"batch_size": 8}
    # A sampled learning rate is snapped to the nearest recorded one, in log space (the geometric
    # midpoint of 2e-3 and 5e-3 is 3.16e-3; the arithmetic one, 3.5e-3).
    space = rp.match_space(sweep_cfg(), grid, "s.yaml")
    assert space.config({"learning_rate": 3.1e-3})["learning_rate"] == pytest.approx(2e-3)
    assert space.config({"learning_rate": 3.3e-3})["learning_rate"] == pytest.approx(5e-3)
    bad = run_cli("replay", str(SWEEP), "--grid", str(GRID), "--strategies", "tpe+sometimes")
    assert bad.returncode == 2 and "--strategies: 'tpe+sometimes': the pruner is one of" in bad.stdout


def test_samplers_and_dominance_pruner_in_sweep_files():
    from harness.errors import SweepFileError
    from harness.sweep.config import parse_sweep
    from harness.sweep.study import make_pruner, make_sampler

    assert isinstance(make_sampler(sweep_cfg(sampler={"name": "gp"})), optuna.samplers.GPSampler)
    assert isinstance(make_sampler(sweep_cfg(sampler={"name": "cmaes"})), optuna.samplers.CmaEsSampler)
    assert isinstance(make_pruner(sweep_cfg(pruner={"name": "dominance"})), optuna.pruners.NopPruner)
    data = yaml.safe_load(SWEEP.read_text())
    with pytest.raises(SweepFileError, match="sampler.name: cmaes is single-objective"):
        parse_sweep({**data, "sampler": {"name": "cmaes"},
                     "objectives": [{"metric": "val_loss"}, {"metric": "peak_mem_mib"}]})
    with pytest.raises(SweepFileError, match="sampler.name: "):
        parse_sweep({**data, "sampler": {"name": "bohb"}})
    with pytest.raises(SweepFileError, match="budget_gpu_hours: "):
        parse_sweep({**data, "budget_gpu_hours": 0})
    with pytest.raises(SweepFileError, match="warm_start.top: "):
        parse_sweep({**data, "warm_start": {"study": "results/x", "top": 0}})


def test_dominance_pruner_stops_a_trial_that_cannot_catch_up():
    from harness.sweep import pruning

    cfg = sweep_cfg(pruner={"name": "dominance", "n_startup_trials": 1, "n_warmup_steps": 0})
    study = optuna.create_study(direction="minimize")
    done = study.ask()
    for m, loss in ((1000, 7.0), (2000, 6.8), (3000, 6.7), (4000, 6.6)):
        done.report(loss, m)
    done.set_user_attr("val_loss", 6.6)
    study.tell(done, 6.6)
    # Best case for a trial at 7.3 at the first milestone: 7.3 - 0.4 (the most any trial gained
    # from there) = 6.9 > 6.6: it cannot catch up. One at 7.0 could still tie: it goes on.
    behind, level = study.ask(), study.ask()
    decision = pruning.judge(behind, cfg, 1000, 7.3, None, None)
    assert decision.prune and decision.rule == "dominance"
    assert not pruning.judge(level, cfg, 1000, 7.0, None, None).prune


TINY = {
    "model": {"name": "tiny-mistral", "gradient_checkpointing": False},
    "dataset": {"source": "shakespeare", "max_val_rows": 8}, "max_seq_length": 64,
    "budget": {"tokens": 600, "eval_every": 300},
    "search_space": {"batch_size": 4, "learning_rate": {"low": 1e-3, "high": 1e-2, "log": True},
                     "lora_r": {"choices": [4, 8]}},
    "sampler": {"name": "random"}, "pruner": {"name": "none"}, "wandb": {"mode": "disabled"},
}


def write_sweep(folder: Path, name: str, **changes) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**TINY, **changes, "study": name}))
    return path


def load(results: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{results / name / 'study.db'}")


def earlier_study(results: Path, name: str) -> None:
    """A finished study to start from, as `harness run` leaves one (its folder, study.json, storage)."""
    folder = results / name
    folder.mkdir(parents=True)
    (folder / "study.json").write_text(json.dumps({"study": name, "storage": f"sqlite:///{folder / 'study.db'}"}))
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{folder / 'study.db'}")
    dists = {"learning_rate": optuna.distributions.FloatDistribution(1e-3, 1e-2, log=True),
             "lora_r": optuna.distributions.CategoricalDistribution([4, 8])}
    for value, lr, r in ((6.0, 2e-3, 8), (5.5, 7e-3, 4), (5.8, 4e-3, 8)):
        study.add_trial(optuna.create_trial(value=value, params={"learning_rate": lr, "lora_r": r}, distributions=dists))


@pytest.mark.slow
def test_warm_start_runs_the_earlier_studys_best_first(tmp_path, harness_cache):
    results = tmp_path / "r"
    earlier_study(results, "before")
    sweep = write_sweep(tmp_path, "after", n_trials=2, warm_start={"study": str(results / "before"), "top": 2})
    proc = run_cli("run", str(sweep), "--results-dir", str(results), "--no-figures")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "warm start: queued the best 2 of 3 trials of study 'before' first" in proc.stdout
    trials = sorted(load(results, "after").trials, key=lambda t: t.number)
    assert [t.params for t in trials] == [{"learning_rate": 7e-3, "lora_r": 4}, {"learning_rate": 4e-3, "lora_r": 8}]
    assert [t.user_attrs["warm_start"] for t in trials] == ["before#1", "before#2"]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    # A search space that does not match: one line naming the key, nothing run.
    narrow = write_sweep(tmp_path, "narrow", n_trials=2, warm_start={"study": str(results / "before")},
                         search_space={**TINY["search_space"], "lora_r": {"choices": [16, 8]}})
    bad = run_cli("run", str(narrow), "--results-dir", str(results), "--no-figures")
    assert bad.returncode == 2, bad.stdout[-2000:]
    assert "warm_start: search_space.lora_r: trial 1 of 'before' has 4, not one of the choices [16, 8]" in bad.stdout


@pytest.mark.slow
def test_gpu_hour_budget_stops_starting_trials(tmp_path, harness_cache):
    from harness.sweep import gpu_budget

    results = tmp_path / "r"
    # One trial first, to know what a trial costs on this machine; then the same study resumed
    # under a budget of that trial and 2.5 more: two more fit, a third would pass it.
    first = run_cli("run", str(write_sweep(tmp_path, "budgeted", n_trials=1)), "--results-dir", str(results),
                    "--no-figures")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    cost = gpu_budget.spent_gpu_s(load(results, "budgeted"), 1)
    hours = 3.5 * cost / 3600
    sweep = write_sweep(tmp_path, "budgeted", n_trials=30, budget_gpu_hours=hours)
    proc = run_cli("run", str(sweep), "--results-dir", str(results), "--no-figures")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "would pass it, so no new trial starts" in proc.stdout
    study = load(results, "budgeted")
    spent, limit = gpu_budget.spent_gpu_s(study, 1), hours * 3600
    costs = [gpu_budget.trial_gpu_s(t, 1) for t in sorted(study.trials, key=lambda t: t.number)]
    assert 2 <= len(costs) < 30, costs
    # The rule, trial by trial: each trial after the first started only while the spend so far and
    # the dearest trial's cost fit the budget, and the study stopped when they no longer did.
    for k in range(1, len(costs)):
        assert sum(costs[:k]) + max(costs[:k]) <= limit * 1.01, (k, costs, limit)
    assert spent + max(costs) > limit * 0.99, (costs, limit)
    # So the study ends below the budget unless a trial ran longer than every one before it (a
    # shared CPU can make one): within 5% when they run alike.
    if max(costs[1:]) <= max(costs[:1]) * 1.1:
        assert spent <= 1.05 * limit, (spent, limit, costs)
    summary = (results / "budgeted" / "summary.md").read_text()
    assert "## GPU budget" in summary and f"spent {spent:,.0f} CPU-s" in summary
