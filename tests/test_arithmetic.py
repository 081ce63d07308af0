"""The training arithmetic (``harness.worker.batching`` / ``step`` / ``distributed``) on a real,
tiny transformers model: gradient accumulation, two Gloo processes, packing with a loss mask, the
learning-rate schedule, token counting, the data budget, step timing and seeding.

No Unsloth and no GPU: ``loop.py`` is never imported, only the modules it trains with.
transformers and peft are imported inside the helpers, so the spawned ranks of the distributed
test (which re-import this module) load only what they use.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from harness.worker.batching import batches, collate, pack, predicted_tokens
from harness.worker.distributed import Dist
from harness.worker.step import DataBudget, accumulate, lr_factor, seed_everything, step_timing

PAD = 0
VOCAB = 64
# Variable lengths, so a batch of 8 and two batches of 4 are padded to different widths, and
# the two halves hold different numbers of loss tokens (which is what the weighting is about).
LENGTHS = (5, 11, 3, 14, 7, 4, 12, 6)


def make_rows(masked: bool = True, lengths=LENGTHS, seed: int = 0):
    """Rows of token ids in 1..VOCAB-1 (0 is the pad id); with ``masked``, every other row has a
    loss mask (a "prompt" of about a third of its tokens left out of the loss)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, n in enumerate(lengths):
        ids = rng.integers(1, VOCAB, size=n).astype(np.int32)
        if masked and i % 2 == 0:
            mask = np.ones(n, dtype=np.uint8)
            mask[: max(1, n // 3)] = 0
            rows.append((ids, mask))
        else:
            rows.append((ids, None if not masked else np.ones(n, dtype=np.uint8)))
    return rows


def tiny_model(seed: int | None = 0, dtype=torch.float64, lora: bool = True, lora_init=False, dropout: float = 0.0):
    """A 2-layer Llama (hidden 32, 2 heads, vocab 64), eager attention, optionally wrapped in LoRA.

    ``lora_init=False`` gives random A *and* B (PEFT's default B = 0 would make every A gradient
    zero at the first step, which would make gradient comparisons vacuous)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).to(dtype)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=lora_init,
                                                 target_modules=["q_proj", "v_proj", "o_proj"]))
    model.train()
    return model


def trainable(model) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def take_grads(model) -> list[torch.Tensor]:
    """The trainable parameters' gradients (cloned), and clears them."""
    out = [p.grad.detach().clone() for p in trainable(model)]
    for p in trainable(model):
        p.grad = None
    return out


def reference(model, rows) -> tuple[float, int, list[torch.Tensor]]:
    """The token-mean loss over every row, computed without padding or batching at all: each row
    alone, per-token cross entropy in float64 (position t predicts token t+1 where it counts),
    summed and divided by the total; its gradients."""
    count, losses = 0, []
    for ids, mask in rows:
        x = torch.from_numpy(ids.astype(np.int64))[None]
        logits = model(input_ids=x).logits[0].double()
        target = x[0, 1:]
        counted = torch.ones(len(ids) - 1, dtype=torch.bool) if mask is None else torch.from_numpy(mask[1:].astype(bool))
        nll = torch.nn.functional.cross_entropy(logits[:-1], target, reduction="none")[counted]
        losses.append(nll.sum())
        count += int(counted.sum())
    loss = torch.stack(losses).sum() / count
    loss.backward()
    return float(loss.detach()), count, take_grads(model)


def assert_grads_close(a, b, rtol, atol):
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b):
        assert x.abs().max() > 0, "a zero gradient would make the comparison vacuous"
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


# HF's causal-LM loss upcasts logits with ``.float()``, i.e. to float32 even for a float64 model,
# so the loss and gradients are float32-accurate; everything else is float64. These tolerances are
# ~1e4 times tighter than the error of a wrong weighting (checked below by the "naive" variants).
RTOL, ATOL = 1e-5, 1e-8


def test_grad_accumulation_two_micro_batches_equal_one_batch():
    rows = make_rows()
    model = tiny_model()
    ref_loss, ref_count, ref_grads = reference(model, rows)

    one = [collate(rows, PAD, "cpu")]
    loss1, n1 = accumulate(model, one)
    grads1 = take_grads(model)

    two = [collate(rows[:4], PAD, "cpu"), collate(rows[4:], PAD, "cpu")]
    assert two[0]["input_ids"].shape[1] != two[1]["input_ids"].shape[1] != one[0]["input_ids"].shape[1]
    loss2, n2 = accumulate(model, two)
    grads2 = take_grads(model)

    assert n1 == n2 == ref_count
    assert loss1 == pytest.approx(ref_loss, rel=RTOL)
    assert loss2 == pytest.approx(ref_loss, rel=RTOL)
    assert_grads_close(grads1, ref_grads, RTOL, ATOL)
    assert_grads_close(grads2, ref_grads, RTOL, ATOL)
    assert_grads_close(grads2, grads1, RTOL, ATOL)

    # The test has teeth: averaging the micro-batches' mean losses unweighted (what plain
    # gradient accumulation does) gives gradients off by far more than the tolerance.
    for b in two:
        (model(**b).loss / len(two)).backward()
    naive = take_grads(model)
    off = max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(naive, ref_grads))
    assert off > 1e3 * RTOL


