"""Chat templates in the shapes the models people fine-tune use, written for these tests.

Each reproduces the behaviour of a family's real template (how it writes system prompts, turns,
reasoning and tool calls, what it adds at the end, which rules it enforces) in its own Jinja,
so lockstep's data path is tested against every shape real templates take. `FAMILIES` also says
which tokens each family's tokenizer has as special tokens, and what a trained turn looks like.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import AddedToken
from transformers import AutoTokenizer

from lockstep.model.load import BUILTIN_DIR

# ChatML with a default system prompt when none is given; tools listed in the system turn,
# calls as <tool_call> JSON, tool results grouped into one user turn.
QWEN25 = r"""
{%- if messages[0].role == 'system' %}{% set sys = messages[0].content %}{% set rest = messages[1:] %}
{%- else %}{% set sys = 'You are a capable assistant made by a lab.' %}{% set rest = messages %}{% endif %}
{{- '<|im_start|>system\n' + sys }}
{%- if tools %}
{{- '\n\n# Tools\nFunctions you may call, as JSON schemas:\n<tools>' }}
{%- for t in tools %}{{ '\n' + (t | tojson) }}{% endfor %}
{{- '\n</tools>\nAnswer a call as <tool_call>{"name": ..., "arguments": ...}</tool_call>.' }}
{%- endif %}
{{- '<|im_end|>\n' }}
{%- for m in rest %}
{%- if m.role == 'assistant' %}
{{- '<|im_start|>assistant' }}
{%- if m.content %}{{ '\n' + m.content }}{% endif %}
{%- for c in m.tool_calls or [] %}
{{- '\n<tool_call>\n{"name": "' + c.function.name + '", "arguments": ' + (c.function.arguments | tojson) + '}\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\n' }}
{%- elif m.role == 'tool' %}
{%- if loop.first or rest[loop.index0 - 1].role != 'tool' %}{{ '<|im_start|>user' }}{% endif %}
{{- '\n<tool_response>\n' + m.content + '\n</tool_response>' }}
{%- if loop.last or rest[loop.index0 + 1].role != 'tool' %}{{ '<|im_end|>\n' }}{% endif %}
{%- else %}
{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}
"""

# Hybrid reasoning: reasoning from `reasoning_content` or split off at </think>; assistant
# turns before the last real user question lose their reasoning; the turn being written (the
# last) always has a think block, empty when there is no reasoning; enable_thinking=false puts
# an empty think block into the generation prompt.
QWEN3 = r"""
{%- set ns = namespace(last_user=-1) %}
{%- for m in messages %}
{%- if m.role == 'user' and not (m.content.startswith('<tool_response>')) %}{% set ns.last_user = loop.index0 %}{% endif %}
{%- endfor %}
{%- if tools or messages[0].role == 'system' %}
{{- '<|im_start|>system\n' }}
{%- if messages[0].role == 'system' %}{{ messages[0].content }}{% if tools %}{{ '\n\n' }}{% endif %}{% endif %}
{%- if tools %}{{ '# Tools\n<tools>' }}{% for t in tools %}{{ '\n' + (t | tojson) }}{% endfor %}{{ '\n</tools>' }}{% endif %}
{{- '<|im_end|>\n' }}
{%- endif %}
{%- for m in messages %}
{%- set text = m.content if m.content is string else '' %}
{%- if m.role == 'user' or (m.role == 'system' and not loop.first) %}
{{- '<|im_start|>' + m.role + '\n' + text + '<|im_end|>\n' }}
{%- elif m.role == 'assistant' %}
{%- if m.reasoning_content is string %}{% set thought = m.reasoning_content %}
{%- elif '</think>' in text %}{% set thought = text.split('</think>')[0].split('<think>')[-1].strip('\n') %}{% set text = text.split('</think>')[-1].lstrip('\n') %}
{%- else %}{% set thought = '' %}{% endif %}
{{- '<|im_start|>assistant\n' }}
{%- if loop.index0 > ns.last_user and (loop.last or thought) %}
{{- '<think>\n' + thought.strip('\n') + '\n</think>\n\n' }}
{%- endif %}
{{- text.lstrip('\n') }}
{%- for c in m.tool_calls or [] %}
{%- if text or not loop.first %}{{ '\n' }}{% endif %}
{{- '<tool_call>\n{"name": "' + c.function.name + '", "arguments": ' + (c.function.arguments | tojson) + '}\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\n' }}
{%- elif m.role == 'tool' %}
{{- '<|im_start|>user\n<tool_response>\n' + text + '\n</tool_response><|im_end|>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\n' }}
{%- if enable_thinking is defined and not enable_thinking %}{{ '<think>\n\n</think>\n\n' }}{% endif %}
{%- endif %}
"""

# [INST] turns with bos before each; the system prompt folded into the first user turn; the
# generation cue ends the user turn, so add_generation_prompt is never read.
LLAMA2 = r"""
{%- if messages[0].role == 'system' %}{% set sys = messages[0].content %}{% set turns = messages[1:] %}
{%- else %}{% set sys = none %}{% set turns = messages %}{% endif %}
{%- for m in turns %}
{%- if (m.role == 'user') != (loop.index0 is even) %}{{ raise_exception('Turns must go user, assistant, user, ...') }}{% endif %}
{%- if m.role == 'user' %}
{%- set text = m.content %}
{%- if loop.first and sys %}{% set text = '<<SYS>>\n' + sys + '\n<</SYS>>\n\n' + text %}{% endif %}
{{- bos_token + '[INST] ' + text.strip() + ' [/INST]' }}
{%- else %}
{{- ' ' + m.content.strip() + ' ' + eos_token }}
{%- endif %}
{%- endfor %}
"""

# Mistral v0.1 / Mixtral: bos once, the system prompt folded into the first user turn, only
# user and assistant roles.
MISTRAL_V1 = r"""
{%- if messages[0].role == 'system' %}{% set sys = messages[0].content %}{% set turns = messages[1:] %}
{%- else %}{% set sys = '' %}{% set turns = messages %}{% endif %}
{{- bos_token }}
{%- for m in turns %}
{%- if m.role not in ['user', 'assistant'] %}{{ raise_exception('Only user and assistant turns, after an optional system prompt') }}{% endif %}
{%- if (m.role == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Turns must alternate between user and assistant') }}{% endif %}
{%- if m.role == 'user' %}
{{- ' [INST] ' + ((sys + '\n\n') if loop.first and sys else '') + m.content + ' [/INST]' }}
{%- else %}
{{- ' ' + m.content + eos_token }}
{%- endif %}
{%- endfor %}
"""

# Mistral v0.3: the system prompt goes only into a user turn that is the last message, the
# tools just before the last user turn; tool calls and results with 9-character ids.
MISTRAL_V3 = r"""
{%- if messages[0].role == 'system' %}{% set sys = messages[0].content %}{% set turns = messages[1:] %}
{%- else %}{% set turns = messages %}{% endif %}
{%- set users = turns | selectattr('role', 'equalto', 'user') | list %}
{{- bos_token }}
{%- for m in turns %}
{%- if m.role == 'user' %}
{%- if tools and m == users[-1] %}{{ '[AVAILABLE_TOOLS] ' + (tools | tojson) + '[/AVAILABLE_TOOLS]' }}{% endif %}
{%- if loop.last and sys is defined %}{{ '[INST] ' + sys + '\n\n' + m.content + '[/INST]' }}
{%- else %}{{ '[INST] ' + m.content + '[/INST]' }}{% endif %}
{%- elif m.tool_calls is defined %}
{{- '[TOOL_CALLS] [' }}
{%- for c in m.tool_calls %}
{%- if c.id is not defined or c.id | length != 9 %}{{ raise_exception('A tool call id must be 9 letters or digits') }}{% endif %}
{{- '{"name": "' + c.function.name + '", "arguments": ' + (c.function.arguments | tojson) + ', "id": "' + c.id + '"}' }}
{%- if not loop.last %}{{ ', ' }}{% endif %}
{%- endfor %}
{{- ']' + eos_token }}
{%- elif m.role == 'assistant' %}
{{- ' ' + m.content | trim + eos_token }}
{%- elif m.role == 'tool' %}
{%- if m.tool_call_id is not defined or m.tool_call_id | length != 9 %}{{ raise_exception('A tool call id must be 9 letters or digits') }}{% endif %}
{{- '[TOOL_RESULTS] {"content": ' + (m.content | tojson) + ', "call_id": "' + m.tool_call_id + '"}[/TOOL_RESULTS]' }}
{%- else %}
{{- raise_exception('Unsupported role: ' + m.role) }}
{%- endif %}
{%- endfor %}
"""

# Llama 3.1: a system header written always, with a knowledge date and today's date; tools
# listed in the first user turn; one tool call per turn, as JSON with "parameters"; results
# under the ipython header.
LLAMA31 = r"""
{%- if date_string is not defined %}{% set date_string = '1 Jan 2025' %}{% endif %}
{%- if messages[0].role == 'system' %}{% set sys = messages[0].content | trim %}{% set turns = messages[1:] %}
{%- else %}{% set sys = '' %}{% set turns = messages %}{% endif %}
{{- bos_token + '<|start_header_id|>system<|end_header_id|>\n\n' }}
{%- if tools %}{{ 'Environment: ipython\n' }}{% endif %}
{{- 'Knowledge cutoff: 2023-12\nDate today: ' + date_string + '\n\n' + sys + '<|eot_id|>' }}
{%- for m in turns %}
{%- if m.role == 'user' and loop.first and tools %}
{{- '<|start_header_id|>user<|end_header_id|>\n\nYou can call these functions:\n' }}
{%- for t in tools %}{{ (t | tojson(indent=2)) + '\n' }}{% endfor %}
{{- '\n' + m.content | trim + '<|eot_id|>' }}
{%- elif 'tool_calls' in m %}
{%- if m.tool_calls | length != 1 %}{{ raise_exception('One tool call per turn') }}{% endif %}
{%- set c = m.tool_calls[0].function %}
{{- '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "' + c.name + '", "parameters": ' + (c.arguments | tojson) + '}<|eot_id|>' }}
{%- elif m.role in ['tool', 'ipython'] %}
{{- '<|start_header_id|>ipython<|end_header_id|>\n\n' + (m.content | tojson) + '<|eot_id|>' }}
{%- else %}
{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\n\n' + m.content | trim + '<|eot_id|>' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}
"""

# Gemma 2: no system role at all; strict alternation; the assistant speaks as "model".
GEMMA2 = r"""
{{- bos_token }}
{%- if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}
{%- for m in messages %}
{%- if (m.role == 'user') != (loop.index0 is even) %}{{ raise_exception('Turns must alternate between user and model') }}{% endif %}
{{- '<start_of_turn>' + ('model' if m.role == 'assistant' else m.role) + '\n' + m.content | trim + '<end_of_turn>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}
"""

# Gemma 3: the system prompt folded into the first user turn.
GEMMA3 = r"""
{{- bos_token }}
{%- if messages[0].role == 'system' %}{% set prefix = messages[0].content | trim + '\n\n' %}{% set turns = messages[1:] %}
{%- else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}
{%- for m in turns %}
{%- if (m.role == 'user') != (loop.index0 is even) %}{{ raise_exception('Turns must alternate between user and model') }}{% endif %}
{{- '<start_of_turn>' + ('model' if m.role == 'assistant' else m.role) + '\n' + (prefix if loop.first else '') + m.content | trim + '<end_of_turn>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}
"""

# Phi-3.5: <|role|> turns; the end-of-text token is written once the conversation is over.
PHI35 = r"""
{%- for m in messages %}
{%- if m.role in ['system', 'user', 'assistant'] %}{{ '<|' + m.role + '|>\n' + m.content + '<|end|>\n' }}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}
"""

# Phi-4-mini: no newlines; tools only as a string field of the system message (the tools
# argument is never read); end-of-text at the end of a finished conversation.
PHI4_MINI = r"""
{%- for m in messages %}
{%- if m.role == 'system' and m.tools is defined %}{{ '<|system|>' + m.content + '<|tool|>' + m.tools + '<|/tool|><|end|>' }}
{%- else %}{{ '<|' + m.role + '|>' + m.content + '<|end|>' }}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}
"""

# Phi-4: ChatML with a separator token instead of a newline.
PHI4 = r"""
{%- for m in messages %}
{%- if m.role in ['system', 'user', 'assistant'] %}{{ '<|im_start|>' + m.role + '<|im_sep|>' + m.content + '<|im_end|>' }}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}
"""

# Phi-4-reasoning: a fixed system prompt of its own (the record's is never written), and
# generation markers around each answer and its end marker.
PHI4_REASONING = r"""
{{- '<|im_start|>system<|im_sep|>Think it through inside <think> </think>, then answer.<|im_end|>' }}
{%- for m in messages %}
{%- if m.role == 'user' %}{{ '<|im_start|>user<|im_sep|>' + m.content + '<|im_end|>' }}
{%- elif m.role == 'assistant' %}{{ '<|im_start|>assistant<|im_sep|>' }}{% generation %}{{ m.content + '<|im_end|>' }}{% endgeneration %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}
"""

# DeepSeek-R1: system text first, unmarked; every answer loses what comes before </think>; the
# generation prompt opens a think block; tool calls need their arguments as text.
DEEPSEEK_R1 = r"""
{%- set ns = namespace(sys='') %}
{%- for m in messages %}{% if m.role == 'system' %}{% set ns.sys = ns.sys + m.content %}{% endif %}{% endfor %}
{{- bos_token + ns.sys }}
{%- for m in messages %}
{%- if m.role == 'user' %}{{ '<｜User｜>' + m.content }}
{%- elif m.role == 'assistant' and m.tool_calls is defined %}
{{- '<｜Assistant｜>' + (m.content or '') + '<｜tool▁calls▁begin｜>' }}
{%- for c in m.tool_calls %}{{ '<｜tool▁call▁begin｜>function<｜tool▁sep｜>' + c.function.name + '\n' + c.function.arguments + '<｜tool▁call▁end｜>' }}{% endfor %}
{{- '<｜tool▁calls▁end｜><｜end▁of▁sentence｜>' }}
{%- elif m.role == 'assistant' %}{{ '<｜Assistant｜>' + m.content.split('</think>')[-1] + '<｜end▁of▁sentence｜>' }}
{%- elif m.role == 'tool' %}{{ '<｜tool▁output▁begin｜>' + m.content + '<｜tool▁output▁end｜>' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<｜Assistant｜><think>\n' }}{% endif %}
"""

# An earlier R1-distill revision: the same, but a plain generation prompt.
DEEPSEEK_R1_OLD = DEEPSEEK_R1.replace("'<｜Assistant｜><think>\\n'", "'<｜Assistant｜>'")

# DeepSeek-V3: the same turns, content written as given.
DEEPSEEK_V3 = r"""
{%- set ns = namespace(sys='') %}
{%- for m in messages %}{% if m.role == 'system' %}{% set ns.sys = ns.sys + m.content %}{% endif %}{% endfor %}
{{- bos_token + ns.sys }}
{%- for m in messages %}
{%- if m.role == 'user' %}{{ '<｜User｜>' + m.content }}
{%- elif m.role == 'assistant' %}{{ '<｜Assistant｜>' + m.content + '<｜end▁of▁sentence｜>' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}
"""

# GLM-4: a fixed prefix, role tokens, and no end-of-turn marker at all (the next role token
# ends a turn); the generation prompt has no newline, the turn starts with one.
GLM4 = r"""
{{- '[gMASK]<sop>' }}
{%- for m in messages %}
{%- if m.content %}{{ '<|' + m.role + '|>\n' + m.content }}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}
"""

# InternLM2 (older revision): ChatML, and eos after a finished conversation that ends with an
# answer.
INTERNLM2 = r"""
{{- bos_token }}
{%- for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endfor %}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}
{%- elif messages[-1].role == 'assistant' %}{{ eos_token }}{% endif %}
"""

# Yi-1.5: the system text first with no markers; a user turn already opens the answer.
YI15 = r"""
{%- if messages[0].role == 'system' %}{{ messages[0].content }}{% endif %}
{%- for m in messages %}
{%- if m.role == 'user' %}{{ '<|im_start|>user\n' + m.content + '<|im_end|>\n<|im_start|>assistant\n' }}
{%- elif m.role == 'assistant' %}{{ m.content + '<|im_end|>\n' }}{% endif %}
{%- endfor %}
"""

# Command-R: named templates (transformers picks "tool_use" when tools are given).
COMMAND_R_DEFAULT = r"""
{{- bos_token }}
{%- if messages[0].role == 'system' %}{% set turns = messages[1:] %}{{ '<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>' + messages[0].content + '<|END_OF_TURN_TOKEN|>' }}
{%- else %}{% set turns = messages %}{% endif %}
{%- for m in turns %}
{%- if (m.role == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Turns must alternate between user and chatbot') }}{% endif %}
{%- if m.role == 'user' %}{{ '<|START_OF_TURN_TOKEN|><|USER_TOKEN|>' + m.content | trim + '<|END_OF_TURN_TOKEN|>' }}
{%- else %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' + m.content | trim + '<|END_OF_TURN_TOKEN|>' }}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% endif %}
"""
COMMAND_R = {
    "default": COMMAND_R_DEFAULT,
    "tool_use": COMMAND_R_DEFAULT.replace(
        "{{- bos_token }}", "{{- bos_token + '# Tools in use' }}"
    ),
    "rag": COMMAND_R_DEFAULT.replace("{{- bos_token }}", "{{- bos_token + '# Documents' }}"),
}

# SmolLM3: a metadata system block (with today's date) opening every conversation; /think or
# /no_think in the system prompt; generation markers around the whole assistant turn, header
# and trailing newline included; /no_think writes an empty think block into every answer.
SMOLLM3 = r"""
{%- set mode = '/think' if (enable_thinking is not defined or enable_thinking) else '/no_think' %}
{%- set sys = '' %}
{%- if messages[0].role == 'system' %}
{%- set sys = messages[0].content %}
{%- if '/no_think' in sys %}{% set mode = '/no_think' %}{% elif '/think' in sys %}{% set mode = '/think' %}{% endif %}
{%- set sys = sys.replace('/no_think', '').replace('/think', '').rstrip() %}
{%- endif %}
{{- '<|im_start|>system\n## Metadata\nToday: ' + strftime_now('%d %B %Y') + '\nMode: ' + mode + '\n\n## Instructions\n' + (sys or 'You are a small helpful model.') + '<|im_end|>\n' }}
{%- for m in messages %}
{%- if m.role == 'user' %}{{ '<|im_start|>user\n' + m.content + '<|im_end|>\n' }}
{%- elif m.role == 'assistant' %}
{%- generation %}
{%- if mode == '/think' %}{{ '<|im_start|>assistant\n' + m.content.lstrip('\n') + '<|im_end|>\n' }}
{%- else %}{{ '<|im_start|>assistant\n<think>\n\n</think>\n' + m.content.lstrip('\n') + '<|im_end|>\n' }}{% endif %}
{%- endgeneration %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' + ('' if mode == '/think' else '<think>\n\n</think>\n') }}{% endif %}
"""

# OLMo-2: eos after every answer; the last message has no newline after it.
OLMO2 = r"""
{{- bos_token }}
{%- for m in messages %}
{%- if m.role == 'assistant' %}{{ '<|assistant|>\n' + m.content + eos_token + ('' if loop.last else '\n') }}
{%- else %}{{ '<|' + m.role + '|>\n' + m.content + '\n' }}{% endif %}
{%- if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}
{%- endfor %}
"""


@dataclass(frozen=True)
class Family:
    template: str | dict[str, str]
    special: tuple[str, ...]
    eos: str
    bos: str | None = None
    lead: str = ""
    """What a trained turn holds before the answer (the template writes it after the prompt)."""
    end: str = ""
    """The end-of-turn marker a trained turn ends with."""
    eos_appended: bool = False
    """No end-of-turn marker: the tokenizer's eos is trained after a sample's last turn."""
    system: str = "kept"
    """kept | dropped (counted) | refused:<the template's own message> | moved (to the last turn)."""
    call: str | None = None
    """How the template writes the tests' call get_weather(city=Paris), as trained; None: it
    has no tool-call format."""
    reasoning: str = "kept"
    """kept | refused (the template drops reasoning)."""
    multi_split: bool = False
    """Multi-turn records become one sample per turn (the template rewrites history)."""
    reasoning_lead: str | None = None
    """`lead` for a turn with reasoning, where it differs."""
    kwargs: dict = field(default_factory=dict)


CHATML = ("<|im_start|>", "<|im_end|>")
DEEPSEEK_TOKENS = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
                   "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>",
                   "<｜tool▁call▁end｜>", "<｜tool▁sep｜>", "<｜tool▁output▁begin｜>",
                   "<｜tool▁output▁end｜>")  # fmt: skip
R1_CALL = (
    "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
    '{"city": "Paris"}<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>'
)
FAMILIES = {
    "qwen2.5": Family(QWEN25, (*CHATML, "<|endoftext|>"), "<|im_end|>", end="<|im_end|>",
                      call='<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                           "</tool_call><|im_end|>"),
    "qwen3": Family(QWEN3, (*CHATML, "<think>", "</think>"), "<|im_end|>",
                    lead="<think>\n\n</think>\n\n", reasoning_lead="", end="<|im_end|>",
                    multi_split=True,
                    call='<think>\n\n</think>\n\n<tool_call>\n{"name": "get_weather", '
                         '"arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'),
    "llama2": Family(LLAMA2, ("<s>", "</s>"), "</s>", bos="<s>", lead=" ", end=" </s>"),
    "mistral-v0.1": Family(MISTRAL_V1, ("<s>", "</s>"), "</s>", bos="<s>", lead=" ", end="</s>"),
    "mistral-v0.3": Family(MISTRAL_V3, ("<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]",
                                        "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                                        "[TOOL_RESULTS]", "[/TOOL_RESULTS]"),
                           "</s>", bos="<s>", lead=" ", end="</s>", system="moved",
                           call='[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": '
                                '"Paris"}, "id": "call00001"}]</s>'),
    "llama3.1": Family(LLAMA31, ("<|begin_of_text|>", "<|start_header_id|>",
                                 "<|end_header_id|>", "<|eot_id|>"),
                       "<|eot_id|>", bos="<|begin_of_text|>", end="<|eot_id|>",
                       call='{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'),
    "gemma2": Family(GEMMA2, ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"), "<eos>",
                     bos="<bos>", end="<end_of_turn>", system="refused:System role not supported"),
    "gemma3": Family(GEMMA3, ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"), "<eos>",
                     bos="<bos>", end="<end_of_turn>"),
    "phi3.5": Family(PHI35, ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
                             "<|endoftext|>"), "<|endoftext|>", end="<|end|>"),
    "phi4-mini": Family(PHI4_MINI, ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
                                    "<|endoftext|>", "<|tool|>", "<|/tool|>"),
                        "<|endoftext|>", end="<|end|>"),
    "phi4": Family(PHI4, (*CHATML, "<|im_sep|>"), "<|im_end|>", end="<|im_end|>"),
    "phi4-reasoning": Family(PHI4_REASONING, (*CHATML, "<|im_sep|>"), "<|im_end|>",
                             end="<|im_end|>", system="dropped"),
    "deepseek-r1": Family(DEEPSEEK_R1, DEEPSEEK_TOKENS, "<｜end▁of▁sentence｜>",
                          bos="<｜begin▁of▁sentence｜>", end="<｜end▁of▁sentence｜>",
                          reasoning="refused", call=R1_CALL),
    "deepseek-r1-old": Family(DEEPSEEK_R1_OLD, DEEPSEEK_TOKENS, "<｜end▁of▁sentence｜>",
                              bos="<｜begin▁of▁sentence｜>", end="<｜end▁of▁sentence｜>",
                              reasoning="refused", call=R1_CALL),
    "deepseek-v3": Family(DEEPSEEK_V3, DEEPSEEK_TOKENS, "<｜end▁of▁sentence｜>",
                          bos="<｜begin▁of▁sentence｜>", end="<｜end▁of▁sentence｜>"),
    "glm4": Family(GLM4, ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
                          "<|observation|>", "<|endoftext|>"),
                   "<|endoftext|>", lead="\n", eos_appended=True),
    "internlm2": Family(INTERNLM2, ("<s>", "</s>", *CHATML), "</s>", bos="<s>",
                        end="<|im_end|>"),
    "yi1.5": Family(YI15, CHATML, "<|im_end|>", end="<|im_end|>"),
    "command-r": Family(COMMAND_R, ("<BOS_TOKEN>", "<|START_OF_TURN_TOKEN|>",
                                    "<|END_OF_TURN_TOKEN|>", "<|SYSTEM_TOKEN|>", "<|USER_TOKEN|>",
                                    "<|CHATBOT_TOKEN|>"),
                        "<|END_OF_TURN_TOKEN|>", bos="<BOS_TOKEN>", end="<|END_OF_TURN_TOKEN|>"),
    "smollm3": Family(SMOLLM3, CHATML, "<|im_end|>", lead="<|im_start|>assistant\n",
                      end="<|im_end|>\n"),
    "olmo2": Family(OLMO2, ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>"),
                    "<|endoftext|>", bos="<|endoftext|>", end="<|endoftext|>"),
}  # fmt: skip


def family_tokenizer(fam: Family, template: str | dict | None = None):
    """The built-in tokenizer plus the family's special tokens, bos/eos and template."""
    tok = AutoTokenizer.from_pretrained(BUILTIN_DIR / "tiny")
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in fam.special],
                   special_tokens=True)  # fmt: skip
    tok.eos_token = fam.eos
    if fam.bos:
        tok.bos_token = fam.bos
    tok.chat_template = template or fam.template
    return tok


def save_family_model(folder: Path, fam: Family, template: str | None = None) -> Path:
    """A tiny random Llama with the family's tokenizer, as a Hugging Face folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = family_tokenizer(fam, template)
    config = AutoConfig.from_pretrained(BUILTIN_DIR / "tiny")
    config.vocab_size = len(tok)
    config.eos_token_id = tok.eos_token_id
    config.pad_token_id = tok.pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# Tiny random models of the architectures people fine-tune: the transformers config class, its
# settings (hidden 32, 2 blocks), and the chat template family its tokenizer gets (None: the
# built-in tokenizer's ChatML). Each keeps what sets its family apart: tied embeddings (Llama),
# fused 3-D experts (Qwen3-MoE, Mixtral), soft-capping and sliding windows (Gemma-2/3), q/k
# norms (Qwen3, OLMo-2), fused qkv (Phi-3, GPT-NeoX), blocks under transformer.h (GPT-2).
_DECODER = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
_MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 32}
ARCHS: dict[str, tuple[str, dict, str | None]] = {
    "llama": ("LlamaConfig", {**_DECODER, "tie_word_embeddings": True}, "llama3.1"),
    "qwen2": ("Qwen2Config", _DECODER, "qwen2.5"),
    "qwen3": ("Qwen3Config", {**_DECODER, "head_dim": 8}, "qwen3"),
    "qwen3-moe": ("Qwen3MoeConfig", {**_DECODER, **_MOE, "head_dim": 8, "num_experts": 4},
                  "qwen3"),
    "mixtral": ("MixtralConfig", {**_DECODER, "num_local_experts": 4, "num_experts_per_tok": 2},
                "mistral-v0.1"),
    "gemma2": ("Gemma2Config", {**_DECODER, "head_dim": 8, "sliding_window": 16}, "gemma2"),
    "gemma3": ("Gemma3TextConfig", {**_DECODER, "head_dim": 8, "sliding_window": 16},
               "gemma3"),
    "phi3": ("Phi3Config", _DECODER, "phi3.5"),
    "mistral": ("MistralConfig", _DECODER, "mistral-v0.3"),
    "gpt-neox": ("GPTNeoXConfig", {"hidden_size": 32, "intermediate_size": 64,
                                   "num_hidden_layers": 2, "num_attention_heads": 4,
                                   "max_position_embeddings": 256}, None),
    "olmo2": ("Olmo2Config", _DECODER, "olmo2"),
    "gpt2": ("GPT2Config", {"n_embd": 32, "n_inner": 64, "n_layer": 2, "n_head": 4,
                            "n_positions": 256}, None),
}  # fmt: skip


def save_tiny_model(folder: Path, arch: str, seed: int = 0) -> Path:
    """A tiny random model of `arch` (a key of ARCHS) with its family's tokenizer, as a Hugging
    Face folder (what a user's save_pretrained model is)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    config_class, settings, family = ARCHS[arch]
    tok = (
        family_tokenizer(FAMILIES[family])
        if family
        else AutoTokenizer.from_pretrained(BUILTIN_DIR / "tiny")
    )
    config = getattr(transformers, config_class)(
        **settings, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
