"""The `lockstep` command tree."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from lockstep import __version__
from lockstep.errors import (
    LaunchError,
    LockstepError,
    TrainingError,
    add_traceback_flag,
    reason,
    report,
    show_traceback,
)
from lockstep.training.preempt import Preempted

if TYPE_CHECKING:
    from lockstep.launch import LaunchOutput


def _cmd_train(args: argparse.Namespace) -> int:
    from lockstep import config, configs, launch, train

    args.config = configs.resolve(args.config)  # `lockstep train demo`: a shipped example
    cfg = train.load_checked(args)  # fail fast, before any process starts
    train.options(args)  # flags that do not go together (--as-rank needs --debug), dry run too
    flags = {k: getattr(args, k) for k in launch.ENV_VARS}
    plan = launch.plan(cfg.launch, flags, os.environ, launch.visible_gpus())
    one_process = plan.in_process or launch.debug_requested(args.debug)
    if not one_process:
        config.check_world(cfg, plan.world_size)
    child = [args.config, *args.overrides]
    child += ["--traceback"] * args.traceback
    child += ["--debug-rank", str(args.debug_rank)] if args.debug_rank is not None else []
    if args.dry_run:
        if one_process:
            print("world: 1 process, in this process")
            argv = [sys.executable, "-m", "lockstep.train", *child]
            argv += ["--debug"] * args.debug + (["--as-rank", args.as_rank] if args.as_rank else [])
        else:
            print(plan.describe())
            argv = launch.torchrun_argv(plan, child)
        print(launch.shell_line(argv))
        return 0
    if one_process:
        return train.run(args, cfg, via_lockstep=True)
    argv = launch.torchrun_argv(plan, child, launcher_module="lockstep.torchrun")
    first = plan.node_rank * plan.nproc_per_node
    describe, env = plan.describe(), {}
    if launch.visible_gpus() == 0:  # CPU processes share this machine's free cores
        from lockstep import threads

        env, note = threads.worker_env(os.environ, plan.nproc_per_node)
        describe += f"; {note}"
    ranks = list(range(first, first + plan.nproc_per_node))
    log = None
    if not show_traceback(args.traceback):
        log = launch.launch_log_path(Path(cfg.output_dir), plan.nnodes, plan.node_rank)
    return _run_torchrun(argv, describe, ranks, log, env)


def _run_torchrun(
    argv: list[str], describe: str, ranks: list[int], log: Path | None, env: dict[str, str]
) -> int:
    """Start torchrun (with `env` added to this environment), pass signals on, and return its
    exit status, naming the first failure.

    With `log`, torchrun's stderr (its own and every rank's) is written there whole and shown
    on the terminal less tracebacks and torchrun's own lines (launch.LaunchOutput); a failure
    then ends in the one line naming its cause and a line naming the log. Without, the
    terminal shows it all (--traceback, LOCKSTEP_TRACEBACK=1).
    """
    from lockstep.launch import FAILURE_DIR_ENV, LAUNCHER_RECORD, LaunchOutput, first_failure

    print(f"[lockstep] {describe}", file=sys.stderr, flush=True)
    out = _open_log(log) if log else contextlib.nullcontext()
    with out, tempfile.TemporaryDirectory(prefix="lockstep-failures-") as failures:
        view = None
        proc = subprocess.Popen(
            argv, env={**os.environ, **env, FAILURE_DIR_ENV: failures},
            stderr=subprocess.PIPE if log else None,
        )  # fmt: skip
        previous = signal.signal(signal.SIGTERM, lambda s, f: proc.send_signal(s))
        try:
            if log:
                failed = lambda: _a_rank_failed(Path(failures))  # noqa: E731
                view = _show_and_log(proc, LaunchOutput(out, sys.stderr.buffer, failed))
            code = _wait(proc)
        finally:
            signal.signal(signal.SIGTERM, previous)
        records = [json.loads(p.read_text()) for p in Path(failures).glob("rank-*.json")]
        launcher_file = Path(failures, LAUNCHER_RECORD)
        launcher = json.loads(launcher_file.read_text()) if launcher_file.is_file() else {}
    preempted = [r for r in records if "preempted" in r]
    if code != 0 and preempted and len(preempted) == len(records) and not launcher:
        return preempted[0]["preempted"]  # every rank stopped on a signal, and said so
    if code != 0:
        what = first_failure(records, launcher, ranks)
        if what is None:
            words = view.last_error if view else ""
            what = f"torchrun: {words}" if words else ("see its log" if log else "see above")
        if view:
            view.end_line()
        report(TrainingError(f"training failed (exit status {code}); {what}"))
        if log:
            print(
                f"lockstep: torchrun's and every rank's output, tracebacks included: {log} "
                "(--traceback shows it here)", file=sys.stderr, flush=True,
            )  # fmt: skip
    return code if code >= 0 else 128 - code


def _open_log(log: Path) -> BinaryIO:
    """The launch log, opened to append; a folder that cannot hold it is one line."""
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        return log.open("ab")
    except OSError as e:
        raise LaunchError(f"output_dir: cannot write the launch log {log}: {reason(e)}") from None


def _show_and_log(proc: subprocess.Popen, view: LaunchOutput) -> LaunchOutput:
    """Feed torchrun's stderr to `view` until it ends. A first Ctrl-C reaches torchrun too
    (it stops its workers, who save a checkpoint): keep reading what they say meanwhile."""
    interrupted = False
    while True:
        try:
            chunk = os.read(proc.stderr.fileno(), 65536)
        except KeyboardInterrupt:
            if interrupted:
                raise
            interrupted = True
            continue
        if not chunk:
            break
        view.feed(chunk)
    view.close()
    return view


def _wait(proc: subprocess.Popen) -> int:
    """torchrun's exit status; a Ctrl-C while waiting lets it finish stopping its workers."""
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the terminal sent SIGINT to torchrun too; let it finish
        return proc.wait()


