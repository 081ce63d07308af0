"""Rows into batches: dynamic padding, plain packing, the seeded stream of micro-batches.

Torch is the only heavy import: tests import this module without unsloth.
"""

from __future__ import annotations

import random

import numpy as np
import torch


Row = tuple[np.ndarray, "np.ndarray | None"]  # token ids, and the loss mask when only some tokens count


def load_rows(path: str) -> list[Row]:
    """Token rows saved by :mod:`harness.data.prepare` (flat ids + offsets, and a loss mask if any)."""
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



def batches(rows: list[np.ndarray], batch_size: int, seed: int):
    """Endless stream of micro-batches, reshuffled each epoch with a seed derived from ``seed``."""
    epoch = 0
    while True:
        order = list(range(len(rows)))
        random.Random(seed * 1000 + epoch).shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield [rows[j] for j in order[i : i + batch_size]]
        epoch += 1


