"""One trial, inside a worker: load (or lend from the kept base), train each seed, report.

The driver sends the trial's number and parameters; this module trains it and tells the driver
everything over the trial's :class:`Link`: its phases and steps, each validation (the driver
answers whether to stop: pruned, or a time-to-target reached), whether its weights are worth
saving, and finally a :class:`~harness.records.TrialReport` of what happened. It never talks to
Optuna and holds no storage URL; it decides nothing about the trial's outcome
(:mod:`harness.sweep.outcome` does, in the driver).
"""

from __future__ import annotations

import gc
import os
import socket
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.protocol import Channel, Closed
from harness.records import Metrics, SeedRun, TrialReport

WEIGHTS = "weights"  # trials/<n>/weights: what a trial that may be the best saved (the driver promotes it)


class DriverGone(RuntimeError):
    """The driver closed the channel mid-trial: the trial's results have nowhere to go."""


class Link:
    """Trial ``number``'s side of the channel: events to the driver (each names the trial: a worker
    may train several at once), and questions it answers. Silent on the ranks of a group but the
    lead one (``channel`` None): rank 0 speaks for the group."""

    def __init__(self, channel: Channel | None, number: int):
        self.channel, self.number = channel, number

    def send(self, kind: str, **fields: Any) -> None:
        if self.channel is None:
            return
        try:
            self.channel.send(kind, number=self.number, **fields)
        except Closed as err:
            raise DriverGone(str(err)) from None

    def ask(self, kind: str, **fields: Any) -> dict:
        """Send, then wait for the driver's ``answer`` (nothing else comes while a lone trial runs)."""
        if self.channel is None:
            return {}
        self.send(kind, **fields)
        try:
            while True:
                message = self.channel.recv()
                if message["kind"] == "answer":
                    return message
        except Closed as err:
            raise DriverGone(str(err)) from None


@dataclass
class TrialSpec:
    """What the driver hands a worker for one trial (the ``trial`` message)."""

    study_dir: Path
    number: int
    params: dict
    started_at: float  # the driver's time.time() when it handed the trial over
    log: str


class WorkerState:
    """What a warm worker keeps between its trials: the base it lends adapters from, and whether
    it may take another (``retire`` says why not; decided here, after each trial, and nowhere else)."""

    def __init__(self, max_trials: int, resident: bool = False, preimport_s: float | None = None):
        self.base = None  # a harness.worker.warm.WarmBase once a LoRA trial has loaded one
        self.max_trials = max_trials
        self.trials = 0
        self.retire: str | None = None
        self.resident = resident  # started by `harness warm up`: it serves study after study
        self.preimport_s = preimport_s  # its import, before its first trial (off that trial's path)

    def drop_base(self, device: str) -> None:
        from harness.worker.metrics import release_cached_memory

        self.base = None
        gc.collect()
        release_cached_memory(device)

    def after_trial(self, report: TrialReport, full: bool) -> None:
        """Give the trial's adapter back, and decide whether this worker takes another trial: not
        after an exception (out of memory, a non-finite loss, an error), a full fine-tune (it
        trained the weights it loaded), a base that changed, memory not given back, or
        ``max_trials``."""
        from harness.worker.warm import BaseChanged

        if report.failure is not None:
            self.retire = self.retire or f"trial {report.number} ended with an exception ({report.failure})"
        if full:
            self.retire = self.retire or "a full fine-tune changes the weights it loaded"
        if self.base is not None:
            try:
                self.base.give_back()
            except BaseChanged as err:
                self.retire = str(err)
                return
            leaked = self.base.leaked_mib()
            # A few MiB move between the allocator's pools from trial to trial; a leak grows by trial.
            if leaked > max(256.0, 0.02 * self.base.resident_mib):
                self.retire = self.retire or f"{leaked:,.0f} MiB not given back after trial {report.number}"
        if self.trials >= self.max_trials:
            self.retire = self.retire or f"{self.trials} trials, its max_trials"


