"""Preprocessing throughput: records per second for tokenise + mask (+ pack).

    .venv/bin/python bench/preprocess.py [--records 100000] [--num-proc 1 2] [--out bench/preprocess.json]

Generates alpaca records (the demo task's generator), then times lockstep's data pipeline on
the built-in tokenizer: reading + chat template + exact assistant mask, then packing, each with
1 and N processes; and the mask found by rendering, with the template's {% generation %} marks
removed (how most real templates are written). The cache is off, so every run tokenises.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import make_demo_data  # noqa: E402

from lockstep.config import DataConfig, ModelConfig  # noqa: E402
from lockstep.data import dataset  # noqa: E402
from lockstep.model.load import load_tokenizer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "preprocess.json")
    args = p.parse_args()
    tok = load_tokenizer(ModelConfig())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        make_demo_data.main(["--n-train", str(args.records), "--n-eval", "0", "--out-dir", tmp])
        path = str(Path(tmp) / "demo_train.jsonl")
        marked = tok.chat_template
        unmarked = re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", marked)
        cases = [("tokenise + mask", marked, False), ("tokenise + mask + pack", marked, True),
                 ("tokenise + mask, no marks", unmarked, False)]  # fmt: skip
        for name, template, packing in cases:
            tok.chat_template = template
            for n in args.num_proc:
                cfg = DataConfig(train=[{"path": path}], max_length=512, packing=packing,
                                 num_proc=n, cache=False)  # fmt: skip
                t0 = time.perf_counter()
                samples = dataset.build(cfg, tok)
                took = time.perf_counter() - t0
                rows.append({
                    "pipeline": name,
                    "num_proc": n,
                    "records": args.records,
                    "seconds": round(took, 2),
                    "records_per_s": round(args.records / took),
                    "sequences": len(samples),
                })  # fmt: skip
                print(f"{rows[-1]['pipeline']:<26} num_proc={n}  {rows[-1]['records_per_s']:>8,} rec/s"
                      f"  ({took:.1f}s)", flush=True)  # fmt: skip
    result = {"machine": platform.platform(), "cpus": __import__("os").cpu_count(), "rows": rows}
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
