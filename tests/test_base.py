"""A base that learns: a preset with a pretrain recipe is pretrained from scratch on the embedded
Shakespeare on first use, cached by name, seed and recipe, and reused after; the fine-tuning text
(the King James Bible) is one the base never saw."""

import csv
import json

import pytest

from harness.data import presets, sources
from harness.worker.prepare import build_preset, preset_dir

pytestmark = pytest.mark.timeout(900)


@pytest.fixture
def small_recipe(monkeypatch, tmp_path):
    """The demo's base with a recipe small enough for a test (the real one takes minutes), in a cache of its own."""
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    spec = dict(presets.PRESETS["tiny-mistral-base"])
    spec["pretrain"] = dict(tokens=24_576, seq_len=64, batch_size=16, learning_rate=3e-3, held_out=0.005)
    monkeypatch.setitem(presets.PRESETS, "tiny-mistral-base", spec)
    return spec


@pytest.mark.slow
def test_a_pretrained_base_builds_learns_and_is_cached(small_recipe, monkeypatch):
    progress = []
    out = build_preset("tiny-mistral-base", seed=0, on_progress=progress.append)
    assert out == preset_dir("tiny-mistral-base", 0)
    record = json.loads((out / "pretrain.json").read_text())
    assert record["steps"] == 24 and record["tokens_trained"] == 24 * 16 * 64
    # What the driver's display shows while it waits: the task, its steps and the loss, to the last step.
    assert progress and all(set(p) == {"task", "step", "steps", "loss"} for p in progress)
    assert (progress[-1]["step"], progress[-1]["steps"]) == (24, 24)
    assert progress[-1]["task"].startswith("pretraining the base")
    assert record["device"] == "cpu" and record["corpus"].startswith("shakespeare")
    # From uniform guessing (ln 32768 = 10.4) to a model that knows some English, on held-out text.
    assert record["held_out_loss_initial"] > 10
    assert record["held_out_loss"] < record["held_out_loss_initial"] - 2, record
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (out / name).exists(), name
    # Cached: a second build trains nothing (the files are not rewritten).
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    import harness.worker.pretrain as pretrain

    monkeypatch.setattr(pretrain, "pretrain", lambda *a, **k: pytest.fail("a cached base was pretrained again"))
    assert build_preset("tiny-mistral-base", seed=0) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    # Another recipe is another base, in another folder.
    small_recipe["pretrain"] = dict(small_recipe["pretrain"], learning_rate=1e-3)
    assert preset_dir("tiny-mistral-base", 0) != out


def test_the_fine_tuning_text_is_the_kjv(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path))
    src = sources.resolve_source("kjv")
    with open(src.location, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) > 20_000
    assert rows[0]["text"].startswith("Genesis 1:1 In the beginning God created")
    assert rows[-1]["book"] == "Revelation"
    # Not Shakespeare: no verse of it is a line of the plays the base learns from.
    with open(sources.shakespeare_csv("speeches"), newline="", encoding="utf-8") as f:
        plays = {row["text"] for row in csv.DictReader(f)}
    assert not plays & {row["text"] for row in rows}
