"""Data sources, formats, column remapping, mixing, overlong and bad-record policies."""

from __future__ import annotations

import csv
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli, small_config, write_jsonl

from lockstep.config import DataConfig
from lockstep.data import dataset
from lockstep.data.render import IGNORE
from lockstep.errors import ConfigError, DataError
from lockstep.model.load import BUILTIN_DIR

ALPACA = [{"instruction": f"Say {i}.", "input": "", "output": f"{i} {i}"} for i in range(6)]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(BUILTIN_DIR / "tiny")


def build(tok, *train, **data):
    """The samples of a data section, checked first as every command that builds checks it."""
    cfg = DataConfig(train=list(train), **data)
    dataset.check_files(cfg)
    return dataset.build(cfg, tok)


def trained_text(tok, samples, i: int) -> str:
    ids, labels = samples.input_ids[i], samples.labels[i]
    return tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE])


def test_every_source_type_reads_the_same_records(tmp_path, tok):
    write_jsonl(tmp_path / "a.jsonl", ALPACA)
    (tmp_path / "a.json").write_text(json.dumps(ALPACA))
    with (tmp_path / "a.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(ALPACA)
    pq.write_table(pa.Table.from_pylist(ALPACA), tmp_path / "a.parquet")
    results = [build(tok, {"path": str(tmp_path / f"a.{ext}")}) for ext in
               ("jsonl", "json", "csv", "parquet")]  # fmt: skip
    for r in results:
        assert [x.tolist() for x in r.input_ids] == [x.tolist() for x in results[0].input_ids]
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "1.jsonl", ALPACA[:2])
    write_jsonl(folder / "2.jsonl", ALPACA[2:])
    assert len(build(tok, {"path": str(folder)})) == 6


def test_hugging_face_datasets_saved_to_disk(tmp_path, tok):
    import datasets

    datasets.Dataset.from_list(ALPACA).save_to_disk(tmp_path / "one")
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(ALPACA[:4]),
                                   "test": datasets.Dataset.from_list(ALPACA[4:])})  # fmt: skip
    splits.save_to_disk(tmp_path / "dict")
    got = build(tok, {"path": str(tmp_path / "one")})
    assert len(got) == 6 and trained_text(tok, got, 0) == "0 0<|im_end|>"
    assert len(build(tok, {"path": str(tmp_path / "dict"), "split": "test"})) == 2
    with pytest.raises(DataError, match="loading it as a Hugging Face dataset .split 'nope'"):
        build(tok, {"path": str(tmp_path / "dict"), "split": "nope"})


def test_formats_and_column_remapping(tmp_path, tok):
    sharegpt = [
        {
            "conversations": [
                {"from": "system", "value": "Be terse."},
                {"from": "human", "value": "hi"},
                {"from": "gpt", "value": "yo"},
            ]
        }
    ]
    messages = [{"messages": [{"role": "user", "content": "hi"},
                              {"role": "assistant", "content": "hey"}]}]  # fmt: skip
    text = [{"body": "plain words here"}]
    renamed = [{"q": "Say x.", "a": "x"}]
    got = build(
        tok,
        {"path": str(write_jsonl(tmp_path / "s.jsonl", sharegpt)), "format": "sharegpt"},
        {"path": str(write_jsonl(tmp_path / "m.jsonl", messages)), "format": "messages"},
        {"path": str(write_jsonl(tmp_path / "t.jsonl", text)), "format": "text",
         "columns": {"text": "body"}},
        {"path": str(write_jsonl(tmp_path / "r.jsonl", renamed)),
         "columns": {"instruction": "q", "output": "a"}},
    )  # fmt: skip
    assert [trained_text(tok, got, i) for i in (0, 1, 3)] == ["yo<|im_end|>", "hey<|im_end|>",
                                                              "x<|im_end|>"]  # fmt: skip
    assert (got.labels[2] == got.input_ids[2]).all()  # text: every token trained
    assert tok.decode(got.input_ids[2]) == "plain words here<|im_end|>"


