"""Every real chat-template shape through lockstep's data path: exact masks or a truthful refusal.

For each family of tests/chat_templates.py (a tokenizer built from the built-in one plus the
family's special tokens) and each kind of record users bring (single-turn, multi-turn, a system
prompt, unicode with double spaces, alpaca with history, reasoning, tool calls), the records are
written to a file and built by `dataset.build`. The decoded trained tokens must be exactly each
assistant turn's text as the template writes it (its reasoning and tool calls included) plus its
end-of-turn marker, each turn trained once, nothing else trained; or the record is refused for
a reason the template itself imposes, and the message says so.
"""

from __future__ import annotations

import pytest
from chat_templates import FAMILIES, Family, family_tokenizer
from conftest import write_jsonl

from lockstep.config import DataConfig
from lockstep.data import dataset
from lockstep.data.render import IGNORE
from lockstep.errors import DataError

SYSTEM = "Answer in one short line."
Q1, A1 = "Reverse: red green blue", "blue green red"
Q2, A2 = "Now count them, please.", "There are 3 words:\n- red, green, blue!"
UQ, UA = "Grüße — naïve  café, 東京?", "Ja:  zwei  Leerzeichen, ñ, 東京 ✓"
THOUGHT = "The list has three words; reversing gives blue, green, red."
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city",
            "parameters": {
                "type": "object",
                "required": ["city"],
                "properties": {"city": {"type": "string", "description": "City name"}},
            },
        },
    }
]
CALL_ANSWER = "It is sunny in Paris, 21 C."


def msg(role, content, **extra):
    return {"role": role, "content": content, **extra}


# kind -> (format, record, the answers trained, in order)
RECORDS = {
    "single": ("messages", {"messages": [msg("user", Q1), msg("assistant", A1)]}, [A1]),
    "multi": ("messages", {"messages": [msg("user", Q1), msg("assistant", A1), msg("user", Q2),
                                        msg("assistant", A2)]}, [A1, A2]),
    "system": ("messages", {"messages": [msg("system", SYSTEM), msg("user", Q1),
                                         msg("assistant", A1)]}, [A1]),
    "unicode": ("messages", {"messages": [msg("user", UQ), msg("assistant", UA)]}, [UA]),
    "alpaca-history": ("alpaca", {"instruction": Q2, "input": "", "output": A2,
                                  "history": [[Q1, A1]]}, [A1, A2]),
    "reasoning": ("messages", {"messages": [msg("user", Q1), msg("assistant", A1,
                                                                 reasoning_content=THOUGHT)]},
                  [(THOUGHT, A1)]),
    "reasoning-inline": ("messages", {"messages": [
        msg("user", Q1), msg("assistant", f"<think>\n{THOUGHT}\n</think>\n\n{A1}")]},
        [(THOUGHT, A1)]),
    "tool-call": ("messages", {"tools": TOOLS, "messages": [
        msg("user", "Weather in Paris?"),
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        msg("tool", "sunny, 21 C"),
        msg("assistant", CALL_ANSWER)]}, ["CALL", CALL_ANSWER]),
}  # fmt: skip


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    fam = FAMILIES[request.param]
    return request.param, fam, family_tokenizer(fam)


def build(tmp_path, tok, fmt, records, **data):
    path = write_jsonl(tmp_path / "data.jsonl", records)
    cfg = DataConfig(train=[{"path": str(path), "format": fmt}], max_length=1024, **data)
    return dataset.build(cfg, tok)


def runs(tok, samples) -> list[str]:
    """The decoded text of each run of trained tokens, sample by sample, in order."""
    out = []
    for ids, labels in zip(samples.input_ids, samples.labels, strict=True):
        run: list[int] = []
        for t, label in zip(ids.tolist(), labels.tolist(), strict=True):
            if label != IGNORE:
                assert label == t
                run.append(t)
            elif run:
                out.append(tok.decode(run))
                run = []
        if run:
            out.append(tok.decode(run))
    return out


def expected_turn(fam: Family, answer, last_in_sample: bool) -> str:
    if isinstance(answer, tuple):  # (reasoning, answer)
        thought, text = answer
        lead = fam.lead if fam.reasoning_lead is None else fam.reasoning_lead
        body = f"{lead}<think>\n{thought}\n</think>\n\n{text}"
    else:
        body = fam.lead + answer
    if fam.eos_appended:
        return body + (fam.eos if last_in_sample else "")
    return body + fam.end


