"""Preference pairs in the layouts users have -> two rows per pair, only the answers trained.

The same pairs are written as LLaMA-Factory's alpaca and sharegpt pairwise datasets and as
TRL's preference datasets (strings, messages, implicit prompt), built with the built-in tiny
tokenizer (a template with {% generation %} marks) and with Qwen2.5- and Llama-3.1-style
templates (no marks), and compared: every layout gives the same rows, the trained tokens are
the answer and its end-of-turn marker, and chosen and rejected share the prompt tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from chat_templates import FAMILIES, family_tokenizer
from conftest import write_jsonl

from lockstep.config import DataConfig, ModelConfig
from lockstep.data import cache, dataset, formats, pairs
from lockstep.data.render import IGNORE
from lockstep.data.sources import Record
from lockstep.errors import ConfigError, DataError, DatasetError
from lockstep.model.load import load_tokenizer

PAIRS = [("Uppercase: cat", "CAT", "Cat"), ("Reverse: abc", "cba", "abc"),
         ("Add 2 and 3.", "5", "6")]  # fmt: skip
SYSTEM, HISTORY = "Answer exactly.", ("Ready?", "Ready.")


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def layouts(root: Path) -> dict[str, dict]:
    """A file per layout holding PAIRS (the first with a system prompt and an earlier exchange)
    and its data.train entry."""
    sys_hist = [{"role": "system", "content": SYSTEM}, user(HISTORY[0]), assistant(HISTORY[1])]
    records = {"alpaca": [], "sharegpt": [], "strings": [], "messages": [], "implicit": []}
    for i, (prompt, chosen, rejected) in enumerate(PAIRS):
        first = i == 0
        records["alpaca"].append(
            {"instruction": prompt, "input": "", "chosen": chosen, "rejected": rejected}
            | ({"system": SYSTEM, "history": [list(HISTORY)]} if first else {})
        )
        turns = [{"from": "human", "value": prompt}]
        if first:
            turns = [{"from": "human", "value": HISTORY[0]},
                     {"from": "gpt", "value": HISTORY[1]}, *turns]  # fmt: skip
        records["sharegpt"].append(
            {"conversations": turns, "chosen": {"from": "gpt", "value": chosen},
             "rejected": {"from": "gpt", "value": rejected}}
            | ({"system": SYSTEM} if first else {})
        )  # fmt: skip
        if not first:  # a string prompt has no earlier exchange
            records["strings"].append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        messages = [*(sys_hist if first else []), user(prompt)]
        records["messages"].append(
            {"prompt": messages, "chosen": [assistant(chosen)], "rejected": [assistant(rejected)]}
        )
        records["implicit"].append(
            {"chosen": [*messages, assistant(chosen)], "rejected": [*messages, assistant(rejected)]}
        )
    fmt = {"alpaca": "alpaca", "sharegpt": "sharegpt"}
    return {
        name: {"path": str(write_jsonl(root / f"{name}.jsonl", recs)),
               "format": fmt.get(name, "preference")}
        for name, recs in records.items()
    }  # fmt: skip


TOKENIZERS = {
    "tiny": lambda: load_tokenizer(ModelConfig()),
    "qwen2.5": lambda: family_tokenizer(FAMILIES["qwen2.5"]),
    "llama3.1": lambda: family_tokenizer(FAMILIES["llama3.1"]),
}
END = {"tiny": "<|im_end|>", "qwen2.5": "<|im_end|>", "llama3.1": "<|eot_id|>"}


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def tok(request):
    return request.param, TOKENIZERS[request.param]()


@pytest.fixture(scope="module")
def qwen():
    return family_tokenizer(FAMILIES["qwen2.5"])


def build(entries: list[dict], tokenizer, **data) -> dataset.Samples:
    return pairs.build_pairs(DataConfig(train=entries, max_length=data.pop("max_length", 256),
                                        **data), tokenizer)  # fmt: skip


def trained(samples: dataset.Samples, row: int) -> list[int]:
    return [int(t) for t in samples.labels[row] if t != IGNORE]


def prompt_of(samples: dataset.Samples, row: int) -> list[int]:
    labels = samples.labels[row].tolist()
    start = next(i for i, t in enumerate(labels) if t != IGNORE)
    return samples.input_ids[row][:start].tolist()


def rows(samples: dataset.Samples) -> list[tuple[list[int], list[int]]]:
    return [
        (i.tolist(), lab.tolist()) for i, lab in zip(samples.input_ids, samples.labels, strict=True)
    ]


def test_every_layout_gives_the_same_rows_training_only_the_answers(tmp_path, tok):
    name, tokenizer = tok
    files = layouts(tmp_path)
    built = {layout: build([entry], tokenizer) for layout, entry in files.items()}
    alpaca = built["alpaca"]
    assert len(alpaca) // 2 == len(PAIRS) and len(alpaca) == 2 * len(PAIRS)
    assert alpaca.stats.skipped == 0 and alpaca.stats.unused == {"0": {}}
    assert alpaca.fingerprint == pairs.fingerprint(DataConfig(train=[files["alpaca"]],
                                                              max_length=256), tokenizer)  # fmt: skip
    for i, (_, chosen, rejected) in enumerate(PAIRS):
        # row 2i: prompt + chosen, row 2i + 1: prompt + rejected; only the answer is trained
        # (the earlier exchange of the first pair is context), with the end-of-turn marker
        assert tokenizer.decode(trained(alpaca, 2 * i)) == chosen + END[name]
        assert tokenizer.decode(trained(alpaca, 2 * i + 1)) == rejected + END[name]
        assert prompt_of(alpaca, 2 * i) == prompt_of(alpaca, 2 * i + 1)
        assert alpaca.input_ids[2 * i].tolist() != alpaca.input_ids[2 * i + 1].tolist()
    first = tokenizer.decode(prompt_of(alpaca, 0))
    assert SYSTEM in first and HISTORY[1] in first and PAIRS[0][0] in first
    for layout in ("sharegpt", "messages", "implicit"):
        assert rows(built[layout]) == rows(alpaca), layout
    assert rows(built["strings"]) == rows(alpaca)[2:]  # the pairs without an earlier exchange
    together = build(list(files.values()), tokenizer)
    assert together.stats.records == 5 * len(PAIRS) - 1
    assert rows(together) == [r for layout in files for r in rows(built[layout])]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_template_family_trains_each_answer_after_one_shared_prompt(tmp_path, family):
    """The answer of a pair whose prompt holds an earlier exchange, with each family's template:
    exactly the answer as the template writes a generated turn is trained, in both rows."""
    fam = FAMILIES[family]
    tokenizer = family_tokenizer(fam)
    rec = {"prompt": [user(HISTORY[0]), assistant(HISTORY[1]), user("Uppercase: cat")],
           "chosen": "CAT", "rejected": "Cat"}  # fmt: skip
    path = write_jsonl(tmp_path / "p.jsonl", [rec])
    got = build([{"path": str(path), "format": "preference"}], tokenizer)
    eos = fam.eos if fam.eos_appended else ""
    for row, answer in enumerate(("CAT", "Cat")):
        assert tokenizer.decode(trained(got, row)) == fam.lead + answer + fam.end + eos
    assert prompt_of(got, 0) == prompt_of(got, 1)
    assert HISTORY[1] in tokenizer.decode(prompt_of(got, 0))


def test_trl_prompt_given_twice_and_a_system_field(tmp_path, qwen):
    """HuggingFaceH4's layout: a text prompt, and answers that repeat it as a conversation."""
    recs = [{"prompt": p, "system": SYSTEM, "chosen": [user(p), assistant(c)],
             "rejected": [user(p), assistant(r)]} for p, c, r in PAIRS]  # fmt: skip
    h4 = build([{"path": str(write_jsonl(tmp_path / "h4.jsonl", recs)), "format": "preference"}],
               qwen)  # fmt: skip
    plain = [{"prompt": [{"role": "system", "content": SYSTEM}, user(p)], "chosen": c,
              "rejected": r} for p, c, r in PAIRS]  # fmt: skip
    want = build([{"path": str(write_jsonl(tmp_path / "p.jsonl", plain)),
                   "format": "preference"}], qwen)  # fmt: skip
    assert rows(h4) == rows(want)
    assert SYSTEM in qwen.decode(prompt_of(h4, 0))