def test_accumulate_skips_a_micro_batch_with_nothing_to_predict():
    rows = make_rows()
    model = tiny_model()
    ref_loss, ref_count, ref_grads = reference(model, rows[:4])
    silent = [(ids, np.zeros(len(ids), dtype=np.uint8)) for ids, _ in rows[4:]]
    empty = collate(silent, PAD, "cpu")
    assert predicted_tokens(empty) == 0
    loss, n = accumulate(model, [collate(rows[:4], PAD, "cpu"), empty])
    assert n == ref_count and math.isfinite(loss)
    assert loss == pytest.approx(ref_loss, rel=RTOL)
    assert_grads_close(take_grads(model), ref_grads, RTOL, ATOL)


def _rank_main(rank: int, world: int, init_method: str, out_dir: str) -> None:
    """One rank of the distributed test: its half of the rows, as 2 micro-batches of 2."""
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        rows = make_rows()
        half = rows[rank * 4 : (rank + 1) * 4]
        model = tiny_model(lora=False)  # full fine-tuning: no peft to import in a fresh process
        d = Dist(rank, world)
        loss, n = accumulate(model, [collate(half[:2], PAD, "cpu"), collate(half[2:], PAD, "cpu")], d)
        params = trainable(model)
        d.sum_gradients(params)
        out = {"loss": loss, "n": n, "grads": [p.grad.clone() for p in params]}
        for p in params:
            p.grad = None
        # A step in which rank 1 has nothing to predict (every label masked, as a packed sequence of
        # prompt tokens can be): it runs no backward, yet the ranks' all-reduce must still match.
        if rank == 1:
            half = [(ids, np.zeros(len(ids), dtype=np.uint8)) for ids, _ in half]
        loss, n = accumulate(model, [collate(half[:2], PAD, "cpu"), collate(half[2:], PAD, "cpu")], d)
        d.sum_gradients(params)
        out.update(silent_loss=loss, silent_n=n, silent_grads=[p.grad for p in params])
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_gloo_processes_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    world = 2
    mp.spawn(_rank_main, args=(world, f"file://{tmp_path}/rendezvous", str(tmp_path)), nprocs=world, join=True)

    rows = make_rows()
    model = tiny_model(lora=False)
    ref_loss, ref_count, _ = reference(model, rows)
    loss, n = accumulate(model, [collate(rows, PAD, "cpu")])
    grads = take_grads(model)
    assert n == ref_count and loss == pytest.approx(ref_loss, rel=RTOL)
    # The two halves hold different numbers of loss tokens, so a plain average of the ranks'
    # mean losses would be wrong: the weighting by the count summed over ranks is exercised.
    counts = [predicted_tokens(collate(rows[r * 4 : (r + 1) * 4], PAD, "cpu")) for r in range(world)]
    assert counts[0] != counts[1]

    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for res in results:
        assert res["n"] == n
        assert res["loss"] == pytest.approx(loss, rel=RTOL)
        # sum_gradients all-reduces in float32, so a float64 gradient comes back float32-accurate.
        assert_grads_close(res["grads"], grads, rtol=1e-5, atol=1e-7)
    for a, b in zip(results[0]["grads"], results[1]["grads"]):
        assert torch.equal(a, b)  # every rank steps with the very same gradient

    # The step where rank 1 had nothing to predict equals one process on rank 0's rows alone.
    ref_loss, ref_count, ref_grads = reference(model, rows[:4])
    for res in results:
        assert res["silent_n"] == ref_count
        assert res["silent_loss"] == pytest.approx(ref_loss, rel=RTOL)
        assert_grads_close(res["silent_grads"], ref_grads, rtol=1e-5, atol=1e-7)


