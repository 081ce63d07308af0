"""Rows into batches: dynamic padding, plain packing, padding-free packing, the seeded stream of
micro-batches (random or grouped by length, sized in rows or in tokens).

Torch is the only heavy import at load time (transformers comes on first use: a trial imports
unsloth before it, so that it patches transformers): tests import this module without unsloth.
"""

from __future__ import annotations

import functools
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


@functools.cache
def _flattening():
    """transformers' padding-free collator (the one TRL's and Unsloth's trainers build on): rows
    flattened into one sequence of shape (1, total), position ids restarting at 0 at each row, and
    -100 as the first label of every row (the rest of its labels are the row's own, loss mask applied).

    Its tensors are identical to the hand-written numpy version it replaced (300 random
    micro-batches, with and without loss masks). It builds Python lists, so it is slower: 2.5 ms
    for 64 rows of 100 tokens, 8.5 ms for 16 rows of 1,000 (0.2 ms before) on this repo's 2-core
    CPU host. Next to a GPU step of a 7B model on such a micro-batch (seconds) that is noise; a
    125M model's step (tens of ms) would feel it by a few percent."""
    from transformers import DataCollatorWithFlattening

    return DataCollatorWithFlattening(return_tensors="pt")


def collate_padding_free(rows: list[Row], device: str) -> dict[str, torch.Tensor]:
    """Padding-free packing: the rows concatenated into one sequence of shape (1, total), with
    position ids restarting at 0 at each row, so attention stays within each row and no token is padding.

    The first label of every row is -100: the position before it is the previous row's last
    token, and a row's first token is never predicted from another row (alone, it is not
    predicted at all). So the loss, its token count and the gradients are those of the rows
    run alone.

    How the model keeps attention within rows (README, under "Packing and batching"): Unsloth's fast
    forward reads ``packed_seq_lengths`` for its variable-length attention (its SFT trainer passes
    the same keys, ``use_cache=False`` included); plain transformers (Unsloth's CPU backend, the
    HF baseline) finds the rows from ``position_ids``, but only without an attention mask and
    without a cache, and its models create a cache unless ``use_cache=False``. transformers'
    collator gives neither key, so they are added here.
    """
    features = [{"input_ids": ids, "labels": ids if mask is None else np.where(mask.astype(bool), ids, -100)}
                for ids, mask in rows]
    batch = _flattening()(features)
    # On the device, as Unsloth's SFT trainer hands it over.
    batch["packed_seq_lengths"] = torch.tensor([len(r[0]) for r in rows], dtype=torch.int32)
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    batch["use_cache"] = False
    return batch


def collate_for(packing: str, rows: list[Row], pad_id: int, device: str) -> dict[str, torch.Tensor]:
    """A micro-batch's tensors for a packing mode: padding-free, or padded (naive packing's
    sequences are already full, so padding them adds nothing but CUDA's rounding)."""
    if packing == "padding_free":
        return collate_padding_free(rows, device)
    return collate(rows, pad_id, device)


