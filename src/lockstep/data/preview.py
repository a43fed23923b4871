"""`lockstep data preview`: see exactly what the model will train on, without loading weights."""

from __future__ import annotations

from typing import Any

import numpy as np

from lockstep.config import DataConfig
from lockstep.data import mixing
from lockstep.data.dataset import Samples, describe
from lockstep.data.render import IGNORE

COLOUR_ON, COLOUR_OFF = "\x1b[1;32m", "\x1b[0m"


def marked(tokenizer: Any, ids: np.ndarray, labels: np.ndarray, colour: bool) -> str:
    """The sample's text with trained spans in green (a terminal) or [[brackets]] (otherwise)."""
    on, off = (COLOUR_ON, COLOUR_OFF) if colour else ("[[", "]]")
    out, run, trained = [], [], None
    for tok, lab in zip(ids.tolist(), labels.tolist(), strict=True):
        is_trained = lab != IGNORE
        if trained is not None and is_trained != trained:
            text = tokenizer.decode(run)
            out.append(f"{on}{text}{off}" if trained else text)
            run = []
        run.append(tok)
        trained = is_trained
    if run:
        text = tokenizer.decode(run)
        out.append(f"{on}{text}{off}" if trained else text)
    return "".join(out)


def report(
    tokenizer: Any, samples: Samples, n: int, colour: bool, cfg: DataConfig, pairs: bool = False
) -> str:
    """The first `n` samples with their trained tokens marked, then the statistics. `pairs`:
    answer pairs (data/pairs.py): the first `n` pairs, each answer with the shared prompt."""
    parts = []
    for i in range(min(2 * n if pairs else n, len(samples))):
        body = marked(tokenizer, samples.input_ids[i], samples.labels[i], colour)
        head = f"pair {i // 2}: {'rejected' if i % 2 else 'chosen'}" if pairs else f"sample {i}"
        parts.append(f"--- {head} ({len(samples.input_ids[i])} tokens)\n{body}")
    st = samples.stats
    tokens, trained = samples.token_count(), samples.target_token_count()
    lengths = samples.lengths()
    p50, p90, p99 = (int(np.percentile(lengths, q)) for q in (50, 90, 99))
    parts.append(
        "--- statistics\n"
        f"records:        {st.records}\n"
        + (f"pairs:          {len(samples) // 2}\n" if pairs else "")
        + f"samples:        {samples.sample_count()}\n"
        f"tokens:         {tokens}\n"
        f"trained tokens: {trained} ({trained / max(tokens, 1):.1%})\n"
        f"length:         min {lengths.min()}, p50 {p50}, p90 {p90}, p99 {p99}, max {lengths.max()}\n"
        f"too long:       {st.truncated} truncated, {st.dropped} dropped\n"
        f"bad records:    {st.skipped} skipped\n"
        + (
            f"packing:        {len(samples)} sequences, {st.packing_efficiency:.1%} real tokens\n"
            if samples.packed
            else ""
        )
        + f"fingerprint:    {samples.fingerprint}"
        + "".join(f"\ndataset {line}" for line in mix_lines(samples, cfg, pairs))
        + "".join(f"\n{'warning' if warn else 'note'}: {line}" for warn, line in describe(st, cfg))
    )
    return "\n".join(parts)


def mix_lines(samples: Samples, cfg: DataConfig, pairs: bool) -> list[str]:
    """Per dataset: its units and tokens, and what each epoch takes of it (data/mixing.py),
    over all the data (a run's data.val_fraction holds some out)."""
    mixture = mixing.of(cfg.train, mixing.unit_datasets(samples, pairs))
    return mixing.table(cfg.train, samples, pairs, mixture)