def test_packing_keeps_the_loss_mask_aligned():
    # Token ids that are unique along the whole stream, so a label identifies its position.
    lengths = (5, 9, 4, 7, 6, 3)
    rows, start = [], 1
    for i, n in enumerate(lengths):
        ids = np.arange(start, start + n, dtype=np.int32)
        start += n
        mask = np.zeros(n, dtype=np.uint8)
        mask[n // 2 :] = 1  # the "response": the second half of each row
        rows.append((ids, mask))
    stream = np.concatenate([r[0] for r in rows])
    stream_mask = np.concatenate([r[1] for r in rows]).astype(bool)
    length = 8
    packed = pack(rows, length)
    assert len(stream) % length != 0
    assert len(packed) == len(stream) // length == 4  # 34 tokens: the last 2 are dropped
    assert all(len(ids) == length and len(mask) == length for ids, mask in packed)
    dropped = set(stream[len(packed) * length :].tolist())
    assert dropped and not dropped & {int(t) for ids, _ in packed for t in ids}

    batch = collate(packed, PAD, "cpu")
    labels = batch["labels"]
    assert labels.shape == (4, length) and bool(batch["attention_mask"].all())
    for i in range(len(packed)):
        seg = slice(i * length, (i + 1) * length)
        expected = torch.from_numpy(np.where(stream_mask[seg], stream[seg], -100).astype(np.int64))
        assert torch.equal(labels[i], expected)
    kept = labels[labels != -100].tolist()
    assert kept == stream[: len(packed) * length][stream_mask[: len(packed) * length]].tolist()

    # Without a loss mask, every packed token counts.
    plain = pack([(ids, None) for ids, _ in rows], length)
    assert all(mask is None for _, mask in plain)
    assert bool((collate(plain, PAD, "cpu")["labels"] != -100).all())


def test_lr_schedule():
    w = 0.2
    assert lr_factor(0.0, w) == pytest.approx(0.0, abs=1e-9)
    assert lr_factor(0.05, w) == pytest.approx(0.25)
    assert lr_factor(w, w) == pytest.approx(1.0)  # the peak, at the end of warm-up
    assert lr_factor(w + (1 - w) / 2, w) == pytest.approx(0.5)  # halfway through the decay
    assert lr_factor(1.0, w) == 0.0
    assert lr_factor(1.3, w) == 0.0
    assert lr_factor(-0.1, w) == pytest.approx(0.0, abs=1e-9)
    # No warm-up: full rate from the start, linear to zero.
    assert lr_factor(0.0, 0.0) == pytest.approx(1.0)
    assert lr_factor(0.25, 0.0) == pytest.approx(0.75)
    assert lr_factor(1.0, 0.0) == 0.0
    # Monotone: up to the peak, then down.
    grid = np.linspace(0, 1, 201)
    f = np.array([lr_factor(p, w) for p in grid])
    peak = int(np.argmax(f))
    assert grid[peak] == pytest.approx(w)
    assert (np.diff(f[: peak + 1]) > 0).all() and (np.diff(f[peak:]) < 0).all()
    assert f.min() >= 0 and f.max() == pytest.approx(1.0)


def test_step_timing_steady_pace_and_warm_up():
    # Two slow warm-up steps (compilation, allocator growth), then a steady pace with one outlier
    # that the median ignores.
    warmup, steady = step_timing([3.0, 1.5, 1.0, 1.2, 0.9, 1.0, 5.0], warmup_steps=2)
    assert steady == pytest.approx(1.0)  # median of 1.0, 1.2, 0.9, 1.0, 5.0
    assert warmup == pytest.approx((3.0 - 1.0) + (1.5 - 1.0))
    # An even number of steady steps: the mean of the middle two.
    assert step_timing([2.0, 1.0, 3.0, 2.0, 4.0], 1) == (pytest.approx(0.0), pytest.approx(2.5))
    # Warm-up steps faster than the steady pace: floored at 0, not negative.
    assert step_timing([0.5, 0.6, 1.0, 1.0], 2) == (0.0, 1.0)
    # The sum is floored, not each step: one fast warm-up step offsets a slow one.
    assert step_timing([0.5, 2.0, 1.0, 1.0], 2) == (pytest.approx(0.5), 1.0)
    # No warm-up steps: every step is steady, nothing is warm-up.
    assert step_timing([1.0, 3.0, 2.0], 0) == (0.0, 2.0)
    # No step after the warm-up: no steady pace to measure against.
    assert step_timing([3.0, 1.0], 2) == (None, None)
    assert step_timing([], 2) == (None, None)


def test_predicted_tokens_counts_what_the_loss_averages_over():
    rows = make_rows()
    # A row whose first position is counted (no mask) and masked rows whose first is not.
    batch = collate(rows, PAD, "cpu")
    expected = 0
    for ids, mask in rows:
        counted = np.ones(len(ids), dtype=bool) if mask is None else mask.astype(bool)
        expected += int(counted.sum()) - int(counted[0])
    assert predicted_tokens(batch) == expected
    unmasked = [(ids, None) for ids, _ in rows]
    assert predicted_tokens(collate(unmasked, PAD, "cpu")) == sum(len(ids) - 1 for ids, _ in unmasked)

    # And it is the very count the model's mean loss is divided by.
    model = tiny_model(lora=False)
    with torch.no_grad():
        out = model(**batch)
        logits = out.logits[:, :-1].double()
        target = batch["labels"][:, 1:]
        total = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1),
                                                  ignore_index=-100, reduction="sum")
    assert float(out.loss) * predicted_tokens(batch) == pytest.approx(float(total), rel=RTOL)


