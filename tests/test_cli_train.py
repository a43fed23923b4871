"""Training end to end through the real CLI, on the built-in tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT, run_cli, small_config, write_jsonl

from lockstep.report.metrics import read as read_rows


def read(path):
    """The training rows of a metrics file (the demo also writes an eval row at its end)."""
    return [row for row in read_rows(path) if "loss" in row]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A shortened demo: the shipped config, fewer steps."""
    out = tmp_path_factory.mktemp("demo") / "run out"  # a space in the path on purpose
    res = run_cli(
        "train",
        "demo",  # the shipped example, by name
        f"output_dir={out}",
        "train.max_steps=80",
        "log.every_steps=1",
    )
    assert res.returncode == 0, res.stderr
    return out, res


def test_demo_writes_everything(demo_run):
    out, res = demo_run
    for name in (
        "metrics.jsonl",
        "loss.png",
        "config.yaml",
        "final/config.json",
        "final/model.safetensors",
        "final/tokenizer.json",
    ):
        assert (out / name).is_file(), name
    rows = read(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 81))
    for key in ("step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"):
        assert key in rows[0]
    assert (out / "config.yaml").read_text().startswith("# lockstep resolved config; config_hash: ")
    assert "train: 100%" in res.stderr and "tok_s=" in res.stderr  # the progress bar


def test_demo_loss_drops(demo_run):
    out, _ = demo_run
    losses = [r["loss"] for r in read(out / "metrics.jsonl")]
    first, last = losses[0], sum(losses[-10:]) / 10
    assert last < 0.7 * first, (first, last)


def test_final_folder_loads_with_transformers_and_generates(demo_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = demo_run
    tok = AutoTokenizer.from_pretrained(out / "final")
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Uppercase the words.\n\nriver stone"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        gen = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] > prompt["input_ids"].shape[1]


def test_warmup_then_cosine_and_grad_clip(demo_run):
    out, _ = demo_run
    rows = read(out / "metrics.jsonl")
    lrs = [r["lr"] for r in rows]
    assert lrs[0] < lrs[5] < lrs[9]  # warmup (10 steps in the demo)
    assert lrs[-1] < lrs[40] < lrs[10]  # cosine decay
    assert all(r["grad_norm"] > 0 for r in rows)


def test_accumulation_gives_the_same_steps(tmp_path, alpaca_file):
    """micro 4 x accumulation 2 and micro 8 x accumulation 1 train on the same global batch."""
    losses = {}
    for micro in (4, 8):
        (tmp_path / str(micro)).mkdir()
        cfg = small_config(tmp_path / str(micro), alpaca_file)
        res = run_cli("train", str(cfg), f"batch.micro_size={micro}")
        assert res.returncode == 0, res.stderr
        losses[micro] = [r["loss"] for r in read(tmp_path / str(micro) / "out" / "metrics.jsonl")]
    assert losses[4] == pytest.approx(losses[8], rel=1e-4)


def test_messages_format(tmp_path):
    recs = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"say {i}"},
                {"role": "assistant", "content": f"{i}"},
            ]
        }
        for i in range(8)
    ]
    data = write_jsonl(tmp_path / "m.jsonl", recs)
    cfg = small_config(tmp_path, data={"train": [{"path": str(data), "format": "messages"}]})
    res = run_cli("train", str(cfg), "train.max_steps=1")
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "out" / "metrics.jsonl").read_text())["target_tokens"] > 0


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda t: ("train", str(t / "missing.yaml")), "config file .*missing.yaml' not found"),
        (
            lambda t: ("train", str(small_config(t, t / "nodata.jsonl"))),
            "data.train.0.path: file '.*nodata.jsonl' not found",
        ),
    ],
)
def test_errors_are_one_line_without_traceback(tmp_path, make, expected):
    import re

    res = run_cli(*make(tmp_path))
    assert res.returncode == 1
    assert not (tmp_path / "out").exists()  # failed before creating anything
    assert re.search(r"lockstep: error: " + expected, res.stderr), res.stderr
    assert "Traceback" not in res.stderr


