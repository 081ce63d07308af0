"""Scale-out on CPU: two drivers (``harness join``) on one study through a real PostgreSQL server
and through a journal file, and the GPU pool's scheduling (one trial per slot at once)."""

import os
import subprocess
import sys

import optuna
import pytest
import yaml

from conftest import ROOT, run_cli

pytestmark = [pytest.mark.timeout(900), pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")]

SWEEP = {
    "study": "shared", "model": {"name": "tiny-mistral", "gradient_checkpointing": False},
    "dataset": {"source": "shakespeare", "max_val_rows": 16}, "max_seq_length": 64,
    "budget": {"max_steps": 6, "eval_every": 3},
    "search_space": {"batch_size": {"choices": [2, 4]}, "learning_rate": {"low": 1e-3, "high": 1e-2, "log": True},
                     "lora_r": 4},
    "sampler": {"name": "tpe", "n_startup_trials": 2}, "pruner": {"name": "median", "n_startup_trials": 2},
    "n_trials": 6, "wandb": {"mode": "offline"},
}


def two_drivers(tmp_path, storage: str) -> list[subprocess.CompletedProcess]:
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(SWEEP))
    procs = [subprocess.Popen([sys.executable, "-m", "harness.cli", "join", str(tmp_path / "s.yaml"),
                               "--storage", storage, "--results-dir", str(tmp_path / f"results-{i}")],
                              cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


def check_shared(study: optuna.Study, tmp_path):
    trials = study.trials
    assert [t.number for t in trials] == list(range(SWEEP["n_trials"])), "n_trials holds across drivers"
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in trials)
    assert len({t.user_attrs["driver"] for t in trials}) == 2, "both drivers ran trials"
    # No trial ran twice: each number has one record, written by one driver.
    results = [p for i in range(2) for p in (tmp_path / f"results-{i}" / "shared" / "trials").glob("*/result.json")]
    assert sorted(int(p.parent.name) for p in results) == list(range(SWEEP["n_trials"]))


@pytest.mark.slow
def test_two_drivers_share_a_journal_file(tmp_path, harness_cache):
    storage = f"journal:///{tmp_path / 'shared.journal'}"
    two_drivers(tmp_path, storage)
    from harness.sweep.storage import make_storage

    check_shared(optuna.load_study(study_name="shared", storage=make_storage(storage)), tmp_path)


def test_join_needs_a_shared_storage(tmp_path):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(SWEEP))
    for command in ("join", "worker"):  # `worker`: its old name
        proc = run_cli(command, str(tmp_path / "s.yaml"))
        assert proc.returncode == 2 and "harness join joins a shared study" in proc.stdout


@pytest.mark.slow
def test_gpu_pool_runs_one_trial_per_slot_at_once(tmp_path, harness_cache):
    sweep = dict(SWEEP, study="pool", n_trials=4)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(sweep))
    proc = run_cli("run", str(tmp_path / "s.yaml"), "--results-dir", str(tmp_path / "r"), "--gpus", "0,1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    study = optuna.load_study(study_name="pool", storage=f"sqlite:///{tmp_path / 'r' / 'pool' / 'study.db'}")
    trials = study.trials
    assert len(trials) == 4 and all(t.state != optuna.trial.TrialState.FAIL for t in trials)
    spans = sorted((t.datetime_start, t.datetime_complete) for t in trials)
    overlapping = sum(1 for a, b in zip(spans, spans[1:]) if b[0] < a[1])
    assert overlapping >= 1, spans  # two slots: trials ran side by side
    # Never more than two at once.
    for t in trials:
        at_once = sum(1 for s, e in spans if s <= t.datetime_start < e)
        assert at_once <= 2
    assert "[gpu 0]" in proc.stdout and "[gpu 1]" in proc.stdout
    # Each slot has its worker: the session's resident one, borrowed by one slot, and the other's own.
    assert {t.user_attrs["start_method"] for t in trials} == {"fork"}
    assert len({t.user_attrs.get("resident_worker") for t in trials}) == 2
    # A slot that runs out of work while the other's trial runs says so in plain words.
    assert "dead driver" not in proc.stdout
    assert not list((tmp_path / "r" / "pool" / "trials").glob("worker-*.log")), "workers that ended cleanly leave no log"
