"""Comparisons a researcher can trust, on CPU with real trials: equal data whatever the batch
size, one seed governing a trial (same seed, same loss, exactly), seeds as a noise band, time to
target, a resumed study that does not replay its parameters, and a rerun of the top configs."""

import optuna
import polars as pl
import pytest
import yaml

from conftest import run_cli

pytestmark = [pytest.mark.timeout(900), pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")]
State = optuna.trial.TrialState

BASE = {
    "model": {"name": "tiny-mistral", "gradient_checkpointing": False},
    "dataset": {"source": "shakespeare", "max_val_rows": 16}, "max_seq_length": 64,
    "budget": {"tokens": 1500, "eval_every": 500},
    "search_space": {"batch_size": 4, "learning_rate": 5e-3, "lora_r": 4},
    "sampler": {"name": "random"}, "pruner": {"name": "none"}, "n_trials": 1, "wandb": {"mode": "disabled"},
}


def run_study(tmp_path, name, n_trials=None, expect=0, **changes):
    sweep = {**BASE, **changes, "study": name}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    args = ["run", str(path), "--results-dir", str(tmp_path / "r")]
    if n_trials:
        args += ["--n-trials", str(n_trials)]
    proc = run_cli(*args)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'r' / name / 'study.db'}")
    return study, proc


@pytest.mark.slow
def test_trials_of_different_batch_sizes_train_on_the_same_data(tmp_path, harness_cache):
    study, proc = run_study(tmp_path, "equal", n_trials=2, sampler={"name": "grid"},
                            search_space={**BASE["search_space"], "batch_size": {"choices": [2, 8]}})
    small, large = sorted(study.trials, key=lambda t: t.params["batch_size"])
    for t in (small, large):
        # At least the budget, and less than one more step of this trial's batch over it.
        assert 1500 <= t.user_attrs["tokens_trained"] < 1500 + t.params["batch_size"] * 64, t.user_attrs
    assert small.user_attrs["steps"] > large.user_attrs["steps"] * 2
    # Reported to the pruner at the same data milestones.
    assert sorted(small.intermediate_values) == sorted(large.intermediate_values) == [500, 1000, 1500]
    summary = (tmp_path / "r" / "equal" / "summary.md").read_text()
    assert "Budget: 1,500 tokens per trial" in summary and "same amount of data" in summary
    # Each trial's steady pace and warm-up, from its own steps; what it trained at that pace.
    for t in (small, large):
        a = t.user_attrs
        assert a["steps"] > 2 and a["steady_step_s"] > 0 and a["warmup_s"] >= 0, a  # timing_warmup_steps: 2
        assert a["train_steady_s"] == pytest.approx(a["steps"] * a["steady_step_s"], abs=2e-3)
    # The sweep efficiency: this run (the launcher's whole time on one device) against that training.
    runs = study.user_attrs["sweep_runs"]
    assert len(runs) == 1 and runs[0]["gpus"] == 1 and runs[0]["start_method"] == "fork" and runs[0]["trials"] == 2
    assert runs[0]["wall_s"] > sum(t.user_attrs["train_steady_s"] for t in (small, large))
    df = pl.read_parquet(tmp_path / "r" / "equal" / "trials.parquet")
    efficiency = df.get_column("sweep_efficiency").unique().to_list()
    assert len(efficiency) == 1 and 0 < efficiency[0] <= 1, efficiency
    assert df.get_column("warmup_s").null_count() == df.get_column("steady_step_s").null_count() == 0
    assert "## Sweep efficiency" in summary and f"**{efficiency[0]:.1%}**" in summary
    assert f"sweep efficiency {efficiency[0]:.1%}" in proc.stdout


@pytest.mark.slow
def test_a_step_budget_is_flagged(tmp_path, harness_cache):
    _, _ = run_study(tmp_path, "steps", budget={"max_steps": 3, "eval_every": 3})
    assert "favours large batches" in (tmp_path / "r" / "steps" / "summary.md").read_text()