def test_bad_yaml_line_and_traceback_switches(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("seed: 1\ndata:\n  train: [\n")
    res = run_cli("train", str(cfg))
    assert res.returncode == 1 and "bad.yaml:4" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("train", str(cfg), "--traceback")
    assert "Traceback" in res.stderr and "lockstep: error:" in res.stderr
    res = run_cli("train", str(cfg), env={"LOCKSTEP_TRACEBACK": "1"})
    assert "Traceback" in res.stderr


def test_lockstep_train_reads_its_config_once(tmp_path, alpaca_file):
    # in one process the config `lockstep train` loaded and checked is the one that trains: an
    # audit hook counts the opens of the file (the run's own copy in output_dir is another file)
    import os
    import subprocess
    import sys

    cfg = small_config(tmp_path, alpaca_file, train={"max_steps": 1})
    script = (
        "import sys\n"
        f"path, opened = {str(cfg)!r}, []\n"
        "sys.addaudithook(lambda event, args: opened.append(event) if event == 'open' and "
        "str(args[0]) == path else None)\n"
        "from lockstep.cli import main\n"
        "code = main(['train', path])\n"
        "print(f'config opened {len(opened)} time(s)')\n"
        "sys.exit(code)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LOCKSTEP_TRACEBACK"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "config opened 1 time(s)" in res.stdout, res.stdout
    assert (tmp_path / "out" / "final").is_dir()


def test_every_command_takes_traceback():
    from lockstep.cli import build_parser
    from lockstep.train import parse

    commands = [["train", "c.yaml"], ["data", "preview", "c.yaml"], ["export", "r", "--out", "o"],
                ["eval", "c.yaml"], ["configs"], ["chat", "builtin:tiny"], ["env"],
                ["serve", "builtin:tiny"]]  # fmt: skip
    for argv in commands:
        assert parse(build_parser(), [*argv, "--traceback"]).traceback is True, argv
        assert parse(build_parser(), argv).traceback is False, argv


def test_bad_record_names_file_and_line(tmp_path, alpaca_file):
    lines = alpaca_file.read_text().splitlines()
    lines[6] = '{"instruction": "x", "input": "y"}'
    alpaca_file.write_text("\n".join(lines) + "\n")
    res = run_cli("train", str(small_config(tmp_path, alpaca_file)))
    assert res.returncode == 1
    assert f"{alpaca_file}:7: missing field 'output'" in res.stderr


def test_python_dash_m_lockstep_and_version():
    res = run_cli("--version")
    assert res.returncode == 0 and res.stdout.startswith("lockstep ")
    assert (ROOT / "src" / "lockstep" / "__main__.py").is_file()


def test_a_lora_run_and_its_export_say_nothing_of_transformers_internals(tmp_path):
    """No `is_gradient_checkpointing is deprecated` (PEFT's, on every wrap) and no `Writing
    model shards` bar (the base and the export are written in seconds) among lockstep's lines."""
    cfg = small_config(tmp_path, finetune={"method": "lora", "lora": {"r": 4, "alpha": 8}},
                       train={"max_steps": 1})  # fmt: skip
    res = run_cli("train", str(cfg))
    assert res.returncode == 0, res.stderr
    exported = run_cli("export", str(tmp_path / "out"), "--out", str(tmp_path / "hf"))
    assert exported.returncode == 0, exported.stderr
    for stderr in (res.stderr, exported.stderr):
        assert "is_gradient_checkpointing" not in stderr and "FutureWarning" not in stderr
        assert "Writing model shards" not in stderr and "Loading weights" not in stderr
    assert (tmp_path / "out" / "base" / "model.safetensors").is_file()
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_log_lines_go_through_the_progress_bar():
    """An eval line during training starts a line of its own, and the bar is drawn again."""
    import io
    import logging

    from tqdm import tqdm

    from lockstep.report.log import BarAwareHandler

    stream = io.StringIO()
    log = logging.getLogger("lockstep.test.bar")
    handler = BarAwareHandler(stream)
    handler.setFormatter(logging.Formatter("[lockstep] %(message)s"))
    log.addHandler(handler)
    log.propagate = False
    bar = tqdm(total=5, desc="train", unit="step", file=stream, mininterval=0)
    try:
        bar.update(1)
        log.warning("step 5: eval_loss 6.4966")
        bar.update(1)
    finally:
        bar.close()
        log.removeHandler(handler)
    text = stream.getvalue()
    assert "\r[lockstep] step 5: eval_loss 6.4966\n" in text, repr(text)
    assert text.rindex("2/5") > text.index("[lockstep] step 5")  # the bar again, below it
