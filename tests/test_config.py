"""Malformed sweep files: one clear line naming the file and the key's path, exit code 2."""

from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run_cli
from harness.sweep.config import Choices, Range, load_sweep
from harness.errors import SweepFileError

VALID = {"study": "s", "model": {"name": "tiny-mistral"}}


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "sweep.yaml"
    p.write_text(text)
    return p


def with_(**changes):
    d = yaml.safe_load(yaml.safe_dump(VALID))
    for dotted, value in changes.items():
        node = d
        *parents, last = dotted.split("__")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = value
    return yaml.safe_dump(d)


BAD = [
    ("unknown key", with_(modle={"name": "x"}), "modle: unknown key"),
    ("nested unknown key", with_(budget__max_stpes=3), "budget.max_stpes: unknown key"),
    ("wrong type", with_(n_trials="many"), "n_trials:"),
    ("empty choices", with_(search_space__lora_r={"choices": []}), "search_space.lora_r.choices"),
    ("low > high", with_(search_space__learning_rate={"low": 0.1, "high": 0.01}), "search_space.learning_rate: low (0.1) is greater than high (0.01)"),
    ("log range touching 0", with_(search_space__learning_rate={"low": 0.0, "high": 0.01, "log": True}), "search_space.learning_rate: a log range needs low > 0"),
    ("unknown sampler", with_(sampler={"name": "bayes"}), "sampler.name:"),
    ("unknown pruner", with_(pruner={"name": "asha"}), "pruner.name:"),
    ("missing model", "study: s\n", "model: Field required"),
    ("n_trials <= 0", with_(n_trials=0), "n_trials: Input should be greater than 0"),
    ("bad storage URL", with_(storage="redis://localhost"), "storage: expected sqlite:///path.db, postgresql://"),
    ("python tag", "study: s\nmodel: !!python/object/apply:os.system ['echo pwned']\n", "not valid YAML or uses a tag that is not allowed"),
    ("not a mapping", "- a\n- b\n", "expected a mapping"),
    ("non-integer batch", with_(search_space__batch_size={"choices": [2, 2.5]}), "search_space.batch_size: expected a positive integer"),
    ("unknown method", with_(search_space__method={"choices": ["lora", "qlora"]}), "search_space.method: expected one of lora, full, got 'qlora'"),
    ("grid over a float range", with_(sampler={"name": "grid"}), "search_space.learning_rate: the grid sampler needs choices"),
    ("unknown packing", with_(search_space__packing={"choices": ["none", "sorted"]}),
     "search_space.packing: expected one of none, naive, padding_free (or true: naive / false: none), got 'sorted'"),
    ("unknown batching", with_(search_space__batching="by_length"), "search_space.batching: expected one of random, length_grouped"),
    ("token cap below a row", with_(max_seq_length=512, search_space__max_tokens_per_batch=256),
     "search_space.max_tokens_per_batch: 256 is below max_seq_length (512)"),
    ("bad study name", with_(study="a/b"), "study:"),
    ("enqueue a fixed key", with_(enqueue=[{"lora_alpha": 8}]), "enqueue.0.lora_alpha: search_space fixes it at 16"),
    ("enqueue an unknown key", with_(enqueue=[{"learning_rate": 1e-3, "lr": 1}]), "enqueue.0.lr: not a search_space dimension"),
    ("enqueue off the choices", with_(search_space__batch_size={"choices": [2, 4]}, enqueue=[{"batch_size": 8}]),
     "enqueue.0.batch_size: 8 is not one of the choices [2, 4]"),
    ("enqueue more than n_trials", with_(n_trials=1, enqueue=[{"lora_r": 8}, {"lora_r": 16}]),
     "enqueue: 2 configs, more than n_trials (1)"),
    ("enqueue out of range", with_(enqueue=[{"learning_rate": 2e-4}, {"learning_rate": 1.0}]),
     "enqueue.1.learning_rate: 1.0 is outside the range"),
]


@pytest.mark.parametrize("text,expected", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_sweep_names_the_key(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(SweepFileError) as err:
        load_sweep(path)
    msg = str(err.value)
    assert msg.startswith(str(path)), msg
    assert expected in msg, msg
    assert "\n" not in msg


def test_cli_prints_one_line_and_exits_2(tmp_path):
    path = write(tmp_path, with_(search_space__learning_rate={"low": 0.1, "high": 0.01}))
    proc = run_cli("run", str(path), "--results-dir", str(tmp_path / "r"))
    assert proc.returncode == 2
    lines = [l for l in proc.stdout.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "learning_rate" in lines[0], proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "r").exists(), "nothing is created for a sweep file that does not validate"


def test_python_tag_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = write(tmp_path, f"study: s\nmodel: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(SweepFileError):
        load_sweep(path)
    assert not marker.exists()


def test_missing_file():
    with pytest.raises(SweepFileError, match="sweep file not found"):
        load_sweep("nope/missing.yaml")


def test_shipped_sweeps_validate():
    for path in (ROOT / "sweeps").glob("*.yaml"):
        load_sweep(path)
    demo = load_sweep(ROOT / "sweeps" / "demo.yaml")
    assert demo.model.name == "tiny-mistral-base" and demo.dataset.source == "kjv" and demo.n_trials >= 4
    assert isinstance(demo.search_space.learning_rate, Range) and demo.search_space.learning_rate.log
    assert isinstance(demo.search_space.lora_r, Choices)


def test_enqueued_configs_run_first_once(tmp_path):
    """The sweep file's enqueued configs are the study's first trials, sampled dimensions they leave
    out are filled in, and a resumed study does not queue them again."""
    import optuna

    from harness.sweep.driver import _next_trial
    from harness.sweep.study import create_study, enqueue_first, suggest

    text = with_(search_space__batch_size={"choices": [2, 4, 8]},
                 enqueue=[{"batch_size": 8, "learning_rate": 3e-4}, {"batch_size": 2}])
    cfg = load_sweep(write(tmp_path, text))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = create_study(cfg, url)
    assert enqueue_first(study, cfg) == 2
    first = suggest(_next_trial(study, cfg), cfg)
    second = suggest(_next_trial(study, cfg), cfg)
    assert (first["batch_size"], first["learning_rate"]) == (8, 3e-4)
    assert second["batch_size"] == 2 and cfg.search_space.learning_rate.low <= second["learning_rate"] <= cfg.search_space.learning_rate.high
    assert all(t.user_attrs.get("enqueued") for t in study.get_trials())
    resumed = create_study(cfg, url)
    assert enqueue_first(resumed, cfg) == 0
    assert len(resumed.get_trials(states=(optuna.trial.TrialState.WAITING,))) == 0
