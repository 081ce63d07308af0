"""Standby trial processes (the default on GPU hosts), exercised on CPU: each trial's process was
started and had imported the training stack before its trial came, and none is left behind."""

import json
import time

import optuna
import pytest
import yaml

from conftest import run_cli
from test_scale import SWEEP

pytestmark = pytest.mark.timeout(900)


def test_standby_processes_import_before_their_trial_and_leave_nothing(tmp_path, harness_cache):
    sweep = dict(SWEEP, study="standby", n_trials=3, start_method="standby", sampler={"name": "random"},
                 pruner={"name": "none"})
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(sweep))
    t0 = time.monotonic()
    proc = run_cli("run", str(tmp_path / "s.yaml"), "--results-dir", str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    study_dir = tmp_path / "r" / "standby"
    study = optuna.load_study(study_name="standby", storage=f"sqlite:///{study_dir / 'study.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    pids = set()
    for t in study.trials:
        m = t.user_attrs
        pids.add(m["pid"])
        # The import ran before the trial was handed over: none of it is in the trial's import_s,
        # and the hand-over waited at most for what was left of it (on CPU a tiny trial ends
        # before the next standby's import does).
        assert m["start_method"] == "standby" and m["preimport_s"] > m["import_s"], m
        assert m["spawn_s"] < m["preimport_s"], m
        parts = m["spawn_s"] + m["import_s"] + m["setup_s"] + m["load_s"]
        assert parts - 0.01 <= m["fixed_s"] < parts + 0.5, m  # the parts, each rounded to ms
        log = (study_dir / "trials" / str(t.number) / "log.txt").read_text()
        assert "Unsloth" in log, "the log starts with what the standby's imports printed"
        assert json.loads((study_dir / "trials" / str(t.number) / "result.json").read_text())["outcome"] == "complete"
    assert len(pids) == 3, "one process per trial"
    # The last standby (started while the last trial ran) was closed; no standby log is left.
    assert not list((study_dir / "trials").glob("standby-*"))
    for pid in pids:
        assert not _alive(pid)
    assert time.monotonic() - t0 < 600


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_standby_that_died_before_its_trial_is_replaced_by_a_spawned_process(tmp_path, harness_cache):
    from harness.launch import StandbyLauncher

    run_cli("run", str(_sweep(tmp_path)), "--results-dir", str(tmp_path / "r"))  # a prepared study to add to
    study_dir = tmp_path / "r" / "dead"
    storage = f"sqlite:///{study_dir / 'study.db'}"
    study = optuna.load_study(study_name="dead", storage=storage)
    trial = study.ask({"batch_size": optuna.distributions.CategoricalDistribution([2, 4]),
                       "learning_rate": optuna.distributions.FloatDistribution(1e-3, 1e-2, log=True)})
    events = []
    with StandbyLauncher(study_dir, storage, {"0": {}}, hang_timeout_s=None) as launcher:
        standby = launcher._waiting["0"]
        standby.proc.kill()
        standby.proc.wait()
        result = launcher.run(trial.number, "0", lambda n, ev: events.append(ev))
    assert result.outcome == "complete", result.reason
    assert result.start_method == "spawn" and result.metrics.preimport_s is None, "it was spawned"
    assert any(e.get("phase") == "training" for e in events)
    log = (study_dir / "trials" / str(trial.number) / "log.txt").read_text()
    assert "the standby process for this trial had ended" in log, "what the standby printed is the trial's"
    assert not list((study_dir / "trials").glob("standby-*"))


def _sweep(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(dict(SWEEP, study="dead", n_trials=1, start_method="spawn", sampler={"name": "random"},
                                        pruner={"name": "none"})))
    return path
