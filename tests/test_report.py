"""The report's tables and figures, from real Optuna studies built in a temporary SQLite storage
(no training): parameter importance, parallel coordinates, throughput and memory by parameter, the
Pareto front of a multi-objective study, the binned per-parameter table and the memory budget."""

import json
import math
import random
import re
import warnings

import optuna
import polars as pl
import pytest

from harness.sweep.report import build_report, marginals, trials_frame
from harness.sweep.storage import default_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)

PNG = b"\x89PNG\r\n\x1a\n"
DISTRIBUTIONS = {
    "learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
    "lora_r": optuna.distributions.CategoricalDistribution([8, 16]),
    "batch_size": optuna.distributions.CategoricalDistribution([2, 4]),
}
METRICS = ["val_loss", "tokens_per_s", "peak_mem_mib"]


def make_study(study_dir, n: int = 14, objectives: int = 1, budget_mib: float | None = 12000, oom: tuple = (5,),
               seed: int = 0) -> optuna.Study:
    """A study as the driver leaves it: ``study.json`` naming it, trials with the harness's records
    as user attributes, out-of-memory trials complete with the worst value and a constraint."""
    study_dir.mkdir(parents=True, exist_ok=True)
    (study_dir / "study.json").write_text(json.dumps({"study": "rep"}))
    directions = ["minimize", "maximize", "minimize"][:objectives]
    study = optuna.create_study(study_name="rep", storage=default_storage(study_dir), directions=directions)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(METRICS[:objectives])
    if budget_mib is not None:
        study.set_user_attr("memory_budget_mib", budget_mib)
    rng = random.Random(seed)
    for i in range(n):
        p = {"learning_rate": 10 ** rng.uniform(-4, -2), "lora_r": rng.choice([8, 16]),
             "batch_size": rng.choice([2, 4])}
        loss = 2 + abs(math.log10(p["learning_rate"]) + 3) + 0.1 * rng.random()
        tps = 1000.0 * p["batch_size"] + 100 * rng.random()
        mem = 500.0 * p["batch_size"] + 10 * p["lora_r"] + rng.random()
        failed = i in oom
        attrs = {"outcome": "oom" if failed else "complete", "method": "lora", "device": "cpu",
                 "tokens_per_s": tps, "peak_mem_mib": mem, "reached_training": True, "steps": 20}
        if not failed:
            attrs.update(value=loss, val_loss=loss, best_val_loss=loss, val_loss_start=4.0, train_s=1.0)
        worst = [math.inf if d == "minimize" else -math.inf for d in directions]
        trial = optuna.trial.create_trial(
            params=p, distributions=DISTRIBUTIONS, values=worst if failed else [loss, tps, mem][:objectives],
            user_attrs=attrs, intermediate_values={} if failed else {10: loss + 0.5, 20: loss})
        if failed:
            trial.set_constraint("oom", 1.0)
        study.add_trial(trial)
    return study


def section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:end if end > 0 else None]


