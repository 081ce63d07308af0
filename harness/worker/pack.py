"""Concurrent trials (``concurrent_trials: K``): up to K LoRA trials of one study trained at once on
one loaded base, each on its own rows of one combined batch (:mod:`harness.worker.multilora`).

A 7B step on a micro-batch of ~90 tokens is bound by the host and by reading 14 GB of frozen
weights, not by arithmetic: K such trials can share one read of the weights. Each trial keeps
everything of its own: its adapter (rank, alpha, dropout; initialised exactly as PEFT would for its
seed), its AdamW state and learning-rate schedule, its seeded data stream, batch size and gradient
accumulation, data budget, validation milestones, pruning and record. Every iteration takes the
next micro-batch of each trial; a trial steps its optimizer when its accumulation is complete, is
validated (with its adapter alone) at its milestones and asks the driver whether to go on, exactly
as alone (:func:`harness.worker.loop.train`); the arithmetic is the same, so its losses are its
solo losses up to float rounding (tests/test_pack.py).

**Continuous batching.** A trial that finishes, is pruned or fails frees its place at once, and the
next trial the driver sent takes it. **Isolation.** A trial's rows reach its adapter alone and its
loss depends on its rows alone: a non-finite loss or an error in one trial ends that trial, and the
others' numbers do not change. An out-of-memory error restarts the pack's trials from their start
in packs half as large (the rest wait their turn), down to one trial, whose out-of-memory is then
its own (an infeasible config, as alone).
"""

from __future__ import annotations

import gc
import math
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.protocol import Channel, Closed
from harness.records import Metrics, SeedRun, TrialReport
from harness.worker.trial import WEIGHTS, DriverGone, Link, TrialSpec, WorkerState, data_budget

MAX_GRAD_NORM = 1.0  # as loop.train clips


@dataclass
class Member:
    """One trial in the pack."""

    spec: TrialSpec
    params: object                 # harness.params.TrainParams
    slot: int
    link: Link
    report: TrialReport
    budget: object                 # step.DataBudget
    stream: object                 # batching.BatchStream
    seed: int
    started: float                 # time.perf_counter() when it joined
    result: object = None          # loop.TrainResult: its counters, history, timings
    next_eval: int = 1
    pending: list = field(default_factory=list)   # this optimizer step's micro-batches still to run
    step_rows: int = 0
    step_n: int = 1                # the step's predicted tokens (its loss is their mean)
    step_loss: float = 0.0
    step_time: float = 0.0         # wall time of this step's iterations (shared with the pack)
    step_share: float = 0.0        # its share of them: each iteration's time over the trials in it
    shares: list = field(default_factory=list)  # each step's share over its wall time
    step_counts: tuple[int, int] = (0, 0)
    lr: float = 0.0
    timed: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # tokens, padded, seconds after warm-up
    shared_with: set[int] = field(default_factory=set)
    pack_sizes: list[int] = field(default_factory=list)  # members at each of its iterations
    steps_taken: int = 0           # optimizer steps of AdamW (its bias correction)
    peak: dict = field(default_factory=dict)  # the highest memory figures of its iterations


