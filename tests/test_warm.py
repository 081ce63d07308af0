"""Warm trial workers (``start_method: warm``, the default on GPU hosts), exercised on CPU: one
worker runs trial after trial with the base kept; each trial's numbers equal those of a trial in
its own process; a failure replaces the worker; nothing of one trial reaches the next."""

import os
import re
import subprocess
import sys

import optuna
import pytest
import yaml

from conftest import ROOT
from test_scale import SWEEP

pytestmark = pytest.mark.timeout(900)

GRID = dict(SWEEP, sampler={"name": "grid"}, pruner={"name": "none"},
            search_space={"batch_size": {"choices": [2, 4]}, "learning_rate": 3e-3, "lora_r": {"choices": [4, 8, 16]},
                          "lora_dropout": 0.1})


def _run(tmp_path, name: str, n_trials: int, faults: str = "", **keys) -> optuna.Study:
    sweep = dict(GRID, study=name, n_trials=n_trials, **keys)
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(sweep))
    env = dict(os.environ, HARNESS_FAULTS=faults)
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "run", str(tmp_path / f"{name}.yaml"), "--results-dir",
                           str(tmp_path / "r")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'r' / name / 'study.db'}")


@pytest.mark.slow
def test_warm_workers_match_separate_processes_and_a_failure_replaces_the_worker(tmp_path, harness_cache):
    # Trial 2 turns a LoRA weight into NaN (a failure the trial catches: its worker retires itself);
    # trial 3 is SIGKILLed with its worker (a crash); trial 4 leaves 320 MiB of tensors alive (its
    # worker finds them after the trial and retires). Dropout is on, so a leaked RNG state would show.
    warm = _run(tmp_path, "warm", 6, faults="2:nan@2,3:sigkill@2,4:leak@1", start_method="warm")
    states = [t.state for t in warm.trials]
    assert states[2] == states[3] == optuna.trial.TrialState.FAIL, states
    complete = [t for t in warm.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 4
    # The configs that completed, each in its own process (a fork of the session's resident worker).
    fork = _run(tmp_path, "fork", len(complete), start_method="fork", sampler={"name": "random"},
                enqueue=[t.params for t in complete])
    by_params = {tuple(sorted(t.params.items())): t for t in fork.trials}
    for t in complete:
        twin = by_params[tuple(sorted(t.params.items()))]
        # The same config and seed in its own process (fork) gives the same curve: no adapter,
        # optimizer state or random state is carried from the trials before it in the worker.
        assert t.value == pytest.approx(twin.value, abs=1e-6), (t.number, t.params)
        assert t.intermediate_values == pytest.approx(twin.intermediate_values, abs=1e-6)
        assert t.user_attrs["start_method"] == "warm" and twin.user_attrs["start_method"] == "fork"
        # Measured once per worker (a fresh adapter is a no-op): the same as every fork trial's.
        assert t.user_attrs["val_loss_start"] == pytest.approx(twin.user_attrs["val_loss_start"], abs=1e-6)
    attrs = {t.number: t.user_attrs for t in warm.trials}
    # Worker 1 ran trials 0-2 (its base kept from the first: the fingerprint check passed each
    # time) and retired after the NaN; worker 2 took trial 3 and was killed with it; worker 3 ran
    # trial 4 and retired for its leak; worker 4 the last.
    assert attrs[0]["pid"] == attrs[1]["pid"] == attrs[2]["pid"]
    assert [attrs[n]["worker_trial"] for n in (0, 1, 2)] == [1, 2, 3]
    # Each worker loaded the base before its first trial came (the driver's preload), and kept it.
    assert all(attrs[n]["base_reused"] is True for n in (0, 1, 4, 5))
    assert len({attrs[n]["pid"] for n in (0, 3, 4, 5)}) == 4
    assert attrs[4]["worker_trial"] == attrs[5]["worker_trial"] == 1
    assert attrs[0].get("preimport_s", 0) > 0 and attrs[1].get("preimport_s") is None, "a worker imports once"
    logs = {n: (tmp_path / "r" / "warm" / "trials" / str(n) / "log.txt").read_text() for n in (2, 4)}
    assert "takes no more trials: trial 2 ended with an exception (nonfinite_loss)" in logs[2]
    assert re.search(r"takes no more trials: [\d,]+ MiB not given back after trial 4", logs[4]), logs[4][-2000:]
    # Workers that ended cleanly (retired, or closed at the study's end) removed their own logs;
    # only the killed one's remains.
    assert len(list((tmp_path / "r" / "warm" / "trials").glob("worker-*.log"))) == 1
    for pid in {a["pid"] for a in attrs.values() if "pid" in a}:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


BASE_CHECK = r"""
import torch, unsloth
from harness.worker.prepare import build_preset
from harness.worker.warm import BaseKey, WarmBase, fingerprint

base = WarmBase(BaseKey(str(build_preset("tiny-mistral", 0)), 64, "float32", False), "cpu")
loaded = fingerprint(base.model)

def adapters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

model = base.lend(lora_r=4, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], checkpointing=False, seed=1)
first = adapters(model)
assert first and all("lora_" in n for n in first)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.5)
for _ in range(3):
    ids = torch.randint(5, 1000, (2, 32))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step(); opt.zero_grad()
assert any(not torch.equal(first[n], p) for n, p in adapters(model).items()), "training moved the adapter"
base.give_back()
assert torch.equal(fingerprint(base.model), loaded), "the base is as loaded"
assert not any("lora" in n for n, _ in base.model.named_modules()), "no adapter layer is left in the base"
again = adapters(base.lend(lora_r=4, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], checkpointing=False, seed=1))
assert again.keys() == first.keys() and all(torch.equal(again[n], first[n]) for n in first), "a fresh adapter, seeded"
base.give_back()
other = adapters(base.lend(lora_r=4, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], checkpointing=False, seed=2))
assert any(not torch.equal(other[n], first[n]) for n in first), "another seed, another init"
base.give_back()
print("ok")
"""


@pytest.mark.slow
def test_a_lent_adapter_is_fresh_and_leaves_the_base_as_loaded(harness_cache):
    proc = subprocess.run([sys.executable, "-c", BASE_CHECK], cwd=ROOT, env=dict(os.environ), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_a_worker_that_dies_before_training_is_replaced_and_its_trial_retried(tmp_path, harness_cache):
    # Trial 0's worker kills itself before the trial loads anything: nothing about the config was
    # tried, so the same parameters run again, in a new worker, and the study still completes.
    study = _run(tmp_path, "early", 2, faults="0:sigkill@0", start_method="warm")
    trials = study.trials
    assert trials[0].state == optuna.trial.TrialState.FAIL
    assert trials[0].user_attrs["outcome"] == "infrastructure", trials[0].user_attrs
    assert trials[1].params == trials[0].params and trials[1].state == optuna.trial.TrialState.COMPLETE
    assert trials[1].user_attrs["worker_trial"] == 1, "the retry ran in a fresh worker"
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == 2


# gpus_per_trial: 2 on CPU: each trial spans two Gloo processes, a warm group under torchrun.
GROUP = dict(gpus_per_trial=2, search_space={"batch_size": {"choices": [2, 4]}, "learning_rate": 3e-3,
                                             "lora_r": {"choices": [4, 8]}, "lora_dropout": 0.1})


def _processes_under(path) -> list[str]:
    """Command lines of the processes still running that name ``path`` (a study's workers do)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        if str(path) in cmdline:
            found.append(f"{entry}: {cmdline}")
    return found


@pytest.mark.slow
def test_a_warm_group_matches_fresh_groups_and_a_failure_retires_it(tmp_path, harness_cache):
    # Trial 1 turns a LoRA weight into NaN on both ranks (a failure the trial catches: the group
    # retires as one); trial 2's ranks are SIGKILLed before training (the group dies: an
    # infrastructure failure, retried as trial 3 in a new group).
    warm = _run(tmp_path, "group", 4, faults="1:nan@2,2:sigkill@0", start_method="warm", **GROUP)
    assert not _processes_under(tmp_path / "r"), "no rank or torchrun agent outlives its study"
    # The configs that completed, each in a group of its own (a group retires after one trial).
    fresh = _run(tmp_path, "fresh", 3, start_method="warm", worker_max_trials=1, sampler={"name": "random"},
                 enqueue=[warm.trials[n].params for n in (0, 3, 4)], **GROUP)
    by_params = {tuple(sorted(t.params.items())): t for t in fresh.trials}
    attrs = {t.number: t.user_attrs for t in warm.trials}
    assert [t.state for t in warm.trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL,
                                              optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE,
                                              optuna.trial.TrialState.COMPLETE], attrs
    assert attrs[1]["outcome"] == "nonfinite_loss" and attrs[2]["outcome"] == "infrastructure"
    assert warm.trials[3].params == warm.trials[2].params, "the dead group's trial ran again"
    for t in (warm.trials[n] for n in (0, 3, 4)):
        twin = by_params[tuple(sorted(t.params.items()))]
        assert twin.user_attrs["worker_trial"] == 1, "each fresh trial had a group of its own"
        assert t.user_attrs["world_size"] == twin.user_attrs["world_size"] == 2
        assert len(t.user_attrs["peak_mem_mib_per_gpu"]) == 2
        # Measured on CPU: bit-identical (difference 0.0). A fresh seeded adapter on each rank, a
        # fresh optimizer and data order: nothing of the group's earlier trials reaches this one.
        assert t.value == pytest.approx(twin.value, abs=1e-6), (t.number, t.params)
        assert t.intermediate_values == pytest.approx(twin.intermediate_values, abs=1e-6)
        assert t.user_attrs["val_loss_start"] == pytest.approx(twin.user_attrs["val_loss_start"], abs=1e-6)
        steps = sorted(t.intermediate_values)
        assert t.intermediate_values[steps[-1]] < t.intermediate_values[steps[0]], "the two ranks train"
    # Group 1 ran trials 0-1 and retired after the NaN; group 2 died with trial 2; group 3 ran the
    # rest, its base kept between them.
    assert attrs[0]["pid"] == attrs[1]["pid"] and [attrs[n]["worker_trial"] for n in (0, 1)] == [1, 2]
    assert attrs[3]["pid"] == attrs[4]["pid"] and [attrs[n]["worker_trial"] for n in (3, 4)] == [1, 2]
    assert attrs[3]["pid"] != attrs[0]["pid"]
    assert all(attrs[n]["base_reused"] is True for n in (0, 3, 4))
    assert attrs[3].get("preimport_s", 0) > 0 and attrs[4].get("preimport_s") is None, "a group imports once, before its first trial"
    log = (tmp_path / "r" / "group" / "trials" / "1" / "log.txt").read_text()
    assert log.count("takes no more trials: trial 1 ended with an exception (nonfinite_loss)") == 2, "both ranks retired"
    # Rank 0 alone saves the best adapter.
    assert (tmp_path / "r" / "group" / "best" / "adapter_config.json").exists()
    # Groups that ended cleanly removed their own logs; only the killed group's remains.
    assert len(list((tmp_path / "r" / "group" / "trials").glob("worker-*.log"))) == 1


AGREE = r"""
import os, time
from datetime import timedelta
import torch, torch.distributed as dist
from harness.worker import distributed as D

D.FAILED_WAIT = timedelta(seconds=3)  # 2 minutes in a study
group = D.Group("cpu")
rank = group.dist.rank
assert group.share({"kind": "trial"} if rank == 0 else None) == {"kind": "trial"}
assert group.agree(None, failed=False) is None
assert group.agree("leaked" if rank == 1 else None, failed=False) == "leaked", "one rank's reason retires all"
if rank == 1:  # its trial failed outside any collective...
    t0 = time.monotonic()
    try:
        group.agree("trial 7 ended oom", failed=True)
    except TimeoutError:
        print(f"rank 1 stopped waiting after {time.monotonic() - t0:.0f} s", flush=True)
        os._exit(1)
else:  # ...while rank 0 waits in the training collective that rank left
    try:
        dist.all_reduce(torch.zeros(1))
    except Exception:
        print("rank 0 freed by rank 1's exit", flush=True)
        os._exit(1)
"""


@pytest.mark.slow
def test_a_failed_rank_stops_waiting_for_a_stuck_one_and_its_exit_frees_it(tmp_path):
    # A failure on one rank only (an out-of-memory error, say) leaves the others in a collective it
    # never joins: the failed rank waits a bounded time to agree, then exits, and torchrun ends the group.
    (tmp_path / "agree.py").write_text(AGREE)
    proc = subprocess.run([sys.executable, "-m", "harness.worker.group", "--standalone", "--nproc_per_node=2",
                           str(tmp_path / "agree.py")], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    waited = re.search(r"rank 1 stopped waiting after (\d+) s", out)
    assert waited and int(waited.group(1)) >= 3, out[-3000:]
    # Rank 0 is freed (the run ended well before the timeout): its collective fails once rank 1 is
    # gone, or, on a loaded machine, torchrun ends it first on seeing rank 1 exit.
    assert "rank 0 freed by rank 1's exit" in out or "closing signal" in out, out[-3000:]
