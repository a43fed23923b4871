"""One entry for every world: plans, dry runs, torchrun with 2 processes, 2 simulated nodes."""

from __future__ import annotations

import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import HANG_S, ROOT, run_cli, small_config

from lockstep.config import LaunchConfig
from lockstep.errors import LaunchError
from lockstep.launch import guard, launcher, plan, torchrun_argv
from lockstep.report.metrics import read


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


NOFLAGS = {"nproc_per_node": None, "nnodes": None, "node_rank": None, "master_addr": None,
           "master_port": None}  # fmt: skip


def test_plan_precedence_flag_over_env_over_config():
    cfg = LaunchConfig(nproc_per_node=3, master_port=1111)
    assert plan(cfg, NOFLAGS, {}, gpus=0).nproc_per_node == 3
    assert plan(cfg, NOFLAGS, {"NPROC_PER_NODE": "4"}, gpus=0).nproc_per_node == 4
    flags = {**NOFLAGS, "nproc_per_node": "5", "master_port": "2222"}
    p = plan(cfg, flags, {"NPROC_PER_NODE": "4", "MASTER_PORT": "3333"}, gpus=0)
    assert (p.nproc_per_node, p.master_port) == (5, 2222)
    assert plan(cfg, NOFLAGS, {"MASTER_PORT": "3333"}, gpus=0).master_port == 3333


def test_plan_auto_uses_visible_gpus():
    assert plan(LaunchConfig(), NOFLAGS, {}, gpus=0).nproc_per_node == 1
    assert plan(LaunchConfig(), NOFLAGS, {}, gpus=8).world_size == 8
    assert plan(LaunchConfig(), NOFLAGS, {}, gpus=1).in_process


def test_multi_node_needs_a_port_and_bad_values_say_where_they_came_from():
    with pytest.raises(LaunchError, match="agreed rendezvous port.*--master-port"):
        plan(LaunchConfig(nnodes=2), NOFLAGS, {}, gpus=0)
    with pytest.raises(LaunchError, match="node_rank must be >= 0 and <= 1, got 2 .*NODE_RANK"):
        plan(LaunchConfig(nnodes=2, master_port=9), NOFLAGS, {"NODE_RANK": "2"}, gpus=0)
    with pytest.raises(LaunchError, match="nproc_per_node must be an integer, got 'x' .*--nproc"):
        plan(LaunchConfig(), {**NOFLAGS, "nproc_per_node": "x"}, {}, gpus=0)


def test_torchrun_argv_is_a_list_that_keeps_every_argument():
    p = plan(LaunchConfig(nproc_per_node=2), NOFLAGS, {}, gpus=0)
    args = ["my cfg.yaml", "output_dir=a b", "x='q'", 'y="z=1"']
    argv = torchrun_argv(p, args)
    assert argv[-4:] == args and "--standalone" in argv
    assert shlex.split(shlex.join(argv)) == argv


@pytest.mark.parametrize(
    ("how", "gpus", "debug", "allowed"),
    [
        ("direct", 0, False, True), ("direct", 1, False, True), ("direct", 2, False, False),
        ("direct", 8, False, False), ("direct", 8, True, True), ("lockstep", 8, False, True),
        ("torchrun", 8, False, True), ("torchrun", 0, False, True), ("lockstep", 0, True, True),
    ],
)  # fmt: skip
def test_guard_every_case(how, gpus, debug, allowed):
    refusal = guard(how, gpus, debug)
    assert (refusal is None) == allowed
    if refusal:
        for way in ("lockstep train cfg.yaml", f"torchrun --nproc-per-node {gpus}", "--debug",
                    "LOCKSTEP_DEBUG=1", "CUDA_VISIBLE_DEVICES"):  # fmt: skip
            assert way in refusal
        assert f"sees {gpus} GPUs" in refusal


