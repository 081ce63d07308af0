"""Padding-free packing, length-aware batching and the packing modes, on CPU.

A padding-free micro-batch (rows concatenated into one sequence, position ids restarting at each
row, the first label of each row masked) must give every row the loss it has alone; naive packing
(the same tokens, attention across rows) must not, so the comparison can fail. Then the training
loop end to end on a tiny model: padding-free and padded trials of the same seed train the same
rows to the same losses, only without the padding. Then the batch stream's options, and the sweep
file's keys. No Unsloth here except in the last test, which runs real trials through the CLI.
"""

from __future__ import annotations

import numpy as np
import optuna
import pytest
import torch
import yaml

from conftest import run_cli
from harness.params import TrainParams
from harness.worker.batching import (BatchStream, collate, collate_for, collate_padding_free, pack,
                                     predicted_tokens, token_counts)
from harness.worker.step import DataBudget, accumulate
from test_arithmetic import PAD, RTOL, ATOL, VOCAB, assert_grads_close, make_rows, reference, take_grads, tiny_model

# Lengths from 2 to 14, so rows straddle each other and the last rows see many earlier tokens.
LENGTHS = (5, 11, 3, 14, 7, 4, 12, 6, 2, 9)


def row_losses_alone(model, rows) -> list[float]:
    """Each row's summed next-token loss (where its mask counts), run by itself, float64."""
    out = []
    with torch.no_grad():
        for ids, mask in rows:
            x = torch.from_numpy(ids.astype(np.int64))[None]
            logits = model(input_ids=x).logits[0].double()
            counted = torch.ones(len(ids) - 1, dtype=torch.bool) if mask is None else torch.from_numpy(mask[1:].astype(bool))
            out.append(float(torch.nn.functional.cross_entropy(logits[:-1], x[0, 1:], reduction="none")[counted].sum()))
    return out


def row_losses_packed(model, rows, batch) -> list[float]:
    """Each row's summed loss read from one packed forward: the logits of its own positions, and
    only its labels (the labels of ``batch``, which decide what counts)."""
    kwargs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**kwargs).logits[0].double()
    labels = batch["labels"][0]
    out, start = [], 0
    for ids, _ in rows:
        end = start + len(ids)
        seg_logits, seg_labels = logits[start : end - 1], labels[start + 1 : end]
        keep = seg_labels != -100
        out.append(float(torch.nn.functional.cross_entropy(seg_logits[keep], seg_labels[keep], reduction="sum")))
        start = end
    return out


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_padding_free_rows_each_get_their_own_loss_and_naive_packing_does_not(attention):
    rows = make_rows(lengths=LENGTHS)  # every other row has a loss mask (a "prompt" left out)
    model = tiny_model(lora=True)
    model.base_model.model.config._attn_implementation = attention
    model.eval()
    alone = row_losses_alone(model, rows)

    batch = collate_padding_free(rows, "cpu")
    assert batch["input_ids"].shape == (1, sum(LENGTHS))  # one sequence, not one token of padding
    assert batch["position_ids"][0].tolist() == [i for n in LENGTHS for i in range(n)]
    assert batch["packed_seq_lengths"].tolist() == list(LENGTHS)
    # What Unsloth's packed forward reads, beside transformers' collator's own keys (README).
    assert batch["packed_seq_lengths"].dtype == torch.int32 and batch["use_cache"] is False
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["position_ids"].dtype == torch.int64
    starts = np.cumsum((0,) + LENGTHS[:-1])
    assert (batch["labels"][0, starts] == -100).all()  # no row's first token is predicted from the row before
    packed = row_losses_packed(model, rows, batch)
    np.testing.assert_allclose(packed, alone, rtol=1e-9, atol=1e-12)

    # Naive packing: the same tokens in one sequence, positions running on and attention across
    # rows. The first row is unchanged (nothing precedes it); every later row's loss moves.
    naive = row_losses_packed(model, rows, {"input_ids": batch["input_ids"], "labels": batch["labels"]})
    assert naive[0] == pytest.approx(alone[0], rel=1e-9)
    off = [abs(a - b) / abs(b) for a, b in zip(naive[1:], alone[1:]) if b]
    assert min(off) > 1e-6 and max(off) > 1e-2, off


