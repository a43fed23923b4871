"""Renderer: the trained tokens are exactly the assistant turns, with or without generation marks.

The templates below are written like the real ones (no `{% generation %}` markers) and set on the
built-in tiny tokenizer; their special tokens that tiny lacks tokenize as plain text, which is
enough: the mask is found from characters, whatever the tokens are. tests/test_templates.py runs
every template shape of the real families through the data path.
"""

from __future__ import annotations

import re

import pytest
from transformers import AutoTokenizer

from lockstep.data.formats import convert
from lockstep.data.render import IGNORE, Options, Renderer
from lockstep.data.sources import Record
from lockstep.data.templates import BUILTIN as TEMPLATES
from lockstep.errors import DataError
from lockstep.model.load import BUILTIN_DIR

# Qwen2-Instruct's template, verbatim: a default system prompt when none is given.
QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama-3-Instruct's template, with bos written out (tiny has no bos token).
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = '<|begin_of_text|>' + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Zephyr-style, inserting a default system prompt, and rejecting a bad role order like Mistral's.
ZEPHYR = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|system|>\nYou are a friendly chatbot.</s>\n' }}"
    "{% endif %}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '</s>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# template -> end-of-turn marker of the assistant
REAL = {
    "qwen2": (QWEN2, "<|im_end|>"),
    "llama3": (LLAMA3, "<|eot_id|>"),
    "zephyr": (ZEPHYR, "</s>"),
}

CHAT = [
    {"role": "system", "content": "Answer in one line."},
    {"role": "user", "content": "Reverse: red green blue"},
    {"role": "assistant", "content": "blue green red"},
    {"role": "user", "content": "And count the words, please."},
    {"role": "assistant", "content": "There are 3 words:\n- red, green, blue!"},
]
NO_SYSTEM = CHAT[1:]
ANSWERS = [m["content"] for m in CHAT if m["role"] == "assistant"]


@pytest.fixture(scope="module")
def base():
    return AutoTokenizer.from_pretrained(BUILTIN_DIR / "tiny")


@pytest.fixture
def tok(base):
    """The tiny tokenizer, its chat template restored after each test."""
    saved = base.chat_template
    yield base
    base.chat_template = saved


def render(tok, messages, where, train_on="assistant", template=None, multi_turn="auto"):
    """One record in the messages format -> (ids, labels) of its one sample."""
    if template:
        tok.chat_template = TEMPLATES[template]  # what data.template does at tokenizer load
    conv = convert(Record(where, {"messages": messages}), "messages")
    out = Renderer(tok, Options(train_on, multi_turn)).render(conv, where)
    assert len(out.samples) == 1, out.samples
    return out.samples[0]


def trained(tok, ids, labels):
    """The decoded text of each contiguous run of trained tokens."""
    runs, run = [], []
    for t, label in zip(ids, labels, strict=True):
        if label != IGNORE:
            assert label == t
            run.append(t)
        elif run:
            runs.append(run)
            run = []
    if run:
        runs.append(run)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


def strip_markers(template: str) -> str:
    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", template)


@pytest.mark.parametrize("chat", [CHAT, NO_SYSTEM], ids=["system", "default_system"])
@pytest.mark.parametrize("name", REAL)
def test_templates_without_markers_train_exactly_the_assistant_turns(tok, name, chat):
    tok.chat_template, end = REAL[name]
    ids, labels = render(tok, chat, "data.jsonl:1")
    # the one tokenization render does is the template's own
    assert ids == tok.apply_chat_template(chat, tokenize=True, return_dict=False)
    assert trained(tok, ids, labels) == [a + end for a in ANSWERS]

    ids_last, labels_last = render(tok, chat, "data.jsonl:1", train_on="last")
    assert ids_last == ids
    assert trained(tok, ids, labels_last) == [ANSWERS[-1] + end]
    assert set(labels_last) - {IGNORE} and labels_last != labels

    ids_all, labels_all = render(tok, chat, "data.jsonl:1", train_on="all")
    assert ids_all == ids and labels_all == ids


def test_default_system_prompt_is_rendered_but_not_trained(tok):
    tok.chat_template = QWEN2
    ids, labels = render(tok, NO_SYSTEM, "x")
    assert "You are a helpful assistant." in tok.decode(ids)
    assert not any("helpful" in run for run in trained(tok, ids, labels))


