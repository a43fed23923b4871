"""`lockstep chat`: talk to a run, a Hugging Face folder, an adapter or a built-in model.

Generation runs in a background thread and hands text to the terminal through
`TextIteratorStreamer`, so a reply appears while it is being written, and Ctrl-C can stop that
one reply (a stopping criterion the thread checks at every token) without ending the session.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lockstep import hub
from lockstep.errors import LockstepError, ModelError, first_line

Message = dict[str, str]

KINDS = (
    "a run's output_dir (holding final/), a Hugging Face folder (config.json), "
    "a PEFT adapter folder (adapter_config.json), or builtin:tiny"
)
PROMPT = "you> "
REPLY = "assistant> "
MORE = "...> "  # the prompt of a message's next line
BLOCK = '"""'  # a line of its own that opens and closes a multi-line message


@dataclass
class ChatModel:
    """The model that answers, in eval mode on its device, and its tokenizer."""

    model: Any
    tokenizer: Any
    what: str  # said once at start-up, so the user knows which weights answer
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    """A run's data.template_kwargs (enable_thinking, ...): prompts render as in training."""


def main(args: argparse.Namespace) -> int:
    """`lockstep chat`: one answer with --prompt (for scripts), else a conversation."""
    _check_flags(args)
    chat = load(args.model, args.adapter)
    print(f"[lockstep] chat: {chat.what}", file=sys.stderr, flush=True)
    # seeded once per session: a session replays exactly, yet two turns are not forced to agree
    torch.manual_seed(args.seed)
    history: list[Message] = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        history.append({"role": "user", "content": args.prompt})
        reply(chat, history, args)
        print(flush=True)
        return 0
    return interactive(chat, history, args)


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse values `generate` would reject later, after the (slow) model load."""
    if args.temperature < 0:
        raise LockstepError(f"--temperature must be >= 0 (0 is greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise LockstepError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.max_new_tokens < 1:
        raise LockstepError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")


# ---------------------------------------------------------------------------------------------
# loading


def load(model_path: str, adapter: str | None = None) -> ChatModel:
    """Resolve MODEL (and --adapter) to a model in eval mode on the best device, and its tokenizer."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    adapter_dir = _adapter_folder(Path(adapter).expanduser()) if adapter else None
    if model_path.startswith("builtin:"):
        model, tokenizer, what = _load_builtin(model_path)
    else:
        folder = _model_folder(Path(model_path).expanduser())
        # adapter_config.json wins: an adapter folder may carry its base's config.json too,
        # but its weights are only the adapter's
        if (folder / "adapter_config.json").is_file():
            if adapter:
                raise ModelError(
                    f"{folder} is itself an adapter; give its base model as MODEL and the "
                    f"adapter as --adapter, or drop --adapter {adapter}"
                )
            model, tokenizer, what = _load_adapter_folder(folder)
        else:
            model, tokenizer, what = _load_hf_folder(folder)
    if adapter_dir:
        model, what = _apply_adapter(model, adapter_dir, what)
        if (adapter_dir / "tokenizer_config.json").is_file():  # saved with it: belongs to it
            tokenizer = _load_tokenizer(adapter_dir)
    model.to(device)
    model.eval()
    kwargs = _run_template_kwargs(Path(model_path).expanduser())
    if kwargs:
        what += f"; chat template variables of the run: {kwargs}"
    return ChatModel(model, tokenizer, f"{what} on {device}", kwargs)


def _run_template_kwargs(path: Path) -> dict[str, Any]:
    """data.template_kwargs of the run whose output_dir `path` is (none for other folders)."""
    if not (path / "final").is_dir() or not (path / "config.yaml").is_file():
        return {}
    from lockstep import config_files

    try:
        raw = config_files.read_file(path / "config.yaml")
    except LockstepError:
        return {}
    kwargs = (raw.get("data") or {}).get("template_kwargs") or {}
    return dict(kwargs) if isinstance(kwargs, dict) else {}


def _model_folder(path: Path) -> Path:
    """A run folder stands for its final/ model; anything else must be a model or adapter folder."""
    if not path.exists():
        raise ModelError(
            f"model {str(path)!r} not found (looked in {path.resolve()}); give {KINDS}"
        )
    if not path.is_dir():
        raise ModelError(f"model {str(path)!r} is a file, not a folder; give {KINDS}")
    if (path / "final").is_dir():
        return path / "final"
    if (path / "adapter_config.json").is_file() or (path / "config.json").is_file():
        return path
    if (path / "checkpoints").is_dir():
        raise ModelError(
            f"run {str(path)!r} has no final/ model yet (it did not finish); make a model folder "
            f"from its newest checkpoint with `lockstep export {path} --out DIR`, then chat with DIR"
        )
    raise ModelError(
        f"folder {str(path)!r} has neither config.json nor adapter_config.json nor final/; "
        f"give {KINDS}"
    )


