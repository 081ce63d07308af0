"""The training step, readable in one page: Unsloth LoRA, dynamic padding, periodic validation.

Imported only inside a trial process (it imports unsloth first, then torch).
"""

from __future__ import annotations

import math
import os
import random
import resource
import time
from dataclasses import dataclass, field
from typing import Callable

import unsloth  # noqa: F401  (must come before transformers/peft: it patches them)
from unsloth import FastLanguageModel

import numpy as np
import torch

from harness import backends

EVAL_BATCH_SIZE = 8  # fixed across trials so every trial's validation loss is computed alike


@dataclass
class TrainParams:
    """One trial's hyperparameters (the search space's names)."""

    batch_size: int
    grad_accum: int
    learning_rate: float
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    epochs: int
    weight_decay: float
    warmup_ratio: float
    packing: bool = False


@dataclass
class TrainResult:
    val_loss: float | None = None
    stopped_early: bool = False  # the step hook asked to stop (Optuna pruned the trial)
    steps: int = 0
    total_steps: int = 0
    tokens_trained: int = 0
    tokens_per_s: float | None = None
    padded_tokens_per_s: float | None = None  # counting padding too: what the GPU actually computed
    train_s: float = 0.0
    eval_s: float = 0.0
    history: list[dict] = field(default_factory=list)


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class Dist:
    """This process's place in a multi-process trial (``gpus_per_trial`` > 1, started by torchrun).

    Every rank draws the same stream of batches and trains on every ``world``-th one; gradients are
    summed across ranks after each backward pass (one all-reduce of the LoRA gradients, flattened),
    so the step equals one step on ``world`` times the batch. Rank 0 talks to Optuna.
    """

    rank: int = 0
    world: int = 1

    def sum(self, *values: float) -> list[float]:
        if self.world == 1:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, value: float) -> list[float]:
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def decide(self, flag: bool) -> bool:
        """Rank 0's decision, for everyone (to prune or not)."""
        if self.world == 1:
            return flag
        import torch.distributed as dist

        box = [flag]
        dist.broadcast_object_list(box, src=0)
        return bool(box[0])

    def sum_gradients(self, params: list[torch.Tensor]) -> None:
        if self.world == 1:
            return
        import torch.distributed as dist

        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def _collective_device() -> str:
    import torch.distributed as dist

    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def init_distributed(device: str) -> Dist:
    """Join the process group torchrun set up (NCCL on GPUs, Gloo on CPU); a no-op alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch.distributed as dist

    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


Row = tuple[np.ndarray, "np.ndarray | None"]  # token ids, and the loss mask when only some tokens count


def load_rows(path: str) -> list[Row]:
    """Token rows saved by :mod:`harness.prepare` (flat ids + offsets, and a loss mask if any)."""
    with np.load(path) as z:
        tokens, offsets = z["tokens"], z["offsets"]
        mask = z["loss_mask"] if "loss_mask" in z.files else None
    return [(tokens[a:b], None if mask is None else mask[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]


def pack(rows: list[Row], length: int) -> list[Row]:
    """Concatenate every row and cut the stream into sequences of exactly ``length`` tokens.

    Rows keep their BOS/EOS, so documents stay delimited; attention crosses those boundaries
    (plain packing, as TRL's default). The last, partial sequence is dropped.
    """
    ids = np.concatenate([r[0] for r in rows])
    masks = None if rows[0][1] is None else np.concatenate([r[1] for r in rows])
    n = len(ids) // length
    return [(ids[i * length : (i + 1) * length], None if masks is None else masks[i * length : (i + 1) * length])
            for i in range(n)]


def collate(rows: list[Row], pad_id: int, device: str) -> dict[str, torch.Tensor]:
    """Dynamic padding: pad to the longest row of this batch, padded positions masked out of the loss.

    On CUDA the width is rounded up to a multiple of 64, so compiled kernels see a few shapes
    instead of one per batch (each new shape costs a recompile).
    """
    width = max(len(r[0]) for r in rows)
    if device == "cuda":
        width = -(-width // 64) * 64
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    counted = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (r, loss_mask) in enumerate(rows):
        ids[i, : len(r)] = torch.from_numpy(r.astype(np.int64))
        mask[i, : len(r)] = 1
        counted[i, : len(r)] = True if loss_mask is None else torch.from_numpy(loss_mask.astype(bool))
    labels = ids.masked_fill(~counted, -100)
    return {k: v.to(device, non_blocking=True) for k, v in (("input_ids", ids), ("attention_mask", mask), ("labels", labels))}


def predicted_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the loss is averaged over: every label after the first position that is not padding."""
    return int((batch["labels"][:, 1:] != -100).sum())


def resolve_device(wanted: str) -> str:
    if wanted == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("the sweep file asks for device: cuda, but no CUDA GPU is visible here")
    return "cuda" if wanted in ("auto", "cuda") and torch.cuda.is_available() else "cpu"


def resolve_dtype(wanted: str, device: str) -> torch.dtype:
    if wanted != "auto":
        return getattr(torch, wanted)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # bf16 matmuls are slow on most CPUs, and fp32 makes CPU results exact


def load_model(model_dir: str, max_seq_length: int, dtype: torch.dtype, load_in_4bit: bool):
    """The base model alone (to attach a saved adapter to)."""
    return FastLanguageModel.from_pretrained(
        model_name=model_dir, max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=load_in_4bit,
    )


def load_lora_model(model_dir: str, p: TrainParams, *, max_seq_length: int, dtype: torch.dtype,
                    load_in_4bit: bool, target_modules: list[str], checkpointing, seed: int):
    return backends.load_unsloth(
        model_dir, max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=load_in_4bit, lora_r=p.lora_r,
        lora_alpha=p.lora_alpha, lora_dropout=p.lora_dropout, target_modules=target_modules,
        checkpointing=checkpointing, seed=seed,
    )


@torch.no_grad()
def evaluate(model, rows: list[np.ndarray], pad_id: int, device: str, dist: Dist = Dist()) -> float:
    """Mean token-level cross-entropy over all of ``rows`` (in a fixed order; shared out by rank)."""
    was_training = model.training
    model.eval()
    loss_sum, count = 0.0, 0
    batches_ = range(0, len(rows), EVAL_BATCH_SIZE)
    for i in list(batches_)[dist.rank :: dist.world]:
        batch = collate(rows[i : i + EVAL_BATCH_SIZE], pad_id, device)
        n = predicted_tokens(batch)
        if n == 0:
            continue
        loss_sum += float(model(**batch).loss.float()) * n
        count += n
    model.train(was_training)
    loss_sum, count = dist.sum(loss_sum, count)
    return loss_sum / max(count, 1)


def batches(rows: list[np.ndarray], batch_size: int, seed: int):
    """Endless stream of micro-batches, reshuffled each epoch with a seed derived from ``seed``."""
    epoch = 0
    while True:
        order = list(range(len(rows)))
        random.Random(seed * 1000 + epoch).shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield [rows[j] for j in order[i : i + batch_size]]
        epoch += 1


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train(
    model, train_rows, val_rows, p: TrainParams, *, pad_id: int, device: str, seed: int, max_seq_length: int,
    max_steps: int | None, eval_every: int, timing_warmup_steps: int,
    on_step: Callable[[int, int, float], None], on_eval: Callable[[int, float], bool], dist: Dist = Dist(),
) -> TrainResult:
    """Train with AdamW and a linear warm-up/decay; validate every ``eval_every`` steps and at the end.

    ``on_eval(step, val_loss)`` returning True stops training (the trial was pruned). Validation
    always runs on the unpacked rows, so packed and padded trials are compared alike.
    """
    if p.packing:
        train_rows = pack(train_rows, max_seq_length)
    if len(train_rows) < p.batch_size:
        raise ValueError(f"the training split has {len(train_rows)} rows, fewer than one batch of {p.batch_size}")
    steps_per_epoch = max(1, len(train_rows) // (p.batch_size * p.grad_accum * dist.world))
    total = p.epochs * steps_per_epoch if max_steps is None else min(max_steps, p.epochs * steps_per_epoch)
    warmup = int(p.warmup_ratio * total)
    trainable = [t for t in model.parameters() if t.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=p.learning_rate, weight_decay=p.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / (warmup + 1) if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
    )
    result = TrainResult(total_steps=total)
    stream = batches(train_rows, p.batch_size, seed)
    timed_tokens, timed_padded, timed_s = 0, 0, 0.0
    model.train()
    for step in range(1, total + 1):
        sync(device)
        t0 = time.perf_counter()
        micro = [collate([next(stream) for _ in range(dist.world)][dist.rank], pad_id, device)
                 for _ in range(p.grad_accum)]
        counts = [predicted_tokens(b) for b in micro]
        n_total = max(1, dist.sum(sum(counts))[0])
        step_loss = 0.0
        for b, n in zip(micro, counts):
            # Weight each micro-batch by its share of the step's tokens (on all ranks): the step's
            # loss is the token mean, whatever the batch sizes and padding.
            loss = model(**b).loss * (n / n_total)
            loss.backward()
            step_loss += float(loss.detach())
        step_loss = dist.sum(step_loss)[0]
        if not math.isfinite(step_loss):
            raise NonFiniteLoss(f"loss became {step_loss} at step {step}")
        dist.sum_gradients(trainable)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        dt = time.perf_counter() - t0
        tokens, padded = (int(x) for x in dist.sum(sum(int(b["attention_mask"].sum()) for b in micro),
                                                    sum(b["attention_mask"].numel() for b in micro)))
        result.tokens_trained += tokens
        result.train_s += dt
        if step > timing_warmup_steps or total <= timing_warmup_steps:
            timed_tokens, timed_padded, timed_s = timed_tokens + tokens, timed_padded + padded, timed_s + dt
        result.steps = step
        on_step(step, total, step_loss)

        if step % eval_every == 0 or step == total:
            t0 = time.perf_counter()
            result.val_loss = evaluate(model, val_rows, pad_id, device, dist)
            result.eval_s += time.perf_counter() - t0
            result.tokens_per_s = timed_tokens / timed_s if timed_s else None
            result.padded_tokens_per_s = timed_padded / timed_s if timed_s else None
            result.history.append({"step": step, "train_loss": step_loss, "val_loss": result.val_loss,
                                   "tokens_per_s": result.tokens_per_s})
            if dist.decide(on_eval(step, result.val_loss)) and step < total:
                result.stopped_early = True
                break
    return result


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's RuntimeError."""
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err))


def memory_in_use(device: str) -> float:
    """MiB held now: CUDA reserved memory, or this process's resident set on CPU."""
    if device == "cuda":
        return round(torch.cuda.memory_reserved() / 2**20, 1)
    with open("/proc/self/statm") as f:
        return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def peak_memory(device: str) -> dict[str, float]:
    """Peak memory of this process in MiB: CUDA max allocated/reserved, or peak RSS on CPU."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    out = {"peak_rss_mib": round(rss, 1)}
    if device == "cuda":
        out["peak_alloc_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["peak_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
        out["peak_mem_mib"] = out["peak_reserved_mib"]
    else:
        out["peak_mem_mib"] = out["peak_rss_mib"]
    return out
