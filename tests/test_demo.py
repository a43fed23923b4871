"""The README's first command, as shipped: the demo learns most of its tasks and shows it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import EXAMPLES, run_cli

EVAL = EXAMPLES / "data" / "demo_eval.jsonl"


@pytest.mark.slow  # the whole demo: about a minute on two idle cores
def test_the_demo_answers_most_task_types_right_and_prints_the_table(tmp_path: Path) -> None:
    started = time.monotonic()
    res = run_cli("train", "demo", f"output_dir={tmp_path / 'run'}",
                  f"data.cache_dir={tmp_path / 'cache'}", timeout=1200)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    table = res.stderr.split("what training changed, on the first 6 eval prompts:\n")[1]
    rows = [[c.strip() for c in line.split(" | ")] for line in table.splitlines()[2:8]]
    first = [json.loads(line) for line in EVAL.read_text().splitlines()[:6]]
    # one row per task type, each prompt as trained and the data's answer
    assert [r[0] for r in rows] == [" ".join(f"{x['instruction']} {x['input']}".split())
                                    for x in first]  # fmt: skip
    assert len({x["instruction"] for x in first}) == 6
    assert [r[1] for r in rows] == [x["output"] for x in first]
    right = [r[0] for r in rows if r[4] == "yes" and r[3] == r[1]]
    assert len(right) >= 4, table
    assert sum(r[2] == r[1] for r in rows) <= 1, table  # the starting weights knew (nearly) none
    print(f"demo: {time.monotonic() - started:.0f}s; right after training: {right}")
