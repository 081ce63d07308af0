"""Architectures that can be built with random weights, so memory and speed can be measured with
no download. Plain data: this module imports nothing heavy.

``tiny-mistral`` is the embedded default: small enough to train on two CPU cores in seconds, with
the real Mistral v3 tokenizer (32768 tokens).
"""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    "tiny-mistral": dict(
        hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, rope_theta=10000.0,
        # With HF's default 0.02, logits of a 128-wide model stay within about ±2.5, so a LoRA on
        # a frozen random base cannot move the loss far from uniform; 0.1 leaves room to learn.
        initializer_range=0.1,
    ),
    # Mistral-7B-v0.3's config.json (vocab 32768, the v3 tokenizer's size).
    "mistral-7b-v0.3": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-5, sliding_window=None,
    ),
}

VOCAB_SIZE = 32768  # the Mistral v3 tokenizer every preset is paired with


def is_preset(name: str) -> bool:
    return name in PRESETS