def test_padding_free_loss_and_gradients_equal_the_rows_run_alone():
    """The model's own loss over a padding-free micro-batch (as the loop trains it): the token
    mean over the rows alone, and its gradients, to float32 accuracy; split into two packed
    micro-batches and weighted by ``accumulate``, the same."""
    rows = make_rows(lengths=LENGTHS)
    model = tiny_model()
    ref_loss, ref_count, ref_grads = reference(model, rows)

    one = [collate_padding_free(rows, "cpu")]
    assert predicted_tokens(one[0]) == ref_count  # the count the mean divides by: boundaries excluded
    loss, n = accumulate(model, one)
    assert n == ref_count and loss == pytest.approx(ref_loss, rel=RTOL)
    assert_grads_close(take_grads(model), ref_grads, RTOL, ATOL)

    two = [collate_padding_free(rows[:4], "cpu"), collate_padding_free(rows[4:], "cpu")]
    loss2, n2 = accumulate(model, two)
    assert n2 == ref_count and loss2 == pytest.approx(ref_loss, rel=RTOL)
    assert_grads_close(take_grads(model), ref_grads, RTOL, ATOL)

    # The boundary mask has teeth: counting each row's first token as a target of the row before
    # adds terms the rows alone never have.
    leaky = collate_padding_free(rows, "cpu")
    for start in np.cumsum((0,) + LENGTHS[:-1])[1:]:
        leaky["labels"][0, start] = leaky["input_ids"][0, start]
    loss3, n3 = accumulate(model, [leaky])
    assert n3 == ref_count + len(LENGTHS) - 1 and loss3 != pytest.approx(ref_loss, rel=RTOL)
    off = max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(take_grads(model), ref_grads))
    assert off > 1e3 * RTOL


def _train(packing: str, batching: str = "random", max_tokens: int = 0, seed: int = 3):
    """The harness's training loop (``loop.train``) on the tiny float64 model, 40 rows, 4 steps of
    2 micro-batches of 4 rows; per-step losses and the result."""
    from harness.worker import loop

    rows = make_rows(lengths=LENGTHS * 4, seed=1)
    val = make_rows(lengths=(6, 13, 4, 9), seed=2)
    torch.manual_seed(seed)
    model = tiny_model(seed=seed, lora_init=True)
    p = TrainParams(method="lora", batch_size=4, grad_accum=2, learning_rate=3e-2, lora_r=4, lora_alpha=8,
                    lora_dropout=0.0, epochs=1, weight_decay=0.0, warmup_ratio=0.0, packing=packing,
                    batching=batching, max_tokens_per_batch=max_tokens)
    losses = []
    result = loop.train(model, rows, val, p, pad_id=PAD, device="cpu", seed=seed, max_seq_length=16,
                        budget=DataBudget("steps", 4, 2), timing_warmup_steps=0,
                        on_step=lambda step, done, loss: losses.append(loss), on_eval=lambda *a: None)
    return losses, result


def test_the_loop_trains_padding_free_exactly_as_padded_without_the_padding():
    padded, r_pad = _train("none")
    free, r_free = _train("padding_free")
    naive, r_naive = _train("naive")
    # The same rows in the same micro-batches, so the same training, step for step.
    np.testing.assert_allclose(free, padded, rtol=1e-5)
    assert r_free.val_loss == pytest.approx(r_pad.val_loss, rel=1e-5)
    assert r_free.tokens_trained == r_pad.tokens_trained and r_free.examples_trained == r_pad.examples_trained == 32
    # What differs is only what was computed: padding-free computes no padding.
    assert r_free.tokens_computed == r_free.tokens_trained < r_pad.tokens_computed
    # Naive packing trains other sequences: full 16-token cuts of the stream (fewer of them: its one
    # epoch ends after 2 steps), attention across rows.
    assert abs(naive[0] - padded[0]) > 1e-3
    assert r_naive.tokens_computed == r_naive.tokens_trained == r_naive.steps * 2 * 4 * 16


