"""lockstep installs as `lockstep-finetune` (the name `lockstep` on the package index is another
project), every install hint says so, and a wheel works on its own: from an empty folder, with
nothing of the source tree importable, the shipped examples list, copy, train and chat."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import ROOT

import lockstep


def test_distribution_name_is_the_one_every_hint_uses():
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    name = re.search(r'^name = "([^"]+)"', pyproject, re.MULTILINE)
    assert name and name[1] == lockstep.DISTRIBUTION == "lockstep-finetune"
    extras = pyproject.split("[project.optional-dependencies]")[1].split("\n[")[0]
    assert {"debug", "tensorboard", "dev"} <= set(re.findall(r"^(\w+) =", extras, re.MULTILINE))
    texts = {p: p.read_text(encoding="utf-8") for p in [ROOT / "README.md"]}
    texts |= {p: p.read_text(encoding="utf-8") for p in (ROOT / "src").rglob("*.py")}
    for path, text in texts.items():
        for hint in re.findall(r"pip install[^`\n]*", text):
            names = re.findall(r"[\"'\s]((?:lockstep|\{DISTRIBUTION\})[\w.-]*)\[?", " " + hint)
            assert all(n in ("lockstep-finetune", "{DISTRIBUTION}") for n in names), (path, hint)
        assert not re.search(r"\blockstep\[", text), path  # an extra of the other project


def _run(argv: list, cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    res = subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert res.returncode == 0, f"{argv}: {res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.mark.slow
def test_the_wheel_alone_lists_copies_trains_and_chats(tmp_path):
    """The wheel, installed (not editable) into a fresh venv, run from an empty folder without
    PYTHONPATH: torch and the other dependencies come from this environment's site-packages
    (a .pth line), lockstep only from the wheel."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LOCKSTEP_TRACEBACK")}
    source = tmp_path / "source"  # a copy, so building leaves nothing in the checkout
    shutil.copytree(
        ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    _run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, source],
        tmp_path,
        env,
    )
    (wheel,) = dist.glob("lockstep_finetune-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, env)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     tmp_path, env).stdout.strip())  # fmt: skip
    here = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "dependencies.pth").write_text("\n".join(sorted(here)) + "\n")
    _run(
        [*pip, "--python", python, "install", "-q", "--no-deps", "--no-index", wheel], tmp_path, env
    )

    work = tmp_path / "empty"
    work.mkdir()
    where = _run([python, "-c", "import lockstep; print(lockstep.__file__)"], work, env).stdout
    assert Path(where.strip()).is_relative_to(site), where  # the wheel's copy, not src/
    info = json.loads(_run([bin_dir / "lockstep", "env", "--json"], work, env).stdout)
    assert info["lockstep_install"] == "installed"

    listed = _run([bin_dir / "lockstep", "configs", "list"], work, env).stdout
    assert listed.startswith("demo ") and "builtin:demo_train.jsonl" in listed
    _run([bin_dir / "lockstep", "configs", "copy", "demo", "x.yaml"], work, env)
    trained = _run([bin_dir / "lockstep", "train", "x.yaml", "train.max_steps=3",
                    f"data.cache_dir={tmp_path / 'cache'}"], work, env)  # fmt: skip
    assert (work / "runs" / "demo" / "final" / "config.json").is_file(), trained.stderr[-2000:]
    answer = _run([bin_dir / "lockstep", "chat", "runs/demo", "--prompt", "Count the words.",
                   "--temperature", "0", "--max-new-tokens", "4"], work, env)  # fmt: skip
    assert "chat: runs/demo/final" in answer.stderr  # 3 steps: the answer itself may be empty
