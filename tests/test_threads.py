"""CPU threads: lockstep leaves out the cores other work uses, the user's count wins, torchrun
processes share the free cores, and the start-up log names the device and the choice."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import HANG_S, ROOT, run_cli, small_config

from lockstep import threads
from lockstep.threads import Cpu

AUTO = {"OMP_NUM_THREADS": None, "MKL_NUM_THREADS": None}  # no count of the user's


def test_rule_leaves_out_the_cores_other_work_uses() -> None:
    assert threads.rule(2, 0.0) == 2  # idle: every core
    assert threads.rule(2, 0.2) == 2  # a shell, an editor: noise
    assert threads.rule(2, 0.5) == 1  # half a core taken is a core taken
    assert threads.rule(2, 2.0) == 1 == threads.rule(2, 7.5)  # never fewer than one
    assert threads.rule(16, 3.1) == 13 and threads.rule(16, 3.3) == 12
    assert threads.rule(16, 0.0, processes=4) == 4  # torchrun's processes share the free cores
    assert threads.rule(16, 8.0, processes=4) == 2
    assert threads.rule(2, 0.0, processes=4) == 1


def test_the_users_count_wins() -> None:
    cpu = Cpu(cores=8, logical=16)
    assert threads.choose({"OMP_NUM_THREADS": "3"}, 3, cpu) == threads.Choice(
        3, "OMP_NUM_THREADS=3"
    )
    assert threads.choose({"MKL_NUM_THREADS": "2"}, 2, cpu).why == "MKL_NUM_THREADS=2"
    # torch's count differs from its default (cores or logical CPUs): the program set it
    assert threads.choose({}, 5, cpu) == threads.Choice(
        5, "torch.set_num_threads before lockstep started"
    )
    measured = threads.choose({"OMP_NUM_THREADS": " "}, 8, cpu)  # blank: not a choice
    assert 1 <= measured.threads <= 8 and "OMP_NUM_THREADS=N to choose" in measured.why


def test_physical_cores_count_hyperthreads_once(tmp_path: Path) -> None:
    for cpu, siblings in enumerate(["0,2", "1,3", "0,2", "1,3"]):
        topo = tmp_path / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "core_cpus_list").write_text(siblings + "\n")
    assert threads.physical_cores({0, 1, 2, 3}, tmp_path) == 2
    assert threads.physical_cores({0, 2}, tmp_path) == 1  # one core's two hyper-threads
    assert threads.physical_cores({0, 7}, tmp_path) == 2  # no topology for cpu7: count CPUs


def test_a_containers_cpu_quota_caps_the_cores(tmp_path: Path) -> None:
    group = tmp_path / "v2" / "user.slice" / "job"
    group.mkdir(parents=True)
    (group / "cpu.max").write_text("150000 100000\n")  # docker --cpus=1.5
    (tmp_path / "v2" / "cpu.max").write_text("max 100000\n")
    assert threads.quota_cores("0::/user.slice/job\n", tmp_path / "v2") == 1.5
    assert threads.quota_cores("0::/\n", tmp_path / "v2") is None
    v1 = tmp_path / "v1" / "cpu,cpuacct"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("400000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.quota_cores("4:cpu,cpuacct:/\n1:memory:/x\n", tmp_path / "v1") == 4.0
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert threads.quota_cores("4:cpu,cpuacct:/\n", tmp_path / "v1") is None


def test_kernel_counters_are_read_per_cpu_and_per_process() -> None:
    stat = (
        "cpu  300 0 30 1000 10 0 0 0 0 0\n"
        "cpu0 100 0 10 500 5 0 0 0 0 0\n"
        "cpu1 200 0 20 500 5 0 0 5 0 0\n"
        "intr 1 2 3\n"
    )
    assert threads.cpu_ticks(stat, {0}) == (110, 615)
    assert threads.cpu_ticks(stat, {0, 1}) == (335, 1345)  # steal is time taken, too
    own = "4242 (python -c x) y) R 1 2 3 4 5 6 7 8 9 10 70 30 0 0 20 0 3\n"
    assert threads.own_ticks(own) == 100
    assert threads.own_ticks(Path("/proc/self/stat").read_text()) >= 0


def test_other_work_counts_busy_processes() -> None:
    cpus = sorted(os.sched_getaffinity(0))[:2]
    loops = [busy_loop(cpus) for _ in cpus]
    try:
        time.sleep(0.5)
        busy, how = threads.other_work()
    finally:
        stop(loops)
    assert busy >= len(cpus) - 0.5, busy
    assert how == "measured over 0.25 s"


def test_device_lines() -> None:
    line = threads.cpu_line(Cpu(2, 4), threads.Choice(1, "other work is using 2.1 cores"))
    assert line == (
        "device: cpu (2 cores available, 4 logical), 1 intra-op thread (other work is using "
        "2.1 cores)"
    )
    assert threads.gpu_line("cuda:0", "NVIDIA H200", 150_000_000_000) == (
        "device: cuda:0 NVIDIA H200 (140 GiB)"
    )


# ---------------------------------------------------------------- the real CLI


def busy_loop(cpus: list[int]) -> subprocess.Popen:
    """A CPU-bound process on `cpus`."""
    return subprocess.Popen(
        [sys.executable, "-c", "while True: pass"],
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),
    )


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def device_line(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if "device: " in line)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_a_run_beside_busy_processes_uses_one_thread(tmp_path: Path) -> None:
    """Two CPU-bound processes on the run's two CPUs: one thread, said in the start-up log and
    recorded in the checkpoint (torch's default would be one per core)."""
    cpus = sorted(os.sched_getaffinity(0))[:2]
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    cfg = small_config(tmp_path, train={"max_steps": 1})
    loops = [busy_loop(cpus) for _ in cpus]
    try:
        res = subprocess.run(
            [sys.executable, "-m", "lockstep", "train", str(cfg)],
            capture_output=True, text=True, timeout=HANG_S, cwd=ROOT,
            env={k: v for k, v in os.environ.items() if k not in AUTO},
            preexec_fn=lambda: os.sched_setaffinity(0, cpus),
        )  # fmt: skip
    finally:
        stop(loops)
    assert res.returncode == 0, res.stderr[-2000:]
    line = device_line(res.stderr)
    assert re.search(r"device: cpu \(\d cores? available, 2 logical\), 1 intra-op thread \(", line)
    assert "other work is using" in line and "OMP_NUM_THREADS=N to choose" in line, line
    state = json.loads(next((tmp_path / "out" / "checkpoints").glob("*/state.json")).read_text())
    assert state["threads"] == 1


def test_omp_num_threads_wins_and_is_named(tmp_path: Path) -> None:
    cfg = small_config(tmp_path, train={"max_steps": 1})
    res = run_cli("train", str(cfg), env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert device_line(res.stderr).endswith(", 1 intra-op thread (OMP_NUM_THREADS=1)")


def test_a_programs_own_torch_threads_win(tmp_path: Path) -> None:
    cfg = small_config(tmp_path, train={"max_steps": 1})
    n = threads.this_cpu().logical + 1  # not torch's default on any machine
    program = (
        f"import sys, torch; torch.set_num_threads({n})\n"
        "from lockstep.train import main\n"
        f"sys.exit(main([{str(cfg)!r}]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in AUTO}
    res = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                         timeout=HANG_S, cwd=ROOT, env=env)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    line = device_line(res.stderr)
    assert line.endswith(f"{n} intra-op threads (torch.set_num_threads before lockstep started)")


@pytest.mark.slow  # torchrun with 2 processes (~25 s on two busy cores)
def test_torchrun_processes_share_the_free_cores(tmp_path: Path) -> None:
    cfg = small_config(tmp_path, train={"max_steps": 1})
    res = run_cli("train", str(cfg), "--nproc-per-node", "2", env=AUTO)
    assert res.returncode == 0, res.stderr[-2000:]
    share = re.search(r"\[lockstep\] world: 2 processes.*; (\d+) CPU threads? per process \(",
                      res.stderr)  # fmt: skip
    assert share, res.stderr[-2000:]
    n = int(share.group(1))
    assert 1 <= n <= max(1, threads.this_cpu().cores // 2)
    assert device_line(res.stderr).endswith(f"intra-op thread{'s' * (n > 1)} (OMP_NUM_THREADS={n})")
    assert "Setting OMP_NUM_THREADS environment variable" not in res.stderr  # torchrun's banner