def run_trial(spec: TrialSpec, link: Link, worker: WorkerState | None = None, lead: bool = True,
              resident: bool = False) -> TrialReport:
    """Train trial ``spec.number`` and return its report; an exception in it becomes the report's
    ``failure`` (out of memory, a non-finite loss, any other error), never an escape. Only
    :class:`DriverGone` escapes: there is no one left to report to. ``worker``: the warm worker it
    runs in (None in a fork); ``resident``: a fork of a resident worker."""
    t0 = time.perf_counter()
    from harness.worker.serve import import_training_stack

    import_training_stack()  # instant in a worker: it imported before the trial came
    import_s = time.perf_counter() - t0
    from harness.worker import loop as T

    report = TrialReport(number=spec.number, host=socket.gethostname(), pid=os.getpid())
    report.metrics.resident_worker = resident or (worker is not None and worker.resident) or None
    state = _Progress()
    try:
        _train(spec, link, worker, report, state, import_s, t0, lead)
    except DriverGone:
        raise
    except Exception as err:  # noqa: BLE001 - every failure is reported; the driver decides what it means
        traceback.print_exc()
        report.reached_training = state.reached_training
        if T.is_out_of_memory(err):
            device = state.device or "cpu"
            report.metrics.update(**T.peak_memory(device), mem_at_failure_mib=T.memory_in_use(device),
                                  oom_error=T.failure_message(err))
            report.failure, report.reason = "oom", T.failure_message(err)
        else:
            report.failure = "nonfinite_loss" if isinstance(err, T.NonFiniteLoss) else "error"
            what = "nonfinite_loss" if report.failure == "nonfinite_loss" else type(err).__name__
            report.reason = f"{what}: {err}"
    if worker is not None:
        report.metrics.worker_trial = worker.trials
    return report


class _Progress:
    """Where the trial got to, for a report after a failure."""

    reached_training = False
    device: str | None = None


