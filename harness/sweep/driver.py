"""The sweep driver: sweep config → Optuna study → one process per trial → report.

The driver imports neither torch nor unsloth. It asks Optuna for each trial (so sampling happens
here, with the whole study's history), starts the trial's process, and tells Optuna how it ended.
``n_trials`` is the study's total: a study that already has that many finished trials runs nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from harness.sweep.config import SweepConfig
from harness.errors import HarnessError
from harness.files import write_json_atomic
from harness.launch.launcher import (StandbyPool, TrialOutcome, TrialProcess, default_start_method, run_prepare,
                              start_fork_server)
from harness.sweep.storage import default_storage, fail_stale, heartbeat, redact, study_lock
from harness.sweep.study import counted_trials, create_study, finished_count, suggest

STATES = {
    "complete": optuna.trial.TrialState.COMPLETE,
    "pruned": optuna.trial.TrialState.PRUNED,
    "fail": optuna.trial.TrialState.FAIL,
}


@dataclass
class SweepRun:
    study_dir: Path
    storage_url: str
    ran: int
    finished: int


def _fmt_params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _promote_best(study: optuna.Study, study_dir: Path, number: int) -> None:
    """Keep the adapter of the best trial under ``best/`` and drop every other one."""
    adapter = study_dir / "trials" / str(number) / "adapter"
    if not adapter.exists():
        return
    try:
        is_best = study.best_trial.number == number
    except ValueError:
        is_best = False
    if not is_best:
        shutil.rmtree(adapter, ignore_errors=True)
        return
    best, old = study_dir / "best", study_dir / "best.old"
    shutil.rmtree(old, ignore_errors=True)
    t = study.best_trial
    write_json_atomic(adapter / "trial.json", {"number": t.number, "val_loss": t.value, "params": t.params})
    if best.exists():
        os.replace(best, old)
    os.replace(adapter, best)
    shutil.rmtree(old, ignore_errors=True)


WAIT = "wait"


def _next_trial(study: optuna.Study, cfg: SweepConfig) -> optuna.Trial | str | None:
    """A retry waiting to run, else a new trial while the study's total allows; None when done.

    ``WAIT`` when the total is reached but trials are still RUNNING (another worker's, or a dead
    driver's that has not gone stale yet: once stale it is failed and queued again as a retry).
    """
    fail_stale(study)
    trials = study.get_trials(deepcopy=False)
    if any(t.state == optuna.trial.TrialState.WAITING for t in trials):
        return study.ask()
    sampler = study.sampler
    if isinstance(sampler, optuna.samplers.GridSampler) and sampler.is_exhausted(study):
        return None
    if counted_trials(study) < cfg.n_trials:
        return study.ask()
    return WAIT if any(t.state == optuna.trial.TrialState.RUNNING for t in trials) else None


def _record(study: optuna.Study, trial: optuna.Trial, outcome: TrialOutcome, cfg: SweepConfig) -> None:
    """Tell Optuna how the trial ended, with the reason and outcome kept on the trial."""
    trial.set_user_attr("driver", f"{socket.gethostname()}:{os.getpid()}")
    if outcome.reason:
        trial.set_user_attr("fail_reason", outcome.reason[-4000:])
    if outcome.state == "fail":
        kind = (outcome.reason or "fail").split(":", 1)[0]
        trial.set_user_attr("outcome", kind if kind in FAIL_KINDS else "error")
    _tell(study, trial, outcome, cfg.objective.direction)


FAIL_KINDS = {"crash", "hang", "nonfinite_loss"}


def _tell(study: optuna.Study, trial: optuna.Trial, outcome: TrialOutcome, direction: str = "minimize") -> None:
    try:
        if outcome.state == "complete":
            study.tell(trial, outcome.value)
        elif outcome.state == "oom":
            # Infeasible (its constraint is set): COMPLETE with the worst value, which best_trial and
            # the report ignore, so the sampler counts it as infeasible rather than failed or pruned.
            study.tell(trial, float("inf") if direction == "minimize" else float("-inf"))
        else:
            study.tell(trial, state=STATES[outcome.state])
    except RuntimeError as err:
        # GridSampler.after_trial calls study.stop() once the grid is covered, which Optuna allows
        # only inside optimize(); the trial's state is stored all the same (tell's `finally`), and
        # the driver checks is_exhausted() itself.
        if "Study.stop" not in str(err):
            raise


class Display:
    """Live progress: trials done of total with the best so far, and each running trial's steps
    (one line per slot: a GPU of the pool, or the single slot)."""

    def __init__(self, console: Console, total: int, done: int, slots: list[str]):
        self.console = console
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, transient=False,
        )
        self.trials = self.progress.add_task("trials", total=total, completed=done)
        self.steps = {slot: self.progress.add_task("", total=1, visible=False) for slot in slots}
        self.tag = {slot: (escape(f"[gpu {slot}] ") if len(slots) > 1 or "," in slot else "") for slot in slots}
        self.best: str = "-"
        self.lock = threading.Lock()

    def __enter__(self) -> "Display":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def start_trial(self, slot: str, number: int, params: dict[str, Any]) -> None:
        self.console.print(f"{self.tag[slot]}[bold]trial {number}[/] {_fmt_params(params)}")
        self.progress.update(self.steps[slot], description=f"  {self.tag[slot]}trial {number}: starting",
                             completed=0, total=1, visible=True)

    def on_event(self, slot: str, number: int, ev: dict) -> None:
        kind, task, tag = ev.get("event"), self.steps[slot], self.tag[slot]
        if kind == "phase":
            self.progress.update(task, description=f"  {tag}trial {number}: {ev['phase']}")
        elif kind == "step":
            self.progress.update(task, completed=ev["step"], total=ev["total"],
                                 description=f"  {tag}trial {number}: step loss {ev['loss']:.3f}")
        elif kind == "eval":
            self.console.print(f"  {tag}trial {number} step {ev['step']:>4}  val_loss {ev['val_loss']:.4f}"
                               + ("  → prune" if ev["prune"] else ""))

    def end_trial(self, slot: str, number: int, outcome: TrialOutcome, study: optuna.Study) -> None:
        m, tag = outcome.metrics, self.tag[slot]
        if outcome.state == "fail":
            first = (outcome.reason or "").splitlines()[0] if outcome.reason else ""
            self.console.print(f"  {tag}[red]trial {number} failed[/]: {escape(first)}")
        elif outcome.state == "oom":
            self.console.print(f"  {tag}trial {number} [yellow]infeasible[/]: out of memory at "
                               f"{m.get('mem_at_failure_mib', 0):,.0f} MiB (peak {m.get('peak_mem_mib', 0):,.0f} MiB)")
        else:
            tps = m.get("tokens_per_s")
            self.console.print(
                f"  {tag}trial {number} [green]{outcome.state}[/] val_loss {outcome.value:.4f}  "
                f"{tps or 0:,.0f} tok/s  peak {m.get('peak_mem_mib', 0):,.0f} MiB  train {m.get('train_s', 0):.1f}s"
                + ("  [yellow]over the memory budget: infeasible[/]" if m.get("outcome") == "over_budget" else "")
            )
        with self.lock:
            try:
                self.best = f"{study.best_value:.4f} (trial {study.best_trial.number})"
            except ValueError:
                pass
            self.progress.update(self.steps[slot], visible=False)
            self.progress.update(self.trials, advance=1, description=f"trials  best val_loss {self.best}")


def run_sweep(
    cfg: SweepConfig, sweep_dir: Path, results_dir: Path, console: Console | None = None,
    gpus: list[int] | None = None, worker: bool = False,
) -> SweepRun:
    """Run the study until it holds ``cfg.n_trials`` trials (or ``cfg.timeout`` passes).

    With ``gpus``, one trial runs on each listed GPU at once. Several drivers (``harness worker``)
    may share one study through its storage; ``n_trials`` holds across all of them.
    """
    console = console or Console()
    study_dir = (results_dir / cfg.study).resolve()
    study_dir.mkdir(parents=True, exist_ok=True)
    storage_url = cfg.storage or default_storage(study_dir)
    # The storage URL may hold a password: it goes to trial processes by environment only.
    write_json_atomic(study_dir / "sweep.json", cfg.model_dump(mode="json", exclude={"storage"}))
    write_json_atomic(study_dir / "study.json", {"study": cfg.study, "storage": redact(storage_url)})

    # Workers share a study: each samples with its own seed (its process id mixed in), so two
    # workers started alike do not propose the same parameters.
    study = create_study(cfg, storage_url, sampler_seed=cfg.seed * 100_003 + os.getpid() if worker else None)
    fail_stale(study)
    done = finished_count(study)
    console.print(f"study [bold]{cfg.study}[/]: {done} of {cfg.n_trials} trials finished; storage {redact(storage_url)}")
    if done >= cfg.n_trials and not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,
                                                                              optuna.trial.TrialState.RUNNING)):
        return SweepRun(study_dir, storage_url, 0, done)

    start_method = default_start_method(cfg.device) if cfg.start_method == "auto" else cfg.start_method
    if cfg.gpus_per_trial > 1:
        start_method = "spawn"  # torchrun starts the trial's processes
    k = cfg.gpus_per_trial
    if gpus and len(gpus) % k:
        raise HarnessError(f"--gpus {','.join(map(str, gpus))}: {len(gpus)} GPUs do not split into groups of "
                           f"gpus_per_trial={k}")
    # A slot is one GPU, or a group of gpus_per_trial GPUs that one trial spans.
    groups = [gpus[i : i + k] for i in range(0, len(gpus), k)] if gpus else ([list(range(k))] if k > 1 else [])
    slots = [",".join(map(str, g)) for g in groups] or ["0"]
    # GPU pool: each slot runs one trial at a time on its GPUs (CUDA_VISIBLE_DEVICES).
    slot_env = {slot: ({"CUDA_VISIBLE_DEVICES": slot} if groups else {}) for slot in slots}
    # With start_method standby, each slot's first standby imports while the model and data are prepared.
    with StandbyPool(study_dir, storage_url, slot_env, enabled=start_method == "standby") as standbys:
        with console.status("preparing model and data (once per study)"):
            run_prepare(study_dir / "sweep.json", sweep_dir, study_dir / "prepared.json", study_dir / "prepare.log")
        prepared = json.loads((study_dir / "prepared.json").read_text())
        train, val = prepared["stats"]["train"], prepared["stats"]["validation"]
        study.set_user_attr("data", prepared["stats"])  # so the report can show it from the storage alone
        console.print(
            f"data: {train['rows']:,} train rows ({train['tokens']:,} tokens), {val['rows']:,} validation rows; "
            f"{train['skipped_empty'] + val['skipped_empty']} empty rows skipped, "
            f"{train['truncated_rows'] + val['truncated_rows']} truncated at {cfg.max_seq_length} tokens"
            f"{' (tokenized data from cache)' if prepared['from_cache'] else ''}; model {prepared['model_dir']}"
        )

        deadline = time.monotonic() + cfg.timeout if cfg.timeout else None
        if start_method == "fork":
            with console.status("starting the trial fork server (imports unsloth once per study)"):
                seconds = start_fork_server(study_dir / "forkserver.log")
            console.print(f"trial processes fork from a server that imported the training stack in {seconds:.1f}s")
        counter = {"ran": 0}
        next_lock = threading.Lock()
        stop, waiting = threading.Event(), threading.Event()

        def slot_loop(slot: str, display: Display) -> None:
            extra_env = slot_env[slot]
            while not stop.is_set():
                if deadline is not None and time.monotonic() >= deadline:
                    console.print("timeout reached: no new trials are started")
                    return
                with next_lock, study_lock(storage_url):  # count-then-ask is atomic across threads, workers, hosts
                    trial = _next_trial(study, cfg)
                    params = suggest(trial, cfg) if isinstance(trial, optuna.Trial) else None
                if trial is None:
                    return
                if trial == WAIT:
                    if not waiting.is_set():
                        waiting.set()
                        console.print("waiting for running trials to end (a dead driver's go stale and are retried)")
                    time.sleep(cfg.fault_tolerance.heartbeat_s)
                    continue
                display.start_trial(slot, trial.number, params)
                process = TrialProcess(study_dir, trial.number, storage_url, start_method,
                                       hang_timeout_s=cfg.budget.hang_timeout_s, extra_env=extra_env, nproc=k,
                                           standby=standbys.take(slot))
                if counted_trials(study) < cfg.n_trials:
                    standbys.refill(slot)  # the next trial's process imports while this one trains
                processes[slot] = (process, trial)
                # The heartbeat says "this trial's driver is alive"; if it stops, another driver (or
                # this one, restarted) fails the trial after the grace period and retries it.
                with heartbeat(study, trial):
                    outcome = process.run(lambda ev, n=trial.number: display.on_event(slot, n, ev))
                processes.pop(slot, None)
                if stop.is_set():
                    return
                _record(study, trial, outcome, cfg)
                _promote_best(study, study_dir, trial.number)
                display.end_trial(slot, trial.number, outcome, study)
                counter["ran"] += 1

        processes: dict[str, tuple[TrialProcess, optuna.Trial]] = {}
        with Display(console, cfg.n_trials, done, slots) as display:
            threads = [threading.Thread(target=slot_loop, args=(slot, display), name=f"slot-{slot}", daemon=True)
                       for slot in slots]
            for t in threads:
                t.start()
            try:
                for t in threads:
                    while t.is_alive():
                        t.join(0.5)
            except KeyboardInterrupt:
                stop.set()
                for process, trial in list(processes.values()):
                    process.kill()
                    trial.set_user_attr("outcome", "interrupted")
                    trial.set_user_attr("fail_reason", "interrupted by the user (Ctrl-C)")
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                raise
        ran = counter["ran"]
        return SweepRun(study_dir, storage_url, ran, finished_count(study))
