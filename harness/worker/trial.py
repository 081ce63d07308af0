"""One trial, in its own process: ``python -m harness.worker.trial STUDY_DIR TRIAL_NUMBER``.

The driver has already asked Optuna for the trial (its parameters are in the storage). This
process loads the study from ``HARNESS_STORAGE_URL`` (an environment variable, so a password never
shows in a process list or a file), trains, reports validation loss to the trial at each
evaluation and stops when the pruner says so. It ends by writing its record, a
:class:`~harness.records.TrialResult`, to ``trials/<n>/result.json``: the driver alone turns that
into the trial's final state in the storage.

Progress goes as JSON lines to the named pipe in ``HARNESS_PROGRESS`` (``harness.launch.progress``).

``python -m harness.worker.trial --standby STUDY_DIR`` is a trial process started before its
trial: it imports the training stack, then reads its trial's number from stdin
(``harness.launch.standby``).

``python -m harness.worker.trial --warm STUDY_DIR`` is a warm trial worker (``harness.launch.warm``):
it runs one trial after another, each named on stdin, keeping the loaded base model and what was
compiled between them (:class:`harness.worker.warm.WarmBase`); it answers each trial on the named
pipe in ``HARNESS_WARM_REPLY`` and ends when it should not be reused (:class:`Worker`). Under
torchrun it is one rank of a warm group: rank 0 reads and answers, every rank trains
(:class:`harness.worker.distributed.Group`).
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from harness.files import write_text_atomic  # noqa: E402
from harness.launch.progress import PATH_ENV, ProgressWriter  # noqa: E402
from harness.records import Metrics, TrialResult  # noqa: E402

Send = Callable[..., None]  # send(event, **fields): progress to the driver


def import_training_stack() -> None:
    """Everything a trial imports (unsloth first), then ``gc.freeze()``.

    Unsloth runs about 15 full garbage collections while loading a model; with the ~700,000
    objects its import leaves behind, they took 5-7 s of a 7B load (``bench/RESULTS.md``). Frozen,
    those objects are no longer traversed.
    """
    import unsloth  # noqa: F401  (first: it patches transformers, trl and peft)

    from harness.worker import loop  # noqa: F401
    import optuna  # noqa: F401

    from harness.data import prepare  # noqa: F401
    from harness.sweep import study  # noqa: F401
    from harness.worker import faults, trackers  # noqa: F401

    if os.environ.get("WANDB_MODE") != "disabled":
        try:
            import wandb  # noqa: F401
        except ImportError:
            pass
    gc.freeze()


class _Stage:
    """Where the trial is, so a failure can say whether training had begun."""

    reached_training = False


class Worker:
    """What a warm worker keeps between its trials: the base it lends adapters from, and whether
    it may take another trial (``retire`` says why not)."""

    def __init__(self, max_trials: int):
        self.base = None  # a harness.worker.warm.WarmBase once a LoRA trial has loaded one
        self.max_trials = max_trials
        self.trials = 0
        self.retire: str | None = None
        self.trial_failed = False  # its latest trial ended in a failure (as the launcher counts one)
        self.resident = False  # started by `harness warm up`: it serves study after study

    def drop_base(self, device: str) -> None:
        from harness.worker.metrics import release_cached_memory

        self.base = None
        gc.collect()
        release_cached_memory(device)


def run_trial(study_dir: Path, number: int, progress: Send, started_at: float, stage: _Stage,
              preimport_s: float | None = None, worker: Worker | None = None) -> TrialResult:
    t0 = time.perf_counter()
    import_training_stack()  # instant when a fork server or a standby process did it already
    import_s = time.perf_counter() - t0
    t_setup = time.perf_counter()

    from harness.data.prepare import Prepared
    from harness.params import applicable
    from harness.sweep import best
    from harness.sweep.config import SweepConfig
    from harness.sweep.storage import trial_handle
    from harness.sweep.study import load_study, trial_params
    from harness.worker import faults
    from harness.worker import loop as T
    from harness.worker.trackers import WandbTracker

    cfg = SweepConfig.model_validate_json((study_dir / "sweep.json").read_text())
    prepared = Prepared.load(study_dir / "prepared.json")
    study = load_study(cfg, os.environ["HARNESS_STORAGE_URL"])
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    params = T.TrainParams(**trial_params(frozen, cfg))
    trial_dir = study_dir / "trials" / str(number)
    trial_dir.mkdir(parents=True, exist_ok=True)

    device = T.resolve_device(cfg.device)
    dtype = T.resolve_dtype(cfg.model.dtype, device)
    dist = T.init_distributed(device)  # gpus_per_trial > 1: one process per GPU, rank 0 leads
    lead = dist.rank == 0
    # Only the lead rank talks to Optuna, W&B and the driver; the others train their share.
    trial = trial_handle(study, frozen) if lead else None
    if lead:
        # While it runs, which process runs the trial (a retry runs in another): what a person or
        # a test needs to find it. Its final record is the driver's to write.
        trial.set_user_attr("pid", os.getpid())
    if not lead:
        progress = lambda *a, **k: None  # noqa: E731
    record = TrialResult(number=number, outcome="error", seed=cfg.seed, host=socket.gethostname(), pid=os.getpid())
    m: Metrics = record.metrics
    m.update(device=device, gpu_name=T.torch.cuda.get_device_name() if device == "cuda" else None,
             dtype=str(dtype).removeprefix("torch."), import_s=round(import_s, 3),
             spawn_s=round(time.time() - started_at - (time.perf_counter() - t0), 3), world_size=dist.world,
             method=params.method)
    if preimport_s is not None:  # a standby process or warm worker imported before its trial came
        m.preimport_s = round(preimport_s, 3)
    if worker is not None:
        worker.trials += 1
        m.worker_trial = worker.trials
        m.resident_worker = worker.resident or None
    T.reset_peak_memory(device)
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0 and int(threads) != T.torch.get_num_threads():
        # A warm worker started before this study's share of the host's cores was known.
        T.torch.set_num_threads(int(threads))
    if device == "cuda":
        # Enforced by the allocator: going over raises an out-of-memory error in this trial. Set
        # (or lifted) by every trial: a resident worker's last study may have had another budget.
        total = T.torch.cuda.get_device_properties(0).total_memory / 2**20
        T.torch.cuda.set_per_process_memory_fraction(
            min(1.0, cfg.memory_budget_mib / total) if cfg.memory_budget_mib else 1.0)
    fault = faults.planned(number)
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    record.seeds = seeds if len(seeds) > 1 else None
    budget = data_budget(cfg, prepared.stats["train"]["tokens"])
    time_to_target = cfg.objective.metric == "time_to_target"
    # A full fine-tune has no LoRA rank, alpha, dropout or target modules: W&B shows them empty.
    tracker_config = {**applicable(vars(params)), "model": cfg.model.name, "seed": cfg.seed, "seeds": seeds,
                      "target_modules": cfg.model.target_modules if params.method == "lora" else None,
                      "max_seq_length": cfg.max_seq_length, "budget": cfg.budget.describe()}
    wandb_cfg = cfg.wandb if lead else cfg.wandb.model_copy(update={"mode": "disabled"})
    with WandbTracker(wandb_cfg, cfg.study, number, tracker_config, study_dir / "wandb") as tracker:
        progress("phase", phase="loading")
        # Reading the config and the study, and starting the W&B run.
        m.setup_s = round(time.perf_counter() - t_setup, 3)
        model = train_rows = val_rows = None
        pruned: dict = {}  # set by the harness's own pruning (multi-objective studies)
        if fault and fault.step == 0:
            faults.inject(fault, model, device, tracker)
        results: list[T.TrainResult] = []
        peaks: list[dict[str, float]] = []  # each earlier seed's peak memory
        try:
            for index, seed in enumerate(seeds):
                t0 = time.perf_counter()
                # One seed governs everything random in this run: model and LoRA init, dropout,
                # and (through the batch stream's own generator) the data order.
                T.seed_everything(seed)
                if model is not None:
                    # The previous seed's model goes before the next loads: each seed's peak
                    # memory is its own (measured on an H100: 28.7 GiB against 17.0 GiB without this).
                    peaks.append(T.peak_memory(device))
                    model = tokenizer = None
                    if worker is not None and worker.base is not None:
                        worker.base.give_back()
                    gc.collect()
                    T.release_cached_memory(device)
                    T.reset_peak_memory(device)
                if worker is not None and params.method == "lora":
                    model, tokenizer = _lend(worker, prepared.model_dir, params, cfg, dtype, device, seed, m)
                else:
                    if worker is not None:
                        # A full fine-tune trains the base itself: it loads its own, and the worker
                        # retires after it (nothing of it is kept for the next trial).
                        worker.drop_base(device)
                        T.reset_peak_memory(device)
                        worker.retire = "a full fine-tune changes the weights it loaded"
                    model, tokenizer = T.load_trainable_model(
                        prepared.model_dir, params, max_seq_length=cfg.max_seq_length, dtype=dtype,
                        load_in_4bit=cfg.model.load_in_4bit, target_modules=cfg.model.target_modules,
                        checkpointing=cfg.model.gradient_checkpointing, seed=seed,
                    )
                if index == 0:
                    trainable, total = T.parameter_counts(model)
                    m.update(trainable_params=trainable, total_params=total)
                if train_rows is None:
                    train_rows, val_rows = T.load_rows(prepared.train_tokens), T.load_rows(prepared.val_tokens)
                    m.load_s = round(time.perf_counter() - t0, 3)
                pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
                on_step, on_eval = _hooks(index, len(seeds), seed, lead, trial, tracker, progress, fault, cfg,
                                          lambda: model, device, time_to_target, pruned)
                if index == 0:
                    # Fixed cost: from the driver starting this trial (spawn, fork or handing it to
                    # a standby) to the first training step.
                    m.fixed_s = round(time.time() - started_at, 3)
                    stage.reached_training = record.reached_training = True
                    progress("phase", phase="training")
                # The untrained model's loss is the same for every seed (a LoRA starts as a no-op),
                # and for every trial that lends from a warm worker's base: measured once there.
                known_start = worker.base.val_loss_start if lent_from(worker, params) else None
                result = T.train(
                    model, train_rows, val_rows, params, pad_id=pad_id, device=device, seed=seed,
                    max_seq_length=cfg.max_seq_length, budget=budget,
                    timing_warmup_steps=cfg.budget.timing_warmup_steps, on_step=on_step, on_eval=on_eval, dist=dist,
                    evaluate_start=index == 0 and known_start is None,
                )
                if index == 0 and lent_from(worker, params):
                    if known_start is None:
                        worker.base.val_loss_start = result.val_loss_start
                    else:
                        result.val_loss_start = known_start
                results.append(result)
                if result.stopped_by == "pruned":
                    break  # pruned on its first seed's curve: the other seeds are not run
        except Exception as err:  # noqa: BLE001 - only out-of-memory is handled here; the rest re-raises
            if not T.is_out_of_memory(err):
                raise
            # Out of memory is a property of this configuration, not a failure: the driver records
            # the trial as infeasible (an Optuna constraint), so the sampler learns to avoid it.
            m.update(**T.peak_memory(device), mem_at_failure_mib=T.memory_in_use(device),
                     oom_error=T.failure_message(err))
            if not lead:
                raise
            tracker.summarize(m.present())
            record.outcome, record.reason = "oom", f"out of memory: {m.oom_error}"
            return record
        first = results[0]
        peaks.append(T.peak_memory(device))
        m.update(**{key: max(p[key] for p in peaks) for key in peaks[-1]})  # the largest seed's peak
        per_rank = dist.gather(m.peak_mem_mib)
        # Throughput and amounts are those of the first seed's run (each seed trains the same
        # budget); times add up over seeds.
        m.update(
            peak_mem_mib_per_gpu=per_rank, peak_mem_mib=max(per_rank),
            tokens_per_s_per_gpu=first.tokens_per_s and round(first.tokens_per_s / dist.world, 1),
            tokens_per_s=first.tokens_per_s and round(first.tokens_per_s, 1),
            padded_tokens_per_s=first.padded_tokens_per_s and round(first.padded_tokens_per_s, 1),
            train_s=round(sum(r.train_s for r in results), 3), eval_s=round(sum(r.eval_s for r in results), 3),
            val_loss_start=first.val_loss_start and round(first.val_loss_start, 6),
            steps=first.steps, tokens_trained=first.tokens_trained, examples_trained=first.examples_trained,
            budget_unit=budget.unit, budget=budget.total,
            steady_step_s=_rounded(first.steady_step_s, 6), warmup_s=_rounded(first.warmup_s, 3),
            train_steady_s=_rounded(steady_training_s(results), 3),
        )
        if first.tokens_computed:
            m.padding_fraction = round(1 - first.tokens_trained / first.tokens_computed, 4)
        _objective(record, results, cfg, len(seeds))
        if record.outcome == "pruned":
            # Optuna's pruner (single objective) is named as configured; the harness's rules by rule.
            record.pruned_by = pruned.get("rule", cfg.pruner.name)
            record.reason = pruned.get("reason")
            # The training time its remaining budget would have taken, at the pace it had.
            done = first.history[-1]["milestone"] if first.history else 0
            if done:
                m.pruning_saved_s = round(first.train_s * max(0.0, budget.total / done - 1), 3)
        if not lead:
            return record
        if cfg.memory_budget_mib and m.peak_mem_mib > cfg.memory_budget_mib:
            # On CPU the budget is checked against peak RSS once the trial is done.
            record.outcome = "over_budget"
            record.reason = f"peak memory {m.peak_mem_mib:,.0f} MiB is over memory_budget_mib {cfg.memory_budget_mib:,.0f}"
        tracker.summarize(m.present())
        if record.outcome == "complete" and best.may_become_best(study, record.values or record.value):
            # Only a trial that may become the best keeps its weights (the last seed's); the driver
            # promotes them to best/. save_pretrained writes what was trained: the adapter alone
            # (adapter_config.json) for LoRA, the whole model (config.json) for full fine-tuning.
            model.save_pretrained(str(trial_dir / best.WEIGHTS))
            tokenizer.save_pretrained(str(trial_dir / best.WEIGHTS))
    return record


def lent_from(worker: Worker | None, params) -> bool:
    """Whether this trial's model is an adapter on the worker's kept base."""
    return worker is not None and worker.base is not None and params.method == "lora"


def _lend(worker: Worker, model_dir: str, params, cfg, dtype, device: str, seed: int, m: Metrics):
    """(model, tokenizer) from the worker's base: loaded now if it has none or one loaded
    differently (``base_reused`` records which), with a fresh adapter for this seed."""
    from harness.worker.warm import BaseKey, WarmBase

    key = BaseKey(model_dir, cfg.max_seq_length, str(dtype).removeprefix("torch."), bool(cfg.model.load_in_4bit))
    reused = worker.base is not None and worker.base.key == key
    if not reused:
        if worker.base is not None:
            worker.drop_base(device)
        worker.base = WarmBase(key, device)
    # lend() resets the peak counters: a warm trial's peak memory starts at its adapter, the base
    # resident (a fresh process's would also count the load's transients, which training exceeds).
    if m.base_reused is None:
        m.base_reused = reused
    model = worker.base.lend(lora_r=params.lora_r, lora_alpha=params.lora_alpha, lora_dropout=params.lora_dropout,
                             target_modules=cfg.model.target_modules,
                             checkpointing=cfg.model.gradient_checkpointing, seed=seed)
    return model, worker.base.tokenizer


def _rounded(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


def steady_training_s(results: list) -> float | None:
    """``train_steady_s``: each seed's steps at its steady pace, summed; None when a seed ran no
    step after the warm-up (no steady pace to count it at)."""
    if any(r.steady_step_s is None for r in results):
        return None
    return sum(r.steps * r.steady_step_s for r in results)


def data_budget(cfg, train_tokens: int):
    """The sweep's budget in a unit the loop counts: an epochs budget becomes tokens (the same
    amount of data for every trial, packed or padded)."""
    from harness.worker.step import DataBudget

    b = cfg.budget
    unit, amount = b.unit(), b.amount()
    every = b.eval_every or amount / 5
    if unit == "epochs":
        return DataBudget("tokens", amount * train_tokens, every * train_tokens)
    if unit == "steps":
        every = max(1, round(every))
    return DataBudget(unit, amount, every)


def _hooks(index, n_seeds, seed, lead, trial, tracker, progress, fault, cfg, model, device, time_to_target,
           pruned: dict):
    """The loop's step and evaluation hooks for seed number ``index``. Only the first seed's
    curve goes to the pruner (the others run only if it was not pruned). ``pruned`` receives the
    rule and reason when the harness's own pruning stops the trial."""
    from harness.worker import faults
    from harness.worker.metrics import peak_memory

    last_loss: list[float] = []  # the latest step's training loss, logged with the next validation

    def on_step(step: int, done: float, loss: float) -> None:
        last_loss[:] = [loss]
        progress("step", step=step, done=(index + done) / n_seeds, loss=loss)
        if fault and step == fault.step and index == 0:
            faults.inject(fault, model(), device, tracker)

    from harness.sweep import pruning
    from harness.sweep.storage import report_intermediate

    objectives = {o.metric: o.direction for o in cfg.all_objectives() if o.metric in (pruning.SPEED, pruning.MEMORY)}

    def on_eval(milestone: int, val_loss: float, tokens_per_s: float | None) -> str | None:
        if not lead:
            return None  # rank 0's decision reaches every rank
        prune = False
        if index == 0:
            report_intermediate(trial, milestone, val_loss)
            # One log per milestone, everything at once: W&B drops a step logged after a later one.
            logged = {"val_loss": val_loss, "train_loss": last_loss[0] if last_loss else None,
                      "tokens_per_s": tokens_per_s}
            tracker.log({k: v for k, v in logged.items() if v is not None}, step=milestone)
            if not cfg.multi_objective:
                prune = bool(trial.should_prune())
            elif cfg.pruner.name != "none":
                # Optuna's pruners are single-objective: the harness's rules (sweep/pruning.py).
                # Dominance is judged on the final validation loss, so not in a time-to-target study.
                decision = pruning.decide(
                    trial.study, objectives if cfg.objective.metric == "val_loss" else {}, milestone, val_loss,
                    tokens_per_s, peak_memory(device)["peak_mem_mib"], cfg.pruner.n_startup_trials,
                    cfg.pruner.n_warmup_steps)
                prune = decision.prune
                if prune:
                    pruned.update(rule=decision.rule, reason=decision.reason)
        converged = time_to_target and val_loss <= cfg.objective.target
        progress("eval", step=milestone, val_loss=val_loss, prune=prune, seed=seed if n_seeds > 1 else None)
        return "converged" if converged else "pruned" if prune else None

    return on_step, on_eval