def _a_rank_failed(failures: Path) -> bool:
    """A rank wrote a failure record (not a stop on a signal, which ends the run in order)."""
    for path in failures.glob("rank-*.json"):
        try:
            if "preempted" not in json.loads(path.read_text()):
                return True
        except (OSError, ValueError):
            return True  # being written: only failures and stops are written
    return False


def _cmd_data_preview(args: argparse.Namespace) -> int:
    from lockstep import config, configs
    from lockstep.data import cache, preview, templates
    from lockstep.data.dataset import check_files
    from lockstep.model.load import load_tokenizer

    cfg = config.load(configs.resolve(args.config), args.overrides)
    check_files(cfg.data)  # a missing data file in words, before the tokenizer loads
    tokenizer = load_tokenizer(cfg.model, templates.configured(cfg.data))
    pairs = cfg.finetune.stage == "preference"
    samples, how = cache.load_or_build(cfg.data, tokenizer, pairs=pairs)
    print(f"[lockstep] data: {how}", file=sys.stderr)
    colour = sys.stdout.isatty() and not args.no_colour
    print(preview.report(tokenizer, samples, args.n, colour, cfg.data, pairs))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from lockstep.export import export

    export(Path(args.source), Path(args.out), args.dtype, args.trust_remote_code, args.overwrite)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    """eval_loss of a checkpoint (default: the run's newest) on the config's eval data."""
    from lockstep import config, configs, dist
    from lockstep.data import cache
    from lockstep.data.dataset import check_files
    from lockstep.export import model_from_checkpoint, resolve_checkpoint, tokenizer_from_checkpoint
    from lockstep.training import parallel
    from lockstep.training.evaluate import check_eval_files, eval_split, evaluate

    cfg = config.load(configs.resolve(args.config), args.overrides)
    if cfg.finetune.stage == "preference":
        raise config.ConfigError(
            "lockstep eval scores supervised runs; a preference run scores its eval pairs while "
            "it trains (data.eval, eval.every_steps: the eval_* rows of metrics.jsonl)"
        )
    check_files(cfg.data)  # a missing data file, before the model loads
    check_eval_files(cfg)  # a missing data.eval file, named as such
    ckpt = resolve_checkpoint(Path(args.checkpoint or cfg.output_dir))
    model, trained_cfg, _ = model_from_checkpoint(ckpt, args.trust_remote_code)
    tokenizer = tokenizer_from_checkpoint(ckpt, trained_cfg)
    samples, _ = cache.load_or_build(cfg.data, tokenizer)
    load = lambda data: cache.load_or_build(data, tokenizer)[0]  # noqa: E731
    _, held = eval_split(cfg, samples, trained_cfg.seed, load)
    if held is None:
        raise config.ConfigError("nothing to evaluate on: set data.eval or data.val_fraction")
    d = dist.Dist(device=dist.default_device())  # a GPU when there is one, in the run's precision
    precision = parallel.autocast(trained_cfg, d)
    result = evaluate(
        model.to(d.device), held, d, cfg.batch.micro_size, tokenizer.pad_token_id,
        precision=precision,
    )  # fmt: skip
    print(json.dumps({"checkpoint": str(ckpt), **result, "device": str(d.device)}))
    return 0


def _cmd_configs(args: argparse.Namespace) -> int:
    from lockstep import configs

    if args.action == "copy":
        if not args.name:
            raise configs.ConfigError("lockstep configs copy NAME [DEST]: which config?")
        target = configs.copy(args.name, args.dest)
        print(f"wrote {target}; train it: lockstep train {target}")
    else:
        print(configs.listing())
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from lockstep import infer

    return infer.main(args)


def _cmd_serve(args: argparse.Namespace) -> int:
    from lockstep import serve

    return serve.main(args)


def _cmd_env(args: argparse.Namespace) -> int:
    from lockstep.report import env

    info = env.collect()
    print(json.dumps(info, indent=2) if args.json else env.render(info))
    return 0