def refusal(fam: Family, kind: str) -> str | None:
    """The reason the template itself gives for refusing this kind of record, if it does."""
    if kind == "system" and fam.system.startswith("refused:"):
        return fam.system.split(":", 1)[1]
    if kind.startswith("reasoning") and fam.reasoning == "refused":
        return "drops the reasoning of assistant message 2"
    if kind == "tool-call" and fam.call is None:
        return "no tool-call format|chat template rejects"
    return None


@pytest.mark.parametrize("kind", list(RECORDS))
def test_each_template_shape_trains_exactly_each_turn_or_refuses_truthfully(tmp_path, family, kind):
    name, fam, tok = family
    fmt, record, answers = RECORDS[kind]
    why = refusal(fam, kind)
    if why:
        with pytest.raises(DataError, match=why):
            build(tmp_path, tok, fmt, [record])
        return
    samples = build(tmp_path, tok, fmt, [record])
    got = runs(tok, samples)
    split = fam.multi_split and len(answers) > 1
    assert len(samples) == (len(answers) if split else 1), got
    if kind == "tool-call":
        assert got == [fam.call, expected_turn(fam, CALL_ANSWER, True)]
        return
    want = [expected_turn(fam, a, split or k == len(answers) - 1) for k, a in enumerate(answers)]
    assert got == want


@pytest.mark.parametrize("name", ["qwen3", "mistral-v0.3"])
def test_whole_refuses_what_auto_splits_and_last_never_needs_to(tmp_path, name):
    fam = FAMILIES[name]
    tok = family_tokenizer(fam)
    record = {"messages": [msg("system", SYSTEM), msg("user", Q1), msg("assistant", A1),
                           msg("user", Q2), msg("assistant", A2)]}  # fmt: skip
    auto = build(tmp_path, tok, "messages", [record])
    assert len(auto) == 2 and auto.stats.notes["split"]["count"] == 1
    with pytest.raises(DataError, match=r"assistant message 3 is written .* data.multi_turn=auto"):
        build(tmp_path, tok, "messages", [record], multi_turn="whole")
    last = build(tmp_path, tok, "messages", [record], train_on="last")
    assert len(last) == 1 and runs(tok, last) == [expected_turn(fam, A2, True)]
    # each split sample is the conversation as the model sees it when it writes that turn:
    # the system prompt is in it (Mistral v0.3 writes it into the last user turn only)
    for ids in auto.input_ids:
        assert SYSTEM in tok.decode(ids.tolist())


def test_split_gives_every_turn_its_own_sample_on_any_template(tmp_path):
    tok = family_tokenizer(FAMILIES["qwen2.5"])
    _, record, _ = RECORDS["multi"]
    whole = build(tmp_path, tok, "messages", [record])
    split = build(tmp_path, tok, "messages", [record], multi_turn="split")
    assert len(whole) == 1 and len(split) == 2
    assert runs(tok, split) == runs(tok, whole) == [A1 + "<|im_end|>", A2 + "<|im_end|>"]


def test_enable_thinking_from_template_kwargs(tmp_path):
    tok = family_tokenizer(FAMILIES["qwen3"])
    _, record, _ = RECORDS["single"]
    off = build(tmp_path, tok, "messages", [record],
                template_kwargs={"enable_thinking": False})  # fmt: skip
    # the empty think block is now part of the prompt the model is given, not of the answer
    assert runs(tok, off) == [A1 + "<|im_end|>"]
    assert "<think>\n\n</think>\n\n" + A1 in tok.decode(off.input_ids[0].tolist())
    # reasoning in the data contradicts a prompt that closes the think block: refused, named
    _, reasoning, _ = RECORDS["reasoning"]
    with pytest.raises(DataError, match=r"generation prompt ends .*</think>.* writes this turn"):
        build(tmp_path, tok, "messages", [reasoning], template_kwargs={"enable_thinking": False})


