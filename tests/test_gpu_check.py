"""The GPU check (bench/gpu/check.sh): its wheel steps, its refusal on a CPU, its cases' configs,
the packing isolation check and the case runner, all on this CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from lockstep import config

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "bench" / "gpu"
SCRIPT = GPU / "check.sh"
DEMO_DATA = ROOT / "src" / "lockstep" / "examples" / "data" / "demo_train.jsonl"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"gpu_{name}", GPU / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is made
    spec.loader.exec_module(mod)
    return mod


check = _module("check")
isolation = _module("isolation")


def pins() -> dict[str, str]:
    """name -> version, as bench/gpu/wheels.txt pins them."""
    out = {}
    for line in (GPU / "wheels.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            out[name] = version
    return out


def fake_wheel(folder: Path, name: str, version: str, tag: str = "py3-none-any") -> Path:
    """A minimal wheel: module `name` (dashes as underscores) with __version__."""
    dist = name.replace("-", "_")
    path = folder / f"{dist}-{version}-{tag}.whl"
    info = f"{dist}-{version}.dist-info"
    files = {
        f"{dist}/__init__.py": f"__version__ = {version!r}\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        f"Tag: {tag}\n",
    }
    record = "".join(f"{f},,\n" for f in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for f, text in {**files, f"{info}/RECORD": record}.items():
            z.writestr(f, text)
    return path


def sh(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)  # fmt: skip


def test_script_parses_and_stops_at_the_first_error():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    assert "\nset -euo pipefail\n" in SCRIPT.read_text()


def test_prepare_downloads_every_pin_for_the_gpu_python(tmp_path):
    index, dest = tmp_path / "index", tmp_path / ".whl"
    index.mkdir()
    dest.mkdir()
    (dest / "stale-0.1-py3-none-any.whl").write_text("an earlier version")
    gpu_tag = "cp312-cp312-manylinux_2_17_x86_64"  # CPython 3.12 on Linux x86_64, as there
    for name, version in pins().items():
        if name == "pydantic-core":  # compiled: only the GPU machine's build may be taken
            for tag in (gpu_tag, "cp311-cp311-manylinux_2_17_x86_64", "cp312-cp312-win_amd64",
                        "cp312-cp312-manylinux_2_17_aarch64"):  # fmt: skip
                fake_wheel(index, name, version, tag)
        else:
            fake_wheel(index, name, version)
        fake_wheel(index, name, version + ".post9")  # a newer one the pin must not take
    r = sh("--prepare", "--wheels", str(dest), "--no-index", "--find-links", str(index))
    assert r.returncode == 0, r.stderr
    got = sorted(p.name for p in dest.glob("*.whl"))
    tags = {"pydantic-core": gpu_tag}
    want = sorted(f"{n.replace('-', '_')}-{v}-{tags.get(n, 'py3-none-any')}.whl"
                  for n, v in pins().items())  # fmt: skip
    assert got == want  # exactly the pins: the stale wheel is gone, no .post9
    for name in want:
        assert name in r.stdout  # the listing names what it fetched
    assert "total" in r.stdout and "MiB" in r.stdout
    assert not (tmp_path / ".whl.partial").exists()


def test_prepare_leaves_the_wheels_alone_when_one_is_missing(tmp_path):
    index, dest = tmp_path / "index", tmp_path / ".whl"
    index.mkdir()
    dest.mkdir()
    kept = fake_wheel(dest, "kept", "1.0")
    for name, version in list(pins().items())[1:]:  # the first pin is not in the index
        fake_wheel(index, name, version)
    r = sh("--prepare", "--wheels", str(dest), "--no-index", "--find-links", str(index))
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("check.sh: pip could not download") and "unchanged" in last
    assert sorted(dest.iterdir()) == [kept]


def test_install_puts_the_wheels_into_the_target_where_they_import(tmp_path):
    wheels, site = tmp_path / "whl", tmp_path / "site"
    wheels.mkdir()
    fake_wheel(wheels, "lockstep-probe-a", "1.2")
    fake_wheel(wheels, "lockstep-probe-b", "3.4")
    r = sh("--install", str(site), "--wheels", str(wheels))
    assert r.returncode == 0, r.stderr
    probe = (
        "import lockstep_probe_a as a, lockstep_probe_b as b; print(a.__version__, b.__version__)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(site)})  # fmt: skip
    assert out.stdout.split() == ["1.2", "3.4"], out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_check_refuses_at_once_without_a_cuda_device():
    t0 = time.perf_counter()
    r = sh()
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("check.sh: no CUDA device: torch ")
    assert "GPU machine" in lines[0] and "--prepare" in lines[0]
    assert r.stdout == ""
    assert time.perf_counter() - t0 < 60  # only the torch import: no install, no model


def test_every_case_is_a_valid_lockstep_config(tmp_path):
    names = [c.name for c in check.CASES]
    assert len(set(names)) == len(names)
    for case in check.CASES:
        for run in case.runs:
            argv = check.command(case, run)
            assert argv[1:5] == ["-m", "lockstep", "train", str(check.BASE)]
            cfg = config.load(check.BASE, argv[5:])
            config.check(cfg, 1)
            assert cfg.output_dir.endswith(f"runs/{case.name}/{run.folder}")
            assert run.expect_fail == (cfg.testing.fail_at_step is not None)
    cfg = config.load(check.BASE, list(check.PACKED))  # what isolation.py runs
    assert cfg.data.packing and cfg.batch.micro_size >= 2


def test_isolation_check_passes_on_packed_rows_and_sees_a_leak(tmp_path):
    cfg = config.validate({
        "seed": 0,
        "model": {"path": "builtin:tiny", "dtype": "bfloat16"},
        "data": {"train": [{"path": str(DEMO_DATA)}], "max_length": 64, "packing": True},
        "batch": {"global_size": 2, "micro_size": 2},
    })  # fmt: skip
    result = isolation.check(cfg, tmp_path / "iso.json")
    assert json.loads((tmp_path / "iso.json").read_text()) == result
    kernels = result["implementations"]
    assert list(kernels) == ["lockstep_segments", "sdpa"]  # lockstep's choice on a CPU first
    assert kernels["lockstep_segments"]["lockstep_choice"] and result["ok"]
    for entry in kernels.values():
        assert entry["ok"] and len(entry["rows"]) == 2 and all(len(r) >= 2 for r in entry["rows"])
        assert entry["rel_diff"] <= isolation.TOLERANCE < entry["leak_rel_diff"]


def test_long_error_lines_are_clipped_in_the_results():
    log: list[str] = []
    code, output = check.run_command(
        [sys.executable, "-c", "print('x' * 5000); print('end')"], 60, log
    )
    assert code == 0 and len(output) > 5000
    assert log[1].startswith("x" * check.LINE_CHARS + " ... (+") and len(log[1]) < 700
    assert check.last_lines(output).splitlines()[-1] == "end"


def test_a_case_past_its_limit_is_stopped_with_its_children():
    log: list[str] = []
    t0 = time.perf_counter()
    code, _ = check.run_command(["bash", "-c", "sleep 60 & sleep 60"], 1, log)
    assert code is None and time.perf_counter() - t0 < 30
    assert log[-1].startswith("[timed out after 1s")


def test_results_folder_holds_three_files(tmp_path):
    ok = check.Result("bf16", "what", "ok", 12.5, 1000.0, 3.2, 5.1, log=["$ cmd", "line"])
    bad = check.Result("qlora", "what", "failed", 3.0, error="ImportError: bitsandbytes\nmore")
    check.write_results(tmp_path, {"env": {"gpu": "X"}, "wall_s": 20}, [ok, bad], ["env"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs.txt", "summary.json",
                                                          "summary.txt"]  # fmt: skip
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] is False
    assert [c["status"] for c in summary["cases"]] == ["ok", "failed"]
    assert summary["cases"][0]["peak_mem_gib"] == 3.2 and "log" not in summary["cases"][0]
    assert "ImportError: bitsandbytes" in (tmp_path / "summary.txt").read_text()
    assert "===== qlora: failed" in (tmp_path / "logs.txt").read_text()


@pytest.mark.slow
def test_a_resume_case_runs_and_judges_on_the_cpu(tmp_path):
    """The runner with real `lockstep train` runs: reference, stopped at step 3, resumed."""
    base = tmp_path / "base.yaml"
    base.write_text(json.dumps({
        "seed": 0, "model": {"path": "builtin:tiny"},
        "data": {"train": [{"path": str(DEMO_DATA)}], "max_length": 64,
                 "cache_dir": str(tmp_path / "cache")},
        "batch": {"global_size": 8, "micro_size": 4}, "optim": {"lr": 1e-3},
        "launch": {"nproc_per_node": 1},
    }))  # fmt: skip
    case = check.Case("lora_resume", "LoRA resume", 240,
                      check._resume_runs("finetune.method=lora"), "resume")  # fmt: skip
    result = check.run_case(case, 240, {}, base, tmp_path / "work")
    assert result.status == "ok", (result.error, "\n".join(result.log))
    assert result.details["resumed_steps"] == [3, 4]
    assert result.details["resumed_loss_rel_diff"] < 1e-4  # float32 on a CPU: exact
    assert result.final_loss is not None and result.peak_mem_gib is None  # no GPU here
    assert sum(line.startswith("$ ") for line in result.log) == 3


@pytest.mark.slow
def test_prepare_fetches_the_real_wheels(tmp_path):
    """The real download (about 45 MiB); skipped where no package index answers."""
    probe = subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(tmp_path / "p"),
         "annotated-types==" + pins()["annotated-types"]],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"no package index reachable: {probe.stderr.strip()[-200:]}")
    r = sh("--prepare", "--wheels", str(tmp_path / ".whl"), timeout=600)
    assert r.returncode == 0, r.stderr
    wheels = sorted((tmp_path / ".whl").glob("*.whl"))
    assert len(wheels) == len(pins())
    core = next(w.name for w in wheels if w.name.startswith("pydantic_core"))
    assert "cp312" in core and "manylinux" in core and "x86_64" in core
    bnb = next(w for w in wheels if w.name.startswith("bitsandbytes"))
    names = zipfile.ZipFile(bnb).namelist()
    assert "bitsandbytes/libbitsandbytes_cuda130.so" in names  # torch 2.11 there is CUDA 13.0


def test_environment_names_what_does_not_import():
    log: list[str] = []
    env = check.environment(log)
    assert env["pydantic"] and not env["pydantic"].startswith("not ")
    assert env["lockstep"] == __import__("lockstep").__version__
    result = check.imports_result({**env, "bitsandbytes": "not importable: ImportError: x"}, 1.0)
    assert (
        result.status == "failed" and result.error == "bitsandbytes: not importable: ImportError: x"
    )
    fine = {**env, **{name: "1.0" for name in check.NEEDED}}
    assert check.imports_result(fine, 1.0).status == "ok"


def test_resume_verdict_compares_losses_and_the_first_resumed_step_memory():
    def rows(losses_peaks):
        return [{"step": s, "loss": x, "peak_mem_gib": p} for s, (x, p) in losses_peaks.items()]

    reference = rows({1: (5.0, 2.0), 2: (4.0, 3.0), 3: (3.0, 3.0), 4: (2.5, 3.0)})
    same = rows({1: (5.0, 2.0), 2: (4.0, 3.0), 3: (3.0, 3.1), 4: (2.5, 3.1)})
    ok = check.Result("resume_memory", "", "ok")
    check.resume(ok, reference, same, memory=True)
    assert ok.status == "ok", ok.error
    assert ok.details["resumed_steps"] == [3, 4]
    assert ok.details["resumed_peak_gib_step3"] == 3.1
    assert ok.details["uninterrupted_peak_gib_step3"] == 3.0
    assert ok.details["fresh_start_peak_gib_step1"] == 2.0

    heavy = check.Result("resume_memory", "", "ok")  # loading left a second optimizer state
    check.resume(heavy, reference, rows({3: (3.0, 4.5), 4: (2.5, 4.5)}), memory=True)
    assert heavy.status == "failed" and "4.50 GiB" in heavy.error and "3.00 GiB" in heavy.error

    drift = check.Result("fsdp_lora_resume", "", "ok")
    check.resume(drift, reference, rows({3: (3.3, 3.0), 4: (2.5, 3.0)}), memory=False)
    assert drift.status == "failed" and "differ" in drift.error
