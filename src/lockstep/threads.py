"""How many CPU threads a run's tensor operations use (torch's intra-op threads), and why.

torch starts one thread per physical core. The threads of one operation wait for each other at
its end, spinning while they wait: when other work holds a core, the thread on it falls behind
and every other thread spins until it catches up, so a run on a busy machine slows several-fold
(bench/threads.py: 9-24x on two cores). lockstep therefore looks at the CPU just before a
CPU run starts and leaves out the cores other work is using:

    threads = max(1, cores - busy) // processes on this machine (at least 1)

`cores`: the physical cores this process may run on (its CPU affinity, capped by a container's CPU
quota). `busy`: the cores' worth of CPU time other processes used during a short sample
(SAMPLE_S), rounded up once it passes NOISE (a shell, an editor: not a taken core); where the
kernel's per-CPU counters are not readable, the 1-minute load average. The count is chosen once,
at the start: CPU results depend on it (bit-exact resume needs the same count), and work that
starts later is not seen.

The user's choice always wins: OMP_NUM_THREADS (or MKL_NUM_THREADS) in the environment, or
torch.set_num_threads called by the program that runs lockstep before it starts.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

SAMPLE_S = 0.25  # how long the CPU is watched before choosing
NOISE = 0.25  # other work below this many cores' worth takes no core
USER_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # torch reads both at start-up


@dataclass(frozen=True)
class Cpu:
    """The CPU as this process sees it: `cores` physical cores it may use, `logical` CPUs."""

    cores: int
    logical: int


@dataclass(frozen=True)
class Choice:
    """`threads` intra-op threads per process, and `why`, in words for the log."""

    threads: int
    why: str


# ---------------------------------------------------------------- what the machine offers


def physical_cores(cpus: set[int], sysfs: Path = Path("/sys/devices/system/cpu")) -> int:
    """Physical cores among the logical CPUs `cpus` (hyper-threads of one core count once);
    len(cpus) where the topology is not readable."""
    cores = set()
    for cpu in cpus:
        try:
            cores.add((sysfs / f"cpu{cpu}" / "topology" / "core_cpus_list").read_text().strip())
        except OSError:
            try:
                cores.add((sysfs / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text())
            except OSError:
                return len(cpus)
    return len(cores) or len(cpus)


def quota_cores(cgroup: str, root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's control group (a container's --cpus), in cores; None
    without one. `cgroup`: the text of /proc/self/cgroup."""
    limits = []
    for line in cgroup.splitlines():
        hier, _, path = line.partition(":")[2].partition(":")
        parts = [p for p in path.strip().split("/") if p]
        if hier == "":  # cgroup v2: the group and every group above it may set cpu.max
            for depth in range(len(parts), -1, -1):
                limits.append(_v2_limit(root.joinpath(*parts[:depth], "cpu.max")))
        elif "cpu" in hier.split(","):  # cgroup v1: the quota of the cpu controller
            limits.append(_v1_limit(root / hier, parts))
    found = [q for q in limits if q is not None]
    return min(found) if found else None


def _v2_limit(path: Path) -> float | None:
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _v1_limit(mount: Path, parts: list[str]) -> float | None:
    for folder in (mount.joinpath(*parts), mount):  # a container sees its group as the root
        try:
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return quota / period if quota > 0 else None
    return None


def this_cpu() -> Cpu:
    """The cores and logical CPUs this process may use (affinity, container quota)."""
    cpus = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    cpus = cpus or set(range(os.cpu_count() or 1))
    cores = physical_cores(cpus)
    try:
        quota = quota_cores(Path("/proc/self/cgroup").read_text())
    except OSError:
        quota = None
    if quota is not None:
        cores = max(1, min(cores, math.ceil(quota)))
    return Cpu(cores, len(cpus))


# ---------------------------------------------------------------- what other work uses


def cpu_ticks(stat: str, cpus: set[int]) -> tuple[int, int]:
    """(busy, total) clock ticks of the logical CPUs `cpus`, summed, from /proc/stat's text.
    Busy counts time taken from this machine's guests by its host (steal) too."""
    busy = total = 0
    for line in stat.splitlines():
        name, *fields = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
            continue
        # user nice system idle iowait irq softirq steal (guest time is inside user)
        values = [int(v) for v in fields[:8]] + [0] * (8 - len(fields[:8]))
        idle = values[3] + values[4]
        busy += sum(values) - idle
        total += sum(values)
    return busy, total