@pytest.mark.parametrize("name", ["deepseek-r1", "deepseek-r1-old"])
def test_reasoning_drop_trains_the_answers_of_templates_that_strip_it(tmp_path, name):
    fam = FAMILIES[name]
    tok = family_tokenizer(fam)
    _, record, _ = RECORDS["reasoning-inline"]
    got = build(tmp_path, tok, "messages", [record], reasoning="drop")
    assert runs(tok, got) == [A1 + fam.end]
    notes = got.stats.notes
    assert notes["reasoning_dropped"]["count"] == 1
    # R1's prompt opens a think block the conversation never has: trained without it, said
    assert ("prompt_tail" in notes) == (name == "deepseek-r1")


def test_reasoning_in_a_template_that_ignores_it_is_trained_inline(tmp_path):
    tok = family_tokenizer(FAMILIES["llama3.1"])
    _, record, _ = RECORDS["reasoning"]
    got = build(tmp_path, tok, "messages", [record])
    assert runs(tok, got) == [f"<think>\n{THOUGHT}\n</think>\n\n{A1}<|eot_id|>"]
    dropped = build(tmp_path, tok, "messages", [record], reasoning="drop")
    assert runs(tok, dropped) == [f"{A1}<|eot_id|>"]


def test_template_dropping_the_system_prompt_is_counted(tmp_path):
    tok = family_tokenizer(FAMILIES["phi4-reasoning"])
    _, record, _ = RECORDS["system"]
    got = build(tmp_path, tok, "messages", [record, record])
    note = got.stats.notes["system_dropped"]
    assert note["count"] == 2 and note["detail"] == "message 1 (system)"
    assert SYSTEM not in tok.decode(got.input_ids[0].tolist())


def test_template_without_end_marker_gets_eos_where_a_turn_ends_its_sample(tmp_path):
    fam = FAMILIES["glm4"]
    tok = family_tokenizer(fam)
    _, record, _ = RECORDS["multi"]
    whole = build(tmp_path, tok, "messages", [record])
    assert runs(tok, whole) == ["\n" + A1, "\n" + A2 + fam.eos]
    notes = whole.stats.notes
    assert notes["no_end_marker"]["count"] == 1 and notes["eos_appended"]["count"] == 1
    split = build(tmp_path, tok, "messages", [record], multi_turn="split")
    assert runs(tok, split) == ["\n" + A1 + fam.eos, "\n" + A2 + fam.eos]
    assert "no_end_marker" not in split.stats.notes


def test_end_of_conversation_eos_is_never_trained(tmp_path):
    for name in ("phi3.5", "phi4-mini", "internlm2"):
        fam = FAMILIES[name]
        tok = family_tokenizer(fam)
        _, record, _ = RECORDS["multi"]
        got = build(tmp_path, tok, "messages", [record])
        assert len(got) == 1, name  # the suffix is not taken for a rewritten history
        text = tok.decode(got.input_ids[0].tolist())
        assert text.rstrip().endswith(fam.eos), name
        assert runs(tok, got) == [A1 + fam.end, A2 + fam.end], name