def test_mixing_keeps_order_and_max_samples(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    b = write_jsonl(tmp_path / "b.jsonl", [{**r, "output": "B"} for r in ALPACA])
    got = build(tok, {"path": str(a), "max_samples": 2}, {"path": str(b)})
    assert len(got) == 8
    assert [trained_text(tok, got, i) for i in (0, 1, 2)] == ["0 0<|im_end|>", "1 1<|im_end|>",
                                                              "B<|im_end|>"]  # fmt: skip


def test_overlong_truncate_or_drop(tmp_path, tok):
    long_answer = {"instruction": "Say it.", "input": "", "output": "word " * 100}
    long_prompt = {"instruction": "long " * 100, "input": "", "output": "x"}
    path = str(write_jsonl(tmp_path / "a.jsonl", [*ALPACA, long_answer, long_prompt]))
    cut = build(tok, {"path": path}, max_length=32)
    # the long answer keeps its first trained tokens; the long prompt keeps none: dropped, counted
    assert len(cut) == 7 and cut.stats.truncated == 2 and max(map(len, cut.input_ids)) == 32
    assert cut.stats.notes["no_target"]["count"] == 1
    assert cut.stats.notes["no_target"]["first"] == f"{path}:8"
    assert trained_text(tok, cut, 6).startswith("word word")
    drop = build(tok, {"path": path}, max_length=32, overlong="drop")
    assert len(drop) == 6 and drop.stats.dropped == 2


def test_bad_line_7_is_named_and_skip_counts(tmp_path, tok):
    lines = [json.dumps(r) for r in ALPACA + ALPACA]
    lines[6] = '{"instruction": "x", "output": '  # broken JSON on line 7
    lines[8] = json.dumps({"instruction": "x"})  # line 9: no output
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{path}:7: invalid JSON.*on_bad_record=skip"):
        build(tok, {"path": str(path)})
    got = build(tok, {"path": str(path)}, on_bad_record="skip")
    assert len(got) == 10 and got.stats.skipped == 2
    assert got.stats.first_skipped[0].startswith(f"{path}:7: invalid JSON")
    assert (
        got.stats.first_skipped[1]
        == f"{path}:9: missing field 'output' (fields present: instruction)"
    )


def test_skip_is_reported_by_the_cli(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([json.dumps(r) for r in ALPACA * 3] + ["not json"]) + "\n")
    res = run_cli("train", str(small_config(tmp_path, path)), "data.on_bad_record=skip",
                  "train.max_steps=1")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert (
        f"skipped 1 bad records (data.on_bad_record=skip); first:\n  {path}:19: invalid JSON"
        in res.stderr
    )


@pytest.mark.parametrize(
    ("records", "fmt", "message"),
    [
        ([{"instruction": "a", "output": 3}], "alpaca", "field 'output' must be a string, got int"),
        ([{"messages": [{"role": "bot", "content": "x"}]}], "messages", "messages[0] must be"),
        ([{"conversations": [{"from": "human", "value": "x"}]}], "sharegpt", "no assistant turn"),
        ([{"text": ""}], "text", "field 'text' is empty"),
    ],
)
def test_wrong_records_say_what_was_expected(tmp_path, tok, records, fmt, message):
    path = write_jsonl(tmp_path / "x.jsonl", records)
    with pytest.raises(
        DataError, match=rf"{path}:1: .*{message}".replace("[", r"\[").replace("]", r"\]")
    ):
        build(tok, {"path": str(path), "format": fmt})


def test_missing_path_and_unsupported_type(tmp_path, tok):
    (tmp_path / "x.xml").write_text("<hi/>")
    with pytest.raises(DataError, match="unsupported file type '.xml'"):
        build(tok, {"path": str(tmp_path / "x.xml")})
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ConfigError, match=r"data.train.0: .*x.txt is plain text.*format: text"):
        build(tok, {"path": str(tmp_path / "x.txt")})
    with pytest.raises(DataError, match="not found"):
        build(tok, {"path": str(tmp_path / "nope.jsonl")})