class PackTrainer:
    """The worker's side of concurrent trials for one study: members joining and leaving, one
    combined forward and backward per iteration."""

    def __init__(self, worker: WorkerState, study_dir: Path, capacity: int, channel: Channel):
        from harness.data.prepare import Prepared
        from harness.sweep.config import SweepConfig
        from harness.worker import loop as T
        from harness.worker.multilora import AdapterBank
        from harness.worker.warm import BaseKey, WarmBase

        self.T, self.worker, self.study_dir, self.channel = T, worker, study_dir, channel
        self.cfg = SweepConfig.model_validate_json((study_dir / "sweep.json").read_text())
        self.prepared = Prepared.load(study_dir / "prepared.json")
        self.device = T.resolve_device(self.cfg.device)
        self.dtype = T.resolve_dtype(self.cfg.model.dtype, self.device)
        key = BaseKey(self.prepared.model_dir, self.cfg.max_seq_length, str(self.dtype).removeprefix("torch."),
                      bool(self.cfg.model.load_in_4bit))
        if worker.base is None or worker.base.key != key:
            if worker.base is not None:
                worker.drop_base(self.device)
            worker.base = WarmBase(key, self.device)
        self.base = worker.base
        self.model = self.base.model
        _plain_forwards(self.model)
        if str(self.cfg.model.gradient_checkpointing).lower() != "false" and hasattr(self.model, "enable_input_require_grads"):
            # Checkpointed blocks pass gradients to the adapters inside them only when their input
            # requires a gradient (the embeddings are frozen): as PEFT prepares a model for it.
            self.model.enable_input_require_grads()
        self.capacity = self.limit = capacity
        r_max = max(_ranks(self.cfg))
        # The adapters' dtype: PEFT's for this base (what a trial alone trains), read off one lent adapter.
        probe = self.base.lend(lora_r=1, lora_alpha=1, lora_dropout=0.0, target_modules=self.cfg.model.target_modules,
                               checkpointing=self.cfg.model.gradient_checkpointing, seed=0)
        dtype = next(p.dtype for n, p in probe.named_parameters() if "lora_A" in n)
        self.base.give_back()
        self.bank = AdapterBank(self.model, self.cfg.model.target_modules, capacity, r_max, dtype,
                                next(self.model.parameters()).device)
        self.members: dict[int, Member] = {}
        self.waiting: list[dict] = []  # trial messages not yet started (the pack is full)
        self.train_rows = self.val_rows = None
        self.pad_id = self.base.tokenizer.pad_token_id if self.base.tokenizer.pad_token_id is not None else 0

    # -- the study's messages ----------------------------------------------------------------------

    def serve(self, first: dict) -> None:
        """Run trials as they come until the driver closes the channel (raises :class:`Closed`)."""
        self.waiting.append(first)
        while True:
            self._take_messages(block=not self.members and not self.waiting)
            while self.waiting and len(self.members) < self.limit:
                self._join(self.waiting.pop(0))
            if self.members:
                self._iterate()

    def _take_messages(self, block: bool) -> None:
        while True:
            message = self.channel.recv(None if block else 0)
            block = False
            if message is None:
                return
            if message["kind"] == "trial":
                self.waiting.append(message)
            # preload: the base is loaded; anything else is not for a pack between trials

    def _ask(self, member: Member, kind: str, **fields) -> dict:
        """A question for the driver about ``member``; other trials' messages wait in line."""
        member.link.send(kind, **fields)
        try:
            while True:
                message = self.channel.recv()
                if message["kind"] == "answer" and message.get("number") == member.spec.number:
                    return message
                if message["kind"] == "trial":
                    self.waiting.append(message)
        except Closed as err:
            raise DriverGone(str(err)) from None

    # -- a member joins ----------------------------------------------------------------------------

    def _join(self, message: dict) -> None:
        spec = TrialSpec(self.study_dir, int(message["number"]), message["params"], float(message["started_at"]),
                         message["log"])
        slot = next(s for s in range(self.capacity) if s not in {m.slot for m in self.members.values()})
        link = Link(self.channel, spec.number)
        report = TrialReport(number=spec.number, host=socket.gethostname(), pid=os.getpid())
        report.metrics.resident_worker = self.worker.resident or None
        with _log_to(spec.log):
            print(f"[harness] trial {spec.number}: worker {os.getpid()}, slot {slot} of a pack of up to "
                  f"{self.limit}", flush=True)
        link.send("started", pid=os.getpid())
        try:
            member = self._member(spec, slot, link, report)
        except DriverGone:
            raise
        except Exception as err:  # noqa: BLE001 - the trial fails alone, before training
            self._failed(spec, link, report, err, slot)
            return
        self.members[spec.number] = member

    def _member(self, spec: TrialSpec, slot: int, link: Link, report: TrialReport) -> Member:
        T, cfg = self.T, self.cfg
        from harness.params import TrainParams

        params = TrainParams(**spec.params)
        if params.method != "lora":
            raise ValueError("concurrent trials train LoRA adapters: method full runs alone (concurrent_trials: 1)")
        self.worker.trials += 1
        m: Metrics = report.metrics
        m.update(device=self.device, gpu_name=T.torch.cuda.get_device_name() if self.device == "cuda" else None,
                 dtype=str(self.dtype).removeprefix("torch."), import_s=0.0, world_size=1, method="lora",
                 worker_trial=self.worker.trials, base_reused=True,
                 spawn_s=round(max(0.0, time.time() - spec.started_at), 3))
        if self.worker.trials == 1 and self.worker.preimport_s is not None:
            m.preimport_s = round(self.worker.preimport_s, 3)
        link.send("phase", phase="loading")
        t0 = time.perf_counter()
        seed = cfg.seed
        report.seed = seed
        T.seed_everything(seed)
        # The adapter PEFT makes for this trial's seed, rank, alpha and targets: its initial weights.
        self.bank.remove()
        try:
            lent = self.base.lend(lora_r=params.lora_r, lora_alpha=params.lora_alpha,
                                  lora_dropout=params.lora_dropout, target_modules=cfg.model.target_modules,
                                  checkpointing=cfg.model.gradient_checkpointing, seed=seed)
            weights = _lora_weights(lent, self.bank.layers)
            m.update(trainable_params=sum(a.numel() + b.numel() for a, b in weights.values()),
                     total_params=sum(p.numel() for p in self.model.parameters())
                     + sum(a.numel() + b.numel() for a, b in weights.values()))
            self.bank.load(slot, weights, params.lora_alpha / params.lora_r, params.lora_dropout)
        finally:
            self.base.give_back()
            self.bank.install()
        if self.train_rows is None:
            self.train_rows = T.load_rows(self.prepared.train_tokens)
            self.val_rows = T.load_rows(self.prepared.val_tokens)
        rows = T.pack(self.train_rows, cfg.max_seq_length) if params.packing == "naive" else self.train_rows
        if not params.max_tokens_per_batch and len(rows) < params.batch_size:
            raise ValueError(f"the training split has {len(rows)} rows, fewer than one batch of {params.batch_size}")
        budget = data_budget(cfg, self.prepared.stats["train"]["tokens"])
        stream = T.batches(rows, params.batch_size, seed, batching=params.batching, max_tokens=params.max_tokens_per_batch,
                           flat=False)
        result = T.TrainResult(budget_unit=budget.unit, budget=budget.total)
        if self.base.val_loss_start is None:
            self.base.val_loss_start = self._evaluate(None)
        result.val_loss_start = self.base.val_loss_start
        m.load_s = round(time.perf_counter() - t0, 3)
        m.setup_s = 0.0
        m.fixed_s = round(time.time() - spec.started_at, 3)
        report.reached_training = True
        link.send("phase", phase="training")
        return Member(spec=spec, params=params, slot=slot, link=link, report=report, budget=budget, stream=stream,
                      seed=seed, started=time.perf_counter(), result=result)

    # -- one iteration: every member's next micro-batch, together ----------------------------------

    def _iterate(self) -> None:
        T = self.T
        members = list(self.members.values())
        for mb in members:
            if not mb.pending:
                self._plan_step(mb)
        batches = [mb.pending.pop(0) for mb in members]
        width = max(b["input_ids"].shape[1] for b in batches)
        segments, start = [], 0
        from harness.worker.multilora import Segment

        for mb, b in zip(members, batches):
            rows = b["input_ids"].shape[0]
            segments.append(Segment(mb.slot, start, start + rows))
            start += rows
        combined = {k: torch.cat([_pad(b[k], width, fill) for b in batches]) for k, fill in
                    (("input_ids", self.pad_id), ("attention_mask", 0), ("labels", -100))}
        self.bank.route(segments, start, width)
        T.sync(self.device)
        t0 = time.perf_counter()
        try:
            self.model.train()
            logits = self.model(input_ids=combined["input_ids"], attention_mask=combined["attention_mask"]).logits
            labels = combined["labels"][:, 1:]
            token_loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none",
                ignore_index=-100).view(labels.shape)
            losses = [token_loss[s.start:s.end].sum() / mb.step_n for s, mb in zip(segments, members)]
            torch.stack(losses).sum().backward()
        except Exception as err:  # noqa: BLE001
            if T.is_out_of_memory(err):
                self._out_of_memory(err)
                return
            raise
        T.sync(self.device)
        dt = time.perf_counter() - t0
        # The pack's peak in this iteration: each member's peak is the highest of its iterations.
        peak = T.peak_memory(self.device)
        T.reset_peak_memory(self.device)
        numbers = {mb.spec.number for mb in members}
        for mb, loss in zip(members, losses):
            mb.peak = {k: max(v, mb.peak.get(k, 0.0)) for k, v in peak.items()}
            mb.step_loss += float(loss.detach())
            mb.step_time += dt
            mb.step_share += dt / len(members)
            mb.shared_with |= numbers - {mb.spec.number}
            mb.pack_sizes.append(len(members))
        # The trials whose accumulation is complete step their optimizers together.
        stepping = [mb for mb in members if not mb.pending]
        finite = []
        for mb in stepping:
            if math.isfinite(mb.step_loss):
                finite.append(mb)
            else:
                self._drop(mb, T.NonFiniteLoss(f"loss became {mb.step_loss} at step {mb.result.steps + 1}"))
        for mb in finite:
            mb.steps_taken += 1
        self.bank.adamw([mb.slot for mb in finite], [mb.lr for mb in finite],
                        [mb.params.weight_decay for mb in finite], [mb.steps_taken for mb in finite], MAX_GRAD_NORM)
        for mb in finite:
            self._finish_step(mb)

    def _plan_step(self, mb: Member) -> None:
        """The member's next optimizer step: its learning rate, its micro-batches, their tokens."""
        T, p, r = self.T, mb.params, mb.result
        progress = mb.budget.position(r.tokens_trained, r.examples_trained, r.steps) / mb.budget.total
        mb.lr = p.learning_rate * T.lr_factor(progress, p.warmup_ratio)
        drawn = [next(mb.stream) for _ in range(p.grad_accum)]
        mb.pending = [T.collate_for(p.packing, rows, self.pad_id, self.device) for rows in drawn]
        mb.step_rows = sum(len(rows) for rows in drawn)
        mb.step_n = max(1, sum(T.predicted_tokens(b) for b in mb.pending))
        counts = [T.token_counts(b) for b in mb.pending]
        mb.step_counts = (sum(c[0] for c in counts), sum(c[1] for c in counts))
        mb.step_loss, mb.step_time, mb.step_share = 0.0, 0.0, 0.0

    def _finish_step(self, mb: Member) -> None:
        """After its optimizer step: the member's counters, progress, faults, validation."""
        T, r, p = self.T, mb.result, mb.params
        tokens, padded = mb.step_counts
        r.steps += 1
        r.tokens_trained += tokens
        r.tokens_computed += padded
        r.examples_trained += mb.step_rows
        r.train_s += mb.step_time
        r.step_s.append(mb.step_time)
        mb.shares.append(mb.step_share / mb.step_time if mb.step_time else 1.0)
        if r.steps > self.cfg.budget.timing_warmup_steps:
            mb.timed[0] += tokens
            mb.timed[1] += padded
            mb.timed[2] += mb.step_time
        budget = mb.budget
        position = budget.position(r.tokens_trained, r.examples_trained, r.steps)
        mb.link.send("step", step=r.steps, done=min(1.0, position / budget.total), loss=mb.step_loss)
        from harness import faults

        fault = faults.planned(mb.spec.number)
        if fault and fault.step == r.steps:
            if fault.kind == "nan":  # one of this trial's adapter weights: its next loss is NaN
                with torch.no_grad():
                    next(iter(self.bank.A.values()))[mb.slot].fill_(float("nan"))
            else:
                faults.inject(fault, None, self.device)
        done = position >= budget.total or mb.stream.epochs_done >= p.epochs
        if position >= budget.milestone(mb.next_eval) or done:
            while mb.next_eval < budget.milestones() and position >= budget.milestone(mb.next_eval + 1):
                mb.next_eval += 1
            milestone = budget.milestone(mb.next_eval) if not done else int(round(min(position, budget.total)))
            t0 = time.perf_counter()
            r.val_loss = self._evaluate(mb.slot)
            r.eval_s += time.perf_counter() - t0
            timed_tokens, timed_padded, timed_s = mb.timed
            if timed_s:
                r.tokens_per_s, r.padded_tokens_per_s = timed_tokens / timed_s, timed_padded / timed_s
            elif r.train_s:
                r.tokens_per_s = r.tokens_trained / r.train_s
            r.history.append({"step": r.steps, "milestone": milestone, "train_loss": mb.step_loss,
                              "val_loss": r.val_loss, "tokens_per_s": r.tokens_per_s,
                              "tokens": r.tokens_trained, "seconds": r.train_s + r.eval_s})
            mb.next_eval += 1
            stop = self._ask(mb, "eval", milestone=milestone, val_loss=r.val_loss,
                             tokens_per_s=timed_tokens / timed_s if timed_s else None,
                             peak_mem_mib=mb.peak.get("peak_mem_mib"),
                             seed_index=0, seed=mb.seed, train_loss=mb.step_loss).get("stop")
            if stop or done:
                r.stopped_by = stop or None
                r.warmup_s, r.steady_step_s = T.step_timing(r.step_s, self.cfg.budget.timing_warmup_steps)
                self._complete(mb)

    # -- validation ---------------------------------------------------------------------------------

    @torch.no_grad()
    def _evaluate(self, slot: int | None) -> float:
        """:func:`harness.worker.loop.evaluate` with one slot's adapter (None: the base alone)."""
        T = self.T
        from harness.worker.multilora import Segment

        was_training = self.model.training
        self.model.eval()
        loss_sum, count = 0.0, 0
        for i in range(0, len(self.val_rows), T.EVAL_BATCH_SIZE):
            batch = T.collate(self.val_rows[i: i + T.EVAL_BATCH_SIZE], self.pad_id, self.device)
            n = T.predicted_tokens(batch)
            if n == 0:
                continue
            rows, width = batch["input_ids"].shape
            self.bank.route([] if slot is None else [Segment(slot, 0, rows)], rows, width)
            loss_sum += float(self.model(**batch).loss.float()) * n
            count += n
        self.model.train(was_training)
        return loss_sum / max(count, 1)

    # -- a member leaves ----------------------------------------------------------------------------

    def _complete(self, mb: Member) -> None:
        T, r, m = self.T, mb.result, mb.report.metrics
        peak = mb.peak or T.peak_memory(self.device)
        m.update(**peak)
        m.update(
            peak_mem_mib_per_gpu=[peak["peak_mem_mib"]],
            tokens_per_s=r.tokens_per_s and round(r.tokens_per_s, 1),
            tokens_per_s_per_gpu=r.tokens_per_s and round(r.tokens_per_s, 1),
            padded_tokens_per_s=r.padded_tokens_per_s and round(r.padded_tokens_per_s, 1),
            train_s=round(r.train_s, 3), eval_s=round(r.eval_s, 3),
            val_loss_start=r.val_loss_start and round(r.val_loss_start, 6), steps=r.steps,
            tokens_trained=r.tokens_trained, examples_trained=r.examples_trained, budget_unit=mb.budget.unit,
            budget=mb.budget.total, steady_step_s=None if r.steady_step_s is None else round(r.steady_step_s, 6),
            warmup_s=None if r.warmup_s is None else round(r.warmup_s, 3),
            # The GPU's time it used: its steps at their steady pace, each by its share of the pack.
            train_steady_s=None if r.steady_step_s is None else round(r.steady_step_s * sum(mb.shares), 3),
            shared_with=sorted(mb.shared_with), pack_size_mean=round(sum(mb.pack_sizes) / len(mb.pack_sizes), 3)
            if mb.pack_sizes else None, pack_size_max=max(mb.pack_sizes, default=None),
        )
        if r.tokens_computed:
            m.padding_fraction = round(1 - r.tokens_trained / r.tokens_computed, 4)
        report = mb.report
        report.runs = [SeedRun(seed=mb.seed, val_loss=r.val_loss, stopped_by=r.stopped_by, history=r.history,
                               train_s=r.train_s)]
        if r.stopped_by != "pruned" and self._ask(mb, "finished", report=report.to_dict()).get("save"):
            self._save(mb)
            report.weights_saved = True
        self._leave(mb, report, code=0)

    def _save(self, mb: Member) -> None:
        """The trial's adapter as PEFT saves it (``trials/<n>/weights``): a fresh PEFT adapter of its
        shape, its trained weights copied in."""
        self.bank.remove()
        try:
            lent = self.base.lend(lora_r=mb.params.lora_r, lora_alpha=mb.params.lora_alpha,
                                  lora_dropout=mb.params.lora_dropout, target_modules=self.cfg.model.target_modules,
                                  checkpointing=self.cfg.model.gradient_checkpointing, seed=mb.seed)
            _load_lora_weights(lent, self.bank.layers, self.bank.weights(mb.slot), mb.params.lora_r)
            out = mb.spec.study_dir / "trials" / str(mb.spec.number) / WEIGHTS
            lent.save_pretrained(str(out))
            self.base.tokenizer.save_pretrained(str(out))
        finally:
            self.base.give_back()
            self.bank.install()

    def _drop(self, mb: Member, err: BaseException) -> None:
        """This trial failed (a non-finite loss, an error): it leaves; the others go on."""
        with _log_to(mb.spec.log):
            traceback.print_exception(err)
        report = mb.report
        report.failure = "nonfinite_loss" if isinstance(err, self.T.NonFiniteLoss) else "error"
        what = "nonfinite_loss" if report.failure == "nonfinite_loss" else type(err).__name__
        report.reason = f"{what}: {err}"
        self._leave(mb, report, code=1)

    def _failed(self, spec: TrialSpec, link: Link, report: TrialReport, err: BaseException, slot: int) -> None:
        with _log_to(spec.log):
            traceback.print_exception(err)
        report.failure, report.reason = "error", f"{type(err).__name__}: {err}"
        self.bank.clear(slot)
        link.send("report", report=report.to_dict())
        link.send("done", code=1, retire=None)

    def _leave(self, mb: Member, report: TrialReport, code: int) -> None:
        self.members.pop(mb.spec.number, None)
        self.bank.clear(mb.slot)
        mb.link.send("report", report=report.to_dict())
        mb.link.send("done", code=code, retire=None)

    def _out_of_memory(self, err: BaseException) -> None:
        """The pack does not fit: its trials start again from the beginning in packs half as large
        (the others wait); a trial alone that runs out of memory is infeasible, as it would be alone."""
        T = self.T
        for t in self.bank.parameters():
            t.grad = None
        gc.collect()
        T.release_cached_memory(self.device)
        members = sorted(self.members.values(), key=lambda mb: mb.spec.number)
        if len(members) == 1:
            mb = members[0]
            m = mb.report.metrics
            m.update(**T.peak_memory(self.device), mem_at_failure_mib=T.memory_in_use(self.device),
                     oom_error=T.failure_message(err))
            mb.report.failure, mb.report.reason = "oom", T.failure_message(err)
            self.members.pop(mb.spec.number)
            self.bank.clear(mb.slot)
            mb.link.send("report", report=mb.report.to_dict())
            mb.link.send("done", code=1, retire=None)
            return
        self.limit = max(1, len(members) // 2)
        for mb in members:
            with _log_to(mb.spec.log):
                print(f"[harness] out of memory in a pack of {len(members)}: starting again in packs of "
                      f"{self.limit}", flush=True)
            self.members.pop(mb.spec.number)
            self.bank.clear(mb.slot)
            self.worker.trials -= 1
        self.waiting[:0] = [{"kind": "trial", "number": mb.spec.number, "params": mb.spec.params,
                             "started_at": mb.spec.started_at, "log": mb.spec.log} for mb in members]

    def close(self) -> None:
        """The study is done with the pack: the base's own layers back, and checked unchanged."""
        self.bank.remove()
        for t in self.bank.parameters():
            t.grad = None
        from harness.worker.warm import BaseChanged, fingerprint

        gc.collect()
        self.T.release_cached_memory(self.device)
        if not torch.equal(fingerprint(self.model), self.base._fingerprint):
            self.worker.retire = str(BaseChanged("the frozen base's weights changed during a pack of trials"))


def _ranks(cfg) -> list[int]:
    """Every LoRA rank the study may ask for."""
    from harness.sweep.config import Choices, Range

    dim = cfg.search_space.searched().get("lora_r")
    if dim is None:
        return [int(cfg.search_space.fixed().get("lora_r", 16))]
    if isinstance(dim, Choices):
        return [int(v) for v in dim.choices]
    assert isinstance(dim, Range)
    return [int(dim.high)]


def _lora_weights(peft_model, layers: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A lent PEFT adapter's (lora_A, lora_B) weights per base layer name."""
    found = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            key = next((k for k in layers if name == k or name.endswith("." + k)), None)
            if key is not None:
                found[key] = (module.lora_A["default"].weight.detach().clone(),
                              module.lora_B["default"].weight.detach().clone())
    return found


@torch.no_grad()
def _load_lora_weights(peft_model, layers: dict, weights: dict, r: int) -> None:
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            key = next((k for k in layers if name == k or name.endswith("." + k)), None)
            if key is not None:
                a, b = weights[key]
                module.lora_A["default"].weight.copy_(a[:r])
                module.lora_B["default"].weight.copy_(b[:, :r])


def _plain_forwards(model) -> None:
    """Unsloth may have given the base's layers fused LoRA kernels (for PEFT's adapters); a pack's
    adapters are plain modules, so the layers' own forwards go back in place."""
    try:
        from unsloth.models.llama import _decline_fused_lora_for_fsdp
    except ImportError:
        return
    _decline_fused_lora_for_fsdp(model, reason="concurrent trials")


def _pad(t: torch.Tensor, width: int, fill: int) -> torch.Tensor:
    if t.shape[1] == width:
        return t
    return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill)


class _log_to:
    """A trial's log, for a line or a traceback (a pack's output is the worker's own)."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        import sys

        self.file = open(self.path, "a")  # noqa: SIM115
        self.saved = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = self.file
        return self

    def __exit__(self, *exc):
        import sys

        sys.stdout, sys.stderr = self.saved
        self.file.close()
