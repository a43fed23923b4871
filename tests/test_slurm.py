"""SLURM: the world from a (simulated) allocation's environment, flags and launch.* winning."""

from __future__ import annotations

import shlex

import pytest
from conftest import run_cli, small_config

from lockstep.config import LaunchConfig
from lockstep.errors import LaunchError
from lockstep.launch import ENV_VARS, expand_hosts, first_host, plan

NOFLAGS = dict.fromkeys(ENV_VARS)
SLURM = {
    "SLURM_JOB_ID": "123456",
    "SLURM_NNODES": "4",
    "SLURM_NODEID": "2",
    "SLURM_JOB_NODELIST": "gpu[07-09,12],login1",
    "SLURM_GPUS_ON_NODE": "2",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_LOCALID": "0",
}
PORT = 20000 + 123456 % 10000


def test_host_lists_expand_like_slurm():
    assert list(expand_hosts("gpu[01-03,07],login1")) == [
        "gpu01",
        "gpu02",
        "gpu03",
        "gpu07",
        "login1",
    ]
    assert list(expand_hosts("rack[1-2]-n[5,9]")) == [
        "rack1-n5",
        "rack1-n9",
        "rack2-n5",
        "rack2-n9",
    ]
    assert list(expand_hosts("a[098-100]")) == ["a098", "a099", "a100"]
    assert first_host("node7") == "node7"
    assert first_host("login1,gpu[1-2]") == "login1"
    with pytest.raises(
        LaunchError, match="SLURM_JOB_NODELIST: cannot read the host list 'gpu\\[1-2'"
    ):
        first_host("gpu[1-2")


def test_the_world_comes_from_slurm_and_says_so():
    p = plan(LaunchConfig(), NOFLAGS, SLURM, gpus=0)
    assert (p.nproc_per_node, p.nnodes, p.node_rank) == (2, 4, 2)
    assert (p.master_addr, p.master_port) == ("gpu07", PORT)
    line = p.describe()
    assert "8 processes = 2 per node x 4 nodes (this is node 2)" in line
    for part in ("nproc_per_node=2 (SLURM_GPUS_ON_NODE)", "nnodes=4 (SLURM_NNODES)",
                 "node_rank=2 (SLURM_NODEID)", "master_addr=gpu07 (SLURM_JOB_NODELIST)",
                 f"master_port={PORT} (SLURM_JOB_ID)"):  # fmt: skip
        assert part in line


def test_a_cpu_allocation_uses_its_tasks_per_node():
    env = {**SLURM, "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_NTASKS_PER_NODE": "3"}
    del env["SLURM_GPUS_ON_NODE"]
    p = plan(LaunchConfig(), NOFLAGS, env, gpus=0)
    assert (p.nproc_per_node, p.nnodes) == (3, 1)
    assert "nproc_per_node=3 (SLURM_NTASKS_PER_NODE)" in p.describe()


def test_flags_env_and_launch_settings_win_over_slurm():
    flags = {**NOFLAGS, "node_rank": "3", "master_port": "29400"}
    env = {**SLURM, "MASTER_ADDR": "10.0.0.5"}
    cfg = LaunchConfig.model_validate({"nproc_per_node": 1})
    p = plan(cfg, flags, env, gpus=0)
    assert (p.node_rank, p.master_port, p.master_addr, p.nproc_per_node, p.nnodes) == (
        3, 29400, "10.0.0.5", 1, 4,
    )  # fmt: skip
    line = p.describe()
    assert "node_rank=3 (--node-rank)" in line and "master_addr=10.0.0.5 (MASTER_ADDR)" in line
    assert "nproc_per_node=1 (launch.nproc_per_node)" in line and "(SLURM_NNODES)" in line
    # SLURM's bad value names its variable
    with pytest.raises(LaunchError, match="node_rank must be >= 0 and <= 3, got 4 .*SLURM_NODEID"):
        plan(LaunchConfig(), NOFLAGS, {**SLURM, "SLURM_NODEID": "4"}, gpus=0)


def test_outside_slurm_and_a_second_task_per_node():
    plain = plan(
        LaunchConfig(), NOFLAGS, {k: v for k, v in SLURM.items() if k != "SLURM_JOB_ID"}, 0
    )
    assert plain.in_process and plain.master_addr == "127.0.0.1"
    with pytest.raises(LaunchError, match="one task per node: srun --ntasks-per-node=1"):
        plan(LaunchConfig(), NOFLAGS, {**SLURM, "SLURM_LOCALID": "1"}, gpus=0)


def _dry_run(tmp_path, *flags: str):
    cfg = small_config(tmp_path)
    env = {**SLURM, **dict.fromkeys(ENV_VARS.values())}  # none of NNODES, MASTER_PORT ... set
    res = run_cli("train", str(cfg), "--dry-run", *flags, "batch.global_size=32", env=env)
    assert res.returncode == 0, res.stderr
    plan_line, cmd = res.stdout.splitlines()
    argv = shlex.split(cmd)
    return plan_line, {flag: argv[argv.index(flag) + 1] for flag in (
        "--nproc-per-node", "--nnodes", "--node-rank", "--master-addr", "--master-port")}  # fmt: skip


def test_dry_run_under_slurm_plans_torchrun_from_the_allocation(tmp_path):
    line, args = _dry_run(tmp_path)
    assert args == {"--nproc-per-node": "2", "--nnodes": "4", "--node-rank": "2",
                    "--master-addr": "gpu07", "--master-port": str(PORT)}  # fmt: skip
    assert "nnodes=4 (SLURM_NNODES)" in line and "node_rank=2 (SLURM_NODEID)" in line
    line, args = _dry_run(tmp_path, "--node-rank", "0", "--nproc-per-node", "1")
    assert (args["--node-rank"], args["--nproc-per-node"], args["--nnodes"]) == ("0", "1", "4")
    assert "node_rank=0 (--node-rank)" in line
    assert not (tmp_path / "out").exists()
