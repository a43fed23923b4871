"""`lockstep serve` end to end: a real server process on 127.0.0.1 (a free port) serving a short
demo run, queried with the official `openai` client (and raw HTTP where the client hides the
wire: the server-sent events, a body that is not JSON).

One server (with an API key) is shared by the module; `lockstep chat` runs beside it while it
starts, so the module costs one short training, one server start-up and two chats.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import HANG_S, ROOT, run_cli
from test_chat import finish, start_chat

openai = pytest.importorskip("openai", reason="the dev extra installs the openai client")
pytest.importorskip("uvicorn", reason="the serve extra installs the web stack")

SYSTEM = "Be brief."
COUNT = "Count the words.\n\nred blue green"
UPPER = "Uppercase the words.\n\nking cup"
KEY = "s3cret-key"


@dataclass
class Served:
    """A running `lockstep serve`: its process, its base URL (…/v1) and its stderr file."""

    proc: subprocess.Popen
    url: str
    log: Path

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=HANG_S)


def start_server(log: Path, *args: str, env: dict[str, str] | None = None) -> Served:
    """`python -m lockstep serve ARGS --port 0`, once it has printed its URL."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("LOCKSTEP_TRACEBACK", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "lockstep", "serve", *args, "--port", "0"],
        stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env=full_env, cwd=ROOT,
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(HANG_S)
    line = lines[0] if lines else ""
    found = re.search(r"serving '.*' at (http://127\.0\.0\.1:\d+/v1) \(Ctrl-C stops\)$", line)
    if not found:
        proc.kill()
        raise AssertionError(f"no URL line: {line!r}\n{log.read_text()}")
    return Served(proc, found.group(1), log)


def stop_server(served: Served) -> str:
    """Stop it as Ctrl-C does; its stderr, once it has exited cleanly."""
    served.proc.send_signal(signal.SIGINT)
    assert served.proc.wait(timeout=HANG_S) == 0, served.log.read_text()
    return served.log.read_text()