def _objective(record: TrialResult, results: list, cfg, n_seeds: int) -> None:
    """The trial's outcome and objective value from its seeds' runs: the mean over seeds of the
    last validation loss, or of the time to target (tokens or seconds, evaluation included)."""
    import statistics

    m = record.metrics
    losses = [r.val_loss for r in results]
    m.val_loss = statistics.fmean(losses)
    m.best_val_loss = min(h["val_loss"] for r in results for h in r.history)
    if results[0].stopped_by == "pruned":
        record.outcome, record.value = "pruned", results[0].val_loss
        return
    if cfg.objective.metric == "time_to_target":
        key = "tokens" if cfg.objective.measure == "tokens" else "seconds"
        times = [r.history[-1][key] if r.stopped_by == "converged" else None for r in results]
        if None in times:
            record.outcome = "not_converged"
            record.reason = (f"not converged: validation loss {cfg.objective.target:g} not reached within the budget "
                             f"(best {m.best_val_loss:.4f})")
            return
        values = [float(t) for t in times]
        m.time_to_target = statistics.fmean(values)
    else:
        values = losses
    record.outcome, record.value = "complete", statistics.fmean(values)
    if n_seeds > 1:
        m.seed_values, m.value_std = values, statistics.stdev(values)
    if cfg.multi_objective:
        # Every objective, in the study's order: the loss one as above, speed and memory as measured.
        measured = {"val_loss": m.val_loss, "time_to_target": m.time_to_target, "tokens_per_s": m.tokens_per_s,
                    "peak_mem_mib": m.peak_mem_mib}
        record.values = [float(measured[o.metric]) for o in cfg.all_objectives()]


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies: a trial never outlives its driver
    (a restarted driver then finds the trial stale and retries it, instead of racing an orphan)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass


def execute(study_dir: Path, number: int, progress: Send, started_at: float, preimport_s: float | None = None,
            worker: Worker | None = None) -> int:
    """Run one trial and write its record to ``trials/<n>/result.json``; 0 on success, 1 on a
    failure it caught (the record says which). In a warm ``worker``, also decide whether it may
    take another trial (``worker.retire``)."""
    if worker is None:
        die_with_parent()  # a warm worker has chosen how it dies with the driver (warm_worker)
    print(f"[harness] trial {number}: process {os.getpid()} on {socket.gethostname()}", flush=True)
    result_file = study_dir / "trials" / str(number) / "result.json"
    result_file.parent.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    stage = _Stage()
    try:
        record = run_trial(study_dir, number, progress, started_at, stage, preimport_s, worker)
        code = 0
    except Exception as err:  # noqa: BLE001 - the reason goes to the driver, which marks the trial FAIL
        traceback.print_exc()
        if not stage.reached_training:
            outcome = "infrastructure"  # nothing about the config was tried: the driver retries it
        elif type(err).__name__ == "NonFiniteLoss":
            outcome = "nonfinite_loss"
        else:
            outcome = "error"
        what = "nonfinite_loss" if outcome == "nonfinite_loss" else type(err).__name__
        record = TrialResult(number=number, outcome=outcome, reason=f"{what}: {err}",
                             host=socket.gethostname(), pid=os.getpid(), reached_training=stage.reached_training)
        if worker is not None:
            record.metrics.worker_trial = worker.trials
        code = 1
    if worker is not None:
        _after_trial(worker, record)
    if rank == 0:
        write_text_atomic(result_file, record.to_json())
    if worker is None and "torch.distributed" in sys.modules:  # a warm group keeps its process group
        import torch.distributed

        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return code


