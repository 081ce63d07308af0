"""Reload a trial's saved weights and measure their validation loss, as the trial did.

``harness eval results/<study>`` runs this on ``best/``, which holds either a LoRA adapter
(``adapter_config.json``: the base model from the study's ``prepared.json``, the adapter on it
with PEFT) or a full model (``config.json``, from ``method: full``: loaded as it is); then the
same validation rows, the same loss.
"""

from __future__ import annotations

from pathlib import Path

import unsloth  # noqa: F401  (before transformers/peft, as in a trial)

from harness.worker import loop as T
from harness.sweep.config import SweepConfig
from harness.data.prepare import Prepared


def weights_val_loss(study_dir: Path, weights_dir: Path | None = None) -> float:
    study_dir = Path(study_dir)
    weights_dir = Path(weights_dir or study_dir / "best")
    adapter = (weights_dir / "adapter_config.json").exists()
    if not adapter and not (weights_dir / "config.json").exists():
        raise FileNotFoundError(f"{weights_dir}: no adapter (adapter_config.json) or full model (config.json) here")
    cfg = SweepConfig.model_validate_json((study_dir / "sweep.json").read_text())
    prepared = Prepared.load(study_dir / "prepared.json")
    device = T.resolve_device(cfg.device)
    dtype = T.resolve_dtype(cfg.model.dtype, device)
    if adapter:
        from peft import PeftModel

        model, tokenizer = T.load_model(prepared.model_dir, cfg.max_seq_length, dtype, cfg.model.load_in_4bit)
        model = PeftModel.from_pretrained(model, str(weights_dir))
    else:
        # A full fine-tune was trained and saved unquantized: reload it the same way.
        model, tokenizer = T.load_model(str(weights_dir), cfg.max_seq_length, dtype, load_in_4bit=False)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return T.evaluate(model, T.load_rows(prepared.val_tokens), pad_id, device)

