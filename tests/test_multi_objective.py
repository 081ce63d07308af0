"""The multi-objective demo variant end to end (sweeps/demo-multi.yaml, fewer trials): validation
loss, tokens/s and peak memory as three objectives of one Optuna study, the Pareto front in the
report, best/ chosen from the front by `prefer`, the harness's own pruning on the way."""

import json

import optuna
import polars as pl
import pytest

from conftest import run_cli, shipped_sweep, table_row

pytestmark = [pytest.mark.timeout(1500), pytest.mark.slow]
N_TRIALS = 5


@pytest.fixture(scope="module")
def multi(tmp_path_factory, harness_cache):
    results = tmp_path_factory.mktemp("results")
    # Half the file's data per trial (the shape of the study is the point here, not how far it learns).
    sweep = shipped_sweep("demo-multi", tmp_path_factory.mktemp("sweep"), n_trials=N_TRIALS,
                          budget={"tokens": 6000, "eval_every": 2000})
    proc = run_cli("run", str(sweep), "--results-dir", str(results))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study_dir = results / "demo-multi"
    return study_dir, optuna.load_study(study_name="demo-multi", storage=f"sqlite:///{study_dir / 'study.db'}")


def test_three_objectives_each_as_measured(multi):
    study_dir, study = multi
    assert study.metric_names == ["val_loss", "tokens_per_s", "peak_mem_mib"]
    assert [d.name for d in study.directions] == ["MINIMIZE", "MAXIMIZE", "MINIMIZE"]
    assert len(study.trials) == N_TRIALS
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete
    for t in complete:
        assert t.values == pytest.approx([t.user_attrs["val_loss"], t.user_attrs["tokens_per_s"],
                                          t.user_attrs["peak_mem_mib"]]), t.number
        # The validation curve is kept (Optuna's report is single-objective): one point per milestone.
        assert sorted(int(k) for k in t.user_attrs["curve"]) == [2000, 4000, 6000]
    for t in study.trials:
        if t.state == optuna.trial.TrialState.PRUNED:
            assert t.user_attrs["pruned_by"] in ("loss", "dominance"), t.user_attrs
            # The training its remaining budget would have taken, at the pace it recorded (none for
            # one stopped at its last milestone): what was recorded, not how long it took.
            stopped_at = max(int(k) for k in t.user_attrs["curve"])
            expected = t.user_attrs["train_s"] * (6000 / stopped_at - 1)
            assert t.user_attrs["pruning_saved_s"] == pytest.approx(expected, abs=2e-3), t.user_attrs


def test_best_is_the_fronts_lowest_loss(multi):
    study_dir, study = multi
    front = [t for t in study.best_trials if all(v <= 0 for v in t.constraints.values())]
    preferred = min(front, key=lambda t: (t.values[0], t.number))
    saved = json.loads((study_dir / "best" / "trial.json").read_text())
    assert saved["number"] == preferred.number
    assert saved["values"]["val_loss"] == pytest.approx(preferred.values[0])
    assert (study_dir / "best" / "adapter_config.json").exists()


def test_report_shows_the_front(multi):
    study_dir, study = multi
    summary = (study_dir / "summary.md").read_text()
    assert "## Pareto front" in summary
    for t in study.best_trials:
        assert table_row(summary, t.number)
    assert (study_dir / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    df = pl.read_parquet(study_dir / "trials.parquet")
    assert df.height == N_TRIALS and "pruned_by" in df.columns