def _after_trial(worker: Worker, record: TrialResult) -> None:
    """Give the trial's adapter back and decide whether the worker takes another trial: not after a
    failure (out of memory, crash, non-finite loss, an error), a base that changed, memory that was
    not given back, or ``max_trials``."""
    from harness.launch.warm import KEEP_WORKER_AFTER
    from harness.worker.warm import BaseChanged

    worker.trial_failed = record.outcome not in KEEP_WORKER_AFTER
    if worker.trial_failed:
        worker.retire = worker.retire or f"trial {record.number} ended {record.outcome}"
    if worker.base is not None:
        try:
            worker.base.give_back()
        except BaseChanged as err:
            worker.retire = str(err)
            return
        leaked = worker.base.leaked_mib()
        # A few MiB move between the allocator's pools from trial to trial; a leak grows by trial.
        if leaked > max(256.0, 0.02 * worker.base.resident_mib):
            worker.retire = worker.retire or f"{leaked:,.0f} MiB not given back after trial {record.number}"
    if worker.trials >= worker.max_trials:
        worker.retire = worker.retire or f"{worker.trials} trials, worker_max_trials"


def _preload(worker: Worker, study_dir: Path) -> None:
    """Load the study's base before the first trial comes (the driver says when the model is
    prepared), so that trial starts at its adapter. Any failure leaves the load to the trial."""
    try:
        from harness.data.prepare import Prepared
        from harness.sweep.config import SweepConfig
        from harness.worker import loop as T
        from harness.worker.warm import BaseKey, WarmBase

        cfg = SweepConfig.model_validate_json((study_dir / "sweep.json").read_text())
        method = cfg.search_space.fixed().get("method")
        if method == "full":
            return  # a full fine-tune loads its own model
        prepared = Prepared.load(study_dir / "prepared.json")
        device = T.resolve_device(cfg.device)
        dtype = T.resolve_dtype(cfg.model.dtype, device)
        key = BaseKey(prepared.model_dir, cfg.max_seq_length, str(dtype).removeprefix("torch."),
                      bool(cfg.model.load_in_4bit))
        if worker.base is not None:
            if worker.base.key == key:
                return
            worker.drop_base(device)  # a resident worker's earlier study loaded another base
        t0 = time.perf_counter()
        worker.base = WarmBase(key, device)
        print(f"[harness] base preloaded in {time.perf_counter() - t0:.1f}s", flush=True)
    except Exception:  # noqa: BLE001 - the first trial loads it instead, and reports what fails
        traceback.print_exc()
        worker.base = None