def test_launcher_detection():
    assert launcher({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, False) == "torchrun"
    assert launcher({}, True) == "lockstep"
    assert launcher({"RANK": "0"}, False) == "direct"


def test_dry_run_single_and_multi_node(tmp_path):
    cfg = small_config(tmp_path)
    res = run_cli("train", str(cfg), "--dry-run", "output_dir=with space")
    assert res.returncode == 0
    lines = res.stdout.splitlines()
    assert lines[0] == "world: 1 process, in this process"
    assert shlex.split(lines[1])[1:] == ["-m", "lockstep.train", str(cfg), "output_dir=with space"]
    res = run_cli(
        "train",
        str(cfg),
        "--dry-run",
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--master-addr",
        "10.1.2.3",
        "batch.global_size=16",
        env={"NPROC_PER_NODE": "2", "MASTER_PORT": "29999"},
    )
    assert res.returncode == 0, res.stderr
    plan_line, cmd = res.stdout.splitlines()
    assert "4 processes = 2 per node x 2 nodes (this is node 1)" in plan_line
    argv = shlex.split(cmd)
    for flag, value in (("--nproc-per-node", "2"), ("--nnodes", "2"), ("--node-rank", "1"),
                        ("--master-addr", "10.1.2.3"), ("--master-port", "29999")):  # fmt: skip
        assert argv[argv.index(flag) + 1] == value
    assert not (tmp_path / "out").exists()  # a dry run runs nothing


def test_two_processes_write_the_same_outputs_as_one(tmp_path, alpaca_file):
    cfg = small_config(tmp_path, alpaca_file)
    out2 = tmp_path / "two procs"
    res = run_cli("train", str(cfg), "--nproc-per-node", "2", f"output_dir={out2}")
    assert res.returncode == 0, res.stderr
    assert "rank 1" not in res.stderr.replace("lockstep rank 1", "")  # rank 1 is quiet
    for name in ("metrics.jsonl", "loss.png", "config.yaml", "final/model.safetensors"):
        assert (out2 / name).is_file(), name
    assert len(read(out2 / "metrics.jsonl")) == 3
    assert res.stderr.count("train:   0%") == 1  # one progress bar: rank 0's


def test_two_nodes_on_one_machine(tmp_path, alpaca_file):
    cfg = small_config(tmp_path, alpaca_file)
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lockstep",
                "train",
                str(cfg),
                "--nnodes",
                "2",
                "--node-rank",
                str(r),
                "--nproc-per-node",
                "1",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                port,
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=HANG_S) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert len(read(tmp_path / "out" / "metrics.jsonl")) == 3
    assert "2 processes" in outs[0][1]