def table_rows(text: str) -> list[list[str]]:
    """A Markdown table's body rows, as cells."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]


def test_single_objective_report_writes_every_figure_but_the_pareto_front(tmp_path):
    study_dir = tmp_path / "rep"
    study = make_study(study_dir)
    out = build_report(study_dir)
    assert {"parquet", "summary", "plot", "headline", "importance", "parallel", "params", "pareto"} <= set(out)
    for key, name in [("plot", "curves.png"), ("importance", "importance.png"), ("parallel", "parallel.png"),
                      ("params", "params.png")]:
        assert out[key] == study_dir / name and out[key].read_bytes()[:8] == PNG, name
    assert out["pareto"] is None and not (study_dir / "pareto.png").exists()
    assert out["headline"].startswith("validation loss: base model 4.0000, best trial")

    text = out["summary"].read_text()
    assert "Memory budget: 12,000 MiB per trial (over it: infeasible)." in text
    assert "## Best trial" in text and f"Trial {study.best_trial.number}:" in text and "## Pareto front" not in text
    importance = table_rows(section(text, "## Parameter importance"))
    assert {r[0] for r in importance} == {"learning_rate", "lora_r", "batch_size"}
    assert sum(float(r[1]) for r in importance) == pytest.approx(1.0, abs=0.01)
    assert "over 13 complete, feasible trials" in text  # the out-of-memory trial is left out

    per_parameter = table_rows(section(text, "## Per parameter"))
    lr_rows = [r for r in per_parameter if r[0] == "learning_rate"]
    assert 1 < len(lr_rows) < 13, "learning rates are binned, not one row per value"
    assert sum(int(r[2]) for r in lr_rows) == 13
    assert {r[1] for r in per_parameter if r[0] == "lora_r"} == {"8", "16"}
    assert {r[1] for r in per_parameter if r[0] == "batch_size"} == {"2", "4"}
    assert build_report(study_dir)["summary"].read_text() == text, "a rebuilt report says the same"


@pytest.mark.parametrize("objectives", [2, 3])
def test_multi_objective_report_lists_the_pareto_front(tmp_path, objectives):
    study_dir = tmp_path / "rep"
    study = make_study(study_dir, objectives=objectives, budget_mib=None)
    front = sorted(t.number for t in study.best_trials)
    (study_dir / "best").mkdir()
    (study_dir / "best" / "trial.json").write_text(json.dumps({"number": front[0]}))
    out = build_report(study_dir)
    assert out["pareto"] == study_dir / "pareto.png" and out["pareto"].read_bytes()[:8] == PNG
    for key in ("importance", "parallel", "params", "plot"):
        assert out[key].read_bytes()[:8] == PNG, key

    text = out["summary"].read_text()
    assert "Memory budget: none (only the card's memory)" in text
    pareto = section(text, "## Pareto front")
    header = next(line for line in pareto.splitlines() if line.startswith("| number"))
    assert header.split(" | ")[1:1 + objectives] == METRICS[:objectives]
    rows = table_rows(pareto)
    assert sorted(int(r[0]) for r in rows) == front and 5 not in front
    by_number = {t.number: t for t in study.best_trials}
    for r in rows:
        t = by_number[int(r[0])]
        assert [float(v) for v in r[1:1 + objectives]] == pytest.approx(t.values, rel=1e-3)
    assert f"trial {front[0]} (`best/trial.json`)" in pareto
    assert "## Best trial" not in text
    assert "the first objective, val_loss" in section(text, "## Parameter importance")


def test_too_few_trials_skip_importance_and_parallel_coordinates(tmp_path):
    study_dir = tmp_path / "rep"
    make_study(study_dir, n=2, oom=(1,))
    (study_dir / "parallel.png").write_bytes(PNG)  # left from an earlier report: removed
    out = build_report(study_dir)
    assert out["importance"] is None and out["parallel"] is None and out["pareto"] is None
    assert not (study_dir / "importance.png").exists() and not (study_dir / "parallel.png").exists()
    assert out["params"].read_bytes()[:8] == PNG  # throughput and memory need no comparison
    text = out["summary"].read_text()
    assert "Fewer than 2 complete, feasible trials (1)" in section(text, "## Parameter importance")


def test_no_varying_parameter_skips_importance(tmp_path):
    study_dir = tmp_path / "rep"
    study_dir.mkdir()
    (study_dir / "study.json").write_text(json.dumps({"study": "rep"}))
    study = optuna.create_study(study_name="rep", storage=default_storage(study_dir))
    for loss in (2.5, 2.4, 2.6):
        study.add_trial(optuna.trial.create_trial(
            params={"lora_r": 8}, distributions={"lora_r": DISTRIBUTIONS["lora_r"]}, value=loss,
            user_attrs={"outcome": "complete", "val_loss": loss, "value": loss, "tokens_per_s": 10.0}))
    out = build_report(study_dir)
    assert out["importance"] is None and out["parallel"] is None
    assert "No parameter varies" in out["summary"].read_text()


def test_marginals_bin_continuous_floats_and_keep_few_values():
    rows = [{"number": i, "outcome": "complete", "val_loss": 2.0 + i / 100, "param_weight_decay": i / 100,
             "param_learning_rate": 1e-4 * 1.2 ** i, "param_lora_r": [8, 16, 32][i % 3]} for i in range(12)]
    df = pl.DataFrame(rows)
    dists = {"weight_decay": optuna.distributions.FloatDistribution(0.0, 0.11),
             "learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
             "lora_r": optuna.distributions.CategoricalDistribution([8, 16, 32])}
    table = marginals(df, ["param_weight_decay", "param_learning_rate", "param_lora_r"], dists)
    assert table.columns == ["parameter", "value", "trials", "mean_val_loss", "best_val_loss"]
    wd = table.filter(pl.col("parameter") == "weight_decay")
    assert 1 < wd.height <= 5 and wd.get_column("trials").sum() == 12  # ~5 equal-width bins
    lr = table.filter(pl.col("parameter") == "learning_rate")
    # 1e-4 .. 7.4e-4: thirds of a decade 1–2.2, 2.2–4.6, 4.6–10 (×1e-4)
    assert lr.get_column("value").to_list() == ["0.0001–0.00022", "0.00022–0.00046", "0.00046–0.001"]
    assert table.filter(pl.col("parameter") == "lora_r").get_column("value").to_list() == ["8", "16", "32"]
    # A continuous float is binned even with a few values.
    few = marginals(df.head(3), ["param_learning_rate"], dists)
    assert few.height == 1 and few.get_column("trials").to_list() == [3]


def test_trials_frame_columns_unchanged_by_the_figures(tmp_path):
    study = make_study(tmp_path / "rep", n=4)
    df = trials_frame(study)
    build_report(tmp_path / "rep")
    assert pl.read_parquet(tmp_path / "rep" / "trials.parquet").columns == df.columns


def test_sweep_efficiency_over_the_recorded_runs(tmp_path):
    """Training at steady pace (× each trial's GPUs) over the runs' wall time × their GPUs: only
    trials asked for during a recorded run count, of any state if they trained; overlapping runs
    (workers) add their GPU-seconds, but their wall time counts once for trials per hour."""
    import time

    from harness.sweep.efficiency import measure, record_run

    study_dir = tmp_path / "eff"
    study_dir.mkdir()
    (study_dir / "study.json").write_text(json.dumps({"study": "eff"}))
    url = default_storage(study_dir)
    study = optuna.create_study(study_name="eff", storage=url)
    dist = {"learning_rate": DISTRIBUTIONS["learning_rate"]}

    def add(state, **attrs):
        study.add_trial(optuna.trial.create_trial(
            state=state, value=1.0 if state == optuna.trial.TrialState.COMPLETE else None,
            params={"learning_rate": 1e-3}, distributions=dist, user_attrs={"outcome": state.name.lower(), "val_loss": 1.0, **attrs}))

    Complete, Pruned = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED
    # Before any recorded run (an older version's, or a driver killed without a record): not counted.
    add(Complete, reached_training=True, train_steady_s=100.0, fixed_s=50.0, warmup_s=9.0)
    time.sleep(0.05)
    started = time.time()
    add(Complete, reached_training=True, train_steady_s=10.0, fixed_s=4.0, warmup_s=1.0, world_size=1)
    add(Pruned, reached_training=True, train_steady_s=5.0, fixed_s=2.0, warmup_s=3.0, world_size=2)
    add(Complete, reached_training=True, fixed_s=3.0)  # no step after its warm-up: no steady pace
    add(Complete, reached_training=False)              # never trained (e.g. predicted out of memory)
    assert trials_frame(study).get_column("sweep_efficiency").null_count() == 5  # no run recorded yet
    wall = time.time() - started + 100.0
    record_run(study, url, {"wall_s": wall, "gpus": 2, "host": "a", "started": started})
    record_run(study, url, {"wall_s": wall, "gpus": 1, "host": "b", "started": started + wall / 2})

    e = measure(study)
    assert [r["host"] for r in study.user_attrs["sweep_runs"]] == ["a", "b"]
    assert e.runs == 2 and e.trials == 3
    assert e.train_gpu_s == pytest.approx(10.0 + 5.0 * 2)
    assert e.wall_gpu_s == pytest.approx(wall * 2 + wall * 1)
    assert e.efficiency == pytest.approx(20.0 / (3 * wall))
    assert e.wall_s == pytest.approx(1.5 * wall)  # the two runs overlap by half
    assert e.trials_per_hour == pytest.approx(3 / (1.5 * wall) * 3600)
    assert e.fixed_s == pytest.approx(3.0) and e.warmup_s == pytest.approx(2.0)
    assert e.first_fixed_s == 4.0 and e.first_warmup_s == 1.0
    assert f"sweep efficiency {e.efficiency:.1%}" in e.line()


    out = build_report(study_dir)
    df = pl.read_parquet(out["parquet"])
    assert df.schema["sweep_efficiency"] == pl.Float64 and df.schema["train_steady_s"] == pl.Float64
    assert df.get_column("sweep_efficiency").to_list() == [pytest.approx(e.efficiency)] * 5
    text = out["summary"].read_text()
    rows = table_rows(section(text, "## Sweep efficiency"))
    assert f"**{e.efficiency:.1%}**" in text and rows[0][0] == f"{e.efficiency:.4g}" and rows[0][3:5] == ["2", "3"]
    assert out["efficiency"] == e.line()


def test_markdown_tables_show_everything_and_stay_tables():
    from harness.sweep.report import _md

    n = 40  # more rows, columns and characters than Polars shows by default
    df = pl.DataFrame({f"column_{i}": [f"{'x' * 60}{r}" for r in range(n)] for i in range(12)}).with_columns(
        lr=pl.Series([1.45e-5] * n), tokens_per_s=pl.Series([16784.0] * (n - 1) + [None]),
        reason=pl.Series(["a|b\nc"] * n))
    lines = _md(df).splitlines()
    assert len(lines) == 2 + n and lines[1].count("|") == len(df.columns) + 1
    assert all(line.count(" | ") == len(df.columns) - 1 for line in lines[:1] + lines[2:])
    rows = [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines[2:]]  # "\|" is no border
    assert rows[-1][:12] == [f"{'x' * 60}{n - 1}"] * 12
    assert rows[0][12:] == ["1.45e-05", "16,784", r"a\|b c"] and rows[-1][13] == ""


def test_a_run_that_pretrained_its_base_first_still_counts_its_trials(tmp_path):
    """The first `make demo` on a machine: the base's pretraining is left out of the run's wall
    time, and the trials that started after it still count."""
    import time

    from harness.sweep.efficiency import measure, record_run

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="eff", storage=url)
    started = time.time()
    time.sleep(0.05)
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.COMPLETE, value=1.0, params={"learning_rate": 1e-3},
        distributions={"learning_rate": DISTRIBUTIONS["learning_rate"]},
        user_attrs={"outcome": "complete", "reached_training": True, "train_steady_s": 2.0, "device": "cpu"}))
    record_run(study, url, {"wall_s": 0.01, "excluded_s": 60.0, "gpus": 1, "host": "a", "started": started})
    e = measure(study)
    assert e.wall_s == pytest.approx(0.01) and e.trials == 1 and e.unit == "CPU", e
