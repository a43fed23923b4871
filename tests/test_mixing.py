"""Dataset mixing (data.train weight / repeat): exact counts, part of the pure data order, the
same on any world size, resumed exactly, shown in the start-up log and in `data preview`."""

from __future__ import annotations

import json
import signal
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, small_config, write_jsonl
from hypothesis import given, settings
from hypothesis import strategies as st
from test_checkpoint import start, wait_for_step

from lockstep.config import DatasetConfig
from lockstep.data import cache, mixing
from lockstep.data.dataset import Samples
from lockstep.data.order import PAD, Mixture, Order, stream
from lockstep.report.metrics import read

A, B = 16, 16  # records of the two datasets: ids 0..15 are A's, 16..31 B's
EPOCH_STEPS = 4  # 32 samples an epoch, global batch 8


def entries(**fields) -> list[DatasetConfig]:
    """data.train entries, one per value of each field's list."""
    n = len(next(iter(fields.values())))
    return [DatasetConfig(path=f"d{i}", **{k: v[i] for k, v in fields.items()}) for i in range(n)]


def step_ids(order: Order, step: int) -> Counter:
    return Counter(
        int(i)
        for r in range(order.world_size)
        for mb in order.micro_batches(step, r)
        for i in mb
        if i != PAD
    )


# --- the counts -------------------------------------------------------------------------------


def test_weights_share_one_pass_of_all_the_data_exactly():
    assert mixing.counts(entries(weight=[3, 1]), [10, 30]) == (30, 10)
    assert mixing.counts(entries(weight=[1, 1, 1]), [1, 1, 2]) == (2, 1, 1)  # tie: listed first
    assert mixing.counts(entries(weight=[0, 2.5]), [7, 5]) == (0, 12)
    assert mixing.counts(entries(weight=[0.1, 0.2]), [10, 20]) == (10, 20)  # no float drift


@given(
    sizes=st.lists(st.integers(0, 500), min_size=1, max_size=6),
    data=st.data(),
)
@settings(max_examples=80, deadline=None)
def test_weighted_counts_sum_to_the_epoch_and_follow_the_shares(sizes, data):
    weights = data.draw(st.lists(st.floats(0, 100), min_size=len(sizes), max_size=len(sizes)))
    if not sum(weights) or not sum(sizes):
        return
    got = mixing.weighted(weights, sizes)
    total = sum(sizes)
    assert sum(got) == total
    for w, c in zip(weights, got, strict=True):
        assert abs(c - total * w / sum(weights)) < 1 + 1e-9


def test_repeat_counts_whole_and_fractional_passes():
    assert mixing.counts(entries(repeat=[2, None]), [10, 7]) == (20, 7)
    assert mixing.counts(entries(repeat=[0.5, 0.25]), [5, 4]) == (3, 1)  # 2.5 rounds up
    assert mixing.counts(entries(repeat=[0.001, 1]), [10, 1]) == (1, 1)  # at least one


# --- the order --------------------------------------------------------------------------------


@pytest.mark.parametrize("counts", [(30, 10), (3, 37), (0, 40), (20, 20)])
def test_mixed_global_batches_identical_for_world_sizes_1_2_4(counts):
    mixture = Mixture((10, 30), counts)
    reference = Order(3, 40, 8, micro_size=8, world_size=1, mixture=mixture)
    assert reference.steps_per_epoch == 5
    for world, micro in ((1, 2), (2, 4), (2, 1), (4, 2), (4, 1)):
        order = Order(3, 40, 8, micro, world, mixture=mixture)
        for step in range(3 * reference.steps_per_epoch):
            assert step_ids(order, step) == step_ids(reference, step), (world, micro, step)