def test_python_dash_m_lockstep_train_and_the_file_itself(tmp_path, alpaca_file):
    cfg = small_config(tmp_path, alpaca_file)
    for entry in (["-m", "lockstep.train"], [str(ROOT / "src" / "lockstep" / "train.py")]):
        out = tmp_path / entry[-1].replace("/", "_")
        res = subprocess.run([sys.executable, *entry, str(cfg), f"output_dir={out}",
                              "train.max_steps=2"], cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
        assert res.returncode == 0, res.stderr
        assert len(read(out / "metrics.jsonl")) == 2


def test_debug_mode_keeps_the_global_batch_of_a_two_process_config(tmp_path, alpaca_file):
    cfg = small_config(tmp_path, alpaca_file, launch={"nproc_per_node": 2})
    res = run_cli("train", str(cfg), "--debug")
    assert res.returncode == 0, res.stderr
    assert "debug mode:" in res.stderr and "launch.nproc_per_node=2 ignored" in res.stderr
    assert "global batch 8 kept: 2 micro-batches of 4" in res.stderr
    assert "1 process(es) x 2 accumulation x 4 micro-batch" in res.stderr
    res2 = run_cli(
        "train",
        str(cfg),
        env={"LOCKSTEP_DEBUG": "1"},
    )
    assert res2.returncode == 0 and "debug mode:" in res2.stderr
    assert read(tmp_path / "out" / "metrics.jsonl")[-1]["loss"] > 0


def _after_the_run(stderr: str) -> list[str]:
    """The terminal's lines after the last progress bar or rank 0 log line: what a failure adds."""
    lines = stderr.replace("\r", "\n").splitlines()
    last = max(i for i, line in enumerate(lines) if line.startswith(("train:", "[lockstep")))
    return [line for line in lines[last + 1 :] if line.strip()]


def _launch_log(stderr: str) -> Path:
    line = [x for x in stderr.splitlines() if "tracebacks included:" in x][-1]
    return Path(line.split("tracebacks included: ")[1].split(" (--traceback")[0])


def test_a_failing_rank_ends_the_run_naming_it(tmp_path, alpaca_file):
    cfg = small_config(
        tmp_path,
        alpaca_file,
        train={"max_steps": 50},
        testing={"fail_at_step": 2, "fail_rank": 1},
        launch={"timeout_s": 900},
    )
    t0 = time.monotonic()
    res = run_cli("train", str(cfg), "--nproc-per-node", "2")
    assert res.returncode != 0
    assert time.monotonic() - t0 < 600  # rank 0 was stopped, not left to time out (900 s)
    assert "rank 1 failed first: injected failure at step 2" in res.stderr
    ps = subprocess.run(["pgrep", "-f", str(cfg)], capture_output=True, text=True)
    assert ps.stdout.strip() == "", "a rank is still running"
    # the terminal: the run as it went, then two lines: the cause, and where the whole story is
    tail = _after_the_run(res.stderr)
    assert len(tail) <= 3 and tail[-2].startswith("lockstep: error: training failed"), tail
    assert "rank 1 failed first" in tail[-2]
    torchrun_banner = "Setting OMP_NUM_THREADS environment variable"
    for noise in ("Traceback", "[rank0]:", torchrun_banner, "torch/distributed", "rank 0: "):
        assert noise not in res.stderr, noise
    assert "train:   0%" in res.stderr  # rank 0's progress, live as ever
    log = _launch_log(res.stderr)
    assert log.parent == tmp_path / "out" / "logs" and log.name.startswith("launch-")
    text = log.read_text()
    assert "Traceback" in text and "injected failure at step 2" in text
    assert "[lockstep rank 0] device: cpu" in text  # every line of the run, the shown ones too


@pytest.mark.slow
def test_traceback_shows_every_ranks_output_on_the_terminal(tmp_path, alpaca_file):
    cfg = small_config(tmp_path, alpaca_file, train={"max_steps": 50},
                       testing={"fail_at_step": 2, "fail_rank": 1}, launch={"timeout_s": 30})  # fmt: skip
    res = run_cli("train", str(cfg), "--nproc-per-node", "2", "--traceback", timeout=120)
    assert res.returncode != 0
    assert "Traceback" in res.stderr and "OMP_NUM_THREADS" in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("lockstep: error: training failed") and "rank 1 failed first" in last
    assert not (tmp_path / "out" / "logs").exists()


def test_debug_rank_without_debugpy_is_a_clear_error(tmp_path, alpaca_file):
    try:
        import debugpy  # noqa: F401
    except ImportError:
        res = run_cli("train", str(small_config(tmp_path, alpaca_file)), "--debug-rank", "0")
        assert res.returncode == 1 and "pip install 'lockstep-finetune[debug]'" in res.stderr
        # several processes: refused before any starts, in one line (not rank 0 blamed)
        t0 = time.monotonic()
        cfg = small_config(tmp_path, alpaca_file)
        res = run_cli("train", str(cfg), "--nproc-per-node", "2", "--debug-rank", "1")
        assert res.returncode == 1 and time.monotonic() - t0 < 30
        assert res.stderr.strip().splitlines() == [
            "lockstep: error: --debug-rank needs debugpy: pip install 'lockstep-finetune[debug]' "
            "(or pip install debugpy)"
        ]
    else:
        pytest.skip("debugpy is installed here; the missing-debugpy message cannot be shown")


def test_launch_output_shows_the_run_and_holds_back_the_noise():
    """What the terminal gets of torchrun's stderr; the log gets every byte."""
    import io

    from lockstep.launch import LaunchOutput

    failed = []
    log, term = io.BytesIO(), io.BytesIO()
    view = LaunchOutput(log, term, lambda: bool(failed))
    chunks = [
        b"W1130 05:43:51.766000 18637 torch/distributed/run.py:874] *****\n",
        b"W1130 05:43:51.766000 18637 torch/distributed/run.py:874] Setting OMP_NUM_THREADS\n",
        b"[lockstep rank 0] plan: 50 steps\n",
        b"UserWarning: something a user needs to see\n",
        b"\r",
        b"train:   0%|          | 0/50 [00:00<?, ?step/s]",  # shown at once, no newline yet
        b"\rtrain:   2%|#         | 1/50 [00:01<01:25,  1.74s/step]",
        b'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\n',
        b"    f()\nValueError: launcher trouble\n",
        b'[rank0]: Traceback (most recent call last):\n[rank0]:   File "y.py"\n',
        b"[rank0]: RuntimeError: Connection closed by peer\n",
    ]
    shown = []
    for chunk in chunks:
        view.feed(chunk)
        shown.append(term.getvalue())
    assert shown[5].endswith(b"train:   0%|          | 0/50 [00:00<?, ?step/s]")
    failed.append(True)  # a rank wrote its failure record: what follows is consequences
    view.feed(b"lockstep: error: rank 1: injected failure\n[W gloo] peer gone\n")
    view.close()
    view.end_line()
    assert log.getvalue() == b"".join(chunks) + b"lockstep: error: rank 1: injected failure\n" \
        b"[W gloo] peer gone\n"  # fmt: skip
    text = term.getvalue().decode()
    assert text == (
        "[lockstep rank 0] plan: 50 steps\nUserWarning: something a user needs to see\n"
        "\rtrain:   0%|          | 0/50 [00:00<?, ?step/s]"
        "\rtrain:   2%|#         | 1/50 [00:01<01:25,  1.74s/step]\n"
    )
    assert view.last_error == "RuntimeError: Connection closed by peer"


# ---------------------------------------------------------------- runs that end badly


def test_first_failure_names_the_cause_not_its_consequences():
    from lockstep.launch import first_failure

    peer_gone = {"rank": 0, "time": 5.0, "error": "Connection closed by peer", "comm": True}
    killed = {"1": {"exitcode": -9, "signal": "SIGKILL", "time": 9.0}}
    line = first_failure([peer_gone], killed, [0, 1])
    assert line.startswith("rank 1 was killed by SIGKILL (out of memory?")
    timed_out = {"rank": 0, "time": 5.0, "error": "Timed out waiting 10000ms", "comm": True}
    assert first_failure([timed_out], {"0": {"exitcode": 1, "signal": None, "time": 6}}, [0, 1])
    assert first_failure([timed_out], {}, [0, 1]).startswith("rank 1 stopped responding")
    stopped_late = {"1": {"exitcode": -9, "signal": "SIGKILL", "time": 40.0}}  # by torchrun
    assert first_failure([timed_out], stopped_late, [0, 1]).startswith("rank 1 stopped responding")
    real = {"rank": 1, "time": 3.0, "error": "data.train.0: bad record"}
    assert (
        first_failure([timed_out, real], {}, [0, 1])
        == "rank 1 failed first: data.train.0: bad record"
    )
    assert first_failure([], {"1": {"exitcode": 2, "signal": None, "time": 1}}, [0, 1]).startswith(
        "rank 1 exited with status 2"
    )
    assert first_failure([], {}, [0, 1]) is None


def _start_two_process_run(tmp_path, alpaca_file, **launch):
    """A 2-process run long enough to be caught mid-training, in a process group of its own."""
    cfg = small_config(tmp_path, alpaca_file, train={"max_steps": 100000},
                       launch={"timeout_s": 20, **launch})  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "lockstep", "train", str(cfg), "--nproc-per-node", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        start_new_session=True,
    )  # fmt: skip
    metrics = tmp_path / "out" / "metrics.jsonl"
    deadline = time.monotonic() + HANG_S
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    return cfg, proc


