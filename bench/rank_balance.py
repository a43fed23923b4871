"""How evenly lockstep's micro-batches spread a step's tokens over the ranks, on chat-length data.

    .venv/bin/python bench/rank_balance.py [--steps 200]

On the realistic bench/vs_peers fixture's records (their token lengths; run
`python3 bench/vs_peers/run.py --fixture realistic --setup-only` first), for several shapes
(micro-batch x processes x accumulation), every step's global batch is dealt the way lockstep's
order function deals it (data/order.py, data.group_by_length: sorted by length, cut into
micro-batches, micro-batch a*W + r to rank r) and two other ways that keep each step's samples
(so its loss) and do not depend on the device:

* today: data/order.py as it is;
* groups to ranks: the same micro-batches, each rank taking accumulation slots by tokens (the
  heaviest micro-batch to the least loaded rank with a free slot);
* balanced contents: micro-batches of the same size filled by tokens (the longest sample to the
  lightest micro-batch with a free slot), then dealt as today.

Reported: the slowest rank's tokens over the mean rank's, averaged over --steps steps. In a
multi-process step every rank waits for the slowest at the gradient all-reduce, so with
padding-free rows (where a micro-batch costs about its tokens) this ratio is the step's time
over what it would take if every rank had an equal share.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lockstep.data.order import Order, group_by_length

HERE = Path(__file__).resolve().parent
SHAPES = ((4, 2, 2), (4, 2, 4), (2, 4, 4), (4, 4, 1), (4, 4, 2), (4, 8, 1), (2, 8, 4))


def lightest_free(loads: list[int], counts: list[int], cap: int) -> int:
    """The index of the least loaded bin with room left (ties: the lowest index)."""
    return min((k for k in range(len(loads)) if counts[k] < cap), key=lambda k: loads[k])


def slowest_over_mean(per_rank: list[int]) -> float:
    return max(per_rank) / (sum(per_rank) / len(per_rank))


def dealt(order: Order, lengths: np.ndarray, step: int) -> dict[str, float]:
    """The three ways of dealing step `step`, as the slowest rank's tokens over the mean."""
    w, a, m = order.world_size, order.accumulation, order.micro_size
    today = [sum(int(lengths[i]) for mb in order.micro_batches(step, r) for i in mb if i >= 0)
             for r in range(w)]  # fmt: skip
    groups = group_by_length(order.global_batch(step), lengths).reshape(-1, m)
    tokens = [int(lengths[g[g >= 0]].sum()) for g in groups]
    loads, counts = [0] * w, [0] * w
    for j in sorted(range(len(tokens)), key=lambda j: -tokens[j]):
        r = lightest_free(loads, counts, a)
        loads[r], counts[r] = loads[r] + tokens[j], counts[r] + 1
    bins, sizes = [0] * len(groups), [0] * len(groups)
    for t in sorted((int(lengths[i]) if i >= 0 else 0 for i in groups.ravel()), reverse=True):
        k = lightest_free(bins, sizes, m)
        bins[k], sizes[k] = bins[k] + t, sizes[k] + 1
    balanced = [sum(bins[x * w + r] for x in range(a)) for r in range(w)]
    return {
        "today": slowest_over_mean(today),
        "groups_to_ranks": slowest_over_mean(loads),
        "balanced_contents": slowest_over_mean(balanced),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    from gemm_shapes import record_lengths  # bench/: the fixture's records, tokenised

    lengths = np.asarray(record_lengths(), dtype=np.int64)
    print(f"{len(lengths)} records, median {int(np.median(lengths))} tokens; slowest rank / mean")
    rows = []
    for m, w, a in SHAPES:
        order = Order(0, len(lengths), m * w * a, m, w, lengths)
        each = [dealt(order, lengths, s) for s in range(args.steps)]
        row = {"micro": m, "world": w, "accumulation": a,
               **{k: round(float(np.mean([e[k] for e in each])), 3) for k in each[0]}}  # fmt: skip
        rows.append(row)
        print(f"micro {m} x {w} processes x accumulation {a}: today {row['today']:.2f}, groups "
              f"to ranks {row['groups_to_ranks']:.2f}, balanced contents "
              f"{row['balanced_contents']:.2f}")  # fmt: skip
    (HERE / "rank_balance.json").write_text(
        json.dumps({"steps": args.steps, "rows": rows}, indent=1)
    )


if __name__ == "__main__":
    main()
