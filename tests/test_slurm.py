"""A study on a real Slurm (a one-node cluster with munge, started here: tests/slurm_cluster.py):
``harness submit slurm`` submits an array of 3 tasks, each a ``harness join`` on the tests'
PostgreSQL; one task is cancelled (``scancel``) while its trial trains. The study still completes
its n_trials, loses no trial and runs no config twice, the cancelled trial runs again on another
task, a task requeued at the same time (``--requeue``) joins the study again, and the storage
password appears nowhere: not in the script, the job, Slurm's logs and state,
nor the results."""

import json
import stat

import optuna
import pytest
import yaml

from conftest import PG_PASSWORD, run_cli, wait_for
from slurm_cluster import SlurmCluster, missing
from test_storage import SWEEP, assert_whole, trials_of

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow,
              pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")]
State = optuna.trial.TrialState

N_TRIALS, WORKERS, HUNG = 8, 3, 2
# Trial 2 stays in training after its step 4 (a hang fault: only the scancel ends it), so the
# cancel surely finds a trial training; its retry is another trial number and runs normally.
SWEEP_SLURM = dict(SWEEP, study="on-slurm", n_trials=N_TRIALS, sampler={"name": "random"},
                   budget={**SWEEP["budget"], "hang_timeout_s": 300},
                   fault_tolerance={"heartbeat_s": 1, "grace_s": 10, "max_retries": 1})


@pytest.fixture(scope="module")
def slurm():
    if gone := missing():
        pytest.skip(f"Slurm is not installed here ({', '.join(gone)}; .ci/run installs slurmd slurmctld "
                    "slurm-client munge)")
    cluster = SlurmCluster()
    yield cluster
    cluster.stop()


def test_a_study_survives_scancel_on_a_real_slurm(tmp_path, private_cache, postgres, slurm, monkeypatch):
    # No resident worker (a private cache): each task's trials are its own processes, which Slurm
    # signals with the task, as on a real cluster.
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    monkeypatch.setenv("HARNESS_SECRETS", str(tmp_path / "secrets"))
    monkeypatch.setenv("HARNESS_FAULTS", f"{HUNG}:hang@4")
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump(SWEEP_SLURM))
    results = tmp_path / "results"
    study_dir = results / "on-slurm"
    public_url = postgres.url.replace(f":{PG_PASSWORD}@", "@")

    sub = run_cli("submit", "slurm", str(sweep), "--workers", str(WORKERS), "--storage", postgres.url,
                  "--results-dir", str(results), "--requeue")
    assert sub.returncode == 0, sub.stdout + sub.stderr + slurm.logs()
    job = sub.stdout.split(" as job ")[1].split(":")[0]
    script = (study_dir / "slurm" / "job.sbatch").read_text()
    assert f"--array=0-{WORKERS - 1}" in script and public_url in script and PG_PASSWORD not in script
    pgpass = tmp_path / "secrets" / "on-slurm.pgpass"
    assert stat.S_IMODE(pgpass.stat().st_mode) == 0o600 and PG_PASSWORD in pgpass.read_text()

    def hung_trial():
        t = next((t for t in trials_of("on-slurm", postgres.url) if t.number == HUNG), None)
        return t if t is not None and t.state == State.RUNNING and 3 in t.intermediate_values else None

    def job_left() -> str:
        return slurm.run("squeue", "-h", "-j", job, "-o", "%i %t", check=False).stdout.strip()

    try:
        assert wait_for(hung_trial, timeout=300), f"trial {HUNG} never trained; queue: {job_left()}\n{slurm.logs()}"
        task = hung_trial().user_attrs["slurm_task"]
        assert task.startswith(f"{job}_")
        slurm.run("scancel", task)
        # Another task is preempted and requeued at the same moment: it goes back in the queue and
        # joins again (Slurm would start it after a delay; StartTime=now starts it at once).
        requeued = f"{job}_{(int(task.split('_')[1]) + 1) % WORKERS}"
        slurm.run("scontrol", "requeue", requeued)
        assert wait_for(lambda: slurm.run("scontrol", "update", f"JobId={requeued}", "StartTime=now",
                                          check=False).stderr.strip().endswith("no longer pending execution")
                        or "run 1" in (study_dir / "slurm" / f"{requeued}.out").read_text(), timeout=60)
        assert wait_for(lambda: not job_left(), timeout=400), f"the job did not finish: {job_left()}"
    finally:
        slurm.run("scancel", job, check=False)

    study = optuna.load_study(study_name="on-slurm", storage=postgres.url)
    trials = {t.number: t for t in study.trials}
    states = {n: (t.state.name, t.user_attrs.get("slurm_task")) for n, t in trials.items()}
    # The study completed its n_trials: nothing left running or waiting, no trial lost.
    assert_whole(study, N_TRIALS)
    # The cancelled task's trial (and the requeued task's, if it had one running) was interrupted,
    # not failed as a crash, and ran again on another task.
    failed = [t for t in trials.values() if t.state == State.FAIL]
    assert HUNG in {t.number for t in failed} and len(failed) <= 2, states
    for t in failed:
        assert t.user_attrs["outcome"] == "interrupted" and "SIGTERM" in t.user_attrs["reason"], t.user_attrs
        [retry] = [r for r in trials.values() if r.system_attrs.get("failed_trial") == t.number]
        assert retry.state == State.COMPLETE and retry.params == t.params, states
        assert retry.user_attrs["slurm_task"] != t.user_attrs["slurm_task"] or t.user_attrs["slurm_task"] == requeued
    assert trials[HUNG].user_attrs["slurm_task"] == task
    # No config ran twice: one finished trial per parameter set.
    done = [t for t in trials.values() if t.state in (State.COMPLETE, State.PRUNED)]
    assert len(done) == N_TRIALS and len({json.dumps(t.params, sort_keys=True) for t in done}) == N_TRIALS, states
    # The requeued task ran its script again and joined the study again.
    requeued_log = (study_dir / "slurm" / f"{requeued}.out").read_text()
    assert "run 1" in requeued_log and requeued_log.count("study on-slurm:") == 2, requeued_log[-3000:]
    # Every task ran trials; the cancelled task said why it stopped, and exited within its grace.
    assert len({t.user_attrs["slurm_task"] for t in trials.values()}) == WORKERS, states
    cancelled_log = (study_dir / "slurm" / f"{task}.out").read_text()
    assert "terminated (SIGTERM)" in cancelled_log, cancelled_log[-2000:]
    # One results folder, written by the tasks: every trial's record and the tables.
    assert sorted(int(p.parent.name) for p in (study_dir / "trials").glob("*/result.json")) == sorted(trials)
    assert (study_dir / "trials.parquet").exists() and (study_dir / "summary.md").exists()

    # No secret anywhere: the script, the job as Slurm shows it, Slurm's logs and saved state
    # (which keeps each job's script and environment), the tasks' logs and the results.
    shown = slurm.run("scontrol", "show", "job", job, check=False).stdout
    assert PG_PASSWORD not in shown
    leaks = [str(p) for root in (study_dir, slurm.root) for p in root.rglob("*")
             if p.is_file() and PG_PASSWORD.encode() in p.read_bytes()]
    assert not leaks, leaks
