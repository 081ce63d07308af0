"""Reload a saved adapter and measure its validation loss, as the trial did.

``harness eval results/<study>`` runs this on ``best/``: the base model from the study's
``prepared.json``, the adapter with PEFT, the same validation rows, the same loss.
"""

from __future__ import annotations

from pathlib import Path

from harness.worker import loop as T
from harness.sweep.config import SweepConfig
from harness.data.prepare import Prepared


def adapter_val_loss(study_dir: Path, adapter_dir: Path | None = None) -> float:
    from peft import PeftModel

    study_dir = Path(study_dir)
    adapter_dir = Path(adapter_dir or study_dir / "best")
    if not (adapter_dir / "adapter_config.json").exists():
        raise FileNotFoundError(f"{adapter_dir}: no adapter here (adapter_config.json missing)")
    cfg = SweepConfig.model_validate_json((study_dir / "sweep.json").read_text())
    prepared = Prepared.load(study_dir / "prepared.json")
    device = T.resolve_device(cfg.device)
    dtype = T.resolve_dtype(cfg.model.dtype, device)
    model, tokenizer = T.load_model(prepared.model_dir, cfg.max_seq_length, dtype, cfg.model.load_in_4bit)
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return T.evaluate(model, T.load_rows(prepared.val_tokens), pad_id, device)