def test_columns_remap_every_layout_and_unread_fields_are_counted(tmp_path, qwen):
    files = layouts(tmp_path)
    renamed = {
        "alpaca": ({"instruction": "question", "chosen": "better", "rejected": "worse"},
                   {"instruction": "question", "chosen": "better", "rejected": "worse"}),
        "sharegpt": ({"conversations": "dialog", "chosen": "good", "rejected": "bad",
                      "from": "speaker", "value": "text"},
                     {"messages": "dialog", "chosen": "good", "rejected": "bad",
                      "role_tag": "speaker", "content_tag": "text"}),
        "messages": ({"prompt": "query", "chosen": "win", "rejected": "lose", "role": "who",
                      "content": "says"},
                     {"prompt": "query", "chosen": "win", "rejected": "lose", "role_tag": "who",
                      "content_tag": "says"}),
    }  # fmt: skip
    for layout, (names, columns) in renamed.items():
        recs = [json.loads(line) for line in Path(files[layout]["path"]).read_text().splitlines()]
        recs = [_rename(r, names) | {"score": 7} for r in recs]
        path = write_jsonl(tmp_path / f"renamed-{layout}.jsonl", recs)
        got = build([{"path": str(path), "format": files[layout]["format"], "columns": columns}],
                    qwen)  # fmt: skip
        assert rows(got) == rows(build([files[layout]], qwen)), layout
        assert got.stats.unused == {"0": {"score": len(PAIRS)}}, layout
    # a LLaMA-Factory dataset_info.json entry's columns, pasted as they are
    info = {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected",
            "system": "system", "history": "history"}  # fmt: skip
    got = build([files["alpaca"] | {"columns": info}], qwen)
    assert rows(got) == rows(build([files["alpaca"]], qwen))
    # a field inside an answer turn that nothing reads is named too
    sharegpt = [{"conversations": [{"from": "human", "value": "Hi"}],
                 "chosen": {"from": "gpt", "value": "Hello", "rating": 5},
                 "rejected": {"from": "gpt", "value": "Go away"}}]  # fmt: skip
    path = write_jsonl(tmp_path / "rated.jsonl", sharegpt)
    got = build([{"path": str(path), "format": "sharegpt", "ignore_fields": ["score"]}], qwen)
    assert got.stats.unused == {"0": {"chosen.rating": 1}}


