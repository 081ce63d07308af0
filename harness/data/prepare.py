"""Once per study: read the data, split it, tokenize it with the model's tokenizer, and cache the
token files (by content, tokenizer and max length), so trials only read them.

Its config is a :class:`~harness.data.spec.DataSpec`; it knows nothing of sweep files, trials or
workers. The model is resolved first, by :mod:`harness.worker.prepare` (building a preset is
training), which then calls :func:`prepare_tokens` and writes the study's :class:`Prepared`.
Torch-free at import: trials and the driver read :class:`Prepared` from here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from harness.data import formats, sources as data
from harness.data.spec import DataSpec
from harness.errors import DataError
from harness.files import atomic_path, write_json_atomic

PREPARED_VERSION = 2  # 2: empty rows are skipped before the validation split, not after


@dataclass
class Prepared:
    """What every trial of a study reads: the model folder and the tokenized splits."""

    model_dir: str
    train_tokens: str
    val_tokens: str
    stats: dict  # per split: rows, tokens, length figures, truncated and skipped rows
    prepare_s: float
    from_cache: bool
    base: dict | None = None  # a base the harness pretrained: its pretrain.json (curve left out)
    built_s: float = 0.0  # spent building the model here, now (a preset's first use on this machine)

    def save(self, path: Path) -> None:
        write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> "Prepared":
        return cls(**json.loads(Path(path).read_text()))


@dataclass
class TokenizedSplit:
    tokens: np.ndarray  # all rows' ids, flat
    offsets: np.ndarray  # row i is tokens[offsets[i]:offsets[i+1]]
    loss_mask: np.ndarray | None  # 1 where a token counts in the loss (responses only); None: all do
    stats: dict

    def save(self, path: Path) -> None:
        arrays = {"tokens": self.tokens, "offsets": self.offsets}
        if self.loss_mask is not None:
            arrays["loss_mask"] = self.loss_mask
        with atomic_path(path) as tmp:
            np.savez(tmp, **arrays)


def tokenize(records: list[data.Record], spec: DataSpec, tok, where: str, skipped_empty: int) -> TokenizedSplit:
    """Render each record, tokenize (BOS + segments + EOS), truncate to ``max_seq_length``.

    ``records`` are usable rows (see :func:`usable_rows`); ``skipped_empty`` is only carried into
    the stats. With ``train_on_responses_only`` a row whose response was truncated away is
    dropped and counted.
    """
    max_len = spec.max_seq_length
    rendered = [formats.render(rec, spec.format, spec.columns, spec.template, tok) for rec in records]
    pieces = [text for segs in rendered for text, _ in segs]
    piece_ids = iter(tok(pieces, add_special_tokens=False)["input_ids"])
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    rows, masks, full_lengths, truncated, no_response = [], [], [], 0, 0
    for segs in rendered:
        ids, mask = list(bos), [0] * len(bos)
        for _, is_response in segs:
            seg = next(piece_ids)
            ids += seg
            mask += [int(is_response or not spec.train_on_responses_only)] * len(seg)
        ids, mask = ids + eos, mask + [1] * len(eos)
        full_lengths.append(len(ids))  # before truncation: what the data holds, not what trains
        if len(ids) > max_len:
            ids, mask, truncated = ids[:max_len], mask[:max_len], truncated + 1
        if spec.train_on_responses_only and not any(mask[1:]):
            no_response += 1
            continue
        rows.append(ids)
        masks.append(mask)
    if not rows:
        raise DataError(f"{where}: every row lost its response to truncation at max_seq_length={max_len}")
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    flat = np.fromiter((t for r in rows for t in r), dtype=np.int32, count=int(offsets[-1]))
    loss_mask = (np.fromiter((m for r in masks for m in r), dtype=np.uint8, count=int(offsets[-1]))
                 if spec.train_on_responses_only else None)
    lens = np.array(full_lengths)
    stats = {
        "rows": len(rows), "skipped_empty": skipped_empty, "dropped_no_response": no_response,
        # tokens and loss_tokens are what is stored and trains (after truncation): packing's
        # sequence count is taken from them. The length figures are per usable row, before truncation.
        "tokens": int(flat.size), "truncated_rows": truncated, "truncated_share": round(truncated / len(lens), 4),
        "length_min": int(lens.min()), "length_median": float(np.median(lens)),
        "length_p95": float(np.percentile(lens, 95)), "length_max": int(lens.max()),
        "loss_tokens": int(loss_mask.sum()) if loss_mask is not None else int(flat.size),
    }
    return TokenizedSplit(flat, offsets, loss_mask, stats)


def _tokenizer_fingerprint(model_dir: str) -> str:
    path = Path(model_dir)
    if not path.is_dir():
        return model_dir
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        if (path / name).exists():
            h.update(name.encode() + (path / name).read_bytes())
    return h.hexdigest()


def usable_rows(records: list[data.Record], spec: DataSpec, where: str) -> tuple[list[data.Record], int]:
    """The usable rows in file order and the number of empty ones skipped.

    A bad row raises here, the first in file order, before any split or size check.
    """
    kept = [rec for rec in records if formats.usable(rec, spec.format, spec.columns)]
    if not kept:
        raise DataError(f"{where}: no usable rows ({len(records)} empty or whitespace-only rows skipped)")
    return kept, len(records) - len(kept)


@dataclass
class Splits:
    train: list[data.Record]
    val: list[data.Record]
    train_where: str
    val_where: str
    skipped: dict  # empty rows skipped, per split
    key_parts: list  # what the token cache key needs of the data


def load_splits(spec: DataSpec, sweep_dir: Path) -> Splits:
    """Read train and validation records: a given validation source or split, or a seeded fraction.

    Every row is read and checked before any size check, so a bad row gets its own message, and
    empty rows are skipped before the split, so they never take a validation row's place.
    """
    src = data.resolve_source(spec.source, sweep_dir)
    records = data.read_records(src, spec.split)
    needed = formats.needed_columns(spec.format, spec.columns)
    data.check_columns(records, needed, src)
    records, skipped = usable_rows(records, spec, src.location)
    key_parts: list = [src.kind, src.digest(), spec.split]
    if spec.validation or spec.validation_split:
        vsrc = data.resolve_source(spec.validation, sweep_dir) if spec.validation else src
        val = data.read_records(vsrc, spec.validation_split or spec.split)
        if not val:
            raise DataError(f"{vsrc.location}: the validation data is empty (dataset.validation)")
        data.check_columns(val, needed, vsrc, "dataset.columns")
        val, val_skipped = usable_rows(val, spec, vsrc.location)
        train, val_where = records, vsrc.location
        key_parts += [vsrc.digest(), spec.validation_split]
    else:
        train, val = data.split(records, spec.val_fraction, spec.seed, src.location)
        # Skipped before the split, so they are the source's: counted with the training split.
        val_where, val_skipped = f"{src.location} (validation fraction {spec.val_fraction:g})", 0
        key_parts += [spec.val_fraction, spec.seed]
    return Splits(train[: spec.max_train_rows], val[: spec.max_val_rows], src.location, val_where,
                  {"train": skipped, "validation": val_skipped}, key_parts)


def check_batches_fit(spec: DataSpec, train: dict, where: str) -> None:
    """The largest batch any trial can ask for must fit in the training split (its stats)."""
    largest = spec.largest_batch_size
    usable = train["rows"]
    # Only naive packing turns rows into fewer, full sequences; padding-free batches count rows.
    if spec.naive_packing:
        usable = min(usable, train["tokens"] // spec.max_seq_length)
    if usable < largest:
        raise DataError(f"{where}: {usable} training {'sequences' if spec.naive_packing else 'rows'}, fewer than one "
                        f"batch of {largest} (search_space.batch_size); add data or lower the batch size")


@dataclass
class Tokens:
    """The tokenized splits of a dataset, as cached."""

    train_tokens: str
    val_tokens: str
    stats: dict
    from_cache: bool


def prepare_tokens(spec: DataSpec, model_dir: str, sweep_dir: Path) -> Tokens:
    """Read, split and tokenize the data with ``model_dir``'s tokenizer, once per content,
    tokenizer and length (a cache hit reads nothing but the stats), then check the batches fit.

    ``model_dir`` is a model folder or a hub id, already resolved by the caller.
    """
    splits = load_splits(spec, sweep_dir)
    key = hashlib.sha256(json.dumps([
        PREPARED_VERSION, *splits.key_parts, _tokenizer_fingerprint(model_dir), spec.format, spec.columns,
        spec.template, spec.train_on_responses_only, spec.max_train_rows, spec.max_val_rows, spec.max_seq_length,
    ], default=str).encode()).hexdigest()[:16]
    cache = data.cache_root() / "tokens" / key
    stats_file = cache / "stats.json"
    from_cache = stats_file.exists()
    if not from_cache:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        train = tokenize(splits.train, spec, tok, splits.train_where, splits.skipped["train"])
        val = tokenize(splits.val, spec, tok, splits.val_where, splits.skipped["validation"])
        cache.mkdir(parents=True, exist_ok=True)
        train.save(cache / "train.npz")
        val.save(cache / "val.npz")
        write_json_atomic(stats_file, {"train": train.stats, "validation": val.stats})
    stats = json.loads(stats_file.read_text())
    # On every prepare, cache hit or not: the batch sizes searched are not part of the cache key,
    # and a batch that cannot fit would otherwise fail every trial instead of stopping here.
    check_batches_fit(spec, stats["train"], splits.train_where)
    return Tokens(str(cache / "train.npz"), str(cache / "val.npz"), stats, from_cache)
