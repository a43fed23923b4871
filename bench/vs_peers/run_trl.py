"""One benchmark run of TRL's SFTTrainer or DPOTrainer; runs inside bench/.venvs/trl (no
lockstep import).

    bench/.venvs/trl/bin/python bench/vs_peers/run_trl.py SPEC.json

SPEC.json (written by run.py or dpo.py): model, data, output_dir, result, steps, micro, accum,
max_length, lr, seed, method (full | lora), packing, lora {r, alpha, dropout}, and optionally
sequential (read the records in file order, ``train_sampling_strategy="sequential"``: run.py's
cases without packing give lockstep's order); for preference training also stage: dpo and beta.

What TRL trains on: the alpaca records become conversations (user: instruction, plus a blank
line and the input when there is one, as lockstep joins them; assistant: output), rendered by
the model's own chat template (ChatML); ``assistant_only_loss=True`` masks by the template's
``{% generation %}`` markers: the loss is on ``{output}<|im_end|>\\n``, as in lockstep and
LLaMA-Factory. Packing is TRL's default strategy, best-fit decreasing (``bfd``), which also turns
on padding-free batches: the packed rows of a micro-batch are concatenated into one row with
position ids restarting at each sample, so no sample attends to another.

Settings that differ from SFTConfig's defaults, to match the other tools: float32
(``bf16=False``; SFTConfig turns bf16 on by default), no gradient checkpointing (on by default
in SFTConfig; off in lockstep and LLaMA-Factory), cosine schedule without warmup, no weight
decay, logging every step, no checkpoints, no evaluation, no reporting. The trained model is
saved at the end, as a user would.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

T_START = time.perf_counter()

import trl  # noqa: E402
from datasets import load_dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_probe import Probe, trainer_settings  # noqa: E402


def to_messages(rec: dict) -> dict:
    user = f"{rec['instruction']}\n\n{rec['input']}" if rec.get("input") else rec["instruction"]
    return {
        "messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": rec["output"]},
        ]
    }


def to_pair(rec: dict) -> dict:
    """An alpaca pairwise record as TRL's conversational preference example."""
    user = f"{rec['instruction']}\n\n{rec['input']}" if rec.get("input") else rec["instruction"]
    return {
        "prompt": [{"role": "user", "content": user}],
        "chosen": [{"role": "assistant", "content": rec["chosen"]}],
        "rejected": [{"role": "assistant", "content": rec["rejected"]}],
    }


def lora_config(spec: dict) -> LoraConfig | None:
    if spec["method"] != "lora":
        return None
    lora = spec["lora"]
    return LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def shared_args(spec: dict) -> dict:
    """The Trainer settings SFT and DPO runs share (see the module docstring)."""
    return {
        **trainer_settings(spec),
        "max_length": spec["max_length"],
        "gradient_checkpointing": False,
        "model_init_kwargs": {"dtype": "float32"},
    }


def train_and_report(trainer_class, args, spec: dict, data, tokenizer, probe: Probe) -> None:
    """Train, save the final model as a user would, and write the probe's result."""
    trainer = trainer_class(
        model=spec["model"],
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=lora_config(spec),
        callbacks=[probe],
    )
    out = trainer.train()
    trainer.save_model(str(Path(spec["output_dir"]) / "final"))
    extra = {"padding_free": bool(trainer.padding_free)} if hasattr(trainer, "padding_free") else {}
    probe.write(
        spec["result"],
        tool="trl",
        train_runtime=out.metrics.get("train_runtime"),
        process_s=time.perf_counter() - T_START,
        versions_extra={"trl": trl.__version__},
        **extra,
    )


def dpo(spec: dict) -> None:
    """DPOTrainer, sigmoid loss, its defaults otherwise: the reference computed live each step (a
    frozen copy of the model for full fine-tuning; the adapters disabled for LoRA), chosen and
    rejected rows padded to the longest of the micro-batch (its padding_free is unavailable for
    DPO in this version). The prompt is the user turn; each answer the assistant turn, so the
    trained tokens are ``{answer}<|im_end|>\n`` as in lockstep and LLaMA-Factory."""
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    data = load_dataset("json", data_files=spec["data"], split="train")
    data = data.map(to_pair, remove_columns=data.column_names)
    args = DPOConfig(**shared_args(spec), loss_type=["sigmoid"], beta=spec["beta"])
    probe = Probe(tokenizer.pad_token_id).install()
    train_and_report(DPOTrainer, args, spec, data, tokenizer, probe)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    if spec.get("stage") == "dpo":
        return dpo(spec)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    data = load_dataset("json", data_files=spec["data"], split="train")
    data = data.map(to_messages, remove_columns=data.column_names)
    sampling = "sequential" if spec.get("sequential") else "random"
    args = SFTConfig(
        **shared_args(spec), packing=spec["packing"], assistant_only_loss=True,
        train_sampling_strategy=sampling,
    )  # fmt: skip
    probe = Probe(tokenizer.pad_token_id).install()
    train_and_report(SFTTrainer, args, spec, data, tokenizer, probe)


if __name__ == "__main__":
    main()