def _rename(value, names: dict[str, str]):
    """A record (and its turns) with keys renamed as a dataset with other column names has."""
    if isinstance(value, dict):
        return {names.get(k, k): _rename(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [_rename(v, names) for v in value]
    return value


def test_supervised_fine_tuning_refuses_pairs_under_any_name(tmp_path, qwen):
    rec = Record("d.jsonl:1", {"instruction": "Hi", "output": "Yo", "better": "Yo!"})
    with pytest.raises(DatasetError, match=r"^d.jsonl:1: field 'better' would change what is "
                                           r"trained \(a preference pair"):  # fmt: skip
        formats.convert(rec, "alpaca", {"chosen": "better"})
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DatasetError, match="format 'preference' holds preference pairs, which "
                                           "supervised fine-tuning does not read"):  # fmt: skip
        dataset.build(DataConfig(train=[{"path": str(path), "format": "preference"}]), qwen)
    # and preference training refuses what it cannot apply
    kto = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "Hi", "chosen": "a", "rejected": "b",
                                                "label": True}])  # fmt: skip
    with pytest.raises(DatasetError, match=rf"^{kto}:1: field 'label' would change what is "
                                           r"trained \(a KTO label.*preference training does "
                                           r"not read it"):  # fmt: skip
        build([{"path": str(kto), "format": "preference"}], qwen)
    got = build([{"path": str(kto), "format": "preference", "ignore_fields": ["label"]}], qwen)
    assert len(got) // 2 == 1
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "plain"}])
    with pytest.raises(DatasetError, match="format 'text' holds no preference pairs"):
        build([{"path": str(text), "format": "text"}], qwen)