@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    data=st.data(),
    seed=st.integers(0, 2**62),
    g=st.sampled_from([1, 4, 8]),
)
@settings(max_examples=40, deadline=None)
def test_each_epoch_takes_its_counts_and_a_pass_never_repeats(sizes, data, seed, g):
    counts = tuple(data.draw(st.integers(0, 3 * n)) for n in sizes)
    if not sum(counts):
        return
    mixture = Mixture(tuple(sizes), counts)
    order = Order(seed, sum(sizes), g, 1, 1, mixture=mixture)
    epochs = 3
    taken = [[] for _ in sizes]  # each dataset's local ids, in the order its epochs took them
    starts = mixture.starts
    for epoch in range(epochs):
        ids = np.concatenate(
            [order.global_batch(s) for s in range(epoch * order.steps_per_epoch,
                                                  (epoch + 1) * order.steps_per_epoch)]
        )  # fmt: skip
        ids = ids[ids != PAD]
        assert len(ids) == sum(counts)
        of = np.searchsorted(np.array(starts), ids, side="right") - 1
        for d, n in enumerate(sizes):
            mine = ids[of == d] - starts[d]
            assert len(mine) == counts[d] and ((mine >= 0) & (mine < n)).all()
            taken[d] += sorted(mine.tolist())
    for d, n in enumerate(sizes):
        whole = stream(seed, d, n, 0, epochs * counts[d])
        # the epochs took the dataset's stream in order: pass after pass, none repeated within
        for epoch in range(epochs):
            window = slice(epoch * counts[d], (epoch + 1) * counts[d])
            assert taken[d][window] == sorted(whole[window].tolist())
        for p in range(len(whole) // n):
            assert sorted(whole[p * n : (p + 1) * n].tolist()) == list(range(n))


def test_an_up_weighted_small_dataset_sees_every_sample_before_any_repeats():
    mixture = Mixture((4, 96), (50, 50))  # dataset 0: 4 samples, 12.5 passes an epoch
    order = Order(11, 100, 10, 10, 1, mixture=mixture)
    small = [int(i) for s in range(order.steps_per_epoch) for i in order.global_batch(s) if i < 4]
    assert len(small) == 50
    local = stream(11, 0, 4, 0, 50).tolist()
    for p in range(12):
        assert sorted(local[4 * p : 4 * p + 4]) == [0, 1, 2, 3]
    assert Counter(small) == Counter(local)


def test_pairs_mix_by_their_chosen_row_and_refuse_a_weighted_empty_dataset():
    rows = np.array([0, 0, 0, 0, 1, 1, 1], dtype=np.int64)  # 3 pairs, a trailing half pair
    samples = Samples([np.ones(3, np.int64)] * 7, [np.ones(3, np.int64)] * 7, "fp", dataset=rows)
    units = mixing.unit_datasets(samples, pairs=True)
    assert units.tolist() == [0, 0, 1]
    assert mixing.of(entries(weight=[1, 2]), units) == Mixture((2, 1), (1, 2))
    assert mixing.of(entries(max_samples=[None, None]), units) is None  # no mixture configured
    with pytest.raises(Exception, match=r"data.train.2 \(d2\) has no usable samples"):
        mixing.of(entries(weight=[1, 1, 1]), units)


def test_a_validation_split_keeps_each_training_sample_s_dataset():
    from lockstep.training.evaluate import split_validation

    rows = [np.arange(1, 4)] * 10
    samples = Samples(rows, rows, "fp", dataset=np.array([0] * 4 + [1] * 6))
    train, held = split_validation(samples, 0.3, seed=5)
    assert len(train) == 7 and len(held) == 3
    assert train.datasets().tolist() == sorted(train.datasets().tolist())  # still grouped
    mixture = mixing.of(entries(weight=[1, 1]), mixing.unit_datasets(train, pairs=False))
    assert sum(mixture.sizes) == 7 and mixture.counts == (4, 3)  # 3.5 each: the tie to the first
    assert Counter(train.datasets().tolist()) + Counter(held.datasets().tolist()) == Counter(
        {0: 4, 1: 6}
    )


def test_an_older_cache_entry_of_several_datasets_is_tokenised_again(tmp_path):
    samples = Samples([np.arange(1, 4)] * 2, [np.arange(1, 4)] * 2, "fp")  # no dataset index
    cache.save(tmp_path / "entry.npz", samples)
    assert cache.load(tmp_path / "entry.npz", "fp", datasets=1).datasets().tolist() == [0, 0]
    with pytest.raises(ValueError, match="which dataset each sample is from"):
        cache.load(tmp_path / "entry.npz", "fp", datasets=2)


# --- real runs --------------------------------------------------------------------------------


def mixed_config(tmp_path: Path, **sections) -> Path:
    """Two datasets of 16 records, weights 1:3; sample_ids logged."""
    a = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Uppercase the words.", "input": f"word{i} river", "output": f"WORD{i}"}
        for i in range(A)
    ])  # fmt: skip
    b = write_jsonl(tmp_path / "b.jsonl", [
        {"instruction": "Reverse them.", "input": f"x{i} y", "output": f"y x{i}"}
        for i in range(B)
    ])  # fmt: skip
    data = {"train": [{"path": str(a), "weight": 1}, {"path": str(b), "weight": 3}]}
    return small_config(tmp_path, log={"every_steps": 1, "sample_ids": True}, data=data,
                        **sections)  # fmt: skip


