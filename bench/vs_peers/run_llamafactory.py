"""One benchmark run of LLaMA-Factory's SFT or DPO; runs inside bench/.venvs/llamafactory (no
lockstep).

    bench/.venvs/llamafactory/bin/python bench/vs_peers/run_llamafactory.py SPEC.json

SPEC.json (written by run.py or dpo.py): model, data, output_dir, result, steps, micro, accum,
max_length, lr, seed, method (full | lora), packing, lora {r, alpha, dropout}, and optionally
sequential (read the records in file order, ``disable_shuffling``: run.py's cases without
packing give lockstep's order) and dataset (its dataset_info.json name; default ``bench``); for
preference training also stage: dpo, dataset, loss (``pref_loss``: sigmoid, simpo or orpo), beta
(``pref_beta``) and gamma (``simpo_gamma``). Its DPO keeps its defaults
otherwise: with full fine-tuning a second copy of the model is the reference, computed at every
step; with LoRA the adapters are disabled; pairs are padded to the longest row of the
micro-batch.

This is what ``llamafactory-cli train config.yaml`` does (``run_exp`` with the config as a dict,
the same code path), plus a callback that measures (hf_probe.py). The config is written to
OUTPUT/llamafactory.yaml for reference.

What LLaMA-Factory trains on: the alpaca records (``dataset_info.json``, made by
make_assets.py) rendered by its ``chatml`` template, with no system prompt (that template has
no default one): ``<|im_start|>user\\n{instruction}<|im_end|>\\n<|im_start|>assistant\\n`` then
``{output}<|im_end|>\\n``, the loss on the latter; the same token ids as lockstep and TRL.
Packing is ``neat_packing`` (``packing`` alone lets packed samples attend to each other; the
other two tools never do): greedy knapsack packs of cutoff_len + 1 tokens, with a 4-D
block-diagonal attention mask (sdpa). Without packing, batches are padded to the longest
sample, rounded up to a multiple of 8 (LLaMA-Factory's SFT collator does that when training).

Settings that differ from LLaMA-Factory's defaults, to match the other tools: no gradient
checkpointing (LLaMA-Factory turns it on for training; lockstep does not use it), float32,
cosine schedule without warmup, no weight decay, logging every step, no checkpoints, no loss
plot, no reporting. The trained model is saved at the end, as LLaMA-Factory always does.

LLaMA-Factory 0.9.5 imports torchaudio when it starts (for audio inputs only), and no
torchaudio build exists for torch 2.13.0; the benchmark does not install torchaudio (nor
torchvision), and lends the import a placeholder module for the moment of that import, so that
text training runs. Nothing in a text-only run uses it.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
import time
import types
from pathlib import Path

T_START = time.perf_counter()


def import_run_exp():
    """`llamafactory.train.tuner.run_exp`, with a placeholder torchaudio if none is installed."""
    if importlib.util.find_spec("torchaudio") is not None:
        from llamafactory.train.tuner import run_exp

        return run_exp
    from transformers.utils import import_utils

    import_utils.is_torchaudio_available()  # cache the truth (False) before the placeholder
    stub = types.ModuleType("torchaudio")
    stub.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
    sys.modules["torchaudio"] = stub
    try:
        from llamafactory.train.tuner import run_exp
    finally:
        del sys.modules["torchaudio"]
    return run_exp


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    run_exp = import_run_exp()
    import llamafactory
    from transformers import AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from hf_probe import Probe, trainer_settings

    lora = spec["lora"]
    stage = {"stage": "sft", "dataset": spec.get("dataset", "bench")}
    if spec.get("stage") == "dpo":
        stage = {
            "stage": "dpo", "dataset": spec["dataset"], "pref_loss": spec["loss"],
            "pref_beta": spec["beta"], "simpo_gamma": spec["gamma"], "pref_ftx": 0.0,
        }  # fmt: skip
    args = {
        **stage,
        "do_train": True,
        "model_name_or_path": spec["model"],
        "trust_remote_code": False,
        "flash_attn": "sdpa",
        "disable_gradient_checkpointing": True,
        "template": "chatml",
        "dataset_dir": str(Path(spec["data"]).parent),
        "cutoff_len": spec["max_length"],
        "packing": spec["packing"],
        "neat_packing": spec["packing"],
        "finetuning_type": spec["method"],
        **(
            {
                "lora_rank": lora["r"],
                "lora_alpha": lora["alpha"],
                "lora_dropout": lora["dropout"],
                "lora_target": "all",
            }
            if spec["method"] == "lora"
            else {}
        ),
        **trainer_settings(spec),
        "overwrite_output_dir": True,
        "disable_shuffling": spec.get("sequential", False),
        "plot_loss": False,
    }
    out = Path(spec["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "llamafactory.yaml").write_text(
        "".join(f"{k}: {json.dumps(v)}\n" for k, v in args.items())
    )
    pad_id = AutoTokenizer.from_pretrained(spec["model"]).pad_token_id
    probe = Probe(pad_id).install()
    run_exp(args=args, callbacks=[probe])
    results = json.loads((out / "train_results.json").read_text())
    probe.write(
        spec["result"],
        tool="llamafactory",
        train_runtime=results.get("train_runtime"),
        process_s=time.perf_counter() - T_START,
        versions_extra={"llamafactory": llamafactory.__version__},
    )


if __name__ == "__main__":
    main()