GOOD = {"prompt": "Uppercase: cat", "chosen": "CAT", "rejected": "Cat"}
BAD = {  # kind: (format, record, what the error says)
    "identical": ("alpaca", {"instruction": "Hi", "chosen": "Hello", "rejected": " Hello "},
                  "'chosen' and 'rejected' are the same answer, so the pair prefers nothing"),
    "empty chosen": ("preference", {"prompt": "Hi", "chosen": " ", "rejected": "Hello"},
                     "field 'chosen' is empty: a pair needs two answers"),
    "empty rejected": ("sharegpt", {"conversations": [{"from": "human", "value": "Hi"}],
                                    "chosen": {"from": "gpt", "value": "Hello"},
                                    "rejected": {"from": "gpt", "value": ""}},
                       "field 'rejected' is empty: a pair needs two answers"),
    "prompt too long": ("preference", {"prompt": "word " * 80, "chosen": "A", "rejected": "B"},
                        "data.max_length=64 leaves no answer token; raise data.max_length or "
                        "shorten the prompt"),
    "no prompt turn": ("sharegpt", {"conversations": [{"from": "human", "value": "Hi"},
                                                      {"from": "gpt", "value": "Yo"}],
                                    "chosen": {"from": "gpt", "value": "A"},
                                    "rejected": {"from": "gpt", "value": "B"}},
                       "the prompt must end with the user's (or a tool's) message"),
    "two prompts": ("preference", {"chosen": [user("Hi"), assistant("A")],
                                   "rejected": [user("Hello"), assistant("B")]},
                    "hold different messages before their answers"),
    "no answer last": ("preference", {"prompt": "Hi", "chosen": [assistant("A"), user("More")],
                                      "rejected": "B"},
                       "field 'chosen' must end with the answer, an assistant message"),
    "user answer": ("sharegpt", {"conversations": [{"from": "human", "value": "Hi"}],
                                 "chosen": {"from": "human", "value": "A"},
                                 "rejected": {"from": "gpt", "value": "B"}},
                    "field 'chosen' must be one assistant turn"),
}  # fmt: skip


def test_bad_pairs_are_named_by_file_and_line_or_skipped_and_counted(tmp_path, qwen):
    entries = []
    good = {"alpaca": {"instruction": "Hi", "chosen": "A", "rejected": "B"},
            "preference": GOOD,
            "sharegpt": {"conversations": [{"from": "human", "value": "Hi"}],
                         "chosen": {"from": "gpt", "value": "A"},
                         "rejected": {"from": "gpt", "value": "B"}}}  # fmt: skip
    for kind, (fmt, record, said) in BAD.items():
        path = write_jsonl(tmp_path / f"{kind.replace(' ', '_')}.jsonl", [good[fmt], record])
        entry = {"path": str(path), "format": fmt}
        with pytest.raises(DataError) as e:
            build([entry], qwen, max_length=64)
        message = str(e.value)
        assert message.startswith(f"{path}:2: "), (kind, message)
        assert said in message and "\n" not in message, (kind, message)
        assert message.endswith("(data.on_bad_record=skip skips such records)"), message
        entries.append(entry)
    got = build(entries, qwen, max_length=64, on_bad_record="skip")
    assert got.stats.skipped == len(BAD) and len(got) // 2 == len(BAD)
    assert got.stats.records == len(BAD)
    assert [s.split(": ")[0] for s in got.stats.first_skipped] == [
        f"{e['path']}:2" for e in entries[:3]
    ]
    assert all(trained(got, r) for r in range(len(got)))


