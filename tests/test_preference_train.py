"""Preference training end to end: the real CLI on the demo's pairs, on 1 and 2 processes."""

from __future__ import annotations

import random
import signal

import pytest
from conftest import run_cli, small_config
from test_checkpoint import start, wait_for_step

from lockstep.report.metrics import read

PAIRS = {"train": [{"path": "builtin:demo_pairs.jsonl", "format": "alpaca"}], "max_length": 64}
LORA = {"stage": "preference", "method": "lora",
        "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}}  # fmt: skip
FULL = {"stage": "preference", "method": "full"}


def pair_config(tmp_path, finetune=None, **sections):
    tmp_path.mkdir(parents=True, exist_ok=True)
    return small_config(tmp_path, finetune=finetune or LORA, data=PAIRS, **sections)


def train_rows(out):
    return [r for r in read(out / "metrics.jsonl") if "loss" in r]


def test_dpo_with_lora_trains_and_logs_rewards(tmp_path):
    cfg = pair_config(tmp_path, train={"max_steps": 3}, optim={"lr": 1e-2, "warmup_steps": 0})
    res = run_cli("train", str(cfg))
    assert res.returncode == 0, res.stderr
    assert "answer pairs (dpo, reference: the model with its LoRA adapters off" in res.stderr
    rows = train_rows(tmp_path / "out")
    assert [r["step"] for r in rows] == [1, 2, 3]
    first = rows[0]
    assert first["loss"] == pytest.approx(0.693147, abs=1e-5)  # the policy starts as its reference
    assert first["rewards/margin"] == pytest.approx(0.0, abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "logps/chosen",
                "logps/rejected", "prefers_chosen"):  # fmt: skip
        assert key in first
    assert rows[-1]["rewards/margin"] > 0  # the chosen answers pull ahead
    assert (tmp_path / "out" / "final" / "adapter_config.json").is_file()
    assert (tmp_path / "out" / "loss.png").stat().st_size > 0  # loss, and rewards beside it


@pytest.mark.parametrize(
    ("loss", "finetune"),
    [("ipo", LORA), ("simpo", FULL), ("orpo", FULL), ("dpo", FULL)],
)
def test_each_loss_trains_end_to_end(tmp_path, loss, finetune):
    cfg = pair_config(tmp_path, finetune=finetune, preference={"loss": loss},
                      train={"max_steps": 2})  # fmt: skip
    res = run_cli("train", str(cfg))
    assert res.returncode == 0, res.stderr
    rows = train_rows(tmp_path / "out")
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] == r["loss"] for r in rows)


def test_same_losses_on_one_and_two_processes_and_any_accumulation(tmp_path):
    """The loss of a step is the mean over the global batch's pairs: 1 process with micro-batch
    8 (no accumulation), 1 process with 4 x 2, and 2 processes with 2 x 2 give the same losses
    and the same batches."""
    runs = {
        "one": [],
        "accumulated": ["batch.micro_size=4"],
        "two": ["batch.micro_size=2", "--nproc-per-node", "2"],
    }
    rows = {}
    for name, args in runs.items():
        cfg = pair_config(tmp_path / name, batch={"global_size": 8, "micro_size": 8},
                          train={"max_steps": 3}, optim={"lr": 1e-2})  # fmt: skip
        res = run_cli("train", str(cfg), *args)
        assert res.returncode == 0, res.stderr
        rows[name] = train_rows(tmp_path / name / "out")
    for name in ("accumulated", "two"):
        assert [r["batch_sha"] for r in rows[name]] == [r["batch_sha"] for r in rows["one"]]
        for key in ("loss", "rewards/margin", "logps/chosen"):
            got, want = [r[key] for r in rows[name]], [r[key] for r in rows["one"]]
            assert got == pytest.approx(want, rel=1e-4, abs=1e-4), (name, key)