def read_steps(out: Path) -> dict[int, Counter]:
    """step -> the sample ids every rank trained on at it (log.sample_ids)."""
    steps: dict[int, Counter] = {}
    for path in (out / "sample_ids").glob("rank-*.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            steps.setdefault(row["step"], Counter()).update(i for i in row["ids"] if i != PAD)
    return steps


def metrics(out: Path) -> list[dict]:
    return read(out / "metrics.jsonl")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same mixed run on one process (30 steps) and on two (torchrun gloo, 8 steps)."""
    one = tmp_path_factory.mktemp("one")
    cfg = mixed_config(one, train={"max_steps": 30}, checkpoint={"every_steps": 15})
    res = run_cli("train", str(cfg))
    assert res.returncode == 0, res.stderr
    two = tmp_path_factory.mktemp("two")
    cfg2 = mixed_config(two, train={"max_steps": 8}, checkpoint={"every_steps": 4})
    res2 = run_cli("train", str(cfg2), "--nproc-per-node", "2")
    assert res2.returncode == 0, res2.stderr
    return {"one": (one, res), "two": (two, res2)}


def test_three_to_one_weights_give_that_share_of_each_epoch(runs):
    one, res = runs["one"]
    steps = read_steps(one / "out")
    for epoch in range(2):
        ids = sum((steps[epoch * EPOCH_STEPS + k + 1] for k in range(EPOCH_STEPS)), Counter())
        assert sum(ids.values()) == A + B  # an epoch: as long as one pass over both
        from_b = sum(n for i, n in ids.items() if i >= A)
        assert from_b == 24 and sum(ids.values()) - from_b == 8
        # B (16 samples, 1.5 passes an epoch): no sample of it more than twice in an epoch
        assert max(n for i, n in ids.items() if i >= A) <= 2
    # over the first two epochs, A's 16 samples were each seen once
    first_two = sum((steps[s] for s in range(1, 2 * EPOCH_STEPS + 1)), Counter())
    assert sorted(i for i in first_two if i < A) == list(range(A))
    assert all(first_two[i] == 1 for i in range(A))
    log = res.stderr
    assert "data mix: " in log and "a.jsonl: 16 samples" in log and "b.jsonl: 16 samples" in log
    assert "8 samples per epoch (25.0% of 32" in log and "24 samples per epoch (75.0% of 32" in log


def test_one_and_two_processes_train_the_same_mixed_batches(runs):
    one, two = read_steps(runs["one"][0] / "out"), read_steps(runs["two"][0] / "out")
    assert sorted(two) == list(range(1, 9))
    for step in range(1, 9):
        assert two[step] == one[step], step
    shas = [r["batch_sha"] for r in metrics(runs["two"][0] / "out")]
    assert shas == [r["batch_sha"] for r in metrics(runs["one"][0] / "out")][:8]


@pytest.mark.slow  # the default suite stays under 10 minutes; CI runs it
def test_a_two_process_checkpoint_resumes_the_mixture_on_one(runs, tmp_path):
    two = runs["two"][0]
    ckpt = two / "out" / "checkpoints" / "step-00000004"
    cfg = two / "cfg.yaml"
    res = run_cli("train", str(cfg), f"output_dir={tmp_path / 'one'}", f"checkpoint.resume={ckpt}")
    assert res.returncode == 0, res.stderr
    resumed = metrics(tmp_path / "one")
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    assert [r["batch_sha"] for r in resumed] == [r["batch_sha"] for r in metrics(two / "out")[4:]]


@pytest.mark.slow  # the default suite stays under 10 minutes; CI runs it
def test_kill_9_and_resume_reproduce_the_mixed_order(runs, tmp_path):
    reference = runs["one"][0]
    cfg = mixed_config(tmp_path, train={"max_steps": 30}, checkpoint={"every_steps": 15})
    proc = start(cfg)
    wait_for_step(tmp_path / "out", 17, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    res = run_cli("train", str(cfg))
    assert res.returncode == 0, res.stderr
    assert "step-00000015" in res.stderr
    # sample_ids rows still buffered at the kill are lost; the resumed steps are all there
    got_ids, want_ids = read_steps(tmp_path / "out"), read_steps(reference / "out")
    assert set(range(16, 31)) <= set(got_ids)
    assert all(got_ids[s] == want_ids[s] for s in got_ids)
    got, want = metrics(tmp_path / "out"), metrics(reference / "out")
    assert [r["batch_sha"] for r in got] == [r["batch_sha"] for r in want]
    assert [r["loss"] for r in got] == [r["loss"] for r in want]


def test_a_changed_mixture_is_refused_on_resume_and_keeps_the_data_cache(runs):
    one, _ = runs["one"]
    res = run_cli("train", str(one / "cfg.yaml"), "train.max_steps=31", "data.train.1.weight=2")
    assert res.returncode != 0
    assert "cannot resume" in res.stderr and "data.train:" in res.stderr
    # an ordering matter: the tokenised samples (and their cache entry) are the same
    res = run_cli("data", "preview", str(one / "cfg.yaml"), "-n", "0", "data.train.1.weight=2")
    assert res.returncode == 0, res.stderr
    assert "reusing tokenised data" in res.stderr + res.stdout
    assert "dataset " in res.stdout and "b.jsonl: 16 samples" in res.stdout
    assert "21 samples per epoch (65.6% of 32, 1.31 passes)" in res.stdout


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.train.0.weight=-1"], "data.train.0.weight: got -1: expected a number greater"),
        (["data.train.0.weight=0", "data.train.1.weight=0"], "data.train: every weight is 0"),
        (["data.train.0.repeat=2"], "data.train.0 sets both: weight and repeat are two ways"),
        (["data.train.0.weight=null"], "data.train.0.weight is not set: with weights, every"),
        (["data.eval=[{path: x.jsonl, weight: 1}]"],
         "data.eval.0.weight is set, but evaluation reads every sample"),
    ],
)  # fmt: skip
def test_bad_mixing_values_are_one_line_config_errors(tmp_path, overrides, message):
    cfg = mixed_config(tmp_path)
    res = run_cli("train", str(cfg), *overrides)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "out").exists()


def test_packs_hold_one_dataset_when_mixing_and_only_then_is_the_cache_key_new(tmp_path):
    from lockstep.config import DataConfig, ModelConfig
    from lockstep.data.dataset import fingerprint
    from lockstep.data.packing import pack
    from lockstep.model.load import load_tokenizer

    rows = [np.arange(1, 5)] * 6
    samples = Samples(rows, rows, "fp", dataset=np.array([0, 0, 0, 1, 1, 1]))
    assert pack(samples, 16).dataset.tolist() == [-1, 1]  # 4 + 2 samples: one pack mixes
    assert pack(samples, 16, by_dataset=True).dataset.tolist() == [0, 1]
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x", "output": "y"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": "u", "output": "v"}])
    tok = load_tokenizer(ModelConfig(path="builtin:tiny"))

    def key(packing: bool, *weights) -> str:
        train = [{"path": str(p), "weight": w} for p, w in zip((a, b), weights, strict=True)]
        return fingerprint(DataConfig(train=train, packing=packing), tok)

    assert key(False, None, None) == key(False, 1, 3) == key(False, 2, 1)  # order only
    assert key(True, 1, 3) == key(True, 2, 1) != key(True, None, None)  # packs change


def test_preference_pairs_mix_through_the_real_cli(tmp_path):
    pa = write_jsonl(tmp_path / "pa.jsonl", [
        {"instruction": f"Say hi {i}", "input": "", "chosen": f"hi {i}", "rejected": f"no {i}"}
        for i in range(6)
    ])  # fmt: skip
    pb = write_jsonl(tmp_path / "pb.jsonl", [
        {"instruction": f"Count {i}", "input": "", "chosen": f"{i} {i + 1}", "rejected": "x"}
        for i in range(4)
    ])  # fmt: skip
    data = {"train": [{"path": str(pa), "repeat": 0.5}, {"path": str(pb), "repeat": 2}]}
    cfg = small_config(tmp_path, data=data, finetune={"stage": "preference"},
                       batch={"global_size": 4, "micro_size": 2}, train={"max_steps": 6},
                       log={"every_steps": 1, "sample_ids": True})  # fmt: skip
    res = run_cli("train", str(cfg))
    assert res.returncode == 0, res.stderr
    assert "pb.jsonl: 4 pairs, " in res.stderr and "8 pairs per epoch (72.7% of 11" in res.stderr
    steps = read_steps(tmp_path / "out")
    assert sorted(steps) == list(range(1, 7))  # 2 epochs of ceil(11 / 4) steps
    for epoch in range(2):
        ids = sum((steps[3 * epoch + k] for k in (1, 2, 3)), Counter())
        assert sum(n for i, n in ids.items() if i < 6) == 3  # half of pa's pairs
        assert all(ids[i] == 2 for i in range(6, 10))  # every pb pair twice
    first_two = sum(steps.values(), Counter())
    assert sorted(i for i in first_two if i < 6) == list(range(6))  # pa: halves, no repeat