@pytest.mark.parametrize("train_on", ["assistant", "last", "all"])
def test_generation_markers_agree_with_prefix_rendering(tok, train_on):
    marked = tok.chat_template
    assert "{% generation %}" in marked
    chat = NO_SYSTEM
    with_markers = render(tok, chat, "x", train_on=train_on)
    tok.chat_template = strip_markers(marked)
    assert "{% generation %}" not in tok.chat_template
    assert render(tok, chat, "x", train_on=train_on) == with_markers
    expected = [a + "<|im_end|>" for a in ANSWERS]
    if train_on != "all":
        runs = trained(tok, *with_markers)
        assert runs == (expected if train_on == "assistant" else expected[-1:])


# fallback -> (assistant header, what the turn trains before its content, end-of-turn marker)
FALLBACK_ENDS = {
    "chatml": ("<|im_start|>assistant\n", "", "<|im_end|>"),
    "llama3": ("<|start_header_id|>assistant<|end_header_id|>\n\n", "", "<|eot_id|>"),
    # the space after "Assistant:" is trained with the turn (see render.PLAIN)
    "plain": ("Assistant:", " ", "<|im_end|>"),
}


@pytest.mark.parametrize("name", TEMPLATES)
def test_builtin_fallbacks_mark_content_and_end_of_turn(tok, name):
    tok.chat_template = None  # the case they exist for
    header, lead, end = FALLBACK_ENDS[name]
    ids, labels = render(tok, CHAT, "x", template=name)
    text = tok.decode(ids)
    assert text.count(header) == 2 and "Answer in one line." in text
    assert trained(tok, ids, labels) == [lead + a + end for a in ANSWERS]
    ids_last, labels_last = render(tok, CHAT, "x", train_on="last", template=name)
    assert ids_last == ids
    assert trained(tok, ids, labels_last) == [lead + ANSWERS[-1] + end]
    # the markers are only marks: stripped, the prefix path finds the same tokens
    tok.chat_template = strip_markers(TEMPLATES[name])
    assert render(tok, CHAT, "x") == (ids, labels)


def test_no_template_at_all_says_how_to_pick_one(tok):
    tok.chat_template = None
    with pytest.raises(DataError, match="data.chat_template .*data.template"):
        render(tok, CHAT, "x")


def test_template_that_rewrites_history_trains_each_turn_as_generated(tok):
    # like reasoning templates: earlier assistant turns lose their <think> part
    tok.chat_template = QWEN2.replace(
        "message['content'] + '<|im_end|>'",
        "(message['content'].split('</think>')[-1].lstrip() if message['role'] == 'assistant' "
        "and not loop.last else message['content']) + '<|im_end|>'",
    )
    chat = [dict(m) for m in CHAT]
    chat[2]["content"] = "<think>reverse it</think>\nblue green red"
    conv = convert(Record("data.jsonl:7", {"messages": chat}), "messages")
    out = Renderer(tok, Options()).render(conv, "data.jsonl:7")
    # two samples: the first turn with its reasoning (as it was written when generated), then
    # the whole conversation training only the last turn
    assert [trained(tok, *s) for s in out.samples] == [
        ["<think>reverse it</think>\nblue green red<|im_end|>"],
        [ANSWERS[-1] + "<|im_end|>"],
    ]
    assert out.notes == [("split", "2 samples")]
    with pytest.raises(DataError, match=r"data.jsonl:7: assistant message 3 is written .*whole"):
        Renderer(tok, Options(multi_turn="whole")).render(conv, "data.jsonl:7")
    # the same template on a conversation it does not rewrite: one sample
    ids, labels = render(tok, CHAT, "data.jsonl:7")
    assert trained(tok, ids, labels) == [a + "<|im_end|>" for a in ANSWERS]


@pytest.mark.parametrize("template", [ZEPHYR, None])
def test_empty_assistant_turn_names_the_record(tok, template):
    if template:
        tok.chat_template = template
    chat = [dict(m) for m in CHAT]
    chat[2]["content"] = "  "
    with pytest.raises(DataError, match=r"data.jsonl:3: empty assistant turn"):
        render(tok, chat, "data.jsonl:3")


def test_conversation_without_assistant_is_refused(tok):
    tok.chat_template = LLAMA3
    with pytest.raises(DataError, match=r"data.jsonl:4: .*no assistant turn"):
        render(tok, CHAT[:2], "data.jsonl:4", train_on="all")


def test_template_errors_become_data_errors(tok):
    tok.chat_template = ZEPHYR
    chat = [*CHAT[:2], {"role": "tool", "content": "42"}, *CHAT[2:]]
    with pytest.raises(DataError, match=r"data.jsonl:5: .*Unknown role: tool"):
        render(tok, chat, "data.jsonl:5")
