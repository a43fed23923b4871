"""`lockstep chat` end to end: a real (short) demo run, then the real CLI talking to it.

The chat processes against the run are started side by side (each spends most of its few seconds
importing), which keeps this module near a minute on two cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import HANG_S, ROOT, run_cli

EVAL = ROOT / "src" / "lockstep" / "examples" / "data" / "demo_eval.jsonl"
COUNT, UPPER = "Count the words.", "Uppercase the words."
# interactive turns are one line each (input() reads one line), unlike the trained prompts
FIRST, SECOND = "Count the words. street truck dry", "Uppercase the words. king cup"
SESSION = f"{FIRST}\n\n{SECOND}\n/reset\n{FIRST}\n/exit\nnever read\n"


def eval_record(instruction: str) -> tuple[str, str]:
    """(the prompt as the model was trained on it, the input's words) of the first such record."""
    for line in EVAL.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record["instruction"] == instruction:
            return f"{instruction}\n\n{record['input']}", record["input"]
    raise AssertionError(f"no {instruction!r} record in {EVAL}")


def start_chat(*args: str, stdin: str = "") -> subprocess.Popen:
    """`python -m lockstep chat ARGS` with `stdin` already typed (the end of input comes when
    `finish` collects it)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("LOCKSTEP_TRACEBACK", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "lockstep", "chat", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert proc.stdin
    proc.stdin.write(stdin)  # a few lines: fits the pipe, never blocks
    proc.stdin.flush()
    return proc


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=HANG_S)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


Chat = tuple[list[str], str]  # (arguments, what is typed)


def side_by_side(**chats: Chat) -> dict[str, subprocess.CompletedProcess]:
    procs = {name: start_chat(*args, stdin=typed) for name, (args, typed) in chats.items()}
    return {name: finish(proc) for name, proc in procs.items()}


def greedy(model: str, prompt: str, *extra: str) -> Chat:
    """A one-shot greedy answer."""
    return [model, *extra, "--prompt", prompt, "--temperature", "0"], ""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo, shortened: enough steps to learn the answer formats (counting is learnt first)."""
    tmp = tmp_path_factory.mktemp("chat")
    out = tmp / "run"
    proc = run_cli(
        "train",
        "demo",  # the shipped example, by name
        f"output_dir={out}",
        "train.max_steps=250",
        "batch.micro_size=16",  # one forward per step: the same global batch, fewer calls
        f"data.cache_dir={tmp / 'cache'}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "final" / "config.json").is_file()
    return out


@pytest.fixture(scope="module")
def chats(run_dir: Path) -> dict[str, subprocess.CompletedProcess]:
    """Every conversation with the trained run; the count asked twice (run folder, its final/)."""
    session = ["--temperature", "0", "--max-new-tokens", "8", "--system", "Be brief."]
    done = side_by_side(
        count=greedy(str(run_dir), eval_record(COUNT)[0]),
        count_again=greedy(str(run_dir / "final"), eval_record(COUNT)[0]),
        upper=greedy(str(run_dir), eval_record(UPPER)[0]),
        session=([str(run_dir), *session], SESSION),
    )
    for proc in done.values():
        assert proc.returncode == 0, proc.stderr
    return done


@pytest.mark.slow  # trains the demo for 250 steps (module fixture)
def test_answers_have_the_trained_format(chats: dict[str, subprocess.CompletedProcess]) -> None:
    count, upper = chats["count"].stdout.strip(), chats["upper"].stdout.strip()
    assert count.isdigit(), count  # one number, nothing around it
    # counting is learnt first (every eval record right at 250 steps): the prompt reached the
    # model exactly as in training, through the same chat template
    assert count == str(len(eval_record(COUNT)[1].split()))
    # 250 steps learn the shape (one capitalised word per input word), not yet which words
    assert upper.isupper(), upper
    assert len(upper.split()) == len(eval_record(UPPER)[1].split()), upper


@pytest.mark.slow  # trains the demo for 250 steps (module fixture)
def test_greedy_is_repeatable(chats: dict[str, subprocess.CompletedProcess]) -> None:
    assert chats["count_again"].stdout == chats["count"].stdout


@pytest.mark.slow  # trains the demo for 250 steps (module fixture)
def test_interactive_session_reset_and_exit(chats: dict[str, subprocess.CompletedProcess]) -> None:
    out = chats["session"].stdout
    replies = [part.split("\n")[0] for part in out.split("assistant> ")[1:]]
    assert len(replies) == 3, out  # the empty line is ignored, /exit stops reading
    assert "(conversation cleared, system prompt kept)" in out
    # after /reset the model sees [system, FIRST] again, exactly as in the first turn
    assert replies[2] == replies[0], out


def test_ctrl_c_stops_the_reply_and_eof_ends_the_session() -> None:
    # the random-weight model rambles until max_new_tokens, so there is a reply to stop
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "lockstep", "chat", "builtin:tiny", "--max-new-tokens", "100000"]
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        bufsize=0, env=env, cwd=ROOT,
    )  # fmt: skip
    try:
        assert proc.stdin and proc.stdout
        proc.stdin.write("hello\n")
        proc.stdin.flush()
        seen = ""
        while not seen.endswith("assistant> "):
            char = proc.stdout.read(1)
            assert char, f"the session ended before replying: {seen!r}"
            seen += char
        time.sleep(1.0)  # generating now
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=HANG_S)  # closes stdin: EOF at the next prompt
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "(reply stopped)" in out, out