def test_kill_9_after_a_checkpoint_resumes_bit_for_bit(tmp_path):
    steps = {"train": {"max_steps": 12}, "checkpoint": {"every_steps": 6}}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert run_cli("train", str(pair_config(tmp_path / "a", **steps))).returncode == 0
    reference = train_rows(tmp_path / "a" / "out")
    cfg = pair_config(tmp_path / "b", **steps)
    proc = start(cfg)
    wait_for_step(tmp_path / "b" / "out", random.randint(7, 10), proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    res = run_cli("train", str(cfg))
    assert res.returncode == 0, res.stderr
    assert "step-00000006 at step 6" in res.stderr
    resumed = train_rows(tmp_path / "b" / "out")
    assert [r["step"] for r in resumed] == list(range(1, 13))
    for key in ("loss", "batch_sha", "grad_norm", "rewards/margin"):
        assert [r[key] for r in resumed[6:]] == [r[key] for r in reference[6:]], key


def test_ranks_out_of_lockstep_stop_before_the_reference_pass(tmp_path):
    """Rank 1 drops its last row (testing.desync=data): the ranks compare what the reference
    table depends on before computing it together, and stop with the fingerprint table."""
    cfg = pair_config(tmp_path, finetune=FULL, train={"max_steps": 2},
                      testing={"desync": "data", "desync_rank": 1}, launch={"timeout_s": 600})  # fmt: skip
    res = run_cli("train", str(cfg), "--nproc-per-node", "2")
    assert res.returncode != 0
    table = res.stderr[res.stderr.index("ranks are out of lockstep (before the reference pass)") :]
    assert "  reference_table " in table and "  reference_rows " in table and "| rank 1: " in table
    assert "reference log-probabilities: computed" not in res.stderr


@pytest.mark.slow  # the default suite's 10 minutes; CI runs it
def test_precomputed_reference_is_reused_by_a_second_run_and_a_resume(tmp_path):
    cfg = pair_config(tmp_path, finetune=FULL, train={"max_steps": 2},
                      checkpoint={"every_steps": 1})  # fmt: skip
    res = run_cli("train", str(cfg))
    assert res.returncode == 0, res.stderr
    assert "reference log-probabilities: computed in" in res.stderr
    first = train_rows(tmp_path / "out")
    assert first[0]["loss"] == pytest.approx(0.693147, abs=1e-5)
    res = run_cli("train", str(cfg), "train.max_steps=3")  # a resume
    assert res.returncode == 0, res.stderr
    assert "reference log-probabilities: read from" in res.stderr
    other = tmp_path / "second"
    res = run_cli("train", str(cfg), f"output_dir={other}")  # a new run on the same data
    assert res.returncode == 0, res.stderr
    assert "reference log-probabilities: read from" in res.stderr
    assert [r["loss"] for r in train_rows(other)] == [r["loss"] for r in first]


@pytest.mark.slow  # the default suite's 10 minutes; CI runs it
def test_eval_pairs_are_scored_before_and_after_and_the_result_exports(tmp_path):
    data = {**PAIRS, "eval": [{"path": "builtin:demo_pairs_eval.jsonl", "format": "alpaca"}]}
    cfg = small_config(tmp_path, finetune=LORA, data=data, train={"max_steps": 2})
    res = run_cli("train", str(cfg))
    assert res.returncode == 0, res.stderr
    evals = [r for r in read(tmp_path / "out" / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2]
    assert evals[0]["eval_loss"] == pytest.approx(0.693147, abs=1e-5)
    assert evals[0]["eval_units"] == 120 and 0 <= evals[1]["eval_prefers_chosen"] <= 1
    before, after = evals[0]["eval_prefers_chosen"], evals[1]["eval_prefers_chosen"]
    assert f"finds likelier: {before:.1%} before training, {after:.1%} after 2 steps" in res.stderr
    res = run_cli("export", str(tmp_path / "out"), "--out", str(tmp_path / "hf"))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "hf" / "config.json").is_file()
    res = run_cli("chat", str(tmp_path / "out"), "--prompt", "Count the words.\ncat dog",
                  "--temperature", "0", "--max-new-tokens", "4")  # fmt: skip
    assert res.returncode == 0 and res.stdout.strip(), res.stderr
    res = run_cli("eval", str(cfg))  # scores SFT runs; a preference run scored its pairs above
    assert res.returncode == 1 and "scores its eval pairs while it trains" in res.stderr


@pytest.mark.slow
@pytest.mark.parametrize("finetune", [LORA, FULL], ids=["lora", "full-precompute"])
def test_fsdp_on_two_processes_trains_the_pairs_as_ddp_does(tmp_path, finetune):
    """FSDP2 shards the model the pair objective wraps: the reference pass (adapters off, or
    the precomputed table computed through the sharded model) and the losses equal DDP's."""
    rows = {}
    for strategy in ("ddp", "fsdp"):
        cfg = pair_config(tmp_path / strategy, finetune=finetune, train={"max_steps": 3},
                          optim={"lr": 1e-2})  # fmt: skip
        res = run_cli("train", str(cfg), "--nproc-per-node", "2", f"train.strategy={strategy}")
        assert res.returncode == 0, res.stderr
        rows[strategy] = train_rows(tmp_path / strategy / "out")
    assert rows["fsdp"][0]["loss"] == pytest.approx(0.693147, abs=1e-5)
    for key in ("loss", "rewards/margin", "grad_norm"):
        got, want = [r[key] for r in rows["fsdp"]], [r[key] for r in rows["ddp"]]
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5), key