def test_data_preview_marks_trained_tokens_and_counts():
    res = run_cli("data", "preview", "demo", "-n", "2")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.count("--- sample ") == 2
    first = out.split("--- sample 0")[1].split("--- sample 1")[0]
    assert "<|im_start|>assistant\n[[" in first and "<|im_end|>]]" in first
    assert first.count("[[") == 1  # only the assistant turn is trained
    for key in ("samples:        2000", "trained tokens:", "length:         min", "p90",
                "too long:       0 truncated, 0 dropped", "bad records:    0 skipped"):  # fmt: skip
        assert key in out, key


def test_cache_is_reused_and_rebuilt_when_any_input_changes(tmp_path, tok):
    from lockstep.data import cache

    data = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    base = {"train": [{"path": str(data)}], "cache_dir": str(tmp_path / "c"), "max_length": 64}
    first, how = cache.load_or_build(DataConfig(**base), tok)
    assert how.startswith("tokenised, cached in ")
    again, how = cache.load_or_build(DataConfig(**base, num_proc=2), tok)  # num_proc: same data
    assert how.startswith("reusing tokenised data from ")
    assert [x.tolist() for x in again.labels] == [x.tolist() for x in first.labels]
    changes = [{"max_length": 32}, {"train_on": "all"}, {"template": "plain"}, {"packing": True},
               {"overlong": "drop"}, {"train": [{"path": str(data), "max_samples": 3}]}]  # fmt: skip
    for change in changes:
        _, how = cache.load_or_build(DataConfig(**{**base, **change}), tok)
        assert how.startswith("tokenised"), change
    write_jsonl(data, ALPACA[:5])  # new file contents
    assert cache.load_or_build(DataConfig(**base), tok)[1].startswith("tokenised")
    tok2 = type(tok).from_pretrained(BUILTIN_DIR / "tiny")
    tok2.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert cache.load_or_build(DataConfig(**base), tok2)[1].startswith("tokenised")


def test_second_run_does_not_tokenise_again(tmp_path):
    cfg = small_config(tmp_path, train={"max_steps": 1})
    first = run_cli("train", str(cfg))
    assert first.returncode == 0 and "data: tokenised, cached in" in first.stderr
    second = run_cli("train", str(cfg), f"output_dir={tmp_path / 'two'}")
    assert second.returncode == 0 and "data: reusing tokenised data from" in second.stderr


def test_num_proc_gives_the_same_samples(tmp_path, tok):
    data = write_jsonl(tmp_path / "a.jsonl", ALPACA * 50 + [{"instruction": "x"}])
    one = build(tok, {"path": str(data)}, on_bad_record="skip")
    two = build(tok, {"path": str(data)}, on_bad_record="skip", num_proc=2)
    assert [x.tolist() for x in one.input_ids] == [x.tolist() for x in two.input_ids]
    assert one.stats == two.stats and one.stats.skipped == 1


def test_a_cache_entry_with_the_earlier_stats_layout_loads(tmp_path, tok):
    # entries written before the stats became BuildStats also stored the sample counts
    # (samples, tokens, ...): they load, and the counts come from the samples
    import numpy as np

    from lockstep.data import cache

    data = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    cfg = DataConfig(train=[{"path": str(data)}], cache_dir=str(tmp_path / "c"), packing=True)
    fresh, _ = cache.load_or_build(cfg, tok)
    entry = next((tmp_path / "c").glob("samples-*.npz"))
    with np.load(entry) as z:
        arrays = {k: z[k] for k in z.files}
    earlier = {**fresh.stats.to_json(), "samples": 999, "tokens": 1, "target_tokens": 1,
               "max_len": 1, "packs": 999}  # fmt: skip
    del earlier["held_out"]
    arrays["stats"] = np.array(json.dumps(earlier))
    with entry.open("wb") as f:
        np.savez(f, **arrays)
    again, how = cache.load_or_build(cfg, tok)
    assert how.startswith("reusing") and again.stats == fresh.stats
    assert again.token_count() == fresh.token_count() == sum(len(x) for x in fresh.input_ids)
    assert again.sample_count() == len(ALPACA)