def warm_worker(study_dir: Path) -> int:
    """Import now, then run trials one after another as the driver names them on stdin, one line
    each (number, hand-over time, progress channel, log file), keeping the base between them.

    A ``preload`` line loads the study's base before the first trial (:func:`_preload`).
    Each trial's output goes to its own log (file descriptors 1 and 2 point there while it runs);
    its answer, ``NUMBER EXIT_CODE keep|retire``, goes to the reply pipe before the progress
    channel closes, so the driver learns the trial ended as soon as its last event arrives.

    In a warm group (under torchrun) every rank runs this loop: rank 0 reads each line and shares
    it, every rank runs the trial, and the group retires as one, after a failure on any rank. A
    group that cannot agree (a rank died, or is stuck in a collective a failed rank left) ends
    with a non-zero exit, so torchrun ends its other ranks.
    """
    in_group = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if in_group:
        die_with_parent()  # a rank: its parent is the group's torchrun agent, which dies with the driver
    else:
        # Not with the slot's thread that started it (a parent-death signal follows the thread):
        # that thread ends when its slot runs out of trials, and the driver then closes the
        # worker itself, cleanly.
        from harness.worker.group import die_with_driver

        die_with_driver()
    t0 = time.perf_counter()
    import_training_stack()
    preimport_s = time.perf_counter() - t0
    group = _join_group(study_dir) if in_group else None
    lead = group is None or group.lead
    reply = open(os.environ["HARNESS_WARM_REPLY"], "w", buffering=1) if lead else None  # noqa: SIM115
    worker = Worker(int(os.environ.get("HARNESS_WORKER_MAX_TRIALS", "50")))
    broken = serve_trials(study_dir, worker, lambda: sys.stdin.readline().split(), reply.write if lead else None,
                          preimport_s, group)
    if broken:
        # At once: tearing down a process group that a dead or stuck rank belongs to can block.
        os._exit(1)
    if group is not None:
        group.close()
    return 0