def predicted_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the loss is averaged over: every label after the first position that is not padding."""
    return int((batch["labels"][:, 1:] != -100).sum())


def token_counts(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(real tokens, computed tokens) of a collated micro-batch: its padding is the difference."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum()), batch["attention_mask"].numel()
    return batch["input_ids"].numel(), batch["input_ids"].numel()  # padding-free: every token is real


# Length grouping sorts rows within groups of this many micro-batches (as transformers'
# LengthGroupedSampler does): wide enough to find rows of similar length, narrow enough that
# the order stays random at the scale of an epoch.
GROUP_MICRO_BATCHES = 50
# Why not transformers' get_length_grouped_indices / LengthGroupedSampler (measured on 2,000 rows
# of 1-59 tokens, batch 4, groups of 50): its padding is the same (1.4%) and it is seeded, but
# (1) it does not shuffle the micro-batches after sorting, so each group's 50 come longest to
# shortest (98% of steps narrower than the one before, against 51% here): a sawtooth of lengths
# through the epoch that the loss and tokens/s curves would follow; (2) it puts the longest *row*
# first, not the micro-batch that computes the most (the same for padded micro-batches of
# batch_size rows, not for padding-free or token-capped ones); (3) its groups and micro-batches
# count rows, so it cannot size either by max_tokens_per_batch. Using it for the rows-counted case
# alone would leave this grouping in place for the token-capped one, and change every
# length-grouped trial's order for nothing: so the grouping stays here.


class BatchStream:
    """The endless, seeded stream of micro-batches (lists of rows), planned one epoch at a time.

    Each epoch shuffles the rows with a seed derived from ``seed`` and the epoch. ``batching``:

    - ``random``: micro-batches are consecutive runs of the shuffled order.
    - ``length_grouped``: the shuffled order is cut into groups of ``GROUP_MICRO_BATCHES``
      micro-batches' worth of rows, each group sorted by length (longest first) and cut into
      micro-batches, and the epoch's micro-batches shuffled again; the one that computes the most
      tokens goes first, so an out-of-memory shows at the first step.

    A micro-batch holds ``batch_size`` rows, or with ``max_tokens`` > 0 as many rows as keep its
    computed tokens within ``max_tokens``: the rows times the longest when padded, their sum when
    ``flat`` (padding-free). A row that alone exceeds the cap forms a micro-batch of its own. With
    rows counted, an epoch's last, partial micro-batch is dropped (a full batch every step); with
    tokens, nothing is dropped.

    ``epochs_done`` counts the epochs whose last micro-batch has been drawn. The same rows,
    options and seed give the same micro-batches.
    """

    def __init__(self, rows: list[Row], batch_size: int, seed: int, *, batching: str = "random",
                 max_tokens: int = 0, flat: bool = False):
        if batching not in ("random", "length_grouped"):
            raise ValueError(f"unknown batching {batching!r}")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.batching, self.max_tokens, self.flat = batching, max_tokens, flat
        self.lengths = [len(r[0]) for r in rows]
        self.epoch = self.epochs_done = 0
        self._plan: list[list[int]] = []
        self._next = 0

    def cost(self, indices: list[int]) -> int:
        """Tokens a micro-batch of these rows computes (before CUDA's rounding of padded widths)."""
        lengths = [self.lengths[i] for i in indices]
        return sum(lengths) if self.flat else len(lengths) * max(lengths, default=0)

    def _cut(self, order: list[int], keep_partial: bool) -> list[list[int]]:
        if not self.max_tokens:
            b = self.batch_size
            end = len(order) if keep_partial else len(order) - len(order) % b
            return [order[i : i + b] for i in range(0, end, b)]
        out, current, total, longest = [], [], 0, 0
        for i in order:
            n = self.lengths[i]
            t, l = total + n, max(longest, n)
            if current and (t if self.flat else (len(current) + 1) * l) > self.max_tokens:
                out.append(current)
                current, t, l = [], n, n
            current.append(i)
            total, longest = t, l
        return out + ([current] if current else [])

    def plan(self, epoch: int) -> list[list[int]]:
        """The row indices of each micro-batch of ``epoch``, in order."""
        order = list(range(len(self.rows)))
        random.Random(self.seed * 1000 + epoch).shuffle(order)
        if self.batching == "random":
            return self._cut(order, keep_partial=bool(self.max_tokens))
        # Groups in rows (GROUP_MICRO_BATCHES x batch_size) or in tokens (that many caps' worth of rows).
        groups, group, tokens = [], [], 0
        for i in order:
            group.append(i)
            tokens += self.lengths[i]
            if (len(group) == GROUP_MICRO_BATCHES * self.batch_size if not self.max_tokens
                    else tokens >= GROUP_MICRO_BATCHES * self.max_tokens):
                groups.append(group)
                group, tokens = [], 0
        if group:
            groups.append(group)
        micro = []
        for g in groups:
            g.sort(key=lambda i: -self.lengths[i])  # stable: rows of one length keep their shuffled order
            micro += self._cut(g, keep_partial=True)
        if not self.max_tokens:  # a full batch every step: the epoch's one partial micro-batch goes
            micro = [m for m in micro if len(m) == self.batch_size]
        random.Random(self.seed * 1000 + epoch + 500).shuffle(micro)
        if micro:
            largest = max(range(len(micro)), key=lambda k: self.cost(micro[k]))
            micro.insert(0, micro.pop(largest))
        return micro

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> list[Row]:
        if self._next >= len(self._plan):
            self._plan, self._next = self.plan(self.epoch), 0
            if not self._plan:
                raise ValueError(f"{len(self.rows)} rows make no micro-batch of {self.batch_size}")
        indices = self._plan[self._next]
        self._next += 1
        if self._next == len(self._plan):
            self.epoch += 1
            self.epochs_done = self.epoch
        return [self.rows[i] for i in indices]


def batches(rows: list[Row], batch_size: int, seed: int, **options) -> BatchStream:
    """Endless stream of micro-batches, reshuffled each epoch with a seed derived from ``seed``
    (:class:`BatchStream`; with no options, ``batch_size`` rows in random order)."""
    return BatchStream(rows, batch_size, seed, **options)


