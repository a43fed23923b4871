"""The data order is a pure function: same step, same samples, for any world size."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lockstep.data.order import PAD, Order, batch_sha, permutation


def step_multiset(order: Order, step: int) -> Counter:
    ids = [
        int(i) for r in range(order.world_size) for mb in order.micro_batches(step, r) for i in mb
    ]
    return Counter(i for i in ids if i != PAD)


@pytest.mark.parametrize("n", [37, 64, 100])
def test_step_multisets_identical_for_every_world_and_accumulation(n):
    g = 24
    reference = Order(5, n, g, micro_size=24, world_size=1)
    for world in (1, 2, 3, 4, 8):
        for micro in (1, 3):
            if g % (micro * world):
                continue
            o = Order(5, n, g, micro, world)
            for step in range(3 * reference.steps_per_epoch):
                assert step_multiset(o, step) == step_multiset(reference, step), (
                    world,
                    micro,
                    step,
                )


@given(n=st.integers(1, 300), g=st.sampled_from([1, 4, 8, 16]), seed=st.integers(0, 2**62))
@settings(max_examples=60, deadline=None)
def test_each_sample_exactly_once_per_epoch(n, g, seed):
    o = Order(seed, n, g, micro_size=1, world_size=1)
    for epoch in range(2):
        steps = range(epoch * o.steps_per_epoch, (epoch + 1) * o.steps_per_epoch)
        seen = np.concatenate([o.global_batch(s) for s in steps])
        real = seen[seen != PAD]
        assert sorted(real.tolist()) == list(range(n))
        # only the last batch of an epoch may hold padding, and it holds n mod g real samples
        assert (seen[: (o.steps_per_epoch - 1) * g] != PAD).all()


def test_seed_and_epoch_change_the_order_and_nothing_else_does():
    assert (permutation(1, 0, 50) == permutation(1, 0, 50)).all()
    assert (permutation(1, 0, 50) != permutation(2, 0, 50)).any()
    assert (permutation(1, 0, 50) != permutation(1, 1, 50)).any()
    np.random.seed(0)
    a = Order(9, 50, 8, 2, 2).micro_batches(3, 1)
    np.random.seed(123)  # global RNG state must not matter
    b = Order(9, 50, 8, 2, 2).micro_batches(3, 1)
    assert all((x == y).all() for x, y in zip(a, b, strict=True))


def test_micro_batch_rule_is_accumulation_major_rank_minor():
    o = Order(3, 40, 8, micro_size=2, world_size=2)
    batch = o.global_batch(0)
    assert [mb.tolist() for mb in o.micro_batches(0, 0)] == [
        batch[0:2].tolist(),
        batch[4:6].tolist(),
    ]
    assert [mb.tolist() for mb in o.micro_batches(0, 1)] == [
        batch[2:4].tolist(),
        batch[6:8].tolist(),
    ]


def test_batch_sha_ignores_padding_and_slot_order():
    assert batch_sha(np.array([3, 1, 2, PAD])) == batch_sha(np.array([2, 3, 1]))
    assert batch_sha(np.array([3, 1, 2])) != batch_sha(np.array([3, 1, 4]))