def _load_builtin(name: str) -> tuple[Any, Any, str]:
    from lockstep.config import ModelConfig
    from lockstep.model.load import BUILTIN_PREFIX, builtin_names, load_model, load_tokenizer

    if name[len(BUILTIN_PREFIX) :] not in builtin_names():
        known = ", ".join(BUILTIN_PREFIX + n for n in builtin_names())
        raise ModelError(f"unknown built-in model {name!r}; available: {known}")
    cfg = ModelConfig(path=name)
    model = load_model(cfg, init_seed=0)
    return model, load_tokenizer(cfg), f"{name} (random weights, init seed 0)"


def _load_hf_folder(folder: Path) -> tuple[Any, Any, str]:
    """A Hugging Face folder, in the dtype its weights were saved in; its own Python never runs."""
    from lockstep.model.load import pretrained_model

    failure = f"cannot load the model in {folder}"
    model = pretrained_model(str(folder), failure, trust_remote_code=False)
    return model, _load_tokenizer(folder), str(folder)


def _load_adapter_folder(folder: Path) -> tuple[Any, Any, str]:
    """An adapter names its base; lockstep saves the tokenizer next to the adapter weights."""
    from peft import AutoPeftModelForCausalLM

    base = _adapter_base(folder)
    try:
        with _quiet_deprecations():
            model = AutoPeftModelForCausalLM.from_pretrained(folder, trust_remote_code=False)
    except Exception as e:
        raise ModelError(
            f"cannot load adapter {folder} on its base {base!r}: {first_line(e)}; if the base "
            f"has moved, run `lockstep chat BASE --adapter {folder}`"
        ) from None
    tokenizer_home = folder if (folder / "tokenizer_config.json").is_file() else Path(base)
    return model, _load_tokenizer(tokenizer_home), f"adapter {folder} on {base}"


def _adapter_base(folder: Path) -> str:
    """The base recorded in adapter_config.json, checked before anything big is loaded."""
    try:
        base = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get(
            "base_model_name_or_path"
        )
    except (OSError, ValueError, AttributeError) as e:
        raise ModelError(f"{folder}/adapter_config.json is not readable JSON: {e}") from None
    looks_local = not hub.looks_like_id(str(base))
    if not base or (looks_local and not Path(base).expanduser().is_dir()):
        raise ModelError(
            f"adapter {folder}: its base model {base!r} (base_model_name_or_path in "
            f"adapter_config.json) is not there; run `lockstep chat BASE --adapter {folder}` "
            "with the base model's folder"
        )
    return base  # a local folder, or a hub id that transformers resolves


def _adapter_folder(adapter: Path) -> Path:
    """Checked before MODEL loads, so a typo costs a second, not a model load."""
    if not (adapter / "adapter_config.json").is_file():
        why = "not found" if not adapter.exists() else "has no adapter_config.json"
        raise ModelError(
            f"--adapter {str(adapter)!r} {why}; give a folder written by a PEFT model's "
            "save_pretrained (it holds adapter_config.json)"
        )
    return adapter


def _apply_adapter(model: Any, adapter: Path, what: str) -> tuple[Any, str]:
    from peft import PeftModel

    try:
        with _quiet_deprecations():
            model = PeftModel.from_pretrained(model, adapter)
    except Exception as e:
        raise ModelError(
            f"--adapter {adapter}: cannot apply it to {what}: {first_line(e)}"
        ) from None
    return model, f"{what} + adapter {adapter}"


