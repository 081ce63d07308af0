"""The two ways to get a LoRA model: Unsloth, and plain transformers + PEFT (the baseline); and
Unsloth's full fine-tuning (``method: full``).

Each loader imports its stack inside the function: a process that only ever calls
:func:`load_hf` never imports unsloth, so it measures transformers as it is, unpatched.
"""

from __future__ import annotations

from typing import Any

def gradient_checkpointing(value: Any) -> Any:
    """Sweep-file values ("unsloth", "true", "false", bools) as the loaders take them."""
    return {"true": True, "false": False}.get(value, value) if isinstance(value, str) else value


def load_unsloth(model_dir: str, *, max_seq_length: int, dtype, load_in_4bit: bool, lora_r: int, lora_alpha: int,
                 lora_dropout: float, target_modules: list[str], checkpointing: Any, seed: int):
    """``FastLanguageModel.from_pretrained`` + ``get_peft_model``. Returns (model, tokenizer)."""
    import unsloth  # noqa: F401  (before transformers/peft: it patches them)
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=model_dir, max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=load_in_4bit,
    )
    model = FastLanguageModel.get_peft_model(
        model, r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
        bias="none", use_gradient_checkpointing=gradient_checkpointing(checkpointing), random_state=seed,
    )
    return model, tokenizer


def load_unsloth_full(model_dir: str, *, max_seq_length: int, dtype, checkpointing: Any):
    """``FastLanguageModel.from_pretrained(..., full_finetuning=True)``: no adapters, every weight
    trainable. Returns (model, tokenizer).

    Unsloth does full fine-tuning itself (on a GPU through ``FastModel``; on a machine without
    one, its CPU backend loads the transformers model and marks every parameter trainable), so
    no plain-transformers path is needed. Gradient checkpointing is Unsloth's to apply here,
    since there is no ``get_peft_model`` to pass it to. Never quantized: a full fine-tune updates
    the weights themselves (Unsloth turns 4-bit off for full fine-tuning anyway; we say so by
    not asking).
    """
    import unsloth  # noqa: F401  (before transformers/peft: it patches them)
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=model_dir, max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=False,
        full_finetuning=True, use_gradient_checkpointing=gradient_checkpointing(checkpointing),
    )
    for param in model.parameters():  # "every weight": whatever a backend left frozen is trained too
        param.requires_grad_(True)
    return model, tokenizer


def load_hf(model_dir: str, *, dtype, lora_r: int, lora_alpha: int, lora_dropout: float,
            target_modules: list[str], checkpointing: Any, seed: int, device: str):
    """transformers ``AutoModelForCausalLM`` (SDPA attention) + PEFT LoRA, as a user writes it by hand."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(device)
    if gradient_checkpointing(checkpointing):  # "unsloth" means: on, the standard way
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                             target_modules=target_modules, bias="none", task_type="CAUSAL_LM"))
    return model, AutoTokenizer.from_pretrained(model_dir)
