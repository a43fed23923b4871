"""World-size invariance end to end: same batches, same losses, agreed seed, desync caught."""

from __future__ import annotations

import json
import time

import pytest
import yaml
from conftest import DEMO_DATA, run_cli, small_config

from lockstep.data.order import PAD, Order
from lockstep.report.metrics import read

STEPS = 22


def train(tmp_path, name: str, *args: str, **sections):
    """Train the demo data for STEPS steps; return the metrics rows."""
    folder = tmp_path / name
    folder.mkdir()
    sections.setdefault("train", {"max_steps": STEPS})
    cfg = small_config(folder, **sections)
    res = run_cli("train", str(cfg), *args)
    assert res.returncode == 0, res.stderr
    metrics = folder / "out" / "metrics.jsonl"  # a replay leaves it alone (writes its own)
    return (read(metrics) if metrics.is_file() else []), folder / "out", res


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lockstep")
    return {
        "1 proc, accumulation 2": train(tmp, "a", "batch.micro_size=4")[0],
        "2 procs, no accumulation": train(tmp, "b", "--nproc-per-node", "2", "batch.micro_size=4")[
            0
        ],
        "2 procs, accumulation 2": train(tmp, "c", "--nproc-per-node", "2", "batch.micro_size=2")[
            0
        ],
        "1 proc, no accumulation": train(tmp, "d", "batch.micro_size=8")[0],
    }


def test_same_batches_at_every_step_for_any_world_and_accumulation(runs):
    reference = [r["batch_sha"] for r in runs["1 proc, accumulation 2"]]
    assert len(reference) == STEPS and len(set(reference)) == STEPS
    for name, rows in runs.items():
        assert [r["batch_sha"] for r in rows] == reference, name


def test_same_losses_for_any_world_and_accumulation(runs):
    reference = [r["loss"] for r in runs["1 proc, accumulation 2"]]
    for name, rows in runs.items():
        assert [r["loss"] for r in rows] == pytest.approx(reference, rel=1e-4), name
    # and the model really trained: the comparison is not between constants
    assert reference[-1] < reference[0]


def test_agreed_seed_with_two_processes(tmp_path):
    rows, out, _ = train(tmp_path, "s", "--nproc-per-node", "2", "seed=null", "log.sample_ids=true",
                         "data.group_by_length=false",
                         train={"max_steps": 3})  # fmt: skip
    seed = yaml.safe_load((out / "config.yaml").read_text())["seed"]
    assert isinstance(seed, int)
    # both ranks trained step 1 on their share of the global batch that this seed orders
    n = len(DEMO_DATA.read_text().splitlines())
    order = Order(seed, n, 8, 4, 2)
    for rank in (0, 1):
        recorded = [
            json.loads(line) for line in (out / "sample_ids" / f"rank-{rank}-of-2.jsonl").open()
        ]
        first = [r["ids"] for r in recorded if r["step"] == 1]
        assert first == [mb.tolist() for mb in order.micro_batches(0, rank)]
    assert rows[0]["batch_sha"]


@pytest.mark.parametrize(("desync", "field"), [("seed", "seed"), ("data", "data_fingerprint")])
def test_desync_is_caught_by_the_fingerprint_check(tmp_path, desync, field):
    cfg = small_config(tmp_path, testing={"desync": desync, "desync_rank": 1},
                       launch={"timeout_s": 900})  # fmt: skip
    t0 = time.monotonic()
    res = run_cli("train", str(cfg), "--nproc-per-node", "2")
    assert res.returncode != 0
    assert time.monotonic() - t0 < 600  # stopped by the check, not by a timeout (900 s)
    assert "ranks are out of lockstep" in res.stderr
    table = res.stderr[res.stderr.index("ranks are out of lockstep") :]
    assert f"  {field} " in table and "| rank 1: " in table
    log = next((tmp_path / "out" / "logs").glob("launch-*.log")).read_text()
    assert log.count("lockstep: error: rank ") == 2  # every rank stopped, in words
    assert res.stderr.strip().splitlines()[-1].startswith("lockstep: torchrun's and every rank")
    assert not (tmp_path / "out" / "final").exists()


def test_replay_one_rank_in_one_process(tmp_path):
    _, out2, _ = train(tmp_path, "two", "--nproc-per-node", "2", "log.sample_ids=true",
                       train={"max_steps": 4})  # fmt: skip
    _, out1, res = train(tmp_path, "replay", "--debug", "--as-rank", "1/2", "log.sample_ids=true",
                         train={"max_steps": 4})  # fmt: skip
    assert "replaying rank 1 of 2" in res.stderr
    recorded = (out2 / "sample_ids" / "rank-1-of-2.jsonl").read_text()
    replayed = (out1 / "sample_ids" / "rank-1-of-2.jsonl").read_text()
    assert replayed == recorded and len(recorded.splitlines()) == 4
    other = (out2 / "sample_ids" / "rank-0-of-2.jsonl").read_text()
    assert replayed != other
    assert all(i != PAD for line in replayed.splitlines() for i in json.loads(line)["ids"])


@pytest.mark.slow
def test_ranks_wait_for_rank_0_tokenising_longer_than_the_collective_timeout(tmp_path):
    """Rank 0 tokenises for longer than launch.timeout_s; the other rank waits for it (that
    timeout is for collectives all ranks reach together) and the log says what it waits for."""
    from conftest import write_jsonl

    records = [
        {"instruction": f"Uppercase the words number {i}.", "input": f"word{i} river stone",
         "output": f"WORD{i} RIVER STONE"}
        for i in range(60_000)
    ]  # fmt: skip
    data = write_jsonl(tmp_path / "big.jsonl", records)
    cfg = small_config(tmp_path, data, launch={"timeout_s": 10}, train={"max_steps": 2},
                       data={"eval": [{"path": str(DEMO_DATA)}]})  # fmt: skip
    t0 = time.monotonic()
    res = run_cli("train", str(cfg), "--nproc-per-node", "2")
    took = time.monotonic() - t0
    assert res.returncode == 0, res.stderr
    assert (
        "the other 1 rank(s) wait while rank 0 reads or tokenises the training data" in res.stderr
    )
    assert "the other 1 rank(s) wait while rank 0 reads or tokenises the eval data" in res.stderr
    tokenising = [
        line for line in res.stderr.splitlines() if "the training data: tokenised" in line
    ]
    assert tokenising and took > 10  # the wait was longer than the timeout
    assert (tmp_path / "out" / "final").is_dir()