def test_overlong_pairs_are_cut_after_the_whole_prompt_or_dropped(tmp_path, qwen):
    long = " ".join(f"w{k}" for k in range(60))
    recs = [
        GOOD,
        {"prompt": "Say many words.", "chosen": long, "rejected": "No."},
        {"prompt": "Say them again.", "chosen": long + " x", "rejected": long + " y"},
    ]
    path = write_jsonl(tmp_path / "long.jsonl", recs)
    entry = {"path": str(path), "format": "preference"}
    full = build([entry], qwen)
    assert full.stats.truncated == 0 and max(map(len, full.input_ids)) > 48
    # truncate: each row cut at max_length, the prompt whole; cut to the same tokens is bad
    with pytest.raises(DataError, match=rf"^{path}:3: cut to data.max_length=48 tokens, the "
                                        r"chosen and the rejected rows are the same"):  # fmt: skip
        build([entry], qwen, max_length=48)
    cut = build([entry], qwen, max_length=48, on_bad_record="skip")
    assert len(cut) // 2 == 2 and cut.stats.skipped == 1
    assert cut.stats.truncated == 1 and max(map(len, cut.input_ids)) == 48
    assert rows(cut)[:2] == rows(full)[:2]
    assert cut.input_ids[2].tolist() == full.input_ids[2][:48].tolist()
    assert prompt_of(cut, 2) == prompt_of(full, 2) == prompt_of(cut, 3)
    assert rows(cut)[3] == rows(full)[3]  # the short answer is whole
    # drop: the pairs with a row over max_length go, both rows
    dropped = build([entry], qwen, max_length=48, overlong="drop")
    assert rows(dropped) == rows(full)[:2]
    assert dropped.stats.dropped == 4 and len(dropped) // 2 == 1
    with pytest.raises(DataError, match=r"no usable preference pairs \(2 longer than data.max"):
        build([{"path": str(write_jsonl(tmp_path / "l.jsonl", recs[1:])),
                "format": "preference"}], qwen, max_length=48, overlong="drop")  # fmt: skip


def test_packing_and_training_the_prompt_are_refused(tmp_path, qwen):
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD])
    entry = {"path": str(path), "format": "preference"}
    with pytest.raises(ConfigError, match="^data.packing: preference pairs are not packed"):
        build([entry], qwen, packing=True)
    with pytest.raises(ConfigError, match="^data.train_on=all would train the prompt"):
        build([entry], qwen, train_on="all")
    assert rows(build([entry], qwen, train_on="last")) == rows(build([entry], qwen))


def test_a_template_that_writes_the_prompt_by_the_answer_is_named(tmp_path):
    # a template with {% generation %} marks (they are the mask) whose first line counts the
    # characters of the whole conversation: answers of different lengths share no prompt (the
    # first record's answers are equally long)
    template = (
        "{{- 'chars: ' + messages | map(attribute='content') | join | length | string }}"
        "{%- for m in messages %}{{- '\\n<|im_start|>' + m.role + '\\n' }}"
        "{%- if m.role == 'assistant' %}{% generation %}{{- m.content + '<|im_end|>' }}"
        "{% endgeneration %}{%- else %}{{- m.content + '<|im_end|>' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '\\n<|im_start|>assistant\\n' }}{%- endif %}"
    )
    tokenizer = family_tokenizer(FAMILIES["qwen2.5"], template)
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD, {"prompt": "Hi", "chosen": "Hello there",
                                                     "rejected": "Go"}])  # fmt: skip
    with pytest.raises(DataError, match=rf"^{path}:2: the chat template writes the prompt "
                                        r"differently before the chosen answer and before the "
                                        r"rejected one"):  # fmt: skip
        build([{"path": str(path), "format": "preference"}], tokenizer)


def test_pair_samples_never_share_a_cache_entry_with_supervised_samples(tmp_path, qwen):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Hi", "chosen": "A",
                                               "rejected": "B"}])  # fmt: skip
    cfg = DataConfig(train=[{"path": str(path)}])
    fp = pairs.fingerprint(cfg, qwen)
    assert fp == pairs.fingerprint(cfg, qwen) != dataset.fingerprint(cfg, qwen)
    assert pairs.build_pairs(cfg, qwen).fingerprint == fp


def test_pair_samples_round_trip_the_data_cache_and_describe(tmp_path, qwen):
    """Pair samples are Samples: the tokenised-data cache keeps their rows and stats, and the
    start-up description reads their stats."""
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD | {"score": 1}, GOOD | {"chosen": "CAT!"}])
    cfg = DataConfig(train=[{"path": str(path), "format": "preference"}],
                     cache_dir=str(tmp_path / "cache"))  # fmt: skip
    built = pairs.build_pairs(cfg, qwen)
    file = cache.cache_file(cfg, built.fingerprint)
    cache.save(file, built)
    loaded = cache.load(file, built.fingerprint)
    assert rows(loaded) == rows(built) and loaded.stats == built.stats
    assert len(loaded) // 2 == 2 and len(loaded) == 4
    assert dataset.describe(loaded.stats, cfg) == [
        (False, f"{path}: fields not used: score (1 records) (ignore_fields silences this)")
    ]