@contextmanager
def _quiet_deprecations() -> Iterator[None]:
    """peft calls transformers APIs deprecated for library authors; a chat user cannot act on it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _load_tokenizer(folder: Path) -> Any:
    from lockstep.model.load import pretrained_tokenizer

    tok = pretrained_tokenizer(folder, False, f"cannot load the tokenizer in {folder}")
    if tok.pad_token_id is None:  # generate wants a pad id even for one sequence
        tok.pad_token = tok.eos_token
    return tok


# ---------------------------------------------------------------------------------------------
# talking


def interactive(chat: ChatModel, history: list[Message], args: argparse.Namespace) -> int:
    """Read a line, answer it; input() works the same on a terminal and on a pipe."""
    print(
        '[lockstep] /reset clears the conversation, /exit ends; several lines: end a line with \\ '
        'to go on, or put them between two lines of """',
        file=sys.stderr, flush=True,
    )  # fmt: skip
    keep = len(history)  # the system message survives /reset
    while True:
        try:
            text = read_message().strip()
        except EOFError:
            print(flush=True)
            return 0
        if not text:  # an accidental Enter is not a turn
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            del history[keep:]
            print("(conversation cleared" + (", system prompt kept)" if keep else ")"), flush=True)
            continue
        history.append({"role": "user", "content": text})
        print(REPLY, end="", flush=True)
        try:
            reply(chat, history, args)
        except KeyboardInterrupt:
            history.pop()  # a stopped reply is not part of the conversation
            print("\n(reply stopped)", flush=True)
            continue
        print(flush=True)


def read_message(ask=input) -> str:
    """One user message from `ask` (input): a line; lines ending in a backslash go on on the
    next line (the backslash dropped); a line of three double quotes opens a block that ends at
    the next such line, for pasted text with blank lines. EOFError when input ends first."""
    line = ask(PROMPT)
    if line.strip() == BLOCK:
        lines: list[str] = []
        while (line := ask(MORE)).strip() != BLOCK:
            lines.append(line)
        return "\n".join(lines)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = ask(MORE)
    return "\n".join([*lines, line])


def reply(chat: ChatModel, history: list[Message], args: argparse.Namespace) -> str:
    """Stream one assistant turn to stdout and append it to `history`."""
    from transformers import TextIteratorStreamer

    inputs = encode(chat, history)
    if getattr(args, "show_prompt", False):
        prompt = chat.tokenizer.apply_chat_template(
            history, add_generation_prompt=True, tokenize=False, **chat.template_kwargs
        )
        print(f"[lockstep] prompt:\n{prompt}\n[lockstep] end of prompt", file=sys.stderr,
              flush=True)  # fmt: skip
    streamer = TextIteratorStreamer(chat.tokenizer, skip_prompt=True, skip_special_tokens=True)
    stop = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            generate(
                chat, inputs, args.max_new_tokens, args.temperature, args.top_p, streamer, stop
            )
        except BaseException as e:  # re-raised in the main thread, where errors are reported
            failure.append(e)
            streamer.end()  # else the reader below waits for text that never comes

    thread = threading.Thread(target=run, daemon=True)
    pieces: list[str] = []
    try:  # started inside: a Ctrl-C right after the start still stops the thread
        thread.start()
        for piece in streamer:
            pieces.append(piece)
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        stop.set()
        if thread.is_alive():
            thread.join()
        raise
    thread.join()
    if failure:
        raise ModelError(f"generation failed: {first_line(failure[0])}") from failure[0]
    text = "".join(pieces).strip()
    history.append({"role": "assistant", "content": text})
    return text


def encode(chat: ChatModel, history: list[Message]) -> Any:
    """The conversation as the model receives it: its chat template (with the run's template
    variables) rendered to token ids, the assistant's turn opened. The same for `lockstep chat`
    and `lockstep serve`. ModelError when the template cannot render it."""
    try:
        inputs = chat.tokenizer.apply_chat_template(
            history, add_generation_prompt=True, return_tensors="pt", return_dict=True,
            **chat.template_kwargs,
        )  # fmt: skip
    except Exception as e:  # no template, or one that refuses a role (e.g. system)
        raise ModelError(
            f"the tokenizer's chat template cannot render this conversation: {first_line(e)}"
        ) from None
    return inputs.to(chat.model.device)


def generate(
    chat: ChatModel,
    inputs: Any,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    streamer: Any,
    stop: threading.Event,
) -> torch.Tensor:
    """One reply to `inputs` (a batch of one), its text handed to `streamer` as it is written;
    greedy when `temperature` is 0, else sampled (with `top_p`) from torch's global generator.
    Ends at the tokenizer's end-of-sequence token, after `max_new_tokens`, or at the next token
    once `stop` is set. Returns the new token ids (the end-of-sequence token included)."""
    from transformers import StoppingCriteriaList

    model, tok = chat.model, chat.tokenizer
    sampling = temperature > 0
    extra = {"temperature": temperature, "top_p": top_p} if sampling else {}
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=sampling,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([_StopOn(stop)]),
            **extra,
        )
    return out[0, inputs["input_ids"].shape[1] :]


class _StopOn:
    """Stops generation once `event` is set: how Ctrl-C (chat), a stop string or a client that
    has left (serve) reach the generating thread."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(
        self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )
