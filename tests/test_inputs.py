"""Data as users bring it: every source and format through the real tokenizer, and a clear
error for each kind of bad input (file, line or row, and what to do)."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import PG_PASSWORD, ROOT, run_cli
from harness.sweep.config import SweepConfig, parse_sweep
from harness.errors import DataError
from harness.worker.prepare import prepare

LINES = [f"Line {i}: now is the winter of our discontent, made glorious summer." for i in range(40)]


def sweep(dataset: dict, **extra) -> SweepConfig:
    return parse_sweep({"study": "inputs", "model": {"name": "tiny-mistral"}, "max_seq_length": 64,
                        "search_space": {"batch_size": 2}, "dataset": {"val_fraction": 0.1, **dataset}, **extra})


def write_csv(path, header, rows):
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    return path


def rows_of(npz_path):
    with np.load(npz_path) as z:
        tokens, offsets = z["tokens"], z["offsets"]
        mask = z["loss_mask"] if "loss_mask" in z.files else None
    return [(tokens[a:b], None if mask is None else mask[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]


@pytest.fixture(scope="module")
def tokenizer(harness_cache):
    from transformers import AutoTokenizer

    from harness.worker.prepare import build_preset

    return AutoTokenizer.from_pretrained(build_preset("tiny-mistral", 0))


# -- sources --------------------------------------------------------------------------------------

def test_every_source_kind_gives_the_same_rows(tmp_path, harness_cache):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    csv_path = write_csv(tmp_path / "d.csv", ["text"], [[t] for t in LINES])
    jsonl = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in LINES])
    pq.write_table(pa.table({"text": LINES}), tmp_path / "d.parquet")
    (tmp_path / "d.txt").write_text("\n\n".join(LINES) + "\n")
    Dataset.from_dict({"text": LINES}).save_to_disk(str(tmp_path / "ds"))
    results = [prepare(sweep({"source": str(p)}), tmp_path)
               for p in (csv_path, jsonl, tmp_path / "d.parquet", tmp_path / "d.txt", tmp_path / "ds")]
    reference = [r.tolist() for r, _ in rows_of(results[0].train_tokens)]
    assert len(reference) == 36
    for r in results[1:]:
        assert [x.tolist() for x, _ in rows_of(r.train_tokens)] == reference
        assert r.stats == results[0].stats


def test_relative_paths_are_taken_from_the_sweep_folder_and_columns_are_mapped(tmp_path, harness_cache):
    write_csv(tmp_path / "d.csv", ["id", "body"], [[i, t] for i, t in enumerate(LINES)])
    p = prepare(sweep({"source": "d.csv", "columns": {"text": "body"}}), tmp_path)
    assert p.stats["train"]["rows"] == 36 and p.stats["validation"]["rows"] == 4


def test_given_validation_file_and_datasets_split(tmp_path, harness_cache):
    from datasets import Dataset, DatasetDict

    write_csv(tmp_path / "train.csv", ["text"], [[t] for t in LINES])
    write_csv(tmp_path / "val.csv", ["text"], [[t] for t in LINES[:3]])
    p = prepare(sweep({"source": "train.csv", "validation": "val.csv"}), tmp_path)
    assert (p.stats["train"]["rows"], p.stats["validation"]["rows"]) == (40, 3)
    DatasetDict({"train": Dataset.from_dict({"text": LINES}), "dev": Dataset.from_dict({"text": LINES[:5]})}
                ).save_to_disk(str(tmp_path / "dd"))
    p = prepare(sweep({"source": "dd", "validation_split": "dev"}), tmp_path)
    assert (p.stats["train"]["rows"], p.stats["validation"]["rows"]) == (40, 5)
    with pytest.raises(DataError, match=r"no split 'test'; splits present: train, dev"):
        prepare(sweep({"source": "dd", "split": "test"}), tmp_path)


def test_hub_id_offline_says_what_to_do(tmp_path, harness_cache, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"some-org/some-data: could not load from the hub .*offline machines need a local file"):
        prepare(sweep({"source": "some-org/some-data"}), tmp_path)


# -- formats --------------------------------------------------------------------------------------

def test_instruction_records_with_loss_on_responses_only(tmp_path, tokenizer):
    items = [{"instruction": f"Name a colour ({i}).", "input": "" if i % 2 else "Be brief.", "output": f"Blue number {i}."}
             for i in range(30)]
    write_jsonl(tmp_path / "i.jsonl", items)
    p = prepare(sweep({"source": "i.jsonl", "format": "instruction", "train_on_responses_only": True}), tmp_path)
    for ids, mask in rows_of(p.train_tokens):
        text = tokenizer.decode(ids)
        assert "### Instruction:" in text and "### Response:" in text
        learned = tokenizer.decode(ids[mask.astype(bool)])
        assert learned.startswith("Blue number") and learned.endswith("</s>"), learned
        assert "Instruction" not in learned
    assert p.stats["train"]["loss_tokens"] < p.stats["train"]["tokens"]


def test_chat_records_with_named_templates(tmp_path, tokenizer):
    items = [{"messages": [{"role": "system", "content": "You are terse."},
                           {"role": "user", "content": f"Count to {i}."},
                           {"role": "assistant", "content": " ".join(map(str, range(1, i + 2)))}]} for i in range(20)]
    write_jsonl(tmp_path / "c.jsonl", items)
    for template, marker in (("chatml", "<|im_start|>user"), ("mistral", "[INST]")):
        p = prepare(sweep({"source": "c.jsonl", "format": "chat", "template": template,
                           "train_on_responses_only": True}), tmp_path)
        ids, mask = rows_of(p.train_tokens)[0]
        assert marker in tokenizer.decode(ids)
        learned = tokenizer.decode(ids[mask.astype(bool)])
        assert learned.lstrip().startswith("1") and "Count" not in learned and "terse" not in learned, learned


def test_chat_record_with_a_bad_message_names_the_line(tmp_path, harness_cache):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "wizard", "content": "hi"}]}
    write_jsonl(tmp_path / "c.jsonl", [good] * 5 + [bad] + [good] * 5)
    with pytest.raises(DataError, match=r"c.jsonl line 6: message 0 must be \{role"):
        prepare(sweep({"source": "c.jsonl", "format": "chat"}), tmp_path)


# -- bad input ------------------------------------------------------------------------------------

def test_missing_file(tmp_path, harness_cache):
    with pytest.raises(DataError, match=r"nope.csv: data file not found"):
        prepare(sweep({"source": "nope.csv"}), tmp_path)


def test_wrong_column_lists_the_columns_present(tmp_path, harness_cache):
    write_csv(tmp_path / "d.csv", ["body", "label"], [[t, 1] for t in LINES])
    with pytest.raises(DataError, match=r"d.csv: no column 'text'; columns present: body, label \(map yours under dataset.columns\)"):
        prepare(sweep({"source": "d.csv"}), tmp_path)


def test_empty_dataset(tmp_path, harness_cache):
    write_csv(tmp_path / "d.csv", ["text"], [])
    with pytest.raises(DataError, match=r"d.csv: the dataset is empty"):
        prepare(sweep({"source": "d.csv"}), tmp_path)


def test_empty_and_whitespace_rows_are_skipped_and_counted(tmp_path, harness_cache):
    write_csv(tmp_path / "d.csv", ["text"], [[t] for t in LINES] + [[""], ["   "], ["\t\n"]])
    p = prepare(sweep({"source": "d.csv", "validation": "d.csv", "max_val_rows": 2}), tmp_path)
    assert p.stats["train"]["skipped_empty"] == 3 and p.stats["train"]["rows"] == 40


def test_empty_rows_are_skipped_before_the_validation_split(tmp_path, harness_cache):
    # 30 blank rows, then 10 usable ones. Skipped after the split, the study seed's 4 validation
    # rows of 40 were all blank: "no usable rows". Skipped first, 1 of the 10 validates.
    write_csv(tmp_path / "d.csv", ["text"], [[""], ["  "], ["\t"]] * 10 + [[t] for t in LINES[:10]])
    p = prepare(sweep({"source": "d.csv"}), tmp_path)
    train, val = p.stats["train"], p.stats["validation"]
    assert (train["rows"], val["rows"]) == (9, 1)
    assert (train["skipped_empty"], val["skipped_empty"]) == (30, 0)


def test_non_utf8_bytes_give_the_line(tmp_path, harness_cache):
    path = tmp_path / "d.csv"
    path.write_bytes(b"text\n" + "".join(f"{t}\n" for t in LINES[:6]).encode() + b"caf\xe9 au lait\n")
    with pytest.raises(DataError, match=r"d.csv line 8: not UTF-8"):
        prepare(sweep({"source": "d.csv"}), tmp_path)


def test_malformed_json_line_gives_the_line(tmp_path, harness_cache):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c",}\n')
    with pytest.raises(DataError) as err:
        prepare(sweep({"source": "d.jsonl"}), tmp_path)
    assert str(err.value) == (f"{path} line 3: malformed JSON "
                              f"(Expecting property name enclosed in double quotes at column 14)")
    # json's own message ends in "at" here: said once, not "starting at at column".
    path.write_text('{"text": "a"}\n{"text": "b}\n')
    with pytest.raises(DataError) as err:
        prepare(sweep({"source": "d.jsonl"}), tmp_path)
    assert str(err.value) == f"{path} line 2: malformed JSON (Unterminated string starting at column 10)"


def test_the_first_bad_row_in_file_order_is_the_one_named(tmp_path, harness_cache):
    # Lines 2 and 16 are bad. Checked in the split's shuffled order, line 16 came first.
    items = [{"text": t} for t in LINES]
    items[1], items[15] = {"text": 2}, {"text": 16}
    write_jsonl(tmp_path / "d.jsonl", items)
    with pytest.raises(DataError, match=r"d.jsonl line 2: column 'text' holds int \(2\), expected text"):
        prepare(sweep({"source": "d.jsonl"}), tmp_path)


def test_a_bad_row_is_named_before_any_size_check(tmp_path, harness_cache):
    # 5 rows at a 0.05 validation fraction leave no validation rows, but the bad row comes first.
    items = [{"text": t} for t in LINES[:5]]
    items[3] = {"text": ["a", "list"]}
    write_jsonl(tmp_path / "d.jsonl", items)
    with pytest.raises(DataError, match=r"d.jsonl line 4: column 'text' holds list"):
        prepare(sweep({"source": "d.jsonl", "val_fraction": 0.05}), tmp_path)


def test_mixed_types_in_the_text_column(tmp_path, harness_cache):
    write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in LINES[:10]] + [{"text": 42}] + [{"text": t} for t in LINES[10:]])
    with pytest.raises(DataError, match=r"d.jsonl line 11: column 'text' holds int \(42\), expected text"):
        prepare(sweep({"source": "d.jsonl", "validation": "d.jsonl"}), tmp_path)


def test_rows_longer_than_max_seq_length_are_truncated_and_counted(tmp_path, harness_cache):
    long = " ".join(["forsooth"] * 200)
    write_csv(tmp_path / "d.csv", ["text"], [[t] for t in LINES] + [[long]] * 5)
    p = prepare(sweep({"source": "d.csv", "validation": "d.csv"}), tmp_path)
    s = p.stats["train"]
    assert s["truncated_rows"] == 5 and s["length_max"] > 64
    assert s["truncated_share"] == pytest.approx(5 / 45, abs=1e-3)
    assert max(len(ids) for ids, _ in rows_of(p.train_tokens)) == 64


def test_length_figures_are_before_truncation(tmp_path, tokenizer):
    long = " ".join(["forsooth"] * 200)
    full = len(tokenizer(long, add_special_tokens=False)["input_ids"]) + 2  # BOS and EOS
    assert full > 64
    write_csv(tmp_path / "d.csv", ["text"], [[t] for t in LINES] + [[long]])
    p = prepare(sweep({"source": "d.csv", "validation": "d.csv"}), tmp_path)
    s = p.stats["train"]
    assert s["length_max"] == full
    assert s["truncated_rows"] == 1 and s["truncated_share"] == pytest.approx(1 / 41, abs=1e-4)
    # What is stored and trains is truncated, and the token count is of that.
    stored = [len(ids) for ids, _ in rows_of(p.train_tokens)]
    assert max(stored) == 64 and s["tokens"] == sum(stored)


def test_validation_split_that_comes_out_empty(tmp_path, harness_cache):
    write_csv(tmp_path / "d.csv", ["text"], [[t] for t in LINES[:5]])
    with pytest.raises(DataError, match=r"d.csv: a validation fraction of 0.05 of 5 usable rows leaves no validation "
                                         r"rows; raise dataset.val_fraction or give dataset.validation"):
        prepare(sweep({"source": "d.csv", "val_fraction": 0.05}), tmp_path)
    with pytest.raises(DataError, match=r"d.csv: a validation fraction of 0.95 of 5 usable rows leaves no training"):
        prepare(sweep({"source": "d.csv", "val_fraction": 0.95}), tmp_path)
    write_csv(tmp_path / "v.csv", ["text"], [])
    with pytest.raises(DataError, match=r"v.csv: the validation data is empty"):
        prepare(sweep({"source": "d.csv", "validation": "v.csv"}), tmp_path)


def test_dataset_smaller_than_one_batch(tmp_path, harness_cache):
    write_csv(tmp_path / "d.csv", ["text"], [[t] for t in LINES[:4]])
    cfg = parse_sweep({"study": "s", "model": {"name": "tiny-mistral"}, "dataset": {"source": "d.csv", "validation": "d.csv"},
                       "search_space": {"batch_size": {"choices": [2, 8]}}})
    with pytest.raises(DataError, match=r"4 training rows, fewer than one batch of 8 \(search_space.batch_size\)"):
        prepare(cfg, tmp_path)


def test_batch_check_runs_on_a_token_cache_hit(tmp_path, harness_cache):
    write_csv(tmp_path / "d.csv", ["text"], [[t + " (batch check)"] for t in LINES])  # content no other test uses
    assert not prepare(sweep({"source": "d.csv"}), tmp_path).from_cache
    bigger = sweep({"source": "d.csv"}, search_space={"batch_size": {"choices": [2, 64]}})
    with pytest.raises(DataError, match=r"d.csv: 36 training rows, fewer than one batch of 64 \(search_space"):
        prepare(bigger, tmp_path)


def test_cli_data_error_is_one_line(tmp_path, harness_cache):
    write_csv(tmp_path / "d.csv", ["body"], [[t] for t in LINES])
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"study": "s", "model": {"name": "tiny-mistral"}, "dataset": {"source": "d.csv"}}))
    proc = run_cli("run", str(path), "--results-dir", str(tmp_path / "r"))
    assert proc.returncode == 2
    assert proc.stdout.strip().splitlines()[-1].startswith("error: ") and "columns present: body" in proc.stdout
    assert "Traceback" not in proc.stdout


# -- cache ----------------------------------------------------------------------------------------

def test_a_second_study_on_the_same_data_does_not_tokenize_again(tmp_path, harness_cache):
    write_csv(tmp_path / "d.csv", ["text"], [[t + " (cache)"] for t in LINES])  # content no other test uses
    first = prepare(sweep({"source": "d.csv"}), tmp_path)
    mtime = os.stat(first.train_tokens).st_mtime_ns
    other = parse_sweep({"study": "another", "model": {"name": "tiny-mistral"}, "max_seq_length": 64,
                         "search_space": {"batch_size": 2}, "dataset": {"source": "d.csv", "val_fraction": 0.1}})
    second = prepare(other, tmp_path)
    assert not first.from_cache and second.from_cache
    assert second.train_tokens == first.train_tokens and os.stat(second.train_tokens).st_mtime_ns == mtime
    third = prepare(sweep({"source": "d.csv"}, max_seq_length=32), tmp_path)  # another length: tokenized anew
    assert not third.from_cache and third.train_tokens != first.train_tokens
    write_csv(tmp_path / "d.csv", ["text"], [[t + "!"] for t in LINES])  # other content: tokenized anew
    assert not prepare(sweep({"source": "d.csv"}), tmp_path).from_cache


# -- packing and responses-only, trained for real, and secrets kept out --------------------------

@pytest.mark.slow
def test_packed_instruction_study_trains_and_keeps_secrets_out(tmp_path, harness_cache, postgres_url):
    items = [{"instruction": f"Say the number {i}.", "output": f"The number is {i}."} for i in range(120)]
    write_jsonl(tmp_path / "i.jsonl", items)
    spec = {"study": "packed", "model": {"name": "tiny-mistral", "gradient_checkpointing": False},
            "dataset": {"source": "i.jsonl", "format": "instruction", "train_on_responses_only": True,
                        "val_fraction": 0.1},
            "max_seq_length": 64, "budget": {"max_steps": 6, "eval_every": 3},
            "search_space": {"batch_size": 2, "learning_rate": 0.01, "lora_r": 4, "packing": {"choices": [True, False]}},
            "sampler": {"name": "grid"}, "pruner": {"name": "none"}, "n_trials": 2,
            "wandb": {"mode": "offline"}, "storage": postgres_url}
    (tmp_path / "packed.yaml").write_text(yaml.safe_dump(spec))
    wandb_key = "0123456789abcdef0123456789abcdef01234567"
    env = dict(os.environ, WANDB_API_KEY=wandb_key)
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "run", str(tmp_path / "packed.yaml"),
                           "--results-dir", str(tmp_path / "results")],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import optuna
    import polars as pl

    study = optuna.load_study(study_name="packed", storage=postgres_url)
    assert sorted(t.params["packing"] for t in study.trials) == [False, True]
    for t in study.trials:
        assert t.state == optuna.trial.TrialState.COMPLETE, t.user_attrs
        assert np.isfinite(t.value) and t.user_attrs["steps"] == 6
    packed = next(t for t in study.trials if t.params["packing"])
    plain = next(t for t in study.trials if not t.params["packing"])
    # Packed batches are full 64-token rows: more tokens per step than padded short records.
    assert packed.user_attrs["tokens_trained"] > plain.user_attrs["tokens_trained"]
    df = pl.read_parquet(tmp_path / "results" / "packed" / "trials.parquet")
    assert df.height == 2 and "param_packing" in df.columns
    # Secrets: neither the W&B key nor the storage password appears anywhere the run wrote or printed.
    assert "***" in proc.stdout and PG_PASSWORD not in proc.stdout + proc.stderr
    for path in (tmp_path / "results").rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            assert PG_PASSWORD.encode() not in blob, path
            assert wandb_key.encode() not in blob, path
