"""Once per study, in its own process: resolve the model and tokenize the data.

Run as ``python -m harness.data.prepare SWEEP.json SWEEP_DIR OUT.json``. It builds a random-init preset (the
embedded ``tiny-mistral`` or a real architecture such as ``mistral-7b-v0.3``) into the cache if
needed, tokenizes the train and validation texts once (cached by content, tokenizer and max
length), and writes where everything is to ``OUT.json``. Trials only read those files.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from harness import params
from harness.data import formats, sources as data
from harness.sweep.config import Choices, Range, SweepConfig
from harness.errors import DataError, HarnessError
from harness.files import atomic_path, write_json_atomic
from harness.data.presets import PRESETS, TOKENIZER_VOCAB, is_preset

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

    def save(self, path: Path) -> None:
        write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> "Prepared":
        return cls(**json.loads(Path(path).read_text()))


def mistral_v3_tokenizer():
    """The real Mistral v3 SentencePiece tokenizer that ``mistral-common`` ships, as a fast HF tokenizer."""
    from transformers import LlamaTokenizerFast

    spec = importlib.util.find_spec("mistral_common")
    if spec is None:
        raise HarnessError("the embedded model needs the 'mistral-common' package: pip install mistral-common")
    model_file = Path(spec.submodule_search_locations[0]) / "data" / "mistral_instruct_tokenizer_240323.model.v3"
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(model_file, Path(tmp) / "tokenizer.model")
        tok = LlamaTokenizerFast.from_pretrained(tmp)
    tok.pad_token = tok.unk_token  # Mistral has no pad token; padded positions are masked anyway
    tok.padding_side = "right"
    return tok


def preset_dir(name: str, seed: int) -> Path:
    """Where a preset is cached: by name and seed, and for a pretrained base by its recipe too, so
    a changed recipe builds a new base instead of reusing an old one."""
    spec = PRESETS[name]
    suffix = ""
    if "pretrain" in spec:
        suffix = "-" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]
    return data.cache_root() / "models" / f"{name}-seed{seed}{suffix}"


def build_preset(name: str, seed: int) -> Path:
    """A model of a preset architecture with the Mistral v3 tokenizer, cached by name and seed:
    random init, or pretrained here when the preset has a ``pretrain`` recipe."""
    out = preset_dir(name, seed)
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = mistral_v3_tokenizer()
    assert len(tok) == TOKENIZER_VOCAB, len(tok)
    spec = dict(PRESETS[name])
    recipe = spec.pop("pretrain", None)
    config = AutoConfig.for_model(
        spec.pop("model_type"), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False, **spec,
    )
    if recipe is not None:
        from harness.worker import pretrain

        # Saved in bf16 when built on a GPU (what GPU trials load), fp32 on a CPU (exact CPU trials).
        save_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        with atomic_path(out) as tmp:
            tmp.mkdir(parents=True, exist_ok=True)
            pretrain.build(tmp, config, tok, pretrain.PretrainRecipe(**recipe), seed=seed, save_dtype=save_dtype)
        return out
    big = name != "tiny-mistral"
    # Large presets are initialised on the GPU in bf16: minutes on a CPU become a second there.
    device = "cuda" if big and torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if big else torch.float32
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.config.dtype = dtype
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    del model
    return out


def resolve_model_name(name: str, seed: int) -> str:
    """A preset is built (once, cached); a local folder or a hub id goes to from_pretrained as is."""
    return str(build_preset(name, seed)) if is_preset(name) else name


def resolve_model(cfg: SweepConfig) -> str:
    return resolve_model_name(cfg.model.name, cfg.seed)


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


def tokenize(records: list[data.Record], cfg: SweepConfig, tok, where: str, skipped_empty: int) -> TokenizedSplit:
    """Render each record, tokenize (BOS + segments + EOS), truncate to ``max_seq_length``.

    ``records`` are usable rows (see :func:`usable_rows`); ``skipped_empty`` is only carried into
    the stats. With ``train_on_responses_only`` a row whose response was truncated away is
    dropped and counted.
    """
    ds, max_len = cfg.dataset, cfg.max_seq_length
    columns = ds.columns.model_dump()
    rendered = [formats.render(rec, ds.format, columns, ds.template, tok) for rec in records]
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
            mask += [int(is_response or not ds.train_on_responses_only)] * len(seg)
        ids, mask = ids + eos, mask + [1] * len(eos)
        full_lengths.append(len(ids))  # before truncation: what the data holds, not what trains
        if len(ids) > max_len:
            ids, mask, truncated = ids[:max_len], mask[:max_len], truncated + 1
        if ds.train_on_responses_only and not any(mask[1:]):
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
                 if ds.train_on_responses_only else None)
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


def usable_rows(records: list[data.Record], cfg: SweepConfig, where: str) -> tuple[list[data.Record], int]:
    """The usable rows in file order and the number of empty ones skipped.

    A bad row raises here, the first in file order, before any split or size check.
    """
    ds = cfg.dataset
    columns = ds.columns.model_dump()
    kept = [rec for rec in records if formats.usable(rec, ds.format, columns)]
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


def load_splits(cfg: SweepConfig, sweep_dir: Path) -> Splits:
    """Read train and validation records: a given validation source or split, or a seeded fraction.

    Every row is read and checked before any size check, so a bad row gets its own message, and
    empty rows are skipped before the split, so they never take a validation row's place.
    """
    ds = cfg.dataset
    src = data.resolve_source(ds.source, sweep_dir)
    records = data.read_records(src, ds.split)
    needed = formats.needed_columns(ds.format, ds.columns.model_dump())
    data.check_columns(records, needed, src)
    records, skipped = usable_rows(records, cfg, src.location)
    key_parts: list = [src.kind, src.digest(), ds.split]
    if ds.validation or ds.validation_split:
        vsrc = data.resolve_source(ds.validation, sweep_dir) if ds.validation else src
        val = data.read_records(vsrc, ds.validation_split or ds.split)
        if not val:
            raise DataError(f"{vsrc.location}: the validation data is empty (dataset.validation)")
        data.check_columns(val, needed, vsrc, "dataset.columns")
        val, val_skipped = usable_rows(val, cfg, vsrc.location)
        train, val_where = records, vsrc.location
        key_parts += [vsrc.digest(), ds.validation_split]
    else:
        train, val = data.split(records, ds.val_fraction, cfg.seed, src.location)
        # Skipped before the split, so they are the source's: counted with the training split.
        val_where, val_skipped = f"{src.location} (validation fraction {ds.val_fraction:g})", 0
        key_parts += [ds.val_fraction, cfg.seed]
    return Splits(train[: ds.max_train_rows], val[: ds.max_val_rows], src.location, val_where,
                  {"train": skipped, "validation": val_skipped}, key_parts)


def check_batches_fit(cfg: SweepConfig, train: dict, where: str) -> None:
    """The largest batch the search space can ask for must fit in the training split (its stats)."""
    dim = cfg.search_space.batch_size
    largest = int(max(dim.choices) if isinstance(dim, Choices) else dim.high if isinstance(dim, Range) else dim)
    packing = cfg.search_space.packing
    # Only naive packing turns rows into fewer, full sequences; padding-free batches count rows.
    may_pack = "naive" in [params.typed({"packing": v})["packing"]
                           for v in (packing.choices if isinstance(packing, Choices) else [packing])]
    usable = train["rows"]
    if may_pack:
        usable = min(usable, train["tokens"] // cfg.max_seq_length)
    if usable < largest:
        raise DataError(f"{where}: {usable} training {'sequences' if may_pack else 'rows'}, fewer than one batch of "
                        f"{largest} (search_space.batch_size); add data or lower the batch size")


def prepare(cfg: SweepConfig, sweep_dir: Path) -> Prepared:
    start = time.perf_counter()
    model_dir = resolve_model(cfg)
    splits = load_splits(cfg, sweep_dir)
    ds = cfg.dataset
    key = hashlib.sha256(json.dumps([
        PREPARED_VERSION, *splits.key_parts, _tokenizer_fingerprint(model_dir), ds.format, ds.columns.model_dump(),
        ds.template, ds.train_on_responses_only, ds.max_train_rows, ds.max_val_rows, cfg.max_seq_length,
    ], default=str).encode()).hexdigest()[:16]
    cache = data.cache_root() / "tokens" / key
    stats_file = cache / "stats.json"
    from_cache = stats_file.exists()
    if not from_cache:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        train = tokenize(splits.train, cfg, tok, splits.train_where, splits.skipped["train"])
        val = tokenize(splits.val, cfg, tok, splits.val_where, splits.skipped["validation"])
        cache.mkdir(parents=True, exist_ok=True)
        train.save(cache / "train.npz")
        val.save(cache / "val.npz")
        write_json_atomic(stats_file, {"train": train.stats, "validation": val.stats})
    stats = json.loads(stats_file.read_text())
    # On every prepare, cache hit or not: the batch sizes searched are not part of the cache key,
    # and a batch that cannot fit would otherwise fail every trial instead of stopping here.
    check_batches_fit(cfg, stats["train"], splits.train_where)
    base = None
    if (Path(model_dir) / "pretrain.json").exists():
        base = json.loads((Path(model_dir) / "pretrain.json").read_text())
        base.pop("curve", None)
    return Prepared(
        base=base, model_dir=model_dir, train_tokens=str(cache / "train.npz"), val_tokens=str(cache / "val.npz"),
        stats=stats, prepare_s=round(time.perf_counter() - start, 3), from_cache=from_cache,
    )


def main(argv: list[str] | None = None) -> int:
    config_json, sweep_dir, out = (argv or sys.argv[1:])[:3]
    try:
        cfg = SweepConfig.model_validate_json(Path(config_json).read_text())
        prepare(cfg, Path(sweep_dir)).save(Path(out))
    except HarnessError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
