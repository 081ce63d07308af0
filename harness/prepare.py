"""Once per study, in its own process: resolve the model and tokenize the data.

Run as ``python -m harness.prepare SWEEP.json SWEEP_DIR OUT.json``. It builds a random-init preset (the
embedded ``tiny-mistral`` or a real architecture such as ``mistral-7b-v0.3``) into the cache if
needed, tokenizes the train and validation texts once (cached by content, tokenizer and max
length), and writes where everything is to ``OUT.json``. Trials only read those files.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from harness import data
from harness.config import SweepConfig
from harness.errors import HarnessError
from harness.presets import PRESETS, VOCAB_SIZE, is_preset

PREPARED_VERSION = 1


@dataclass
class Prepared:
    """What every trial of a study reads: the model folder and the tokenized splits."""

    model_dir: str
    train_tokens: str
    val_tokens: str
    train_rows: int
    val_rows: int
    train_token_count: int
    val_token_count: int
    truncated_rows: int
    prepare_s: float

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)

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


def build_preset(name: str, seed: int) -> Path:
    """A random-init model of a preset architecture with the Mistral v3 tokenizer, cached by name and seed."""
    out = data.cache_root() / "models" / f"{name}-seed{seed}"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    tok = mistral_v3_tokenizer()
    assert len(tok) == VOCAB_SIZE, len(tok)
    config = MistralConfig(
        vocab_size=VOCAB_SIZE, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False, **PRESETS[name],
    )
    big = name != "tiny-mistral"
    # Large presets are initialised on the GPU in bf16: minutes on a CPU become a second there.
    device = "cuda" if big and torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if big else torch.float32
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = MistralForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    config.torch_dtype = dtype
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    del model
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def resolve_model(cfg: SweepConfig) -> str:
    name = cfg.model.name
    if is_preset(name):
        return str(build_preset(name, cfg.seed))
    return name  # a local folder or a hub id; from_pretrained resolves it


def _tokenize(tok, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray, int]:
    """BOS + text + EOS per row, truncated to ``max_len``. Returns flat ids, row offsets, rows truncated."""
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    rows, truncated = [], 0
    for row in ids:
        row = [tok.bos_token_id, *row, tok.eos_token_id]
        if len(row) > max_len:
            row, truncated = row[:max_len], truncated + 1
        rows.append(row)
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    flat = np.fromiter((t for r in rows for t in r), dtype=np.int32, count=int(offsets[-1]))
    return flat, offsets, truncated


def _save_tokens(path: Path, flat: np.ndarray, offsets: np.ndarray) -> None:
    tmp = path.with_name(path.stem + f".tmp{os.getpid()}.npz")
    np.savez(tmp, tokens=flat, offsets=offsets)
    os.replace(tmp, path)


def prepare(cfg: SweepConfig, sweep_dir: Path) -> Prepared:
    start = time.perf_counter()
    model_dir = resolve_model(cfg)
    ds = cfg.dataset
    train_path = data.resolve_source(ds.source, sweep_dir)
    val_path = data.resolve_source(ds.validation, sweep_dir) if ds.validation else None

    key = hashlib.sha256(json.dumps([
        PREPARED_VERSION, data.file_digest(train_path), val_path and data.file_digest(val_path),
        model_dir, ds.text_column, ds.val_fraction, ds.max_train_rows, ds.max_val_rows,
        cfg.max_seq_length, cfg.seed,
    ]).encode()).hexdigest()[:16]
    cache = data.cache_root() / "tokens" / key
    stats_file = cache / "stats.json"
    if not stats_file.exists():
        from transformers import AutoTokenizer

        texts = data.read_texts(train_path, ds.text_column)
        if val_path:
            train, val = texts, data.read_texts(val_path, ds.text_column)
        else:
            train, val = data.split(texts, ds.val_fraction, cfg.seed)
        train, val = train[: ds.max_train_rows], val[: ds.max_val_rows]
        tok = AutoTokenizer.from_pretrained(model_dir)
        cache.mkdir(parents=True, exist_ok=True)
        stats = {"train_rows": len(train), "val_rows": len(val), "truncated_rows": 0}
        for split_name, texts_ in (("train", train), ("val", val)):
            flat, offsets, truncated = _tokenize(tok, texts_, cfg.max_seq_length)
            _save_tokens(cache / f"{split_name}.npz", flat, offsets)
            stats[f"{split_name}_token_count"] = int(flat.size)
            stats["truncated_rows"] += truncated
        stats_file.write_text(json.dumps(stats))
    stats = json.loads(stats_file.read_text())
    return Prepared(
        model_dir=model_dir, train_tokens=str(cache / "train.npz"), val_tokens=str(cache / "val.npz"),
        prepare_s=round(time.perf_counter() - start, 3), **stats,
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
