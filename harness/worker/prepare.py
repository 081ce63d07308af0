"""Once per study: resolve the model (building a preset if needed), then tokenize the data.

:func:`prepare_study` runs inside a worker process, or as ``python -m harness.worker.prepare
SWEEP.json SWEEP_DIR OUT.json`` (the driver never imports torch). A preset is built into the
cache on first use: random init (the embedded ``tiny-mistral``, or a real architecture such as
``mistral-7b-v0.3``), or pretrained here (:mod:`harness.worker.pretrain`) when it has a recipe.
The data is read, split and tokenized by :mod:`harness.data.prepare`, which takes the sweep's
:class:`~harness.data.spec.DataSpec` and knows nothing of trials or workers. ``OUT.json`` says
where everything is (:class:`~harness.data.prepare.Prepared`); trials only read those files.

Torch is imported only when a preset has to be built: with the model and tokens cached, preparing
takes a fraction of a second.
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
from pathlib import Path
from typing import Callable

from harness import env
from harness.data import sources
from harness.data.prepare import Prepared, prepare_tokens
from harness.data.presets import PRESETS, TOKENIZER_VOCAB, is_preset
from harness.errors import HarnessError
from harness.files import atomic_path, write_json_atomic
from harness.sweep.config import SweepConfig

Progress = Callable[[dict], None]  # {"task", "step", "steps", "loss"}, as the progress file holds them

PRETRAIN_TASK = "pretraining the base on Shakespeare"
PROGRESS_EVERY_S = 0.5  # progress at most this often (and at the last step): the driver polls its file


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


def preset_spec(name: str, pretrain: dict | None = None) -> dict:
    """A preset's spec, its pretraining recipe changed by ``pretrain`` (the sweep file's
    ``model.pretrain``: tokens, seq_len, batch_size, learning_rate, held_out)."""
    spec = dict(PRESETS[name])
    if pretrain:
        spec["pretrain"] = {**spec["pretrain"], **pretrain}
    return spec


def preset_dir(name: str, seed: int, pretrain: dict | None = None) -> Path:
    """Where a preset is cached: by name and seed, and for a pretrained base by its recipe too, so
    a changed recipe builds a new base instead of reusing an old one."""
    spec = preset_spec(name, pretrain)
    suffix = ""
    if "pretrain" in spec:
        suffix = "-" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]
    return sources.cache_root() / "models" / f"{name}-seed{seed}{suffix}"


def _pretrain_steps(on_progress: Progress | None):
    """Pretraining's (step, steps, loss) callback as progress dicts, at most every PROGRESS_EVERY_S."""
    if on_progress is None:
        return None
    last = [0.0]

    def on_step(step: int, steps: int, loss: float) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_EVERY_S or step == steps:
            last[0] = now
            on_progress({"task": PRETRAIN_TASK, "step": step, "steps": steps, "loss": round(loss, 4)})
    return on_step


def build_preset(name: str, seed: int, on_progress: Progress | None = None, pretrain: dict | None = None) -> Path:
    """A model of a preset architecture with the Mistral v3 tokenizer, cached by name and seed:
    random init, or pretrained here when the preset has a ``pretrain`` recipe (changed by
    ``pretrain``; ``on_progress`` follows its steps)."""
    out = preset_dir(name, seed, pretrain)
    if (out / "config.json").exists():
        return out
    import filelock

    # One build per folder at a time, whoever builds it (a study's preparation, a bench, another
    # cache that links this models folder): a second build would replace the folder under a reader.
    out.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(out.parent / f".{out.name}.lock")):
        if (out / "config.json").exists():
            return out
        return _build_preset(out, name, pretrain, seed, on_progress)


def _build_preset(out: Path, name: str, pretrain: dict | None, seed: int, on_progress: Progress | None) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = mistral_v3_tokenizer()
    assert len(tok) == TOKENIZER_VOCAB, len(tok)
    spec = preset_spec(name, pretrain)
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
            pretrain.build(tmp, config, tok, pretrain.PretrainRecipe(**recipe), seed=seed, save_dtype=save_dtype,
                           on_step=_pretrain_steps(on_progress))
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


def resolve_model_name(name: str, seed: int, on_progress: Progress | None = None, pretrain: dict | None = None) -> str:
    """A preset is built (once, cached); a local folder or a hub id goes to from_pretrained as is."""
    return str(build_preset(name, seed, on_progress, pretrain)) if is_preset(name) else name


def resolve_model(cfg: SweepConfig, on_progress: Progress | None = None) -> str:
    pretrain = cfg.model.pretrain.model_dump(exclude_none=True) if cfg.model.pretrain else None
    return resolve_model_name(cfg.model.name, cfg.seed, on_progress, pretrain)


def prepare(cfg: SweepConfig, sweep_dir: Path, on_progress: Progress | None = None) -> Prepared:
    """The study's model and tokenized data (``sweep_dir``: where relative data paths start)."""
    start = time.perf_counter()
    cached = not is_preset(cfg.model.name) or (preset_dir(
        cfg.model.name, cfg.seed, cfg.model.pretrain.model_dump(exclude_none=True) if cfg.model.pretrain else None)
        / "config.json").exists()
    model_dir = resolve_model(cfg, on_progress)
    built_s = 0.0 if cached else time.perf_counter() - start
    tokens = prepare_tokens(cfg.data_spec(), model_dir, sweep_dir)
    base = None
    if (Path(model_dir) / "pretrain.json").exists():
        base = json.loads((Path(model_dir) / "pretrain.json").read_text())
        base.pop("curve", None)
    return Prepared(
        base=base, model_dir=model_dir, train_tokens=tokens.train_tokens, val_tokens=tokens.val_tokens,
        stats=tokens.stats, prepare_s=round(time.perf_counter() - start, 3), from_cache=tokens.from_cache,
        built_s=round(built_s, 3),
    )


def prepare_study(cfg: SweepConfig, sweep_dir: Path, out: Path, on_progress: Progress | None = None) -> Prepared:
    """:func:`prepare`, written to ``out`` (the study's prepared.json) for its trials to read.

    One at a time per cache: drivers of one study started together (a Slurm array's tasks on a
    shared cache) would otherwise build the same preset side by side, one replacing the folder
    another is reading. A cache hit takes a fraction of a second, so the others hardly wait."""
    import filelock

    sources.cache_root().mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(sources.cache_root() / "prepare.lock")):
        prepared = prepare(cfg, sweep_dir, on_progress)
    prepared.save(Path(out))
    return prepared


def progress_file(path: str | None) -> Progress | None:
    """Progress written to ``path`` (the driver shows it live while it waits; this process's own
    output goes to a log)."""
    if not path:
        return None
    return lambda progress: write_json_atomic(Path(path), progress)


def main(argv: list[str] | None = None) -> int:
    config_json, sweep_dir, out = (argv or sys.argv[1:])[:3]
    try:
        cfg = SweepConfig.model_validate_json(Path(config_json).read_text())
        prepare_study(cfg, Path(sweep_dir), Path(out), progress_file(os.environ.get(env.PREPARE_PROGRESS)))
    except HarnessError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