def _train(spec: TrialSpec, link: Link, worker: WorkerState | None, report: TrialReport, state: _Progress,
           import_s: float, t0: float, lead: bool) -> None:
    from harness import faults
    from harness.data.prepare import Prepared
    from harness.params import TrainParams
    from harness.sweep.config import SweepConfig
    from harness.worker import loop as T

    t_setup = time.perf_counter()
    cfg = SweepConfig.model_validate_json((spec.study_dir / "sweep.json").read_text())
    prepared = Prepared.load(spec.study_dir / "prepared.json")
    params = TrainParams(**spec.params)
    trial_dir = spec.study_dir / "trials" / str(spec.number)
    trial_dir.mkdir(parents=True, exist_ok=True)
    device = state.device = T.resolve_device(cfg.device)
    dtype = T.resolve_dtype(cfg.model.dtype, device)
    dist = T.init_distributed(device)  # gpus_per_trial > 1: one process per GPU, rank 0 leads
    m: Metrics = report.metrics
    m.update(device=device, gpu_name=T.torch.cuda.get_device_name() if device == "cuda" else None,
             dtype=str(dtype).removeprefix("torch."), import_s=round(import_s, 3),
             spawn_s=round(max(0.0, time.time() - spec.started_at - (time.perf_counter() - t0)), 3),
             world_size=dist.world, method=params.method)
    if worker is not None:
        worker.trials += 1
        m.worker_trial = worker.trials
        if worker.trials == 1 and worker.preimport_s is not None:
            m.preimport_s = round(worker.preimport_s, 3)
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
    fault = faults.planned(spec.number)
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    report.seed, report.seeds = seeds[0], seeds if len(seeds) > 1 else None
    budget = data_budget(cfg, prepared.stats["train"]["tokens"])
    link.send("phase", phase="loading")
    m.setup_s = round(time.perf_counter() - t_setup, 3)  # reading the study's config and data record
    if fault and fault.step == 0:
        faults.inject(fault, None, device)
    model = tokenizer = train_rows = val_rows = None
    results: list[T.TrainResult] = []
    peaks: list[dict[str, float]] = []  # each earlier seed's peak memory
    for index, seed in enumerate(seeds):
        t_load = time.perf_counter()
        # One seed governs everything random in this run: model and LoRA init, dropout, and
        # (through the batch stream's own generator) the data order.
        T.seed_everything(seed)
        if model is not None:
            # The previous seed's model goes before the next loads: each seed's peak memory is its
            # own (measured on an H100: 28.7 GiB against 17.0 GiB without this).
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
            if worker is not None and worker.base is not None:
                # A full fine-tune trains the weights it loads: its own, not the kept base.
                worker.drop_base(device)
                T.reset_peak_memory(device)
            model, tokenizer = T.load_trainable_model(
                prepared.model_dir, params, max_seq_length=cfg.max_seq_length, dtype=dtype,
                load_in_4bit=cfg.model.load_in_4bit, target_modules=cfg.model.target_modules,
                checkpointing=cfg.model.gradient_checkpointing, seed=seed,
            )
        if index == 0:
            trainable, total_params = T.parameter_counts(model)
            m.update(trainable_params=trainable, total_params=total_params)
        if train_rows is None:
            train_rows, val_rows = T.load_rows(prepared.train_tokens), T.load_rows(prepared.val_tokens)
            m.load_s = round(time.perf_counter() - t_load, 3)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        on_step, on_eval = _hooks(index, len(seeds), seed, link, fault, lambda: model, device)
        if index == 0:
            # Fixed cost: from the driver handing this trial over to its first training step.
            m.fixed_s = round(time.time() - spec.started_at, 3)
            state.reached_training = report.reached_training = True
            link.send("phase", phase="training")
        # The untrained model's loss is the same for every seed (a LoRA starts as a no-op), and for
        # every trial that lends from a warm worker's base: measured once there.
        lent = worker is not None and worker.base is not None and params.method == "lora"
        known_start = worker.base.val_loss_start if lent else None
        result = T.train(
            model, train_rows, val_rows, params, pad_id=pad_id, device=device, seed=seed,
            max_seq_length=cfg.max_seq_length, budget=budget, timing_warmup_steps=cfg.budget.timing_warmup_steps,
            on_step=on_step, on_eval=on_eval, dist=dist, evaluate_start=index == 0 and known_start is None,
        )
        if index == 0 and lent:
            if known_start is None:
                worker.base.val_loss_start = result.val_loss_start
            else:
                result.val_loss_start = known_start
        results.append(result)
        if result.stopped_by == "pruned":
            break  # pruned on its first seed's curve: the other seeds are not run
    first = results[0]
    peaks.append(T.peak_memory(device))
    m.update(**{key: max(p[key] for p in peaks) for key in peaks[-1]})  # the largest seed's peak
    per_rank = dist.gather(m.peak_mem_mib)
    # Throughput and amounts are those of the first seed's run (each seed trains the same budget);
    # times add up over seeds.
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
    report.runs = [SeedRun(seed=s, val_loss=r.val_loss, stopped_by=r.stopped_by, history=r.history, train_s=r.train_s)
                   for s, r in zip(seeds, results)]
    if lead and first.stopped_by != "pruned":
        # Only a trial that may become the best keeps its weights (the last seed's): the driver
        # judges that from the report so far, and promotes them to best/. save_pretrained writes
        # what was trained: the adapter alone (adapter_config.json) for LoRA, the whole model
        # (config.json) for full fine-tuning.
        if link.ask("finished", report=report.to_dict()).get("save"):
            model.save_pretrained(str(trial_dir / WEIGHTS))
            tokenizer.save_pretrained(str(trial_dir / WEIGHTS))
            report.weights_saved = True


def _lend(worker: WorkerState, model_dir: str, params, cfg, dtype, device: str, seed: int, m: Metrics):
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


def _hooks(index: int, n_seeds: int, seed: int, link: Link, fault, model, device: str):
    """The loop's step and validation hooks for seed number ``index``: progress to the driver,
    and at each validation the driver's answer (stop or go on)."""
    from harness import faults
    from harness.worker.metrics import peak_memory

    last_loss: list[float] = []  # the latest step's training loss, sent with the next validation

    def on_step(step: int, done: float, loss: float) -> None:
        last_loss[:] = [loss]
        link.send("step", step=step, done=(index + done) / n_seeds, loss=loss)
        if fault and step == fault.step and index == 0:
            faults.inject(fault, model(), device)

    def on_eval(milestone: int, val_loss: float, tokens_per_s: float | None) -> str | None:
        answer = link.ask("eval", milestone=milestone, val_loss=val_loss, tokens_per_s=tokens_per_s,
                          peak_mem_mib=peak_memory(device)["peak_mem_mib"], seed_index=index, seed=seed,
                          train_loss=last_loss[0] if last_loss else None)
        return answer.get("stop")

    return on_step, on_eval