def test_data_budget_milestones():
    b = DataBudget("tokens", 10_000, 3_000)
    assert b.milestones() == 4
    points = [b.milestone(i) for i in range(1, b.milestones() + 1)]
    assert points == [3000, 6000, 9000, 10000]
    assert b.milestone(b.milestones()) == b.total and b.milestone(b.milestones() + 3) == b.total

    even = DataBudget("examples", 9_000, 3_000)
    assert even.milestones() == 3
    assert [even.milestone(i) for i in (1, 2, 3)] == [3000, 6000, 9000]

    # Fractional cadences: spaced equally, the last at the total, no extra point from rounding.
    frac = DataBudget("steps", 30, 2.5)
    assert frac.milestones() == 12
    pts = [frac.milestone(i) for i in range(1, 13)]
    assert pts[-1] == 30 and pts == sorted(pts) and len(set(pts)) == 12
    assert DataBudget("examples", 0.3, 0.1).milestones() == 3  # 0.3 / 0.1 = 2.9999999999999996

    assert b.position(tokens=5, examples=6, steps=7) == 5
    assert even.position(tokens=5, examples=6, steps=7) == 6
    assert frac.position(tokens=5, examples=6, steps=7) == 7
    with pytest.raises(ValueError):
        DataBudget("epochs", 1, 1)
    with pytest.raises(ValueError):
        DataBudget("tokens", 100, 0)


def _train_three_steps(seed: int) -> list[float]:
    seed_everything(seed)
    model = tiny_model(seed=None, dtype=torch.float32, lora=True, lora_init=True, dropout=0.1)
    opt = torch.optim.AdamW(trainable(model), lr=1e-2)
    stream = batches(make_rows(lengths=LENGTHS * 2), 3, seed)
    losses = []
    for _ in range(3):
        loss, _ = accumulate(model, [collate(next(stream), PAD, "cpu") for _ in range(2)])
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss)
    return losses


def test_same_seed_same_losses():
    a, b, c = _train_three_steps(7), _train_three_steps(7), _train_three_steps(8)
    assert a == b  # bit-identical
    assert all(math.isfinite(x) for x in a) and a[0] != a[2]  # it trains
    assert all(x != y for x, y in zip(a, c))


def test_batches_stream():
    rows = [(np.array([i]), None) for i in range(10)]
    take = lambda s, k: [[int(r[0][0]) for r in b] for b, _ in zip(batches(rows, 3, s), range(k))]  # noqa: E731
    first = take(5, 9)
    assert first == take(5, 9)
    assert first != take(6, 9)
    # 3 batches an epoch (the partial 4th is dropped), no row twice within an epoch.
    for e in range(3):
        epoch = sum(first[e * 3 : (e + 1) * 3], [])
        assert len(epoch) == len(set(epoch)) == 9
    assert first[:3] != first[3:6]  # reshuffled each epoch


def test_collate_pads_to_the_longest_row_on_cpu():
    rows = make_rows(masked=False, lengths=(3, 70, 5))
    batch = collate(rows, PAD, "cpu")
    assert batch["input_ids"].shape == (3, 70)  # not rounded up to 128: that is for CUDA only
    assert batch["attention_mask"].sum(1).tolist() == [3, 70, 5]
    assert bool((batch["input_ids"][0, 3:] == PAD).all()) and bool((batch["labels"][0, 3:] == -100).all())
    assert torch.equal(batch["input_ids"][1], torch.from_numpy(rows[1][0].astype(np.int64)))
    assert batch["input_ids"].dtype == torch.long and batch["labels"].dtype == torch.long