def _workers(cfg) -> dict[int, int]:
    """{rank: pid} of the training workers of this config."""
    found = {}
    ps = subprocess.run(["pgrep", "-f", f"lockstep.train {cfg}"], capture_output=True, text=True)
    for pid in map(int, ps.stdout.split()):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ranks = [e[5:] for e in env if e.startswith(b"RANK=")]
        if ranks:
            found[int(ranks[0])] = pid
    return found


@pytest.mark.slow
def test_killing_the_launchers_process_group_leaves_no_worker(tmp_path, alpaca_file):
    """A closed terminal or a scheduler's kill -9 of the group: the workers die with it."""
    import os
    import signal

    cfg, proc = _start_two_process_run(tmp_path, alpaca_file)
    assert len(_workers(cfg)) == 2
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    deadline = time.monotonic() + 60  # returns as soon as they are gone
    while _workers(cfg) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _workers(cfg) == {}, "a worker outlived its launcher"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "expected"),
    [("SIGKILL", "rank 1 was killed by SIGKILL (out of memory?"),
     ("SIGSTOP", "rank 1 stopped responding")],
)  # fmt: skip
def test_a_killed_or_stopped_rank_is_named(tmp_path, alpaca_file, sig, expected):
    import os
    import signal

    cfg, proc = _start_two_process_run(tmp_path, alpaca_file)
    os.kill(_workers(cfg)[1], getattr(signal, sig))
    try:
        _, err = proc.communicate(timeout=HANG_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    last = [line for line in err.splitlines() if line.startswith("lockstep: error")][-1]
    assert expected in last, err[-3000:]
    tail = _after_the_run(err)
    assert len(tail) <= 3 and tail[-2] == last and "Traceback" not in err, err[-3000:]
    assert _launch_log(err).is_file()


@pytest.mark.slow
def test_ctrl_c_on_two_processes_saves_and_ends_in_words(tmp_path, alpaca_file):
    """The terminal's Ctrl-C (SIGINT to its process group): the ranks save a checkpoint, the run
    ends saying where, and nothing of torchrun's way of stopping follows."""
    import os
    import signal

    cfg, proc = _start_two_process_run(tmp_path, alpaca_file)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    tail = _after_the_run(err)
    assert len(tail) <= 3 and tail[-1].startswith("lockstep: stopped by SIGINT"), err[-3000:]
    assert "Run the same command again to continue from it" in tail[-1]
    assert "Traceback" not in err and "SignalException" not in err, err[-3000:]
    assert list((tmp_path / "out" / "checkpoints").glob("step-*/COMPLETE")), err[-3000:]


def test_dry_run_refuses_as_rank_without_debug(tmp_path):
    res = run_cli("train", str(small_config(tmp_path)), "--dry-run", "--as-rank", "1/2")
    assert res.returncode != 0
    assert "--as-rank replays one rank in one process: add --debug" in res.stderr


def test_a_hub_name_that_cannot_be_reached_fails_at_once(tmp_path):
    t0 = time.monotonic()
    res = run_cli("train", str(small_config(tmp_path)), "model.path=no-such-org/no-such-model",
                  env={"HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert res.returncode != 0 and time.monotonic() - t0 < 120  # no download attempts
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("lockstep: error: model.path 'no-such-org/no-such-model' is not a local")
    assert "HF_HUB_OFFLINE is set" in last and "huggingface-cli download" in last