def _layouts(records: list[dict]) -> dict[str, list[dict]]:
    """The demo's pairs in each layout preference data comes in (alpaca's is the demo's own)."""

    def prompt(r):
        return f"{r['instruction']}\n{r['input']}"

    return {
        "sharegpt": [{"conversations": [{"from": "human", "value": prompt(r)}],
                      "chosen": {"from": "gpt", "value": r["chosen"]},
                      "rejected": {"from": "gpt", "value": r["rejected"]}} for r in records],
        "preference": [{"prompt": prompt(r), "chosen": r["chosen"], "rejected": r["rejected"]}
                       for r in records],
        "preference-messages": [{
            "prompt": [{"role": "user", "content": prompt(r)}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        } for r in records],
    }  # fmt: skip


@pytest.mark.parametrize("layout", ["sharegpt", "preference", "preference-messages"])
def test_each_pair_layout_trains_end_to_end(tmp_path, layout):
    import json

    from conftest import EXAMPLES

    lines = (EXAMPLES / "data" / "demo_pairs.jsonl").read_text().splitlines()[:64]
    records = _layouts([json.loads(x) for x in lines])[layout]
    path = tmp_path / f"{layout}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    fmt = "sharegpt" if layout == "sharegpt" else "preference"
    cfg = small_config(tmp_path, finetune=LORA, data={"train": [{"path": str(path), "format": fmt}]},
                       train={"max_steps": 2})  # fmt: skip
    res = run_cli("train", str(cfg))
    assert res.returncode == 0, res.stderr
    assert "data: 128 samples from 64 records" in res.stderr
    rows = train_rows(tmp_path / "out")
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5) and len(rows) == 2


def test_data_preview_shows_each_pair_with_both_answers_marked(tmp_path):
    cfg = pair_config(tmp_path)
    res = run_cli("data", "preview", str(cfg), "-n", "1")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    chosen = out[out.index("--- pair 0: chosen") : out.index("--- pair 0: rejected")]
    rejected = out[out.index("--- pair 0: rejected") : out.index("--- statistics")]
    # the demo's first pair: the same prompt, each answer (and its end marker) marked trained
    assert "[[FOX NORTH CUP NORTH" in chosen and "[[FOX NORTH CUP north" in rejected
    assert chosen.split("[[")[0].split("\n", 1)[1] == rejected.split("[[")[0].split("\n", 1)[1]
    assert "pairs:          1200" in out and "--- pair 1" not in out
