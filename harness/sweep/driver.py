"""The sweep driver: sweep config → Optuna study → a worker per slot → each trial's milestones and
report → its outcome → storage and W&B.

The driver imports neither torch nor unsloth, and is the study's only Optuna client: it asks
Optuna for each trial (so sampling happens here, with the whole study's history), hands the
trial's parameters to a worker through the launcher, answers the worker's questions at each
validation (it reports the intermediate value and decides pruning) and at the end (whether the
weights may be the best), logs to W&B, decides the trial's outcome from the worker's report and
the process's end (:mod:`harness.sweep.outcome`) and records it (``study.record_result``).
``n_trials`` is the study's total: a study that already has that many finished trials runs nothing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import optuna
from rich.console import Console
from rich.markup import escape

from harness import faults
from harness.cluster import placement
from harness.errors import HarnessError, TrialsCannotRun
from harness.files import write_json_atomic, write_text_atomic
from harness.launch import Launcher, default_start_method, make_launcher, nvidia_visible, run_prepare
from harness.params import applicable
from harness.records import TrialReport, TrialResult
from harness.sweep import gpu_budget, outcome, pruning
from harness.sweep.best import may_become_best, promote
from harness.sweep.config import SweepConfig
from harness.sweep.display import Display
from harness.sweep.efficiency import RunClock
from harness.sweep.storage import default_storage, fail_stale, heartbeat, redact, study_lock
from harness.sweep.predict import StudyMemory
from harness.sweep.signals import Terminated, sigterm_raises
from harness.sweep.study import counted_trials, create_study, enqueue_first, finished_count, record_result, suggest, trial_params
from harness.sweep.trackers import WandbTracker
from harness.sweep.wandb_check import study_wandb_mode
from harness.sweep.warm_start import warm_start

WAIT = "wait"
# An interrupted trial says nothing about its config and is not its driver's fault: it is always
# queued again (a task preempted twice loses nothing), unlike a failure, which max_retries bounds.
INTERRUPTED_RETRIES = 10**6


def _next_trial(study: optuna.Study, cfg: SweepConfig) -> optuna.Trial | str | None:
    """A retry waiting to run, else a new trial while the study's total allows; None when done.

    ``WAIT`` when the total is reached but trials are still RUNNING (another slot's or worker's, or
    a dead driver's that has not gone stale yet: once stale it is failed and queued again).
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


def _slots(gpus: list[int] | None, per_trial: int) -> dict[str, dict[str, str]]:
    """Each slot (a GPU of the pool, or a group of ``gpus_per_trial`` GPUs that one trial spans)
    with the environment its trials run in."""
    if gpus and len(gpus) % per_trial:
        raise HarnessError(f"--gpus {','.join(map(str, gpus))}: {len(gpus)} GPUs do not split into groups of "
                           f"gpus_per_trial={per_trial}")
    groups = ([gpus[i : i + per_trial] for i in range(0, len(gpus), per_trial)] if gpus
              else [list(range(per_trial))] if per_trial > 1 else [])
    if not groups:
        return {"0": {}}
    slots = {",".join(map(str, g)): {"CUDA_VISIBLE_DEVICES": ",".join(map(str, g))} for g in groups}
    processes = sum(len(g) for g in groups)
    if processes > 1 and "OMP_NUM_THREADS" not in os.environ and nvidia_visible():
        # Each trial process's CPU threads (torch's intra-op pool), the host's cores shared out, as
        # torchrun does for its ranks: not every process with a thread per core.
        for env in slots.values():
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    return slots


def _prepare(cfg: SweepConfig, study: optuna.Study, sweep_dir: Path, study_dir: Path, console: Console) -> float:
    """Prepare the study's model and data; the seconds spent building the model (its first use here)."""
    with console.status("preparing model and data (once per study)") as status:
        def show(progress: dict) -> None:  # a base being pretrained: its first use on this machine
            done = progress["step"] / max(progress["steps"], 1)
            bar = "━" * int(30 * done) + " " * (30 - int(30 * done))
            status.update(f"{progress['task']} (once per machine): [{bar}] step {progress['step']}/"
                          f"{progress['steps']}, loss {progress['loss']:.3f}")

        run_prepare(study_dir / "sweep.json", sweep_dir, study_dir / "prepared.json", study_dir / "prepare.log",
                    on_progress=show)
    prepared = json.loads((study_dir / "prepared.json").read_text())
    if base := prepared.get("base"):
        study.set_user_attr("base", base)
        console.print(f"base {cfg.model.name}: pretrained here on {base['tokens_trained']:,} tokens of Shakespeare "
                      f"({base['passes']} passes), held-out loss {base['held_out_loss_initial']:.2f} -> "
                      f"{base['held_out_loss']:.2f}, in {base['seconds']:.0f} s on {base['device']}")
    train, val = prepared["stats"]["train"], prepared["stats"]["validation"]
    study.set_user_attr("data", prepared["stats"])  # so the report can show it from the storage alone
    console.print(
        f"data: {train['rows']:,} train rows ({train['tokens']:,} tokens), {val['rows']:,} validation rows; "
        f"{train['skipped_empty'] + val['skipped_empty']} empty rows skipped, "
        f"{train['truncated_rows'] + val['truncated_rows']} truncated at {cfg.max_seq_length} tokens"
        f"{' (tokenized data from cache)' if prepared['from_cache'] else ''}; model {prepared['model_dir']}"
    )
    return float(prepared.get("built_s") or 0.0)


def _wandb_for_study(cfg: SweepConfig, study_dir: Path, console: Console) -> SweepConfig:
    """Decide once for the whole study whether W&B can go online (a key on a host without network
    would otherwise make every trial wait for W&B's time-out)."""
    mode, warning = study_wandb_mode(cfg.wandb, study_dir / "wandb")
    if warning:
        console.print(f"[yellow]warning:[/] {warning}")
    return cfg.model_copy(update={"wandb": cfg.wandb.model_copy(update={"mode": mode})})


def run_sweep(
    cfg: SweepConfig, sweep_dir: Path, results_dir: Path, console: Console | None = None,
    gpus: list[int] | None = None, join: bool = False,
) -> int:
    """Run the study until it holds ``cfg.n_trials`` trials (or ``cfg.timeout`` passes); the
    number of trials this call ran.

    With ``gpus``, one trial runs on each listed GPU at once. Several drivers (``harness join``)
    may share one study through its storage; ``n_trials`` holds across all of them. Raises
    :class:`TrialsCannotRun` when a trial could not get to train after its retries, and
    :class:`~harness.sweep.signals.Terminated` on SIGTERM, once the running trials are recorded
    as interrupted.
    """
    with sigterm_raises() as terminating:
        try:
            return _run_sweep(cfg, sweep_dir, results_dir, console, gpus, join, terminating)
        except BaseException as err:
            if terminating.is_set() and not isinstance(err, Terminated):
                # Something failed on the way out (a worker let go, a thread's storage call): the
                # trials are recorded all the same, and the caller must still see why it ended.
                raise Terminated() from err
            raise


def _run_sweep(cfg: SweepConfig, sweep_dir: Path, results_dir: Path, console: Console | None,
               gpus: list[int] | None, join: bool, terminating: threading.Event) -> int:
    console = console or Console()
    study_dir = (results_dir / cfg.study).resolve()
    study_dir.mkdir(parents=True, exist_ok=True)
    storage_url = cfg.storage or default_storage(study_dir)
    write_json_atomic(study_dir / "study.json", {"study": cfg.study, "storage": redact(storage_url),
                                                  "sweep_dir": str(Path(sweep_dir).resolve())})

    # Drivers that join a shared study each sample with their own seed (the process id mixed in), so
    # two started alike do not propose the same parameters.
    study = create_study(cfg, storage_url, joiner=os.getpid() if join else 0)
    with study_lock(storage_url):
        fresh = not study.get_trials(deepcopy=False)
        enqueue_first(study, cfg)
        taken = warm_start(study, cfg, Path(sweep_dir), fresh)
    if taken:
        console.print(taken, highlight=False)
    fail_stale(study)
    done = finished_count(study)
    console.print(f"study [bold]{cfg.study}[/]: {done} of {cfg.n_trials} trials finished; storage {redact(storage_url)}; "
                  f"budget {cfg.budget.describe()}" + (f", {cfg.seeds} seeds per config" if cfg.seeds > 1 else ""))
    if done >= cfg.n_trials and not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,
                                                                              optuna.trial.TrialState.RUNNING)):
        return 0
    cfg = _wandb_for_study(cfg, study_dir, console)
    # What the report states from the storage alone: how much data a trial gets, what is ranked.
    study.set_user_attr("budget", {"unit": cfg.budget.unit(), "amount": cfg.budget.amount(),
                                   "eval_every": cfg.budget.eval_every, "text": cfg.budget.describe(),
                                   "seeds": cfg.seeds, "objective": cfg.objective.model_dump()})
    study.set_user_attr("memory_budget_mib", cfg.memory_budget_mib)
    if cfg.budget_gpu_hours:
        study.set_user_attr("gpu_budget", {"hours": cfg.budget_gpu_hours, "devices": cfg.gpus_per_trial,
                                           "device": "cuda" if cfg.device != "cpu" and nvidia_visible() else "cpu"})
    # The storage URL may hold a password: it stays in the driver (no worker talks to Optuna).
    write_json_atomic(study_dir / "sweep.json", cfg.model_dump(mode="json", exclude={"storage"}))

    start_method = default_start_method(cfg.device) if cfg.start_method == "auto" else cfg.start_method
    slots = _slots(gpus, cfg.gpus_per_trial)
    launcher = make_launcher(start_method, study_dir, slots, cfg.budget.hang_timeout_s, cfg.gpus_per_trial,
                             cfg.worker_max_trials, cfg.device)
    driver_id = f"{socket.gethostname()}:{os.getpid()}"
    deadline = time.monotonic() + cfg.timeout if cfg.timeout else None
    next_lock = threading.Lock()
    stop, waiting, budget_said = threading.Event(), threading.Event(), threading.Event()
    # Each lane's trial while it runs. Whoever takes it out (its lane when it ends, or the
    # interrupt) records it: never both.
    running: dict[str, optuna.Trial] = {}
    running_lock = threading.Lock()
    where = placement()  # the scheduler's task this driver is, if any: on each trial
    counts = {"ran": 0, "trained": 0}
    cannot_run: list[TrialResult] = []
    memory = StudyMemory(cfg, sweep_dir, [
        (trial_params(t, cfg), t.user_attrs) for t in study.get_trials(deepcopy=False)
        if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)],
        margin=cfg.predicted_oom_margin)

    # Concurrent trials: a slot's lanes share its worker; the trials on each slot now, by lane, and
    # the condition a lane waits on until the pack has room (in memory) for its trial.
    lanes = {slot: [slot] if cfg.concurrent_trials == 1 else [f"{slot}.{i}" for i in range(cfg.concurrent_trials)]
             for slot in slots}
    on_slot: dict[str, dict[str, dict]] = {slot: {} for slot in slots}
    room = {slot: threading.Condition() for slot in slots}

    def wait_for_room(slot: str, lane: str, params: dict) -> str | None:
        """Hold a lane's trial until the slot's pack, with it, is predicted to fit (memory_budget_mib
        or the card); its place taken. A reason when it cannot fit even alone."""
        with room[slot]:
            while True:
                fits, why = memory.pack_fits([*on_slot[slot].values(), params])
                if fits or not on_slot[slot] or stop.is_set():  # stopping: the launcher will not start it
                    on_slot[slot][lane] = params
                    return None if fits else why
                room[slot].wait(cfg.fault_tolerance.heartbeat_s)

    def leave_room(slot: str, lane: str) -> None:
        with room[slot]:
            on_slot[slot].pop(lane, None)
            room[slot].notify_all()

    def hold(lane: str, trial: optuna.Trial) -> bool:
        """The lane's trial, from the moment it is asked for, is in ``running``: an interrupt then
        records it. One asked for as the driver stops is recorded here, as interrupted (its
        parameters are queued again), so no trial is left running for the heartbeat to find stale."""
        with running_lock:
            if not stop.is_set():
                running[lane] = trial
                return True
        _record_interrupted(study, study_dir, trial, driver_id, outcome.TAKEN_BACK if terminating.is_set() else None)
        return False

    def slot_loop(slot: str, lane: str, display: Display) -> None:
        while not stop.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                console.print("timeout reached: no new trials are started")
                return
            with next_lock, study_lock(storage_url):  # count-then-ask is atomic across threads, workers, hosts
                if cfg.budget_gpu_hours and not (spend := gpu_budget.check(study, cfg.budget_gpu_hours,
                                                                            cfg.gpus_per_trial)).start:
                    if not budget_said.is_set():
                        budget_said.set()
                        console.print(spend.line, highlight=False)
                    return
                trial = _next_trial(study, cfg)
                params = suggest(trial, cfg) if isinstance(trial, optuna.Trial) else None
            if isinstance(trial, optuna.Trial):
                if (fault := faults.planned(trial.number)) and fault.kind == "sigterm":
                    os.kill(os.getpid(), signal.SIGTERM)  # the test hook: taken back right here
                    stop.wait(10)
                if not hold(lane, trial):
                    return  # asked for as the driver stopped: recorded as interrupted
            if trial is None:
                return
            if trial == WAIT:
                if not waiting.is_set():
                    waiting.set()
                    display.waiting(len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))))
                stop.wait(cfg.fault_tolerance.heartbeat_s)
                continue
            retry_of = next((t.system_attrs.get("failed_trial") for t in study.get_trials(deepcopy=False)
                             if t.number == trial.number), None)
            for key, value in where.items():
                trial.set_user_attr(key, value)
            display.start_trial(lane, trial.number, params, retry_of)
            prediction, too_big = memory.check(params)
            if prediction is not None:  # goes into the trial's record below, whatever its outcome
                predicted = dict(predicted_mem_mib=round(prediction.peak_mib, 1),
                                 predicted_total_mib=round(prediction.total_mib, 1))
            if too_big:
                # Infeasible without running: the sampler learns from it as from a real out-of-memory.
                skipped = outcome.predicted_oom(trial.number, too_big)
                skipped.metrics.update(**predicted)
                with running_lock:
                    if running.pop(lane, None) is None:
                        return  # interrupted: the interrupt recorded it
                record_result(study, trial, skipped, cfg.fault_tolerance.max_retries, driver_id, cfg.memory_budget_mib)
                display.end_trial(lane, skipped, study, False)
                counts["ran"] += 1
                continue
            session = TrialSession(study, trial, cfg, params, lane, display, study_dir)
            with heartbeat(study, trial), session.tracker:
                if cfg.concurrent_trials > 1:
                    wait_for_room(slot, lane, params)
                try:
                    run = launcher.run(trial.number, params, slot, session.on_event, session.on_ask,
                                       more=counted_trials(study) < cfg.n_trials)
                finally:
                    leave_room(slot, lane)
                end = outcome.ProcessEnd(run.code, run.hung, cfg.budget.hang_timeout_s, run.reached_training,
                                         launcher.name, run.log_tail, taken_back=terminating.is_set())
                result = outcome.decide(trial.number, run.report, end, cfg, session.pruned)
                session.tracker.failed = result.state == "fail"
                if not stop.is_set():
                    session.tracker.summarize({"outcome": result.outcome, **result.metrics.present()})
            with running_lock:
                if running.pop(lane, None) is None:
                    return  # interrupted: the interrupt recorded it
            if prediction is not None:
                result.metrics.update(**predicted)
                if result.outcome in ("complete", "pruned", "over_budget"):
                    memory.learn(params, result.metrics.present())
            retries = INTERRUPTED_RETRIES if result.outcome == "interrupted" else cfg.fault_tolerance.max_retries
            retried = record_result(study, trial, result, retries, driver_id, cfg.memory_budget_mib,
                                    cfg.objective.target)
            write_text_atomic(study_dir / "trials" / str(trial.number) / "result.json", result.to_json())
            promote(study, study_dir, trial.number)
            display.end_trial(lane, result, study, retried)
            counts["ran"] += 1
            counts["trained"] += result.reached_training
            if result.outcome == "infrastructure" and not retried:
                cannot_run.append(result)
                stop.set()
            if stop.is_set():
                return

    # This run's wall time and GPUs, for the sweep efficiency (sweep/efficiency.py): from entering
    # the launcher (the first standby imports beside the preparation) to the end of the last trial;
    # recorded on the study also on Ctrl-C or an error (the GPUs were held all the same).
    clock = RunClock(study, storage_url, gpus=len(slots) * cfg.gpus_per_trial, start_method=launcher.name,
                     trials=lambda: counts["ran"], resident=lambda: len(launcher.resident_slots))
    with clock, launcher:
        for note in launcher.notes():
            console.print(note, highlight=False)
        clock.exclude(_prepare(cfg, study, sweep_dir, study_dir, console))
        launcher.prepared()
        with Display(console, cfg.n_trials, done, [lane for slot in slots for lane in lanes[slot]]) as display:
            # Each lane says when it has ended: after a join cut short by a signal, Python 3.11 may
            # call a lane that is still running stopped (the bpo-45274 workaround).
            ended = {lane: threading.Event() for slot in slots for lane in lanes[slot]}

            def lane_main(slot: str, lane: str) -> None:
                try:
                    slot_loop(slot, lane, display)
                finally:
                    ended[lane].set()

            threads = [threading.Thread(target=lane_main, args=(slot, lane), name=f"lane-{lane}", daemon=True)
                       for slot in slots for lane in lanes[slot]]
            for t in threads:
                t.start()
            try:
                for t in threads:
                    while t.is_alive():
                        t.join(0.5)
                clock.stop()
            except (KeyboardInterrupt, Terminated) as err:
                stop.set()  # no lane starts another trial
                why = outcome.TAKEN_BACK if isinstance(err, Terminated) else None
                _interrupt(study, study_dir, launcher, running, running_lock, driver_id, why)
                # A lane recording the trial it had just finished, or asking for one as the stop
                # came: let it write its record (a lane whose trial was killed ends at once).
                end = time.monotonic() + 5
                for lane_ended in ended.values():
                    lane_ended.wait(max(0.0, end - time.monotonic()))
                raise
    if cannot_run:
        r = cannot_run[0]
        raise TrialsCannotRun(f"trial {r.number} could not get to train after {cfg.fault_tolerance.max_retries} "
                              f"retries, so the study stopped: {(r.reason or '').splitlines()[0]} "
                              f"(log: {study_dir / 'trials' / str(r.number) / 'log.txt'})")
    return counts["ran"]


