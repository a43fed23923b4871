"""What a run says agrees with what it does: counts, fingerprints, epochs, what is (re)written."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from conftest import run_cli, small_config

from lockstep.data.dataset import BuildStats, Samples
from lockstep.data.render import IGNORE
from lockstep.training.evaluate import split_validation


def line(stderr: str, start: str) -> str:
    """The first log line that starts with `start` (after the [lockstep] prefix)."""
    for text in stderr.splitlines():
        if text.startswith(f"[lockstep] {start}"):
            return text
    raise AssertionError(f"no line starting {start!r} in:\n{stderr}")


def test_a_split_counts_only_its_own_samples() -> None:
    ids = [np.arange(n) for n in (5, 7, 9, 11, 13, 15, 17, 19, 21, 23)]
    labels = [np.where(np.arange(len(x)) >= 3, x, IGNORE) for x in ids]
    stats = BuildStats(records=10)
    train, val = split_validation(Samples(ids, labels, "abc", stats), 0.2, seed=3)
    for part in (train, val):
        assert part.token_count() == sum(len(x) for x in part.input_ids)
        assert part.target_token_count() == sum(int((y != IGNORE).sum()) for y in part.labels)
        assert part.sample_count() == len(part)
        assert part.fingerprint == "abc"  # the data's: one hash names the data in a run
    assert train.token_count() + val.token_count() == 140
    assert (len(train), train.stats.held_out) == (8, 2)
    assert train.stats.records == 10  # what the build read stays the build's


def test_counts_follow_the_samples_held_after_subset_and_packing() -> None:
    # the counts that decide padding-free rows and fill the start-up log come from the samples
    # a Samples holds, never from numbers the build wrote down for all of them
    from lockstep.data.packing import pack

    ids = [np.arange(n) for n in (5, 7, 9, 11, 13)]
    labels = [np.where(np.arange(len(x)) >= 2, x, IGNORE) for x in ids]
    whole = Samples(ids, labels, "abc", BuildStats(records=5))
    assert (whole.token_count(), whole.target_token_count(), whole.sample_count()) == (45, 35, 5)
    part = whole.subset([1, 3])
    assert (part.token_count(), part.target_token_count(), part.sample_count()) == (18, 14, 2)
    assert part.stats == whole.stats and part.stats is not whole.stats  # the build's, a copy
    assert whole.without_last().token_count() == 45 - 13
    packed = pack(whole, 16)  # rows: [13], [11, 5], [9, 7]
    assert (len(packed), packed.sample_count(), packed.token_count()) == (3, 5, 45)
    assert packed.stats.packing_efficiency == round(45 / (3 * 16), 4)
    one_row = packed.subset([1])
    assert (one_row.sample_count(), one_row.token_count()) == (2, 16)
    assert one_row.target_token_count() == int((packed.labels[1] != IGNORE).sum())


def test_val_fraction_log_counts_the_training_part_with_one_fingerprint(tmp_path: Path) -> None:
    cfg = small_config(tmp_path, data={"val_fraction": 0.05}, train={"max_steps": 1})
    res = run_cli("train", str(cfg))
    assert res.returncode == 0, res.stderr
    data = line(res.stderr, "data: ")
    m = re.search(r"data: (\d+) samples \((\d+) more held out: data.val_fraction=0.05\) from "
                  r"(\d+) records, (\d+) tokens.*fingerprint (\w+)", data)  # fmt: skip
    assert m, data
    kept, held, records = (int(m[k]) for k in (1, 2, 3))
    assert (kept + held, held) == (records, round(records * 0.05))
    cached = line(res.stderr, "the training data: ")
    assert f"samples-{m[5]}.npz" in cached  # the fingerprint named is the cached data's


def test_a_finished_run_is_left_as_it_is(tmp_path: Path) -> None:
    cfg = small_config(tmp_path, train={"max_steps": 2})
    out = tmp_path / "out"
    assert run_cli("train", str(cfg)).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in (out / "final" / "model.safetensors",
                                                out / "loss.png", out / "metrics.jsonl")}  # fmt: skip
    again = run_cli("train", str(cfg))
    assert again.returncode == 0, again.stderr
    assert "the run is already complete (2 of 2 steps" in again.stderr
    assert "plan:" not in again.stderr and "train:" not in again.stderr  # no plan, no bar
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing rewritten
    # overwrite says what it deletes
    fresh = run_cli("train", str(cfg), "checkpoint.resume=never", "checkpoint.overwrite=true")
    assert fresh.returncode == 0, fresh.stderr
    assert "checkpoint.overwrite=true: deleted 1 checkpoint(s) of an earlier run" in fresh.stderr
    assert "step-00000002" in line(fresh.stderr, "checkpoint.overwrite")
    # export refuses to write over a folder, unless told to
    hf = tmp_path / "hf"
    assert run_cli("export", str(out), "--out", str(hf)).returncode == 0
    refused = run_cli("export", str(out), "--out", str(hf))
    assert refused.returncode != 0
    assert "already holds files" in refused.stderr and "--overwrite" in refused.stderr
    assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    (hf / "stale.bin").write_text("old")
    replaced = run_cli("export", str(out), "--out", str(hf), "--overwrite")
    assert replaced.returncode == 0 and "(replaced)" in replaced.stdout, replaced.stderr
    assert not (hf / "stale.bin").exists() and (hf / "config.json").is_file()


def test_plan_names_epochs_and_packed_sequences(tmp_path: Path, alpaca_file: Path) -> None:
    cfg = small_config(tmp_path, alpaca_file, data={"packing": True}, train={"max_steps": 6})
    res = run_cli("train", str(cfg))
    assert res.returncode == 0, res.stderr
    packing = line(res.stderr, "packing: ")
    packs = int(re.search(r"into (\d+) sequences", packing)[1])
    plan = line(res.stderr, "plan: ")
    per_epoch = -(-packs // 8)  # global batch 8
    assert f"({6 / per_epoch:.2f} epochs of {per_epoch} steps: train.max_steps=6 wins over " \
           "train.epochs=1)" in plan, plan  # fmt: skip
    assert "of 8 packed sequences = 1 process(es)" in plan, plan


def test_a_replay_says_what_it_did_and_keeps_the_runs_metrics(tmp_path: Path) -> None:
    cfg = small_config(tmp_path, train={"max_steps": 2})
    out = tmp_path / "out"
    res = run_cli("train", str(cfg), "--debug", "--as-rank", "1/2")
    assert res.returncode == 0, res.stderr
    done = line(res.stderr, "replay of rank 1 of 2 done: steps 1-2")
    assert "No checkpoint and no final/ model are written" in done
    assert "rank 1's share of each step" in done
    assert not (out / "final").exists() and not (out / "metrics.jsonl").exists()
    assert len((out / "metrics-replay-rank1-of-2.jsonl").read_text().splitlines()) == 2


def test_eval_show_prints_the_first_eval_prompts_before_and_after(
    tmp_path: Path, alpaca_file: Path
) -> None:
    cfg = small_config(tmp_path, data={"eval": [{"path": str(alpaca_file)}]},
                       eval={"show": 3}, train={"max_steps": 2})  # fmt: skip
    res = run_cli("train", str(cfg))
    assert res.returncode == 0, res.stderr
    text = res.stderr.split("what training changed, on the first 3 eval prompts:\n")[1]
    lines = text.splitlines()
    assert [c.strip() for c in lines[0].split(" | ")] == ["prompt", "data says", "before training", "after training",
                                     "right"], lines[0]  # fmt: skip
    rows = [[c.strip() for c in row.split(" | ")] for row in lines[2:5]]
    # the user's message as trained (template markup left out), the data's answer
    assert [r[:2] for r in rows] == [[f"Uppercase the words. word{i} river", f"WORD{i} RIVER"]
                                     for i in range(3)]  # fmt: skip
    right = sum(r[4] == "yes" for r in rows)
    assert re.fullmatch(rf"after training {right} of 3 answers are the data's \(before: \d of 3\);"
                        r" greedy, eval.show=3", lines[5]), lines[5]  # fmt: skip


def test_eval_show_needs_eval_prompts(tmp_path: Path) -> None:
    res = run_cli("train", str(small_config(tmp_path, eval={"show": 2})))
    assert res.returncode == 2 or res.returncode == 1, res.stderr
    assert "eval.show=2 answers eval prompts, but there are none" in res.stderr
