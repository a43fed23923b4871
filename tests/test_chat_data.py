"""The datasets users bring, end to end through the CLI: every field used or named.

The records are generated here in the layouts of LLaMA-Factory's demo datasets (alpaca, alpaca
with a system column, identity-style, glaive-style tool calling in sharegpt with function_call /
observation turns and a tools column, c4-style long documents, a .txt file) and of OpenAI /
TRL messages (content-part lists, tool_calls, reasoning), configured as a dataset_info.json entry
would describe them, and trained on a tiny model whose tokenizer has a Qwen2.5-style template.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from chat_templates import FAMILIES, family_tokenizer, save_family_model
from conftest import run_cli, write_jsonl

from lockstep.config import DataConfig
from lockstep.data import dataset
from lockstep.data.render import IGNORE

WEATHER = {"name": "get_weather", "description": "Current weather of a city",
           "parameters": {"type": "object", "required": ["city"],
                          "properties": {"city": {"type": "string", "description": "City"}}}}  # fmt: skip
CITIES = ["Paris", "Lima", "Oslo", "Kyoto", "Quito", "Perth"]


def glaive_records() -> list[dict]:
    """Tool use in LLaMA-Factory's sharegpt layout: the call and its result as JSON text."""
    out = []
    for i, city in enumerate(CITIES):
        out.append({
            "conversations": [
                {"from": "human", "value": f"How is the weather in {city}?"},
                {"from": "function_call",
                 "value": json.dumps({"name": "get_weather", "arguments": {"city": city}})},
                {"from": "observation", "value": json.dumps({"sky": "clear", "c": 20 + i})},
                {"from": "gpt", "value": f"It is clear in {city}, {20 + i} C."},
            ],
            "tools": json.dumps([WEATHER]),  # bare schemas, as JSON text
        })  # fmt: skip
    return out


def openai_records() -> list[dict]:
    """The same conversations as OpenAI messages: string arguments, content null, call ids."""
    out = []
    for i, city in enumerate(CITIES):
        call = {"id": f"call_{i}x", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": city})}}  # fmt: skip
        out.append({
            "messages": [
                {"role": "user", "content": [{"type": "text", "text":
                                              f"How is the weather in {city}?"}]},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call["id"],
                 "content": json.dumps({"sky": "clear", "c": 20 + i})},
                {"role": "assistant", "content": f"It is clear in {city}, {20 + i} C."},
            ],
            "tools": [{"type": "function", "function": WEATHER}],
        })  # fmt: skip
    return out


@pytest.fixture(scope="module")
def qwen_model(tmp_path_factory) -> Path:
    return save_family_model(tmp_path_factory.mktemp("qwen") / "model", FAMILIES["qwen2.5"])


def config(tmp_path: Path, model: Path, train: list[dict], **data) -> Path:
    cfg = {
        "output_dir": str(tmp_path / "out"), "seed": 3, "model": {"path": str(model)},
        "data": {"train": train, "max_length": 256, "cache_dir": str(tmp_path / "cache"), **data},
        "batch": {"global_size": 4, "micro_size": 2}, "train": {"max_steps": 2},
        "optim": {"lr": 1e-3}, "log": {"every_steps": 1},
    }  # fmt: skip
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return path