def _interrupt(study: optuna.Study, study_dir: Path, launcher: Launcher, running: dict[str, optuna.Trial],
               lock: threading.Lock, driver_id: str, why: str | None = None) -> None:
    """Ctrl-C or SIGTERM: end the running trials and record them as interrupted. Their parameters
    are queued again, so they run first: on the next run of the same command, or at once on
    another driver of a shared study; they do not count towards n_trials."""
    with lock:
        taken = list(running.values())
        running.clear()
    for trial in taken:
        launcher.kill(trial.number)
    if why is not None:
        launcher.abandon()
    for trial in taken:
        _record_interrupted(study, study_dir, trial, driver_id, why)


def _record_interrupted(study: optuna.Study, study_dir: Path, trial: optuna.Trial, driver_id: str,
                        why: str | None) -> None:
    result = outcome.interrupted(trial.number, why) if why else outcome.interrupted(trial.number)
    record_result(study, trial, result, INTERRUPTED_RETRIES, driver_id)
    trial_dir = study_dir / "trials" / str(trial.number)
    trial_dir.mkdir(parents=True, exist_ok=True)  # a trial taken back before it started has none yet
    write_text_atomic(trial_dir / "result.json", result.to_json())


class TrialSession:
    """One trial as the driver follows it: the worker's events go to the live view and to the
    trial's W&B run; its questions are answered here, with the study's whole history at hand."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial, cfg: SweepConfig, params: dict, slot: str,
                 display: Display, study_dir: Path):
        self.study, self.trial, self.cfg, self.slot, self.display = study, trial, cfg, slot, display
        self.pruned: outcome.Pruning | None = None
        seeds = [cfg.seed + i for i in range(cfg.seeds)]
        # A full fine-tune has no LoRA rank, alpha, dropout or target modules: W&B shows them empty.
        config = {**applicable(params), "model": cfg.model.name, "seed": cfg.seed, "seeds": seeds,
                  "target_modules": cfg.model.target_modules if params.get("method", "lora") == "lora" else None,
                  "max_seq_length": cfg.max_seq_length, "budget": cfg.budget.describe()}
        self.log = study_dir / "trials" / str(trial.number) / "log.txt"
        self.tracker = WandbTracker(cfg.wandb, cfg.study, trial.number, config, study_dir / "wandb", warn=self.warn)
        fault = faults.planned(trial.number)
        self.wandb_fault = fault if fault is not None and fault.kind == "wandb" else None

    def warn(self, line: str) -> None:
        """On the console, and in the trial's log, where its story is told."""
        self.display.console.print(f"[yellow]{escape(line)}[/]", highlight=False)
        with self.log.open("a") as f:
            f.write(line + "\n")

    def on_event(self, number: int, message: dict) -> None:
        kind = message["kind"]
        if kind == "started":
            # While it runs, which process runs the trial (a retry runs in another): what a person
            # or a test needs to find it.
            self.trial.set_user_attr("pid", message["pid"])
        elif kind == "step" and self.wandb_fault is not None and message["step"] == self.wandb_fault.step:
            self.tracker.fail_next(faults.disk_full())
        self.display.on_event(self.slot, number, message)

    def on_ask(self, number: int, message: dict) -> dict:
        if message["kind"] == "eval":
            return {"stop": self._at_validation(number, message)}
        # "finished": whether its weights may become the study's best (only those are saved).
        record = outcome.decide(number, TrialReport.from_dict(message["report"]),
                                outcome.ProcessEnd(code=0, reached_training=True), self.cfg, self.pruned)
        return {"save": record.outcome == "complete" and may_become_best(self.study, record.values or record.value)}

    def _at_validation(self, number: int, message: dict) -> str | None:
        """Report the milestone and decide: stop ("pruned", on the first seed's curve only, or
        "converged", a time-to-target reached) or go on (None)."""
        milestone, loss, first = int(message["milestone"]), float(message["val_loss"]), message["seed_index"] == 0
        stop = None
        if first:
            decision = pruning.judge(self.trial, self.cfg, milestone, loss, message.get("tokens_per_s"),
                                     message.get("peak_mem_mib"))
            # One log per milestone, everything at once: W&B drops a step logged after a later one.
            logged = {"val_loss": loss, "train_loss": message.get("train_loss"),
                      "tokens_per_s": message.get("tokens_per_s")}
            self.tracker.log({k: v for k, v in logged.items() if v is not None}, step=milestone)
            if decision.prune:
                self.pruned, stop = outcome.Pruning(decision.rule, decision.reason), "pruned"
        if stop is None and self.cfg.objective.metric == "time_to_target" and loss <= self.cfg.objective.target:
            stop = "converged"
        self.display.on_event(self.slot, number, {**message, "prune": stop == "pruned",
                                                  "seed": message["seed"] if self.cfg.seeds > 1 else None})
        return stop