def test_a_dataset_error_in_a_tokenising_process_stops_the_build(tmp_path, tok):
    from lockstep.errors import DatasetError

    no_template = type(tok).from_pretrained(BUILTIN_DIR / "tiny")
    no_template.chat_template = None
    data = write_jsonl(tmp_path / "a.jsonl", ALPACA * 20)
    cfg = DataConfig(train=[{"path": str(data)}], num_proc=2, on_bad_record="skip")
    with pytest.raises(DatasetError, match="the tokenizer has no chat template"):
        dataset.build(cfg, no_template)


@pytest.mark.parametrize(
    ("record", "fmt", "message"),
    [
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]},
                       {"role": "assistant", "content": "a cat"}]}, "messages",
         r"messages\[0\].content\[0\]: parts of type 'image_url' cannot be trained"),
        ({"conversations": [{"from": "human", "value": "hi"},
                            {"from": "function_call", "value": "{not json"}]}, "sharegpt",
         r"conversations\[1\]: a tool call must be JSON"),
        ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}],
          "tools": "[{oops"}, "sharegpt", r"field 'tools' is not valid JSON"),
        ({"conversations": [{"from": "system", "value": "a"}, {"from": "human", "value": "hi"},
                            {"from": "gpt", "value": "yo"}], "system": "b"}, "sharegpt",
         r"a system turn and a 'system' field: give the system prompt once"),
        ({"messages": [{"role": "user", "content": "hi"},
                       {"role": "assistant", "content": None}]}, "messages",
         r"messages\[1\]: 'content' is missing or null \(and no tool calls\)"),
        ({"messages": [{"role": "user", "content": "hi"},
                       {"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}]},
         "messages", r"a tool call needs a function name"),
        ({"instruction": "hi", "output": "yo", "chosen": "yo", "rejected": "no"}, "alpaca",
         r"field 'chosen' would change what is trained \(a preference pair"),
    ],
)  # fmt: skip
def test_chat_records_that_cannot_be_trained_say_why(tmp_path, tok, record, fmt, message):
    path = write_jsonl(tmp_path / "x.jsonl", [record])
    with pytest.raises(DataError, match=rf"{path}:1: .*{message}"):
        build(tok, {"path": str(path), "format": fmt})


def test_unused_fields_are_named_and_ignore_fields_silences_them(tmp_path, tok):
    records = [{**r, "id": i, "source": "web"} for i, r in enumerate(ALPACA)]
    path = str(write_jsonl(tmp_path / "a.jsonl", records))
    got = build(tok, {"path": path})
    lines = dataset.describe(got.stats, DataConfig(train=[{"path": path}]))
    assert (False, f"{path}: fields not used: id (6 records), source (6 records) "
                   "(ignore_fields silences this)") in lines  # fmt: skip
    quiet = build(tok, {"path": path, "ignore_fields": ["id", "source"]})
    assert not dataset.describe(quiet.stats, DataConfig(train=[{"path": path}]))


def test_template_settings_that_cannot_work_together_are_refused():
    from lockstep.config import validate

    base = {"data": {"train": [{"path": "x.jsonl"}]}}
    with pytest.raises(ConfigError, match="data.template .* or data.chat_template .*not both"):
        validate({"data": {**base["data"], "template": "chatml", "chat_template": "{{ x }}"}})
    with pytest.raises(ConfigError, match="data.template_kwargs: tools is set by lockstep"):
        validate({"data": {**base["data"], "template_kwargs": {"tools": []}}})
    with pytest.raises(ConfigError, match=r"columns: got .*format 'text' reads no field 'output'"):
        validate({"data": {"train": [{"path": "x", "format": "text", "columns": {"output": "y"}}]}})
    # LLaMA-Factory's column names are accepted, as lockstep's
    cfg = validate(
        {"data": {"train": [{"path": "x", "columns": {"prompt": "q", "response": "a"}}]}}
    )
    assert cfg.data.train[0].columns == {"instruction": "q", "output": "a"}


def test_a_missing_chat_template_file_fails_fast(tmp_path):
    res = run_cli("train", str(small_config(tmp_path)), "data.chat_template=nope/template.jinja")
    assert res.returncode == 1
    assert "data.chat_template: file 'nope/template.jinja' not found" in res.stderr


# ---------------------------------------------------------------- files and records that are broken

GOOD = json.dumps({"instruction": "Say hi", "output": "hi"}) + "\n"


def _bad_line(body: str) -> bytes:
    return (GOOD + body + "\n" + GOOD).encode()


BAD_RECORDS = {  # one bad record between two good ones: named by file:line, skipped and counted
    "invalid UTF-8": (b'{"instruction": "x\xff", "output": "y"}\n'.join([GOOD.encode()] * 2), 2,
                      "not UTF-8 text (byte 18 of the line)"),
    "deep nesting": (_bad_line('{"instruction": ' + "[" * 50000 + "]" * 50000 + ', "output": "y"}'),
                     2, "JSON nested too deeply"),
    "lone surrogate": (_bad_line('{"instruction": "a \\ud800 b", "output": "y"}'), 2,
                       "unpaired UTF-16 surrogate"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_a_broken_record_is_named_or_skipped_and_counted(tmp_path, tok, case):
    content, line, message = BAD_RECORDS[case]
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:{line}: .*{re.escape(message)}"):
        build(tok, {"path": str(path)})
    got = build(tok, {"path": str(path)}, on_bad_record="skip")
    assert len(got) == 2 and got.stats.skipped == 1


def test_a_byte_order_mark_is_not_part_of_the_first_record(tmp_path, tok):
    for name, body in (("d.jsonl", GOOD * 2), ("d.json", f"[{GOOD}, {GOOD}]"),
                       ("d.csv", "instruction,output\nSay hi,hi\nSay yo,yo\n")):  # fmt: skip
        path = tmp_path / name
        path.write_bytes(b"\xef\xbb\xbf" + body.encode())
        assert len(build(tok, {"path": str(path)})) == 2, name


def _gzip(path):
    import gzip

    path.write_bytes(gzip.compress(GOOD.encode() * 3))


def _loop(path):
    other = path.with_name("other.jsonl")
    other.symlink_to(path)
    path.symlink_to(other)


def _corrupt_parquet(path):
    path.write_bytes(b"PAR1" + bytes(range(200)) + b"PAR1")


def _unreadable(path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    path.write_text(GOOD)
    path.chmod(0)


BAD_FILES = {
    "gzip data named .jsonl": ("d.jsonl", _gzip, "gzip-compressed data under a .jsonl name"),
    "symlink loop": ("d.jsonl", _loop, "a symbolic link to nothing"),
    "corrupt parquet": ("d.parquet", _corrupt_parquet, "not a readable parquet file"),
    "unreadable": ("d.jsonl", _unreadable, "cannot read it: Permission denied"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
@pytest.mark.parametrize("mode", ["error", "skip"])
def test_a_file_that_cannot_be_read_stops_with_its_name(tmp_path, tok, case, mode):
    """A whole file unreadable is never skipped as records: that would lose it silently."""
    name, make, message = BAD_FILES[case]
    path = tmp_path / name
    make(path)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: {re.escape(message)}"):
        dataset.fingerprint(DataConfig(train=[{"path": str(path)}], on_bad_record=mode), tok)
        build(tok, {"path": str(path)}, on_bad_record=mode)


def test_a_null_cell_is_called_null_not_missing(tmp_path, tok):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"instruction": ["a", "b"], "output": ["x", None]}), path)
    with pytest.raises(DataError, match=rf"^{path}: row 1: field 'output' is null \(no value\)"):
        build(tok, {"path": str(path)})


def test_broken_data_is_one_error_line_from_the_cli(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(BAD_RECORDS["invalid UTF-8"][0])
    res = run_cli("data", "preview", str(small_config(tmp_path, path)))
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith(f"lockstep: error: {path}:2: not UTF-8")