@pytest.mark.slow
def test_one_seed_governs_a_trial_and_seeds_give_a_noise_band(tmp_path, harness_cache):
    single, _ = run_study(tmp_path, "single")
    band, proc = run_study(tmp_path, "band", seeds=3)
    loss = single.trials[0].user_attrs["val_loss"]
    t = band.trials[0]
    values = t.user_attrs["seed_values"]
    assert t.user_attrs["seeds"] == [0, 1, 2] and len(values) == 3
    # Seed 0 of the band is the single study's trial again, in another process: the same loss,
    # exactly (CPU); other seeds (LoRA init, data order) give other losses.
    assert values[0] == loss and len(set(values)) == 3
    assert t.value == pytest.approx(sum(values) / 3) and t.user_attrs["value_std"] > 0
    assert "over 3 seeds" in proc.stdout and "± " in (tmp_path / "r" / "band" / "summary.md").read_text()


@pytest.mark.slow
def test_time_to_target(tmp_path, harness_cache):
    study, proc = run_study(tmp_path, "ttt", n_trials=2, sampler={"name": "grid"},
                            objective={"metric": "time_to_target", "target": 10.8, "measure": "tokens"},
                            search_space={**BASE["search_space"], "learning_rate": {"choices": [1e-7, 2e-2]}})
    slow, fast = sorted(study.trials, key=lambda t: t.params["learning_rate"])
    assert fast.state == State.COMPLETE and fast.user_attrs["outcome"] == "complete"
    # The tokens trained when an evaluation (every 500 tokens) first saw the target: at a milestone,
    # plus what the step that crossed it held (less than one batch of 4 x 64).
    assert fast.value == fast.user_attrs["time_to_target"]
    assert any(m <= fast.value < m + 4 * 64 for m in (500, 1000, 1500)), fast.value
    assert fast.user_attrs["best_val_loss"] <= 10.8
    # Never reached: recorded as not converged with its best loss, infeasible, never the best.
    assert slow.user_attrs["outcome"] == "not_converged" and slow.user_attrs["best_val_loss"] > 10.8
    assert slow.constraints["not_converged"] > 0 and study.best_trial.number == fast.number
    assert study.metric_names == ["time_to_target"]
    df = pl.read_parquet(tmp_path / "r" / "ttt" / "trials.parquet")
    assert df.filter(pl.col("number") == slow.number)["feasible"].item() is False