def test_the_loop_caps_micro_batches_by_tokens():
    losses, r = _train("padding_free", batching="length_grouped", max_tokens=32)
    assert len(losses) == 4 and all(np.isfinite(losses))
    # Each of the 8 micro-batches holds at most 32 tokens, so the 4 steps trained at most 256.
    assert r.tokens_trained <= 8 * 32 and r.tokens_computed == r.tokens_trained


# -- the batch stream --------------------------------------------------------------------------

def varied_rows(n: int = 300, seed: int = 0):
    lengths = np.random.default_rng(seed).integers(1, 60, n)
    return [(np.full(k, i + 1, dtype=np.int32), None) for i, k in enumerate(lengths)]


def padded_share(stream: BatchStream, plan) -> float:
    real = sum(stream.lengths[i] for m in plan for i in m)
    return 1 - real / sum(len(m) * max(stream.lengths[i] for i in m) for m in plan)


def test_length_grouping_is_seeded_and_cuts_the_padding():
    rows = varied_rows()
    random_ = BatchStream(rows, 4, seed=5)
    grouped = BatchStream(rows, 4, seed=5, batching="length_grouped")
    plan = grouped.plan(0)
    assert plan == BatchStream(rows, 4, seed=5, batching="length_grouped").plan(0)  # deterministic per seed
    assert plan != BatchStream(rows, 4, seed=6, batching="length_grouped").plan(0)
    assert plan != grouped.plan(1)  # and reshuffled each epoch
    assert all(len(m) == 4 for m in plan) and len(plan) == len(rows) // 4
    seen = [i for m in plan for i in m]
    assert len(seen) == len(set(seen))  # no row twice in an epoch
    assert grouped.cost(plan[0]) == max(grouped.cost(m) for m in plan)  # the largest first
    assert padded_share(grouped, plan) < 0.1 < 0.3 < padded_share(random_, random_.plan(0))


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("batching", ["random", "length_grouped"])
def test_token_capped_micro_batches_hold_every_row_once_within_the_cap(flat, batching):
    rows = varied_rows()
    stream = BatchStream(rows, 4, seed=1, batching=batching, max_tokens=120, flat=flat)
    plan = stream.plan(0)
    assert sorted(i for m in plan for i in m) == list(range(len(rows)))  # nothing dropped
    assert all(stream.cost(m) <= 120 for m in plan)
    if flat:  # padding-free: the cap is the sum of lengths, so most micro-batches are nearly full
        assert sum(stream.cost(m) for m in plan) / len(plan) > 0.75 * 120
    assert plan == BatchStream(rows, 4, seed=1, batching=batching, max_tokens=120, flat=flat).plan(0)


def test_the_stream_counts_epochs():
    rows = varied_rows(10)
    stream = BatchStream(rows, 3, seed=0)
    for _ in range(3):
        next(stream)
    assert stream.epochs_done == 1  # 3 micro-batches an epoch (the 10th row is dropped)
    next(stream)
    assert stream.epochs_done == 1 and stream.epoch == 1


def test_token_counts_and_collate_for():
    rows = make_rows(masked=False, lengths=(3, 9, 5))
    padded = collate_for("none", rows, PAD, "cpu")
    assert token_counts(padded) == (17, 27)
    free = collate_for("padding_free", rows, PAD, "cpu")
    assert token_counts(free) == (17, 17) and "attention_mask" not in free
    assert predicted_tokens(free) == predicted_tokens(padded) == 17 - 3
    naive = pack(rows, 8)
    assert token_counts(collate_for("naive", naive, PAD, "cpu")) == (16, 16)
    assert torch.equal(collate(rows, PAD, "cpu")["input_ids"], padded["input_ids"])


# -- the sweep file and real trials -------------------------------------------------------------