def own_ticks(stat: str) -> int:
    """utime + stime of a process (all its threads), from its /proc/PID/stat text."""
    fields = stat.rpartition(")")[2].split()  # the command name may hold spaces
    return int(fields[11]) + int(fields[12])


def other_work(sample_s: float = SAMPLE_S) -> tuple[float, str]:
    """(cores' worth of CPU time that other processes use now on this process's CPUs, how it
    was measured). Sampled from the kernel's counters over `sample_s`, this process's own use
    taken out; the 1-minute load average where those are not readable."""
    cpus = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set()
    try:
        before = cpu_ticks(Path("/proc/stat").read_text(), cpus)
        own_before = own_ticks(Path("/proc/self/stat").read_text())
        time.sleep(sample_s)
        after = cpu_ticks(Path("/proc/stat").read_text(), cpus)
        own_after = own_ticks(Path("/proc/self/stat").read_text())
    except (OSError, ValueError, IndexError):
        before = after = (0, 0)
    ticks = after[1] - before[1]
    if ticks <= 0:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        return load, "the 1-minute load average"
    per_cpu = ticks / len(cpus)  # ticks one CPU had during the sample
    other = (after[0] - before[0] - (own_after - own_before)) / per_cpu
    return max(other, 0.0), f"measured over {sample_s:g} s"


# ---------------------------------------------------------------- the choice


def rule(cores: int, busy: float, processes: int = 1) -> int:
    """Threads per process: the cores other work leaves free (`busy` cores' worth, rounded up
    past NOISE), shared by `processes` processes on this machine; at least 1."""
    taken = max(0, math.ceil(busy - NOISE))
    return max(1, max(1, cores - taken) // max(1, processes))


def user_choice(env: Mapping[str, str]) -> str | None:
    """`OMP_NUM_THREADS=N` (or MKL_NUM_THREADS) as the user set it; None when unset."""
    for name in USER_ENV:
        if env.get(name, "").strip():
            return f"{name}={env[name].strip()}"
    return None


def choose(env: Mapping[str, str], current: int, cpu: Cpu) -> Choice:
    """The intra-op threads of a CPU run: the user's (`env`, or `current`, torch's count now,
    when it is not torch's default for `cpu`), else `measured`."""
    if (named := user_choice(env)) is not None:
        return Choice(current, named)
    if current not in (cpu.cores, cpu.logical):
        return Choice(current, "torch.set_num_threads before lockstep started")
    return measured(cpu)


def measured(cpu: Cpu, processes: int = 1) -> Choice:
    """The rule on the other work measured now, for `processes` processes on this machine."""
    busy, how = other_work()
    share = f", shared by {processes} processes" if processes > 1 else ""
    why = f"other work is using {busy:.1f} cores, {how}{share}; OMP_NUM_THREADS=N to choose"
    return Choice(rule(cpu.cores, busy, processes), why)


def setup_cpu(env: Mapping[str, str]) -> tuple[Cpu, Choice]:
    """Choose this process's intra-op threads and set them in torch (see the module's rule)."""
    import torch

    cpu = this_cpu()
    choice = choose(env, torch.get_num_threads(), cpu)
    if choice.threads != torch.get_num_threads():
        torch.set_num_threads(choice.threads)
    return cpu, choice


def worker_env(env: Mapping[str, str], processes: int) -> tuple[dict[str, str], str]:
    """For `processes` CPU processes that torchrun starts on this machine: the environment they
    need (OMP_NUM_THREADS: each one's share, unless the user set it) and the words for the
    launcher's line. Without it torchrun gives each process one thread."""
    if (named := user_choice(env)) is not None:
        return {}, f"CPU threads per process: {named}"
    choice = measured(this_cpu(), processes)
    plural = "s" if choice.threads > 1 else ""
    return (
        {"OMP_NUM_THREADS": str(choice.threads)},
        f"{choice.threads} CPU thread{plural} per process ({choice.why})",
    )


# ---------------------------------------------------------------- the start-up line


def cpu_line(cpu: Cpu, choice: Choice) -> str:
    """`device: cpu (2 cores available, 4 logical), 1 intra-op thread (...)`."""
    plural = "s" if choice.threads > 1 else ""
    return (
        f"device: cpu ({cpu.cores} cores available, {cpu.logical} logical), "
        f"{choice.threads} intra-op thread{plural} ({choice.why})"
    )


def gpu_line(device: str, name: str, total_bytes: int) -> str:
    """`device: cuda:0 NVIDIA H200 (139 GiB)`."""
    return f"device: {device} {name} ({total_bytes / 2**30:.0f} GiB)"
