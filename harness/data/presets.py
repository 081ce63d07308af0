"""Architectures that can be built with random weights, so memory and speed can be measured with
no download. Plain data: this module imports nothing heavy.

Every preset is paired with the real Mistral v3 tokenizer (32768 tokens, shipped by
``mistral-common``); a preset with a larger vocabulary keeps its own embedding size, so memory and
speed stay those of the real model, and the tokenizer's ids all fall inside it.
``tiny-mistral`` is the embedded default: small enough to train on two CPU cores in seconds.

A preset with a ``pretrain`` recipe is a *base that learns*: the harness pretrains it from
scratch on the embedded Shakespeare once per machine (:mod:`harness.worker.pretrain`) and caches
it; fine-tuned on the King James Bible (``dataset.source: kjv``, text it never saw), its loss
falls well below the base's. ``tiny-mistral-base`` builds on two CPU cores in a few minutes (the
demo's model); ``mistral-125m-base`` builds on a GPU in a minute or two (the literature study).
"""

from __future__ import annotations

TOKENIZER_VOCAB = 32768  # the Mistral v3 tokenizer every preset is paired with

PRESETS: dict[str, dict] = {
    "tiny-mistral": dict(
        model_type="mistral", vocab_size=32768, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rope_theta=10000.0,
        # With HF's default 0.02, logits of a 128-wide model stay within about ±2.5, so a LoRA on
        # a frozen random base cannot move the loss far from uniform; 0.1 leaves room to learn.
        initializer_range=0.1,
    ),
    # Pretrained here (see above): the tiny shape with the usual 0.02 init, ~0.4 passes over
    # Shakespeare in a few minutes on two CPU cores.
    "tiny-mistral-base": dict(
        model_type="mistral", vocab_size=32768, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rope_theta=10000.0,
        pretrain=dict(tokens=400_000, seq_len=128, batch_size=16, learning_rate=3e-3),
    ),
    # ~125M parameters (GPT-2 small's width and depth, Mistral's GQA and vocabulary), pretrained
    # on a GPU: about three passes over Shakespeare.
    "mistral-125m-base": dict(
        model_type="mistral", vocab_size=32768, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=4096, rope_theta=10000.0,
        pretrain=dict(tokens=4_000_000, seq_len=512, batch_size=32, learning_rate=1e-3),
    ),
    # A ~1.1B Mistral shape (TinyLlama's dimensions with Mistral's vocabulary).
    "mistral-1b": dict(
        model_type="mistral", vocab_size=32768, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-5, sliding_window=None,
    ),
    # Mistral-7B-v0.3's config.json.
    "mistral-7b-v0.3": dict(
        model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-5, sliding_window=None,
    ),
    # Llama-3.1-8B's config.json.
    "llama-3.1-8b": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
        rms_norm_eps=1e-5, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    ),
    # Qwen2.5-7B's config.json.
    "qwen2.5-7b": dict(
        model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-6, use_sliding_window=False,
    ),
}


def is_preset(name: str) -> bool:
    return name in PRESETS