def post(url: str, body: bytes, key: str | None = KEY) -> tuple[int, str]:
    """(status, body text) of a raw POST with `key` (None: no Authorization), errors included."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=HANG_S) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def assert_openai_error(text: str, param: str | None = None) -> dict:
    """The body is OpenAI's error shape (every key there); its `error`."""
    error = json.loads(text)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["message"] and error["type"], error
    assert error["param"] == param, error
    return error


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo, short: 40 steps already answer in the trained formats (a count, capitals)."""
    tmp = tmp_path_factory.mktemp("serve")
    out = tmp / "run"
    proc = run_cli(
        "train", "demo", f"output_dir={out}", "train.max_steps=40", "batch.micro_size=32",
        "eval.show=0", f"data.cache_dir={tmp / 'cache'}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def chats(run_dir: Path) -> dict[str, subprocess.Popen]:
    """`lockstep chat --prompt ... --temperature 0` of the run, started before the server is."""
    return {
        prompt: start_chat(
            str(run_dir),
            "--system",
            SYSTEM,
            "--prompt",
            prompt,
            "--temperature",
            "0",
            "--max-new-tokens",
            "16",
        )  # fmt: skip
        for prompt in (COUNT, UPPER)
    }


@pytest.fixture(scope="module")
def served(
    run_dir: Path, chats: dict[str, subprocess.Popen], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    log = tmp_path_factory.mktemp("serve-log") / "stderr.txt"
    served = start_server(log, str(run_dir), "--max-tokens", "16", env={"LOCKSTEP_API_KEY": KEY})
    try:
        yield served
    finally:
        err = stop_server(served) if served.proc.poll() is None else log.read_text()
    assert "Traceback" not in err, err  # every failure above was answered, never raised
    assert err.endswith("[lockstep] serve: stopped\n"), err


@pytest.fixture(scope="module")
def chat_replies(chats: dict[str, subprocess.Popen]) -> dict[str, str]:
    """What each chat printed."""
    done = {prompt: finish(proc) for prompt, proc in chats.items()}
    for proc in done.values():
        assert proc.returncode == 0, proc.stderr
    return {prompt: proc.stdout for prompt, proc in done.items()}


def ask(served: Served, prompt: str, **kwargs) -> object:
    return served.client().chat.completions.create(
        model="run",
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
        **kwargs,
    )


def test_models_lists_the_served_name(served: Served) -> None:
    models = served.client().models.list()
    assert [m.id for m in models.data] == ["run"]  # the run folder's name
    assert served.client().models.retrieve("run").owned_by == "lockstep"
    with pytest.raises(openai.NotFoundError):
        served.client().models.retrieve("other")


def test_greedy_reply_is_lockstep_chats(
    served: Served, chat_replies: dict[str, str], run_dir: Path
) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run_dir / "final")
    for prompt in (COUNT, UPPER):
        reply = ask(served, prompt, temperature=0, max_tokens=16)
        text = reply.choices[0].message.content
        assert text + "\n" == chat_replies[prompt]  # chat prints the reply and a newline
        assert reply.choices[0].finish_reason == "stop"
        assert reply.model == "run" and reply.object == "chat.completion"
        conversation = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
        ids = tok.apply_chat_template(conversation, add_generation_prompt=True, return_dict=True)
        usage = reply.usage
        assert usage.prompt_tokens == len(ids["input_ids"])  # the chat template, as in training
        # the reply's tokens and the end-of-sequence token
        assert usage.completion_tokens == len(tok(text)["input_ids"]) + 1
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # 40 steps of the demo have learnt to count: the prompt reached the model as trained
    assert chat_replies[COUNT].strip().isdigit(), chat_replies


def test_streaming_reply_is_the_whole_reply_in_pieces(served: Served) -> None:
    whole = ask(served, UPPER, temperature=0, max_tokens=16)
    chunks = list(
        ask(served, UPPER, temperature=0, max_tokens=16, stream=True,
            stream_options={"include_usage": True})
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    # on the wire: server-sent events, each a JSON chunk, ending with [DONE]
    body = json.dumps({"model": "run", "messages": [{"role": "user", "content": UPPER}],
                       "stream": True, "temperature": 0})  # fmt: skip
    status, events = post(f"{served.url}/chat/completions", body.encode())
    assert status == 200
    assert events.endswith("data: [DONE]\n\n")
    lines = [e for e in events.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in lines)
    assert all("choices" in json.loads(e[6:]) for e in lines[:-1])


def test_eight_concurrent_requests_are_all_answered(served: Served) -> None:
    prompts = [COUNT, UPPER, "Count the words.\n\nsun", "Uppercase the words.\n\nmoon tree"] * 2
    alone = {p: ask(served, p, temperature=0, max_tokens=8).choices[0].message.content
             for p in prompts[:4]}  # fmt: skip
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda p: ask(served, p, temperature=0, max_tokens=8), prompts))
    # all answered, each with the answer to its own prompt
    assert [r.choices[0].message.content for r in replies] == [alone[p] for p in prompts]
    assert len({r.id for r in replies}) == 8


def test_sampling_with_a_seed_repeats_and_user_is_accepted(served: Served) -> None:
    texts = [
        ask(served, UPPER, temperature=1.5, top_p=0.95, seed=seed, max_tokens=12, user="me")
        .choices[0].message.content
        for seed in (5, 5, 6, 7, 8)
    ]  # fmt: skip
    assert texts[0] == texts[1]  # the same seed, the same reply
    assert len(set(texts)) > 1, texts  # sampled: other seeds, other replies


def test_completions_take_the_raw_prompt(served: Served, run_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = "The words"  # the run goes on without an end: 6 tokens, then the length limit
    tok = AutoTokenizer.from_pretrained(run_dir / "final")
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    ids = tok(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=6, do_sample=False)
    expected = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(expected) >= 5, expected
    client = served.client()
    reply = client.completions.create(model="run", prompt=prompt, max_tokens=6, temperature=0)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == expected  # no chat template around the prompt
    assert reply.usage.prompt_tokens == ids["input_ids"].shape[1]
    assert reply.usage.completion_tokens == 6 and reply.choices[0].finish_reason == "length"
    # a stop string ends the text before it
    stop = expected[3:5]
    cut = client.completions.create(
        model="run", prompt=prompt, max_tokens=6, temperature=0, stop=[stop, "zzz"]
    )
    assert cut.choices[0].text == expected[: expected.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="run", prompt=prompt, max_tokens=6, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_bad_requests_get_openai_errors_and_the_server_goes_on(served: Served) -> None:
    client = served.client()
    url = f"{served.url}/chat/completions"
    status, text = post(url, b'{"model": "run", "messages": [')
    assert status == 400 and "not valid JSON" in assert_openai_error(text)["message"]
    status, text = post(url, b"[1, 2]")
    assert status == 400 and "JSON object" in assert_openai_error(text)["message"]
    status, text = post(url, json.dumps({"model": "run"}).encode())
    assert status == 400 and assert_openai_error(text, "messages")

    user = [{"role": "user", "content": COUNT}]
    with pytest.raises(openai.BadRequestError) as e:  # over the context (1024 tokens)
        client.chat.completions.create(model="run", messages=user, max_tokens=5000)
    assert e.value.status_code == 400 and e.value.code == "context_length_exceeded"
    assert e.value.param == "max_tokens" and "lower max_tokens to" in e.value.message
    long = [{"role": "user", "content": "word " * 3000}]
    with pytest.raises(openai.BadRequestError) as e:  # the prompt alone is over it
        client.chat.completions.create(model="run", messages=long, stream=True)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:  # a field lockstep does not implement
        client.chat.completions.create(model="run", messages=user, logit_bias={"5": 10})
    assert e.value.param == "logit_bias" and "unsupported field" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="run", messages=user, n=2)
    assert e.value.param == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="run", messages=user, temperature=-1)
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="run", messages=[{"role": "tool", "content": "x"}])
    assert e.value.param == "messages[0].role"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=user)
    assert e.value.code == "model_not_found" and "'run'" in e.value.message
    status, text = post(f"{served.url}/embeddings", b"{}")
    assert status == 404 and assert_openai_error(text)

    reply = client.chat.completions.create(model="run", messages=user, temperature=0)
    assert reply.choices[0].message.content  # still serving
    assert served.proc.poll() is None


def test_a_client_that_leaves_stops_its_generation(served: Served) -> None:
    body = {"model": "run", "prompt": "The words", "max_tokens": 1000, "temperature": 0}
    start = time.perf_counter()  # the whole reply: "The words" runs on to its max_tokens
    whole = served.client().completions.create(**body)
    whole_s = time.perf_counter() - start
    assert whole.usage.completion_tokens == 1000
    host, port = served.url.removeprefix("http://").removesuffix("/v1").split(":")
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for stream in (True, False):
        conn = http.client.HTTPConnection(host, int(port), timeout=HANG_S)
        conn.request("POST", "/v1/completions", json.dumps({**body, "stream": stream}), headers)
        if stream:  # gone after the first piece
            response = conn.getresponse()
            assert response.status == 200 and response.readline().startswith(b"data: {")
            response.close()
        else:  # gone while the whole reply is generated
            time.sleep(whole_s / 10)
        conn.close()
        start = time.perf_counter()
        after = served.client().completions.create(**{**body, "max_tokens": 1})
        # answered at once: the 1000 tokens nobody reads were not generated first (they would
        # take about 0.9 whole_s; a reply of one token takes a few hundredths of it)
        took = time.perf_counter() - start
        assert took < whole_s / 8, (stream, took, whole_s)
        assert after.usage.completion_tokens == 1


def test_api_key_is_required_when_set(served: Served) -> None:
    with pytest.raises(openai.AuthenticationError) as e:
        served.client("wrong").models.list()
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    body = json.dumps({"model": "run", "prompt": "hi"}).encode()
    status, text = post(f"{served.url}/completions", body, key=None)  # no Authorization header
    assert status == 401 and "no API key" in assert_openai_error(text)["message"]
    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(f"{served.url}/models", timeout=HANG_S)
    assert raw.value.code == 401
    assert [m.id for m in served.client(KEY).models.list().data] == ["run"]


def test_a_taken_port_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = run_cli("serve", "builtin:tiny", "--port", str(port))
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"lockstep: error: cannot listen on 127.0.0.1:{port}: ")
    assert "--port (0 picks a free one)" in proc.stderr and "Traceback" not in proc.stderr


def test_without_the_serve_extra_says_what_to_install() -> None:
    # the web stack made unimportable, as in an environment without the extra
    code = (
        "import sys; sys.modules['uvicorn'] = None\n"
        "from lockstep.cli import main; sys.exit(main(['serve', 'builtin:tiny']))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_S, cwd=ROOT
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "lockstep: error: lockstep serve needs a web stack (uvicorn is not installed): "
        "pip install 'lockstep-finetune[serve]'"
    ]


def test_stop_text_holds_back_what_may_start_a_stop_string() -> None:
    from lockstep.serve import StopText

    stops = StopText(("END", "\n\n"))
    assert stops.feed("one E") == "one "  # "E" may begin END
    assert stops.feed("N") == ""
    assert stops.feed("Ds two") == "" and stops.hit  # END: the text stops before it
    assert stops.feed("more") == "" and stops.flush() == ""
    free = StopText(("END",))
    assert free.feed("the E") == "the " and free.feed("nd") == "End" and free.flush() == ""
    assert free.feed("x E") == "x " and free.flush() == "E"  # the reply ended: nothing held


def test_api_key_flag_wins_over_the_environment() -> None:
    from lockstep.serve import ServeError, api_key

    assert api_key("flag", {"LOCKSTEP_API_KEY": "env"}) == "flag"
    assert api_key(None, {"LOCKSTEP_API_KEY": "env"}) == "env"
    assert api_key(None, {}) is None
    with pytest.raises(ServeError, match="LOCKSTEP_API_KEY is empty"):
        api_key(None, {"LOCKSTEP_API_KEY": " "})