@pytest.mark.slow
def test_a_resumed_study_draws_new_parameters(tmp_path, harness_cache):
    space = {**BASE["search_space"], "learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}}
    study, _ = run_study(tmp_path, "resume", n_trials=2, search_space=space, budget={"tokens": 500})
    study, _ = run_study(tmp_path, "resume", n_trials=4, search_space=space, budget={"tokens": 500})
    rates = [t.params["learning_rate"] for t in study.trials]
    assert len(rates) == 4 and len(set(rates)) == 4, rates  # the second run did not replay the first's draws
    # Each run adds its wall time to the study's sweep efficiency.
    assert [r["trials"] for r in study.user_attrs["sweep_runs"]] == [2, 2]


@pytest.mark.slow
def test_rerun_the_top_configs_with_fresh_seeds(tmp_path, harness_cache):
    space = {**BASE["search_space"], "learning_rate": {"choices": [1e-3, 2e-2]}}
    run_study(tmp_path, "ranked", n_trials=2, sampler={"name": "grid"}, search_space=space, budget={"tokens": 500})
    proc = run_cli("rerun", str(tmp_path / "r" / "ranked"), "--top", "2", "--seeds", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (tmp_path / "r" / "ranked-rerun" / "rerun.md").read_text()
    assert "2 fresh seeds each" in report and "bootstrap interval" in report
    assert "distinguishable" in report
    rerun = optuna.load_study(study_name="ranked-rerun",
                              storage=f"sqlite:///{tmp_path / 'r' / 'ranked-rerun' / 'study.db'}")
    assert [t.user_attrs["seeds"] for t in rerun.trials] == [[10_000, 10_001]] * 2
    assert {t.user_attrs["original_trial"] for t in rerun.trials} == {0, 1}


def test_rerun_statistics():
    from harness.sweep.rerun import bootstrap_difference, compare

    interval = bootstrap_difference([1.0, 1.1, 0.9], [2.0, 2.1, 1.9])
    assert interval.method == "BCa" and 0.8 < interval.low <= interval.high < 1.2
    result = compare([{"mean": 1.0, "values": [1.0, 1.1, 0.9]}, {"mean": 1.02, "values": [0.8, 1.3, 0.96]}])
    assert result["distinguishable"] is False and result["interval"].low < 0 < result["interval"].high
    assert result["welch"].p > 0.5 and result["difference"] == pytest.approx(0.02)


def test_rerun_verdict_rarely_calls_noise_a_real_difference():
    """Pairs of configs drawn from one distribution: the verdict calls them different about 5% of
    the time, not the ~20% (3 seeds) the percentile bootstrap interval did."""
    import numpy as np

    from harness.sweep.rerun import welch

    rng = np.random.default_rng(0)
    for seeds in (3, 5):
        a, b = rng.normal(8.0, 0.15, (2, 4000, seeds))
        rate = float(np.mean(welch(a, b).distinguishable))
        assert rate <= 0.065, (seeds, rate)


def test_rerun_verdict_detects_a_large_difference():
    import numpy as np

    from harness.sweep.rerun import compare, welch

    rng = np.random.default_rng(1)
    a = rng.normal(8.0, 0.15, (4000, 5))
    b = rng.normal(8.0 + 4 * 0.15, 0.15, (4000, 5))  # four seed standard deviations worse
    assert float(np.mean(welch(a, b).distinguishable)) >= 0.95
    best, worse = [8.10, 8.05, 8.12, 8.08, 8.11], [8.60, 8.71, 8.55, 8.66, 8.62]
    result = compare([{"mean": np.mean(worse), "values": worse}, {"mean": np.mean(best), "values": best}])
    assert result["ranked"][0]["values"] == best and result["distinguishable"] is True
    assert result["welch"].p < 1e-4 and result["interval"].low > 0
    # Maximizing, the same numbers the other way round: the runner-up is still the worse one.
    result = compare([{"mean": np.mean(best), "values": best}, {"mean": np.mean(worse), "values": worse}],
                     minimize=False)
    assert result["ranked"][0]["values"] == worse and result["difference"] > 0 and result["welch"].t > 0


def test_rerun_report_states_the_test():
    from harness.sweep.rerun import compare, report_markdown

    rows = [{"mean": 8.098, "std": 0.147, "values": [8.2537, 7.9616, 8.0789], "original": 1, "params": {"lr": 1.45e-3}},
            {"mean": 8.405, "std": 0.174, "values": [8.3567, 8.2608, 8.5983], "original": 0, "params": {"lr": 2e-4}}]
    text = report_markdown("s", 3, compare(rows))
    # bench/RESULTS.md's seed-noise comparison: the bootstrap interval excludes zero, Welch's test does not.
    assert "| 1 | 1 | 3 | 8.0981 ± 0.1470 |" in text
    assert "worse by 0.3072" in text and "BCa bootstrap interval" in text
    assert "t = 2.34, df = 3.9, p = 0.0815" in text and "**not distinguishable**" in text
    # No spread at all: BCa cannot be computed, the percentile interval is given and said to be.
    flat = [{"mean": 1.0, "std": 0.0, "values": [1.0] * 3, "original": 0, "params": {}},
            {"mean": 1.0, "std": 0.0, "values": [1.0] * 3, "original": 1, "params": {}}]
    result = compare(flat)
    assert result["interval"].method == "percentile" and result["distinguishable"] is False
    assert "BCa impossible" in report_markdown("s", 3, result)