def _add_trust_flag(p: argparse.ArgumentParser) -> None:
    """--trust-remote-code: the only way a checkpoint's model may run its folder's Python (its
    own config.yaml saying model.trust_remote_code=true is not enough)."""
    p.add_argument(
        "--trust-remote-code", dest="trust_remote_code", action="store_true",
        help="allow a checkpoint trained with model.trust_remote_code=true to run its model "
        "folder's Python code (only for code you trust)",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    from lockstep.train import add_run_args

    parser = argparse.ArgumentParser(
        prog="lockstep",
        description="Fine-tune Hugging Face causal LMs from one YAML file, every rank in lockstep.",
    )
    parser.add_argument("--version", action="version", version=f"lockstep {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train from a config file (plans the world, starts it)")
    add_run_args(p)
    w = p.add_argument_group("world (flag > env variable > config launch.*)")
    w.add_argument("--nproc-per-node", dest="nproc_per_node", help="'auto' or N (NPROC_PER_NODE)")
    w.add_argument("--nnodes", help="number of nodes (NNODES)")
    w.add_argument("--node-rank", dest="node_rank", help="this node's rank (NODE_RANK)")
    w.add_argument("--master-addr", dest="master_addr", help="rendezvous host (MASTER_ADDR)")
    w.add_argument("--master-port", dest="master_port", help="rendezvous port (MASTER_PORT)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and command, run nothing")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("data", help="look at the data as the model will see it")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = data_sub.add_parser("preview", help="rendered samples with trained tokens marked, counts")
    p.add_argument("config", help="run config (YAML or JSON)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("-n", type=int, default=3, help="samples to show (default 3)")
    p.add_argument("--no-colour", action="store_true", help="[[brackets]] even on a terminal")
    add_traceback_flag(p)
    p.set_defaults(func=_cmd_data_preview)

    p = sub.add_parser("export", help="a run or checkpoint -> a Hugging Face folder")
    p.add_argument("source", help="a run's output_dir (its newest checkpoint) or a checkpoint")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast weights")
    p.add_argument("--overwrite", action="store_true", help="replace what --out already holds")
    _add_trust_flag(p)
    add_traceback_flag(p)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("eval", help="eval_loss / eval_ppl of a checkpoint on the eval data")
    p.add_argument("config", help="run config (YAML or JSON)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--checkpoint", help="a checkpoint or run folder (default: output_dir's newest)")
    _add_trust_flag(p)
    add_traceback_flag(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("configs", help="list the example configs, or copy one to start from")
    p.add_argument("action", nargs="?", choices=["list", "copy"], default="list")
    p.add_argument("name", nargs="?", help="with copy: the config's name")
    p.add_argument("dest", nargs="?", help="with copy: file or folder (default ./NAME.yaml)")
    add_traceback_flag(p)
    p.set_defaults(func=_cmd_configs)

    p = sub.add_parser("chat", help="chat with a model, a run or an adapter in the terminal")
    p.add_argument(
        "model", help="a run's output_dir, a Hugging Face folder, an adapter, or builtin:tiny"
    )
    p.add_argument("--adapter", help="a PEFT adapter folder to apply on top of MODEL")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--prompt", help="answer this once and exit (for scripts)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--top-p", dest="top_p", type=float, default=0.9, help="nucleus sampling (0.9)")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument(
        "--show-prompt", dest="show_prompt", action="store_true",
        help="print each prompt on stderr exactly as the model receives it (its chat template)",
    )  # fmt: skip
    add_traceback_flag(p)
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP server for a model, a run or an adapter",
        description="Serve MODEL over OpenAI's API: GET /v1/models, POST /v1/chat/completions "
        "(streaming too), POST /v1/completions. Prompts are rendered as `lockstep chat` renders "
        "them. Concurrent requests wait in a queue: one generation thread answers them one at a "
        "time, in order of arrival. Needs the serve extra: pip install 'lockstep-finetune[serve]'.",
    )  # fmt: skip
    p.add_argument(
        "model", help="a run's output_dir, a Hugging Face folder, an adapter, or builtin:tiny"
    )
    p.add_argument("--adapter", help="a PEFT adapter folder to apply on top of MODEL")
    p.add_argument("--name", help="the model id clients ask for (default: MODEL's folder name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (default 8000)")
    p.add_argument(
        "--api-key", dest="api_key",
        help="answer only requests with 'Authorization: Bearer KEY' (default: $LOCKSTEP_API_KEY)",
    )  # fmt: skip
    p.add_argument(
        "--max-tokens", dest="max_tokens", type=int, default=256,
        help="max_tokens of a request that gives none, within the context (default 256)",
    )  # fmt: skip
    add_traceback_flag(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("env", help="versions, devices, and where lockstep is imported from")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_traceback_flag(p, shown=False)
    p.set_defaults(func=_cmd_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    from lockstep.train import parse

    args = parse(build_parser(), argv)
    try:
        return args.func(args)
    except Preempted as e:
        print(f"lockstep: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except LockstepError as e:
        return report(e, args.traceback)
    except KeyboardInterrupt:
        print("lockstep: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