def serve_trials(study_dir: Path, worker: Worker, next_words: Callable[[], list[str]],
                 answer: Callable[[str], object] | None, preimport_s: float | None, group=None,
                 during_trial: Callable[[], object] = contextlib.nullcontext) -> bool:
    """The warm worker's loop over one study's lines (``next_words``: a line's words, empty when the
    study is done), until the study is done or the worker retires. Each trial's answer goes to
    ``answer`` (the lead rank's; None on the others); ``during_trial`` is a context manager around
    each trial (a resident worker watches for its driver there). True when a group broke (the
    caller must exit at once)."""
    lead = group is None or group.lead
    own_out, own_err = os.dup(1), os.dup(2)
    try:
        while worker.retire is None:
            words = next_words() if lead else None
            if group is not None:
                words = group.share(words)
            if not words:
                return False  # closed: the study needs no more trials
            if words[0] == "preload":
                _preload(worker, study_dir)
                continue
            number, started_at, channel, log = int(words[0]), float(words[1]), words[2], words[3]
            sys.stdout.flush()
            sys.stderr.flush()
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
            progress = ProgressWriter(channel if lead else None)
            broken = False
            try:
                with during_trial():
                    code = execute(study_dir, number, progress, started_at,
                                   preimport_s if worker.trials == 0 else None, worker)
                if group is not None:
                    try:
                        worker.retire = group.agree(worker.retire, failed=worker.trial_failed)
                    except Exception as err:  # noqa: BLE001 - whatever broke, the group cannot go on
                        traceback.print_exc()
                        worker.retire, broken = f"the group broke after trial {number}: {err}", True
                if worker.retire:
                    print(f"[harness] this worker takes no more trials: {worker.retire}", flush=True)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(own_out, 1)
                os.dup2(own_err, 2)
            if lead:
                answer(f"{number} {code} {'retire' if worker.retire else 'keep'}\n")
                progress("end")
                progress.close()
            if broken:
                return True
        return False
    finally:
        os.close(own_out)
        os.close(own_err)