def test_packing_and_batching_in_the_sweep_file():
    from harness.sweep.config import parse_sweep
    from harness.sweep.study import trial_params
    from harness.errors import SweepFileError

    base = {"study": "s", "model": {"name": "tiny-mistral"}, "max_seq_length": 64}
    cfg = parse_sweep({**base, "search_space": {"packing": {"choices": ["none", "padding_free"]},
                                                "batching": {"choices": ["random", "length_grouped"]},
                                                "max_tokens_per_batch": {"choices": [0, 256]}}})
    assert {"packing", "batching", "max_tokens_per_batch"} <= set(cfg.search_space.searched())
    # Old sweep files: true and false still mean naive packing and none.
    old = parse_sweep({**base, "search_space": {"packing": {"choices": [False, True]}}})
    frozen = optuna.trial.create_trial(params={"packing": True}, distributions={
        "packing": optuna.distributions.CategoricalDistribution([False, True])}, value=1.0)
    assert trial_params(frozen, old)["packing"] == "naive"
    assert TrainParams(**{**trial_params(frozen, old), "batch_size": 2, "grad_accum": 1, "learning_rate": 1e-3,
                          "lora_r": 4, "lora_alpha": 4, "lora_dropout": 0.0, "epochs": 1}).packing == "naive"
    assert TrainParams(method="lora", batch_size=2, grad_accum=1, learning_rate=1e-3, lora_r=4, lora_alpha=4,
                       lora_dropout=0.0, epochs=1, weight_decay=0.0, warmup_ratio=0.0, packing=False,
                       batching="random", max_tokens_per_batch=0).packing == "none"
    for space, expected in [({"packing": "padded"}, "search_space.packing: expected one of none, naive, padding_free"),
                            ({"batching": "sorted"}, "search_space.batching: expected one of random, length_grouped"),
                            ({"max_tokens_per_batch": 32}, "search_space.max_tokens_per_batch: 32 is below max_seq_length (64)"),
                            ({"max_tokens_per_batch": -5}, "search_space.max_tokens_per_batch: expected an integer >= 0")]:
        with pytest.raises(SweepFileError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            parse_sweep({**base, "search_space": space})


@pytest.mark.timeout(900)
@pytest.mark.slow
def test_a_study_searches_packing_and_records_the_padding(tmp_path, harness_cache):
    """Real trials (Unsloth's CPU backend, tiny-mistral, the embedded speeches): a grid over the
    three packing modes at one seed. Padding-free trains the very rows the padded trial trains,
    to the same validation loss, with no padding; each trial records its padding fraction."""
    spec = {"study": "pack", "model": {"name": "tiny-mistral", "gradient_checkpointing": False},
            "dataset": {"source": "shakespeare", "max_val_rows": 16}, "max_seq_length": 64,
            "budget": {"tokens": 1500, "eval_every": 750},
            "search_space": {"batch_size": 4, "learning_rate": 3e-3, "lora_r": 4,
                             "packing": {"choices": ["none", "padding_free", "naive"]}},
            "sampler": {"name": "grid"}, "pruner": {"name": "none"}, "n_trials": 3, "wandb": {"mode": "disabled"}}
    (tmp_path / "pack.yaml").write_text(yaml.safe_dump(spec))
    proc = run_cli("run", str(tmp_path / "pack.yaml"), "--results-dir", str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study = optuna.load_study(study_name="pack", storage=f"sqlite:///{tmp_path / 'r' / 'pack' / 'study.db'}")
    trials = {t.params["packing"]: t for t in study.trials}
    for t in trials.values():
        assert t.state == optuna.trial.TrialState.COMPLETE, t.user_attrs
    none, free, naive = (trials[k].user_attrs for k in ("none", "padding_free", "naive"))
    assert none["tokens_trained"] == free["tokens_trained"] and none["steps"] == free["steps"]
    assert free["val_loss"] == pytest.approx(none["val_loss"], rel=1e-4)
    assert free["padding_fraction"] == 0 == naive["padding_fraction"] < none["padding_fraction"]
    assert naive["val_loss"] != pytest.approx(none["val_loss"], rel=1e-4)
    import polars as pl

    df = pl.read_parquet(tmp_path / "r" / "pack" / "trials.parquet")
    assert sorted(df["param_packing"].to_list()) == ["naive", "none", "padding_free"]
    assert "padding_fraction" in df.columns
