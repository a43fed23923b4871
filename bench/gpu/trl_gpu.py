"""TRL's SFTTrainer under bench/gpu's settings (run by bench/gpu/run.py in a Python with trl).

    python3 bench/gpu/trl_gpu.py MODEL_DIR DATA.jsonl OUT.json [--steps 30] [--seq 4096]
                                 [--micro 2] [--accumulation 8] [--no-compile]

Full fine-tuning of the model in float32 with bf16 autocast (as lockstep's bf16 compute with
float32 master weights), TRL's padding-free best-fit packing into --seq-token packs, the loss on
the completions, AdamW, lr 1e-5 with 2 warm-up steps; flash_attention_2 when flash-attn imports,
else sdpa. Writes OUT.json: tokens/s over the last two thirds of the steps (the tokens the model
was fed: no padding), wall seconds, final loss, peak GPU memory (0 without a GPU), the tokens
counted and TRL's own count (num_tokens), which should agree.
"""

from __future__ import annotations

import argparse
import json
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--accumulation", type=int, default=8)
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="train eagerly (default: torch.compile, as lockstep's run)")  # fmt: skip
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    ds = load_dataset("json", data_files=args.data, split="train").map(
        lambda r: {"prompt": [{"role": "user", "content": r["instruction"] + "\n\n" + r["input"]}],
                   "completion": [{"role": "assistant", "content": r["output"]}]},
        remove_columns=["instruction", "input", "output"])  # fmt: skip
    try:
        import flash_attn  # noqa: F401

        attn = "flash_attention_2"
    except ImportError:
        attn = "sdpa"
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=torch.float32, attn_implementation=attn
    )
    fed = [0]  # tokens fed to the model so far
    ends: list[tuple[float, int]] = []  # (seconds, tokens) at each optimizer step's end

    def count(module, inputs, kwargs):
        mask = kwargs.get("attention_mask")
        fed[0] += int(mask.sum()) if mask is not None else kwargs["input_ids"].numel()

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            ends.append((time.perf_counter(), fed[0]))

    model.register_forward_pre_hook(count, with_kwargs=True)
    cfg = SFTConfig(output_dir=args.out + ".d", max_steps=args.steps,
                    per_device_train_batch_size=args.micro,
                    gradient_accumulation_steps=args.accumulation, learning_rate=1e-5, bf16=True,
                    max_length=args.seq, packing=True, padding_free=True, logging_steps=1,
                    save_strategy="no", report_to="none", dataloader_num_workers=2,
                    torch_compile=args.compile, warmup_steps=2, seed=0,
                    use_cpu=not torch.cuda.is_available())  # fmt: skip
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                         callbacks=[Clock()])  # fmt: skip
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    start = ends[len(ends) // 3 - 1]  # the same window as lockstep's (run.py, timed_rate)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    gpu = torch.cuda.is_available()
    result = {"tokens_per_s": (ends[-1][1] - start[1]) / (ends[-1][0] - start[0]),
              "wall_s": round(wall, 1), "final_loss": losses[-1], "steps": len(ends),
              "attn_implementation": attn, "tokens": ends[-1][1],
              "trl_num_tokens": next((h["num_tokens"] for h in reversed(trainer.state.log_history)
                                      if "num_tokens" in h), None),
              "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else 0.0}  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