def _join_group(study_dir: Path):
    """This rank's place in its warm group, on the study's device (NCCL on GPUs, Gloo on CPU)."""
    from harness.sweep.config import SweepConfig
    from harness.worker import loop as T
    from harness.worker.distributed import Group

    cfg = SweepConfig.model_validate_json((study_dir / "sweep.json").read_text())
    return Group(T.resolve_device(cfg.device))


def standby(study_dir: Path) -> int:
    """Import now; then run the trial whose number, hand-over time and progress channel arrive on
    stdin. The driver has already made this process's log the trial's."""
    die_with_parent()
    t0 = time.perf_counter()
    import_training_stack()
    preimport_s = time.perf_counter() - t0
    words = sys.stdin.readline().split()
    if not words:
        return 0  # closed: the study needed no more trials
    number, started_at, channel = int(words[0]), float(words[1]), words[2]
    return execute(study_dir, number, ProgressWriter(channel), started_at, preimport_s)


def main(argv: list[str] | None = None) -> int:
    """Entry for a spawned or forked trial process (``STUDY_DIR N``) or a standby one
    (``--standby STUDY_DIR``)."""
    args = argv or sys.argv[1:]
    if args[0] == "--standby":
        return standby(Path(args[1]))
    if args[0] == "--warm":
        return warm_worker(Path(args[1]))
    study_dir, number = args[:2]
    started_at = float(os.environ.get("HARNESS_STARTED_AT", time.time()))
    return execute(Path(study_dir), int(number), ProgressWriter(os.environ.get(PATH_ENV)), started_at)


if __name__ == "__main__":
    sys.exit(main())
