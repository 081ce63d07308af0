"""``warm_start: {study: DIR or URL, top: K}``: begin a study with the best K configs of an
earlier one, queued before the sampler proposes any (as ``enqueue`` is), so a new search starts
from what is known instead of from random draws.

The earlier study is a results folder (its ``study.json`` names the study and its storage) or a
storage URL (``name`` picks the study when the storage holds several). Its complete, feasible
trials are ranked by their objective (the preferred one, several objectives) and the best K with
distinct parameters are taken. Their parameters must fit this sweep's search space: every
dimension searched here was searched there, each value is one of this sweep's choices or inside
its range, and a dimension searched there but fixed here had the fixed value. Otherwise a one-line
error names the key. Queued once, when the study is created (a resumed study is left as it is),
each marked ``warm_start`` with the earlier trial's number in its record. Torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna

from harness import params as hp
from harness.errors import HarnessError, SweepFileError
from harness.sweep.best import top_configs
from harness.sweep.config import Choices, SweepConfig
from harness.sweep.storage import default_storage, make_storage


def _open(cfg: SweepConfig, sweep_dir: Path) -> optuna.Study:
    ws = cfg.warm_start
    assert ws is not None
    where = ws.study
    if "://" in where or where.startswith("journal:"):
        url, name = where, ws.name
    else:
        folder = Path(where) if Path(where).is_absolute() else (sweep_dir / where)
        if not folder.is_dir() and Path(where).is_dir():
            folder = Path(where)  # relative to where the command runs
        info = folder / "study.json"
        if not info.is_file():
            raise SweepFileError(f"warm_start.study: {where}: no study there (expected results/<study> with its "
                                 "study.json, or a storage URL)")
        meta = json.loads(info.read_text())
        name = ws.name or meta["study"]
        url = meta["storage"] if "***" not in meta["storage"] else None
        url = url or default_storage(folder.resolve())
    storage = make_storage(url)
    names = optuna.get_all_study_names(storage=storage)
    if name is None:
        if len(names) != 1:
            raise SweepFileError(f"warm_start.name: the storage holds {len(names)} studies "
                                 f"({', '.join(names) or 'none'}); name one")
        name = names[0]
    if name not in names:
        raise SweepFileError(f"warm_start.name: no study {name!r} in that storage ({', '.join(names) or 'none'})")
    return optuna.load_study(study_name=name, storage=storage)


def fit(trial: optuna.trial.FrozenTrial, cfg: SweepConfig, earlier: str) -> dict[str, Any]:
    """``trial``'s parameters as this sweep's searched dimensions, or a one-line error naming the key."""
    searched, fixed = cfg.search_space.searched(), cfg.search_space.fixed()
    values = hp.typed(trial.params)
    out: dict[str, Any] = {}
    for name, dim in searched.items():
        where = f"warm_start: search_space.{name}"
        if name not in values:
            raise SweepFileError(f"{where}: study {earlier!r} did not search it (it searched "
                                 f"{', '.join(sorted(values)) or 'nothing'})")
        v = values[name]
        if isinstance(dim, Choices):
            if v not in [hp.typed({name: c})[name] for c in dim.choices]:
                raise SweepFileError(f"{where}: trial {trial.number} of {earlier!r} has {v!r}, not one of the choices "
                                     f"{dim.choices}")
        elif isinstance(v, (str, bool)) or not dim.low <= v <= dim.high:
            raise SweepFileError(f"{where}: trial {trial.number} of {earlier!r} has {v!r}, outside "
                                 f"[{dim.low:g}, {dim.high:g}]")
        out[name] = v
    for name, v in values.items():
        if name not in searched and name in fixed and hp.typed({name: fixed[name]})[name] != v:
            raise SweepFileError(f"warm_start: search_space.{name}: study {earlier!r} searched it (trial "
                                 f"{trial.number}: {v!r}); this sweep fixes it at {fixed[name]!r}")
    return out


def warm_start(study: optuna.Study, cfg: SweepConfig, sweep_dir: Path, fresh: bool) -> str | None:
    """Queue the earlier study's best configs on a study that held no trial (``fresh``; the
    sweep's ``enqueue`` baselines may just have been queued before them); a line saying what was
    taken (None when nothing was to do)."""
    if cfg.warm_start is None or not fresh:
        return None
    earlier = _open(cfg, sweep_dir)
    picked = top_configs(earlier, cfg.warm_start.top)
    if not picked:
        raise HarnessError(f"warm_start: study {earlier.study_name!r} has no complete trial to start from")
    configs = [fit(t, cfg, earlier.study_name) for t in picked]
    if len(configs) + len(cfg.enqueue) > cfg.n_trials:
        raise SweepFileError(f"warm_start.top: {len(configs)} configs and {len(cfg.enqueue)} enqueued, more than "
                             f"n_trials ({cfg.n_trials})")
    for t, config in zip(picked, configs):
        study.enqueue_trial(config, user_attrs={"enqueued": True, "warm_start": f"{earlier.study_name}#{t.number}"},
                            skip_if_exists=True)
    shown = "; ".join(f"#{t.number} ({t.value if t.value is not None else t.values[0]:.4f}): "
                      + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in c.items())
                      for t, c in zip(picked, configs))
    return (f"warm start: queued the best {len(configs)} of {len(earlier.trials)} trials of study "
            f"{earlier.study_name!r} first: {shown}")
