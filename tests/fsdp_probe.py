"""Started by tests/test_fsdp.py under torchrun, to see what one rank holds and when it ends.

`python -m torch.distributed.run ... tests/fsdp_probe.py MODE CFG OUT_DIR [key=value ...]`:

- `hold`: builds the model with lockstep's own functions (build.build_model,
  parallel.prepare/replicate), runs one optimizer step of two accumulated micro-batches through
  parallel.gradient_sync, counts the bytes of every tensor the process holds after each
  backward, gathers what final/ needs (final.final_state); writes OUT_DIR/rank-R.json.
- `end`: a whole run through lockstep.train.main; writes OUT_DIR/rank-R.json with the time
  main returned on this rank (its process group already torn down).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

from lockstep import config, dist
from lockstep.model.attention import Choice
from lockstep.training import build, final, parallel
from lockstep.training.objective import objective

SDPA = Choice("sdpa", "set by the test")  # one sample per row: no varlen


def held_bytes() -> int:
    """Bytes of every tensor this process holds (weights or their shards, gradients, FSDP's own
    buffers), each storage counted once."""
    gc.collect()
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        if not isinstance(obj, torch.Tensor):
            continue
        for t in (obj, obj.grad if obj.is_leaf else None):
            if t is None:
                continue
            t = t.to_local() if hasattr(t, "to_local") else t
            storage = t.untyped_storage()
            key = storage.data_ptr()
            storages[key] = max(storages.get(key, 0), storage.nbytes())
    return sum(storages.values())


def hold(cfg_path: str, out: Path, overrides: list[str]) -> None:
    cfg = config.load(cfg_path, overrides)
    d = dist.setup(60.0)
    model = build.build_model(cfg, cfg.seed, d, SDPA)
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    engine = parallel.replicate(cfg, d, parallel.prepare(cfg, d, model, objective(cfg)))
    ids = torch.randint(4, 500, (2, 32), generator=torch.Generator().manual_seed(d.rank))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    after_backward = []
    for micro in range(2):
        with parallel.gradient_sync(engine, last=micro == 1):
            engine(batch).backward()
        after_backward.append(held_bytes())
    gathered = final.final_state(cfg, d, model)
    report = {
        "whole_model_bytes": whole,
        "held_after_backward": after_backward,
        "final_keys": sorted(gathered) if gathered is not None else None,
    }
    (out / f"rank-{d.rank}.json").write_text(json.dumps(report))
    dist.teardown(d, finished=True)


def end(cfg_path: str, out: Path, overrides: list[str]) -> None:
    from lockstep import train

    code = train.main([cfg_path, *overrides])
    rank = os.environ["RANK"]
    (out / f"rank-{rank}.json").write_text(json.dumps({"code": code, "returned": time.time()}))


if __name__ == "__main__":
    {"hold": hold, "end": end}[sys.argv[1]](sys.argv[2], Path(sys.argv[3]), sys.argv[4:])
