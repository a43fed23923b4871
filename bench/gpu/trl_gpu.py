"""TRL's SFTTrainer under bench/gpu's settings (run by bench/gpu/run.py in a Python with trl).

argv: model_dir data.jsonl steps seq micro accumulation out.json
"""

import json
import sys
import time

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer

model_dir, data, steps, seq, micro, accum, out = sys.argv[1:8]
tok = AutoTokenizer.from_pretrained(model_dir)
ds = load_dataset("json", data_files=data, split="train").map(
    lambda r: {"prompt": [{"role": "user", "content": r["instruction"] + "\n\n" + r["input"]}],
               "completion": [{"role": "assistant", "content": r["output"]}]},
    remove_columns=["instruction", "input", "output"])  # fmt: skip
try:
    import flash_attn  # noqa: F401

    attn = "flash_attention_2"
except ImportError:
    attn = "sdpa"
model = AutoModelForCausalLM.from_pretrained(
    model_dir, dtype=torch.float32, attn_implementation=attn
)


class Clock(TrainerCallback):
    times: list = []
    tokens: list = [0]  # real tokens fed to the model so far

    def on_step_end(self, args, state, control, **kw):
        self.times.append((time.perf_counter(), self.tokens[0]))


clock = Clock()


def count(module, args, kwargs):
    mask = kwargs.get("attention_mask")
    ids = kwargs["input_ids"]
    clock.tokens[0] += int(mask.sum()) if mask is not None else ids.numel()


model.register_forward_pre_hook(count, with_kwargs=True)
cfg = SFTConfig(output_dir=out + ".d", max_steps=int(steps), per_device_train_batch_size=int(micro),
                gradient_accumulation_steps=int(accum), learning_rate=1e-5, bf16=True,
                max_length=int(seq), packing=True, padding_free=True, logging_steps=1,
                save_strategy="no", report_to="none", dataloader_num_workers=2,
                torch_compile=True, warmup_steps=2, seed=0)  # fmt: skip
trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                     callbacks=[clock])  # fmt: skip
t0 = time.perf_counter()
trainer.train()
wall = time.perf_counter() - t0
third = len(clock.times) // 3  # after compilation and warm-up, as for lockstep
seconds = clock.times[-1][0] - clock.times[third - 1][0]
tokens = clock.times[-1][1] - clock.times[third - 1][1]
losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
result = {"tokens_per_s": tokens / seconds, "wall_s": wall, "final_loss": losses[-1],
          "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}  # fmt: skip
with open(out, "w") as f:
    json.dump(result, f)