def llamafactory_layouts(root: Path) -> list[dict]:
    """A file per layout, and the data.train entries a dataset_info.json entry maps to."""
    alpaca = [{"instruction": f"Uppercase: word{i}", "input": "", "output": f"WORD{i}"}
              for i in range(4)]  # fmt: skip
    system = [{"instruction": f"Add {i} and 2.", "input": "", "output": str(i + 2),
               "system": "You are a calculator."} for i in range(4)]  # fmt: skip
    identity = [{"instruction": "Who are you?", "input": "",
                 "output": "I am {{name}}, an assistant trained by {{author}}."}] * 2  # fmt: skip
    c4 = [{"text": " ".join(f"token{k % 97}" for k in range(n))} for n in (40, 300, 700)]
    parts = [{"messages": [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Name a color."},
                                     {"type": "text", "text": "Just one."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Teal."}]}]}] * 2  # fmt: skip
    write_jsonl(root / "alpaca_demo.jsonl", alpaca)
    (root / "alpaca_system.json").write_text(json.dumps(system))
    (root / "identity.json").write_text(json.dumps(identity))
    write_jsonl(root / "glaive_toolcall_demo.jsonl", glaive_records())
    write_jsonl(root / "c4_demo.jsonl", c4)
    (root / "wiki.txt").write_text("A first paragraph of plain text.\n\nA second one.\n")
    write_jsonl(root / "parts.jsonl", parts)
    return [
        {"path": str(root / "alpaca_demo.jsonl")},
        {"path": str(root / "alpaca_system.json"), "format": "alpaca",
         "columns": {"prompt": "instruction", "query": "input", "response": "output",
                     "system": "system"}},
        {"path": str(root / "identity.json")},
        {"path": str(root / "glaive_toolcall_demo.jsonl"), "format": "sharegpt",
         "columns": {"messages": "conversations", "tools": "tools"}},
        {"path": str(root / "c4_demo.jsonl"), "format": "text", "columns": {"prompt": "text"}},
        {"path": str(root / "wiki.txt"), "format": "text"},
        {"path": str(root / "parts.jsonl"), "format": "messages"},
    ]  # fmt: skip


def test_llamafactory_demo_layouts_train_end_to_end_with_no_field_dropped(tmp_path, qwen_model):
    train = llamafactory_layouts(tmp_path)
    cfg = config(tmp_path, qwen_model, train, max_length=512)
    res = run_cli("train", str(cfg))
    assert res.returncode == 0, res.stderr[-3000:]
    log = res.stderr
    assert "fields not used" not in log and "warning" not in log.lower(), log
    assert "longer than 512: 0 truncated, 0 dropped" in log, log
    # 4 + 4 + 2 + 6 conversations, 1 text file, 2 content-part records; the documents in
    # consecutive chunks of 512 that overlap by one token
    tok = family_tokenizer(FAMILIES["qwen2.5"])
    docs = [json.loads(line)["text"] for line in (tmp_path / "c4_demo.jsonl").open()]
    lengths = [len(tok(d)["input_ids"]) + 1 for d in docs]
    chunks = sum(1 if n <= 512 else -(-(n - 1) // 511) for n in lengths)
    assert chunks > len(docs)
    assert f"data: {18 + chunks + 1} samples from 22 records" in log, log
    assert f"{chunks - len(docs)} extra samples from text documents" in log, log
    preview = run_cli("data", "preview", str(cfg), "-n", "0")
    assert preview.returncode == 0, preview.stderr
    assert "records:        22" in preview.stdout
    assert f"samples:        {18 + chunks + 1}" in preview.stdout


def test_long_documents_keep_every_token(tmp_path):
    tok = family_tokenizer(FAMILIES["qwen2.5"])
    docs = [{"text": " ".join(f"w{k % 50}" for k in range(n))} for n in (10, 700, 3001)]
    path = write_jsonl(tmp_path / "c4.jsonl", docs)
    got = dataset.build(DataConfig(train=[{"path": str(path), "format": "text"}],
                                   max_length=128), tok)  # fmt: skip
    assert all(len(x) <= 128 for x in got.input_ids) and len(got) > len(docs)
    # the targets of the chunks, in order, are every token of every document but its first
    want = [t for d in docs for t in (tok(d["text"])["input_ids"] + [tok.eos_token_id])[1:]]
    targets = [t for lab in got.labels for t in lab[1:].tolist() if t != IGNORE]
    assert targets == want
    assert got.stats.notes["chunked"]["count"] == len(got) - len(docs)


def test_tool_calling_in_sharegpt_and_openai_layouts_are_the_same_samples(tmp_path, qwen_model):
    write_jsonl(tmp_path / "glaive.jsonl", glaive_records())
    write_jsonl(tmp_path / "openai.jsonl", openai_records())
    tok = family_tokenizer(FAMILIES["qwen2.5"])
    glaive = dataset.build(DataConfig(train=[{
        "path": str(tmp_path / "glaive.jsonl"), "format": "sharegpt"}]), tok)  # fmt: skip
    openai = dataset.build(DataConfig(train=[{
        "path": str(tmp_path / "openai.jsonl"), "format": "messages"}]), tok)  # fmt: skip
    assert [x.tolist() for x in glaive.input_ids] == [x.tolist() for x in openai.input_ids]
    assert [x.tolist() for x in glaive.labels] == [x.tolist() for x in openai.labels]
    for layout, fmt in (("glaive", "sharegpt"), ("openai", "messages")):
        cfg = config(tmp_path / layout, qwen_model,
                     [{"path": str(tmp_path / f"{layout}.jsonl"), "format": fmt}],
                     max_length=512)  # fmt: skip
        res = run_cli("train", str(cfg))
        assert res.returncode == 0, res.stderr[-3000:]
        preview = run_cli("data", "preview", str(cfg), "-n", "1")
        assert preview.returncode == 0, preview.stderr
        sample = preview.stdout.split("--- sample 0")[1].split("--- statistics")[0]
        # the tool-call turn is trained, the tool list and the tool's result are not
        call = '[[<tool_call>\n{"name": "get_weather", "arguments": {"city": "'
        assert call in sample and "</tool_call><|im_end|>]]" in sample, sample
        assert '"description": "Current weather of a city"' in sample.split("[[")[0]
        assert "<tool_response>" in sample and "[[<tool_response>" not in sample


GLM_LIKE = (
    "{{- '[gMASK]<sop>' }}{%- for m in messages %}{%- if m.role != 'system' and m.content %}"
    "{{- '<|' + m.role + '|>\\n' + m.content }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>' }}{%- endif %}"
)


def test_custom_template_trains_saves_and_prompts_and_every_loss_is_said(tmp_path):
    """data.chat_template (a file) trains the run, lands in every tokenizer written, prompts
    `lockstep chat`; this template drops system prompts and tools and writes no end-of-turn
    marker, and each of those (and a sample emptied by truncation) is said in the log."""
    model = save_family_model(tmp_path / "model", FAMILIES["glm4"])
    template = tmp_path / "custom.jinja"
    template.write_text(GLM_LIKE, encoding="utf-8")
    records = [
        {"messages": [{"role": "system", "content": "Be terse."},
                      {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                      {"role": "user", "content": "Again"},
                      {"role": "assistant", "content": "Yo again"}],
         "tools": [{"type": "function", "function": WEATHER}]},
        {"messages": [{"role": "user", "content": "long " * 300},
                      {"role": "assistant", "content": "cut"}]},
    ] + [{"messages": [{"role": "user", "content": f"Say {i}"},
                       {"role": "assistant", "content": str(i)}]} for i in range(6)]  # fmt: skip
    data = write_jsonl(tmp_path / "d.jsonl", records)
    cfg = config(tmp_path, model, [{"path": str(data), "format": "messages"}],
                 chat_template=str(template), max_length=64)  # fmt: skip
    res = run_cli("train", str(cfg), "checkpoint.every_steps=1")
    assert res.returncode == 0, res.stderr[-3000:]
    log = res.stderr
    for said in ("1 records whose system message is not in the template's rendering",
                 "1 records whose tool definitions are not in the template's rendering",
                 "1 records with an assistant turn that has no end-of-turn marker trained",
                 "8 records whose last trained turn got the tokenizer's eos token appended",
                 "1 samples dropped: truncation to data.max_length left no trained token"):  # fmt: skip
        assert said in log, (said, log)
    out = tmp_path / "out"
    for folder in (out / "final", out / "checkpoints" / "step-00000002" / "tokenizer"):
        assert (folder / "chat_template.jinja").read_text(encoding="utf-8") == GLM_LIKE
    exported = run_cli("export", str(out), "--out", str(tmp_path / "exported"))
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "exported" / "chat_template.jinja").read_text() == GLM_LIKE
    chat = run_cli("chat", str(out), "--prompt", "Hello there", "--show-prompt",
                   "--temperature", "0", "--max-new-tokens", "2")  # fmt: skip
    assert chat.returncode == 0, chat.stderr
    prompt = chat.stderr.split("[lockstep] prompt:\n")[1].split("\n[lockstep] end of prompt")[0]
    assert prompt == "[gMASK]<sop><|user|>\nHello there<|assistant|>"


def test_builtin_llama3_template_on_a_tokenizer_without_its_tokens_warns(tmp_path):
    data = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Hi", "output": "Yo"}] * 8)
    cfg = {"output_dir": str(tmp_path / "out"), "seed": 1,
           "data": {"train": [{"path": str(data)}], "template": "llama3",
                    "cache_dir": str(tmp_path / "c")},
           "batch": {"global_size": 4, "micro_size": 4}, "train": {"max_steps": 1}}  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    res = run_cli("train", str(tmp_path / "c.yaml"))
    assert res.returncode == 0, res.stderr[-2000:]
    said = "8 records rendered by data.template=llama3, whose markers this tokenizer has no "
    assert said in res.stderr and "(<|begin_of_text|>, <|start_header_id|>," in res.stderr


def test_refused_fields_and_template_refusals_name_the_cause(tmp_path, qwen_model):
    kto = write_jsonl(tmp_path / "kto.jsonl", [{"instruction": "Hi", "output": "Yo",
                                                 "label": False}])  # fmt: skip
    res = run_cli("train", str(config(tmp_path, qwen_model, [{"path": str(kto)}])))
    assert res.returncode == 1
    assert f"{kto}:1: field 'label' would change what is trained (a KTO label" in res.stderr
    # the same file with the label set aside on purpose trains
    ignored = config(tmp_path, qwen_model, [{"path": str(kto), "ignore_fields": ["label"]}])
    assert run_cli("data", "preview", str(ignored), "-n", "0").returncode == 0
    unknown = config(tmp_path, qwen_model, [{"path": str(kto), "columns": {"answer": "output"}}])
    res = run_cli("train", str(unknown))
    assert res.returncode == 1
    assert "data.train.0.columns: got {'answer': 'output'}: format 'alpaca' reads no field " in (
        res.stderr
    )


def test_template_kwargs_render_the_training_data_and_the_chat_prompt(tmp_path):
    """A variable the template reads (like enable_thinking) is passed in training and, for a
    run folder, in `lockstep chat`: the model is prompted as it was trained."""
    template = (
        "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' }}"
        "{%- if m.role == 'assistant' %}{{- mode }}{%- endif %}{{- m.content + '<|im_end|>\\n' }}"
        "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' + mode }}"
        "{%- endif %}"
    )
    data = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Hi", "output": "Yo"}] * 8)
    cfg = {"output_dir": str(tmp_path / "out"), "seed": 1,
           "data": {"train": [{"path": str(data)}], "chat_template": template,
                    "template_kwargs": {"mode": "[calm]"}, "cache_dir": str(tmp_path / "c")},
           "batch": {"global_size": 4, "micro_size": 4}, "train": {"max_steps": 1}}  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert run_cli("train", str(tmp_path / "c.yaml")).returncode == 0
    preview = run_cli("data", "preview", str(tmp_path / "c.yaml"), "-n", "1")
    assert "<|im_start|>assistant\n[calm][[Yo<|im_end|>]]" in preview.stdout, preview.stdout
    chat = run_cli("chat", str(tmp_path / "out"), "--prompt", "Hey", "--show-prompt",
                   "--temperature", "0", "--max-new-tokens", "1")  # fmt: skip
    assert chat.returncode == 0, chat.stderr
    assert "<|im_start|>user\nHey<|im_end|>\n<|im_start|>assistant\n[calm]\n[lockstep]" in (
        chat.stderr
    )