@pytest.mark.slow  # trains the demo for 250 steps (module fixture)
def test_lora_adapter_on_its_base_and_alone(
    run_dir: Path, chats: dict[str, subprocess.CompletedProcess], tmp_path: Path
) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = run_dir / "final"
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora)
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(base).save_pretrained(adapter)
    recorded = json.loads((adapter / "adapter_config.json").read_text())
    assert recorded["base_model_name_or_path"] == str(base)
    prompt = eval_record(COUNT)[0]
    done = side_by_side(
        on_base=greedy(str(base), prompt, "--adapter", str(adapter)),
        alone=greedy(str(adapter), prompt),
    )
    for proc in done.values():
        assert proc.returncode == 0, proc.stderr
        assert "adapter" in proc.stderr  # the start-up line names what answers
    # LoRA's B starts at zero, so the adapter changes nothing: equal answers mean the right base
    assert done["on_base"].stdout == done["alone"].stdout == chats["count"].stdout


def test_missing_model_is_named() -> None:
    proc = finish(start_chat("no/such/model-dir", "--prompt", "hi"))
    assert proc.returncode == 1
    assert "lockstep: error: model 'no/such/model-dir' not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_folder_that_is_no_model_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    proc = finish(start_chat(str(tmp_path), "--prompt", "hi"))
    assert proc.returncode == 1
    assert f"lockstep: error: folder '{tmp_path}' has neither config.json" in proc.stderr
    assert "adapter_config.json" in proc.stderr and "builtin:tiny" in proc.stderr


def test_interactive_input_of_several_lines() -> None:
    # the trained prompt shape "instruction, blank line, input" typed two ways: a block between
    # lines of """ (pasted text, blank line kept) and lines ending in a backslash
    typed = '"""\nCount the words.\n\nred blue green\n"""\nCount the words.\\\n\\\nred blue\n'
    proc = finish(start_chat("builtin:tiny", "--temperature", "0", "--max-new-tokens", "1",
                             "--show-prompt", stdin=typed))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    prompts = proc.stderr.split("[lockstep] prompt:\n")[1:]
    assert len(prompts) == 2, proc.stderr
    assert "<|im_start|>user\nCount the words.\n\nred blue green<|im_end|>" in prompts[0]
    assert "<|im_start|>user\nCount the words.\n\nred blue<|im_end|>" in prompts[1]
    assert proc.stdout.count("assistant> ") == 2, proc.stdout