def test_generation_markers_give_the_mask_transformers_gives(tmp_path):
    for name in ("phi4-reasoning", "smollm3"):
        tok = family_tokenizer(FAMILIES[name])
        _, record, _ = RECORDS["multi"]
        got = build(tmp_path, tok, "messages", [record])
        theirs = tok.apply_chat_template(
            record["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        assert got.input_ids[0].tolist() == list(theirs["input_ids"]), name
        ours = [int(label != IGNORE) for label in got.labels[0].tolist()]
        assert ours == list(theirs["assistant_masks"]), name


def test_marked_template_with_train_on_last_keeps_only_the_last_turns_marks(tmp_path):
    fam = FAMILIES["smollm3"]
    tok = family_tokenizer(fam)
    _, record, _ = RECORDS["multi"]
    got = build(tmp_path, tok, "messages", [record], train_on="last")
    assert runs(tok, got) == [expected_turn(fam, A2, True)]


def test_tools_and_their_calls_reach_templates_that_write_them(tmp_path):
    tok = family_tokenizer(FAMILIES["mistral-v0.3"])
    _, record, _ = RECORDS["tool-call"]
    got = build(tmp_path, tok, "messages", [record])
    text = tok.decode(got.input_ids[0].tolist())
    # the tool list before the last user turn, the call with the id lockstep numbered it with
    # (nine letters and digits, as this template demands) and the result linked to it
    assert "[AVAILABLE_TOOLS]" in text and "get_weather" in text.split("[TOOL_CALLS]")[0]
    assert '"arguments": {"city": "Paris"}' in text
    assert '"id": "call00001"' in text and '"call_id": "call00001"' in text


def test_a_template_that_ignores_tools_is_counted(tmp_path):
    tok = family_tokenizer(FAMILIES["phi4-mini"])
    record = {"tools": TOOLS, "messages": [msg("user", Q1), msg("assistant", A1)]}
    got = build(tmp_path, tok, "messages", [record])
    assert got.stats.notes["tools_dropped"]["detail"] == "get_weather"


def test_named_templates_pick_by_tools_like_transformers(tmp_path):
    tok = family_tokenizer(FAMILIES["command-r"])
    _, record, _ = RECORDS["system"]
    plain = build(tmp_path, tok, "messages", [record])
    assert tok.decode(plain.input_ids[0].tolist()).startswith("<BOS_TOKEN><|START_OF_TURN")
    with_tools = build(tmp_path, tok, "messages", [{**record, "tools": TOOLS}])
    assert tok.decode(with_tools.input_ids[0].tolist()).startswith("<BOS_TOKEN># Tools in use")
    assert runs(tok, plain) == runs(tok, with_tools) == [A1 + "<|END_OF_TURN_TOKEN|>"]


def test_loss_weight_zero_leaves_a_turn_untrained(tmp_path):
    tok = family_tokenizer(FAMILIES["qwen2.5"])
    record = {
        "messages": [
            msg("user", Q1, loss_weight=0.0),
            msg("assistant", A1, loss_weight=0),
            msg("user", Q2),
            msg("assistant", A2, loss_weight=1.0),
        ]
    }
    assert runs(tok, build(tmp_path, tok, "messages", [record])) == [A2 + "<|im_end|>"]
    record["messages"][1]["loss_weight"] = 0.5
    with pytest.raises(DataError, match=r"messages\[1\]: loss_weight=0.5: .*fully \(1\) or not"):
        build(tmp_path, tok, "messages", [record])


def test_the_templates_are_valid_for_transformers_too():
    """The zoo's templates render with transformers' own apply_chat_template (no typo makes
    a family test pass vacuously)."""
    for name, fam in FAMILIES.items():
        tok = family_tokenizer(fam)
        text = tok.apply_chat_template(RECORDS["single"][1]["messages"], tokenize=False)
        assert A1 in text, name


# Qwen3's behaviour with generation marks: the turn after the last user question gets an
# (empty) think block, earlier turns do not
MARKED_QWEN3 = r"""
{%- set ns = namespace(last_user=-1) %}
{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}
{%- for m in messages %}
{%- if m.role == 'assistant' %}
{{- '<|im_start|>assistant\n' }}{% generation %}
{%- if loop.index0 > ns.last_user %}{{ '<think>\n\n</think>\n\n' }}{% endif %}
{{- m.content + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}
{%- else %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}
"""


def test_marked_template_that_rewrites_history_splits_like_any_other(tmp_path):
    tok = family_tokenizer(FAMILIES["qwen3"], MARKED_QWEN3)
    _, record, _ = RECORDS["multi"]
    auto = build(tmp_path, tok, "messages", [record])
    lead = "<think>\n\n</think>\n\n"
    assert runs(tok, auto) == [lead + A1 + "<|im_end|>", lead + A2 + "<|im_end|>"]
    assert auto.stats.notes["split"]["count"] == 1
    with pytest.raises(DataError, match="assistant message 2 is written .*multi_turn=auto"):
        build(tmp_path, tok, "messages", [record], multi_turn="whole")


@pytest.mark.parametrize("name", ["qwen3", "glm4", "smollm3"])
def test_num_proc_gives_the_same_samples_and_masks(tmp_path, name):
    tok = family_tokenizer(FAMILIES[name])
    kinds = ["single", "multi", "system", "unicode", "reasoning-inline"]
    records = [RECORDS[k][1] for k in kinds] * 30
    one = build(tmp_path, tok, "messages", records)
    two = build(tmp_path, tok, "messages", records, num_proc=2)
    assert [x.tolist() for x in one.input_ids] == [x.tolist() for x in two.input_ids]
    assert [x.tolist() for x in one.labels] == [x.tolist() for x in two.labels]
    assert one.stats == two.stats
