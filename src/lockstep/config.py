"""The schema of a run, in one place: YAML/JSON file + dotted overrides -> a validated RunConfig.

Every way a config can be wrong ends in one ConfigError that names the dotted key, the value
and what is allowed, so a user never reads a pydantic or YAML traceback.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from lockstep import config_text
from lockstep.config_files import apply_override, nul_key, read_file
from lockstep.errors import ConfigError

# the arguments of rendering itself (apply_chat_template's): not variables for a template
RENDER_ARGUMENTS = {"messages", "conversation", "tools", "documents", "add_generation_prompt",
                    "continue_final_message", "tokenize", "chat_template", "return_dict",
                    "return_assistant_tokens_mask", "return_tensors", "tokenizer_kwargs",
                    "padding", "truncation", "max_length", "sanitize_control_tokens",
                    "add_special_tokens"}  # fmt: skip

PosInt = Annotated[int, Field(ge=1)]
MAX_BATCH = 1 << 20  # samples per step: far above any real run, far below what fills memory
MAX_LORA_RANK = 4096  # above the hidden size of most models: a larger rank is a typo
NonNegInt = Annotated[int, Field(ge=0)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


class ModelConfig(Section):
    path: str = Field("builtin:tiny", min_length=1)
    """`builtin:tiny`, a local Hugging Face folder, or a hub id."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """The compute dtype of forward and backward (float16 is refused for training: see check)."""
    master_weights: Literal["float32", "same"] = "float32"
    """With dtype bfloat16: `float32` keeps the trained weights and optimizer in float32 and
    runs forward/backward in bfloat16 (mixed precision; frozen weights - a LoRA base, frozen
    blocks - are held in bfloat16); `same`: every weight in bfloat16 too (pure)."""
    trust_remote_code: bool = False
    attn_implementation: Literal[
        "auto", "sdpa", "eager", "flash_attention_2", "flex_attention", "lockstep_segments"
    ] = "auto"
    """`auto`: flash_attention_2 (variable-length, no mask) where samples share rows (packing,
    padding-free) and it can run: CUDA GPU of compute capability >= 8.0, dtype bfloat16/float16,
    flash-attn that imports, a model class that supports it. Otherwise, on a CPU where samples
    share rows and the class supports sdpa, lockstep_segments (sdpa over each sample of a row on its
    own, no mask); otherwise sdpa, or eager for a class without sdpa (Gemma-2), rows of several
    samples then getting a dense block-diagonal mask. Never flex_attention (set it explicitly).
    A set kernel that cannot run is refused; the log says which kernel runs and why
    (model/attention.py)."""


class LoraSettings(Section):
    r: Annotated[int, Field(ge=1, le=MAX_LORA_RANK)] = 8
    alpha: Annotated[FiniteFloat, Field(gt=0)] = 16.0
    dropout: Annotated[FiniteFloat, Field(ge=0, lt=1)] = 0.0
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    """`all-linear`: every linear layer of the blocks (not the output head); or module names."""
    target_parameters: Literal["experts"] | list[str] = []
    """LoRA on parameters rather than modules: the experts of a mixture-of-experts model, which
    transformers stores as 3-D parameters (no linear layer to wrap). `experts`: every 3-D
    parameter of the blocks; or names (a parameter name or its end, e.g.
    [mlp.experts.gate_up_proj, mlp.experts.down_proj]). Needs peft >= 0.17 and dropout 0."""
    use_rslora: bool = False
    use_dora: bool = False
    quantize: Literal["4bit", "8bit"] | None = None
    """QLoRA: load the base model quantised with bitsandbytes (CUDA only)."""
    init_from: str | None = Field(None, min_length=1)
    """A PEFT LoRA adapter folder (adapter_config.json and its weights, e.g. a LoRA run's
    OUTPUT/final) to start from instead of a fresh adapter. The adapter decides r, alpha,
    target_modules, target_parameters, use_rslora and use_dora (a config that sets one to
    another value is refused) and dropout unless the config sets it; a resumed run restores
    its checkpoint, not the adapter."""


class FreezeSettings(Section):
    trainable_layers: PosInt | None = None
    """Train the last N transformer blocks (everything else frozen)."""
    trainable_modules: list[str] | None = None
    """Or: train the parameters whose names match these patterns (fnmatch, e.g. '*.mlp.*')."""


class FinetuneConfig(Section):
    stage: Literal["sft", "preference"] = "sft"
    """`sft`: learn the answers of the data; `preference`: learn to prefer each pair's chosen
    answer to its rejected one (the `preference` section: DPO, IPO, SimPO, ORPO)."""
    method: Literal["full", "lora", "freeze"] = "full"
    lora: LoraSettings = LoraSettings()
    freeze: FreezeSettings = FreezeSettings()


class PreferenceConfig(Section):
    """finetune.stage=preference: the loss over answer pairs (training/preference.py)."""

    loss: Literal["dpo", "ipo", "simpo", "orpo"] = "dpo"
    """dpo (sigmoid), ipo: against a reference model; simpo, orpo: reference-free."""
    beta: Annotated[FiniteFloat, Field(gt=0)] = 0.1
    """How far the policy may move from the reference (dpo, ipo); the reward scale (simpo:
    2.0-2.5 is usual; orpo: the scale of the logged rewards only)."""
    label_smoothing: Annotated[FiniteFloat, Field(ge=0, lt=0.5)] = 0.0
    """dpo, simpo: the share of pairs assumed to be labelled the wrong way round."""
    gamma: Annotated[FiniteFloat, Field(ge=0)] = 0.5
    """simpo: the target reward margin."""
    orpo_lambda: Annotated[FiniteFloat, Field(gt=0)] = 0.1
    """orpo: the weight of the odds-ratio term beside the chosen answer's loss."""
    reference: Literal["auto", "adapters_off", "precompute", "live"] = "auto"
    """Where dpo and ipo get the reference model's log-probabilities. `adapters_off`: the LoRA
    model with its adapters disabled (no copy; a forward pass more per micro-batch);
    `precompute`: one pass of the starting model over the data before training, cached next
    to the tokenised data and read back on resume; `live`: a frozen copy of the starting
    model beside the one that trains; `auto`: adapters_off with LoRA (not from
    finetune.lora.init_from), else precompute."""


class DatasetConfig(Section):
    path: str = Field(min_length=1)
    """A .jsonl/.json/.csv/.parquet/.txt file, a folder of them, or a Hugging Face dataset name
    (a .txt file is one text document: format text); or `builtin:NAME`, a data file shipped
    with lockstep (builtin:demo_train.jsonl, builtin:demo_eval.jsonl), found from any folder."""
    format: Literal["alpaca", "messages", "sharegpt", "text", "preference"] = "alpaca"
    """The records' layout. Preference pairs: alpaca or sharegpt with `chosen` / `rejected`
    answers (LLaMA-Factory's pairwise layouts), or `preference` (TRL's: `prompt`, `chosen`,
    `rejected`, as messages or as strings); supervised fine-tuning refuses pairs."""
    split: str = "train"
    """The split of a Hugging Face dataset."""
    columns: dict[str, str] | None = None
    """lockstep's field name -> the dataset's, e.g. {instruction: prompt, output: response}.
    The names each format reads are listed in the README ("Data"); the names dataset_info.json
    files use (prompt, query, response, messages, role_tag, content_tag) are accepted too."""
    ignore_fields: list[str] = []
    """Fields of the records that are known to be unused (not listed as unused at start-up)."""
    max_samples: PosInt | None = None
    """Use only the first N records of this dataset."""
    weight: Annotated[FiniteFloat, Field(ge=0)] | None = None
    """This dataset's share of each epoch: weight / the sum of the weights, of an epoch as long
    as one pass over all of data.train (set it on every entry, or on none). Up-weighted, a
    dataset repeats, going through all its samples before any comes again; down-weighted, each
    epoch continues where the last stopped. 0 leaves it out. README: "Mixing datasets"."""
    repeat: Annotated[FiniteFloat, Field(gt=0)] | None = None
    """Passes over this dataset per epoch: round(repeat x its samples), e.g. 2 (twice), 0.5
    (half of it, the other half next epoch); entries without it count once. Not with weight."""

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, v: dict[str, str] | None, info: ValidationInfo) -> dict | None:
        from lockstep.data.formats import check_columns  # where the field names live

        return check_columns(info.data.get("format", "alpaca"), v)


class DataConfig(Section):
    train: list[DatasetConfig] = Field(min_length=1)
    """Concatenated in the listed order; the data order then shuffles them together."""
    eval: list[DatasetConfig] = []
    """Held-out datasets for eval_loss (same formats and settings as train)."""
    val_fraction: Annotated[FiniteFloat, Field(ge=0, lt=1)] = 0.0
    """Or: hold out this share of the train samples (chosen by the seed) for evaluation."""
    max_length: Annotated[int, Field(ge=8, le=1_048_576)] = 512
    overlong: Literal["truncate", "drop"] = "truncate"
    """What to do with a sample longer than max_length."""
    template: Literal["chatml", "llama3", "plain"] | None = None
    """None: the tokenizer's own chat template; else a built-in one (for tokenizers without)."""
    chat_template: str | None = Field(None, min_length=1)
    """A chat template to use instead of the tokenizer's: a path to a .jinja file, or the
    template itself. Saved into every tokenizer lockstep writes (final/, checkpoints, export),
    so the trained model is prompted exactly as it was trained."""
    template_kwargs: dict[str, Any] = {}
    """Variables the chat template reads, e.g. {enable_thinking: false} or {date_string: ...}."""
    train_on: Literal["assistant", "last", "all"] = "assistant"
    """Which tokens carry loss: every assistant turn, only the last one, or everything."""
    multi_turn: Literal["auto", "split", "whole"] = "auto"
    """How a conversation with several trained turns becomes samples. `whole`: one sample, which
    needs a template that writes each earlier turn as it wrote it when that turn was generated;
    `split`: one sample per trained turn (the conversation up to it); `auto`: whole where that
    is exact, else split as little as needed (e.g. templates that drop reasoning from history)."""
    reasoning: Literal["keep", "drop"] = "keep"
    """Reasoning in the data (`reasoning_content`, or <think>...</think> in the content): `keep`
    trains it (a template that would drop it is refused); `drop` removes it, answers only."""
    packing: bool = False
    """Pack samples into sequences of max_length (attention stays inside each sample); the
    global batch then counts packed sequences."""
    on_bad_record: Literal["error", "skip"] = "error"
    """`error`: a bad record stops the run naming file:line; `skip`: count and report them."""
    num_proc: Annotated[int, Field(ge=1, le=256)] = 1
    """Processes that tokenise in parallel."""
    cache: bool = True
    """Keep tokenised data on disk, keyed by a fingerprint of everything it depends on."""
    cache_dir: str | None = None
    """Where (None: ~/.cache/lockstep/data)."""
    padding_free: Literal["auto"] | bool = "auto"
    """Concatenate a micro-batch's samples into one row (position ids restart per sample,
    attention stays inside each sample): no compute is spent on padding; the loss is unchanged.
    `auto`: on CUDA where flash_attention_2's variable-length kernel runs (see
    model.attn_implementation; with sdpa/eager a row would get a dense [T, T] mask); on a CPU
    where lockstep_segments runs (a model class with sdpa), otherwise when a row stays short
    (micro_size x mean sample length <= 1024 tokens); never with packing."""
    group_by_length: bool = True
    """Inside each global batch, put samples of similar length into the same micro-batch (less
    padding). The step's set of samples is unchanged, so is the loss; a function of the batch."""
    num_workers: Annotated[int, Field(ge=0, le=64)] = 0
    """Processes that build micro-batches ahead of the training step (pinned memory on CUDA)."""


class BatchConfig(Section):
    global_size: Annotated[int, Field(ge=1, le=MAX_BATCH)] = 16
    """Samples per optimizer step, over all processes."""
    micro_size: Annotated[int, Field(ge=1, le=MAX_BATCH)] = 4
    """Samples per forward pass on one device."""


class TrainConfig(Section):
    epochs: PosInt = 1
    max_steps: PosInt | None = None
    """Stop after this many optimizer steps (None: run all epochs)."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """`ddp`: every process holds the whole model; `fsdp`: parameters, gradients and optimizer
    state sharded over the processes (FSDP2, per block), sharded checkpoints."""
    loss_chunk: PosInt | None = 1024
    """Target tokens per chunk of the cross entropy: the LM head runs chunk by chunk, so the
    full logits never exist at once. None: the plain loss over the full logits."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in backward: far less memory, ~30% more compute."""
    compile: bool = False
    """torch.compile each transformer block (the first steps are slower while it compiles)."""


class OptimConfig(Section):
    lr: Annotated[FiniteFloat, Field(gt=0, le=10)] = 1e-4
    weight_decay: Annotated[FiniteFloat, Field(ge=0)] = 0.0
    betas: tuple[
        Annotated[FiniteFloat, Field(ge=0, lt=1)], Annotated[FiniteFloat, Field(ge=0, lt=1)]
    ] = (0.9, 0.999)
    eps: Annotated[FiniteFloat, Field(gt=0)] = 1e-8
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: NonNegInt = 0
    min_lr_ratio: Annotated[FiniteFloat, Field(ge=0, le=1)] = 0.0
    grad_clip: Annotated[FiniteFloat, Field(gt=0)] | None = 1.0
    """Clip the global gradient norm to this value (None: no clipping)."""
    fused: bool | None = None
    """Fused AdamW kernel. None: fused where the device supports it (CUDA, CPU)."""


class CheckpointConfig(Section):
    every_steps: PosInt | None = None
    """Save every N optimizer steps (and always at the end, and when preempted)."""
    keep_last: PosInt | None = None
    """Keep this many newest checkpoints (None: all); older ones go once a new one is complete."""
    resume: str = Field("auto", min_length=1)
    """`auto`: continue from the newest complete checkpoint in output_dir, if any; `never`:
    start fresh (refused while output_dir holds checkpoints, unless overwrite); or a path."""
    overwrite: bool = False
    """With resume=never: delete the existing checkpoints and start fresh."""
    resume_force: bool = False
    """Resume even though fields that change the data order or the model changed."""


class EvalConfig(Section):
    every_steps: PosInt | None = None
    """Compute eval_loss / eval_ppl over the whole eval set every N steps (and at the end)."""
    show: Annotated[int, Field(ge=0, le=100)] = 0
    """At the end of a run, answer the first N eval samples' prompts greedily with the model as
    it was before training and as trained, and print them side by side with the answers the
    data gives (0: no table). Loads the model's starting weights once more on rank 0."""


class LogConfig(Section):
    every_steps: PosInt = 1
    tensorboard: bool = False
    """Also write TensorBoard event files (train and eval scalars) to OUTPUT/tensorboard/: the
    same as listing tensorboard in log.trackers."""
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = []
    """Where rank 0 also sends every metrics.jsonl row (its numbers, at its step), with the
    config, seed and config hash as the run's parameters; a resumed run continues the same
    tracker run. tensorboard: OUTPUT/tensorboard/; wandb: Weights & Biases (WANDB_MODE=offline
    keeps it in OUTPUT/wandb/); mlflow: MLFLOW_TRACKING_URI, else a file store in
    OUTPUT/mlruns. Each is an extra: pip install 'lockstep-finetune[wandb]' (or [mlflow])."""
    project: str = Field("lockstep", min_length=1)
    """The W&B project and the MLflow experiment of log.trackers' runs."""
    run_name: str | None = Field(None, min_length=1)
    """The trackers' name of the run; None: the output_dir's folder name."""
    sample_ids: bool = False
    """Each rank writes the sample ids of every micro-batch to OUTPUT/sample_ids/ (debugging)."""
    profile: tuple[PosInt, PosInt] | None = None
    """Profile optimizer steps [FIRST, LAST] (counted from 1, both included) with torch.profiler:
    per rank, the timeline, the operators by their own time, and the share of the phases (data,
    forward, backward, step, after) in OUTPUT/profile/; rank 0 logs the shares. Start after a
    step or two of warm-up, e.g. [3, 4]. None: no profiling."""


class LaunchConfig(Section):
    """Where the processes run. Flags and env variables override these (see launch.py)."""

    nproc_per_node: Literal["auto"] | PosInt = "auto"
    """`auto`: one process per visible CUDA device, 1 without GPUs."""
    nnodes: PosInt = 1
    node_rank: NonNegInt = 0
    master_addr: str = "127.0.0.1"
    master_port: Annotated[int, Field(ge=1, le=65535)] | None = None
    """Required with several nodes; None on one node: a free port is found."""
    max_restarts: NonNegInt = 0
    timeout_s: Annotated[FiniteFloat, Field(gt=0)] = 300.0
    """How long a rank waits for the others at a collective before the run fails."""


class FaultInjection(Section):
    """Test-only fault injection (lockstep's own tests use it to prove failures are caught)."""

    fail_at_step: PosInt | None = None
    """Raise an error at this optimizer step..."""
    fail_rank: NonNegInt = 0
    """...on this rank."""
    desync: Literal["seed", "data"] | None = None
    """Make one rank differ: `seed` (it adds 1 to the agreed seed) or `data` (it drops its last
    training record), to prove the fingerprint check stops the run."""
    desync_rank: NonNegInt = 1


class RunConfig(Section):
    output_dir: str = Field("runs/lockstep", min_length=1)
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    """None: rank 0 draws one at start-up and every rank uses it."""
    model: ModelConfig = ModelConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    preference: PreferenceConfig = PreferenceConfig()
    data: DataConfig
    batch: BatchConfig = BatchConfig()
    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    log: LogConfig = LogConfig()
    launch: LaunchConfig = LaunchConfig()
    testing: FaultInjection = FaultInjection()

    @field_validator("seed", mode="before")
    @classmethod
    def _no_bool_seed(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("expected an integer or null")
        return v


# ---------------------------------------------------------------- loading


def load(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    raw = read_file(path) if path is not None else {}
    for ov in overrides:
        apply_override(raw, ov)
    return validate(raw)


def validate(raw: dict[str, Any]) -> RunConfig:
    try:
        bad = nul_key(raw)
        if bad:
            raise ConfigError(f"{bad}: holds a NUL character (\\x00), which no path or name can")
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(config_text.explain(e, RunConfig)) from None
    except (RecursionError, TypeError, ValueError, OverflowError) as e:
        raise ConfigError(f"the config cannot be read: {e}") from None
    check(cfg)
    return cfg


def check(cfg: RunConfig, world_size: int = 1) -> None:
    """Combinations of values that are each valid alone but not together, and the batch split
    on `world_size` processes (validate runs it for one process on every config it loads)."""
    _check_combinations(cfg)
    _check_batch_split(cfg, world_size)


def check_world(cfg: RunConfig, world_size: int) -> None:
    """The batch split on the world the run will have, once it is known: every loaded config
    was checked for one process already (validate), so only a larger world checks again."""
    if world_size > 1:
        _check_batch_split(cfg, world_size)


def _check_combinations(cfg: RunConfig) -> None:
    """Values each valid alone that do not go together."""
    _check_mixing(cfg.data)
    if cfg.finetune.lora.init_from and cfg.finetune.method != "lora":
        raise ConfigError(
            f"finetune.lora.init_from starts LoRA from an adapter, but finetune.method="
            f"{cfg.finetune.method}: set finetune.method=lora (or drop finetune.lora.init_from)"
        )
    if cfg.eval.every_steps and not (cfg.data.eval or cfg.data.val_fraction):
        raise ConfigError(
            "eval.every_steps is set but there is nothing to evaluate on: set data.eval "
            "(datasets like data.train) or data.val_fraction (e.g. 0.05)"
        )
    if cfg.data.eval and cfg.data.val_fraction:
        raise ConfigError("set data.eval or data.val_fraction, not both")
    if cfg.eval.show and not (cfg.data.eval or cfg.data.val_fraction):
        raise ConfigError(
            f"eval.show={cfg.eval.show} answers eval prompts, but there are none: set data.eval "
            "(datasets like data.train) or data.val_fraction (e.g. 0.05), or eval.show=0"
        )
    if cfg.data.template and cfg.data.chat_template:
        raise ConfigError(
            "set data.template (a built-in template) or data.chat_template (your own), not both"
        )
    taken = sorted(set(cfg.data.template_kwargs) & RENDER_ARGUMENTS)
    if taken:
        raise ConfigError(
            f"data.template_kwargs: {', '.join(taken)} is set by lockstep for every rendering "
            f"(the conversation, its tools, the generation prompt); give only the variables "
            f"the template itself reads, such as enable_thinking"
        )
    fz = cfg.finetune.freeze
    if cfg.finetune.method == "freeze" and (fz.trainable_layers is None) == (
        not fz.trainable_modules
    ):
        raise ConfigError(
            "finetune.method=freeze needs exactly one of finetune.freeze.trainable_layers "
            "(train the last N blocks) or finetune.freeze.trainable_modules (name patterns)"
        )
    if cfg.model.dtype == "float16":
        raise ConfigError(
            "model.dtype=float16 cannot train here: mixed float16 needs loss scaling, which "
            "lockstep does not do, and pure float16 loses AdamW's second moment (squared "
            "gradients below 6e-8 become 0). Use model.dtype=bfloat16 (GPUs since Ampere), or "
            "float32 (older GPUs and CPUs); export --dtype float16 still writes float16 weights"
        )
    if (
        cfg.train.strategy == "fsdp"
        and cfg.finetune.method == "lora"
        and cfg.finetune.lora.quantize
    ):
        raise ConfigError(
            f"finetune.lora.quantize={cfg.finetune.lora.quantize} (QLoRA) with "
            "train.strategy=fsdp: quantised weights cannot be sharded by FSDP2 here. Use "
            "train.strategy=ddp (each GPU holds the quantised base), or LoRA without quantize "
            "under fsdp"
        )
    if cfg.log.profile and cfg.log.profile[0] > cfg.log.profile[1]:
        first, last = cfg.log.profile
        raise ConfigError(
            f"log.profile=[{first}, {last}]: the first step comes after the last; "
            f"write [{last}, {first}] (steps FIRST to LAST, counted from 1)"
        )
    _check_preference(cfg)


def _check_batch_split(cfg: RunConfig, world_size: int) -> None:
    """Each optimizer step splits into whole micro-batches on every one of `world_size`."""
    g, m = cfg.batch.global_size, cfg.batch.micro_size
    if g % (m * world_size):
        per_step = m * world_size
        lower = max(per_step, g // per_step * per_step)
        by = f"batch.micro_size={m}"
        if world_size > 1:
            by += f" x {world_size} processes = {per_step}"
        raise ConfigError(
            f"batch.global_size={g} is not divisible by {by}: "
            f"each optimizer step must split into whole micro-batches on every process. "
            f"Set batch.global_size to a multiple of {per_step} (e.g. {lower} or "
            f"{lower + per_step}), or change batch.micro_size."
        )


def _check_mixing(data: DataConfig) -> None:
    """data.train's weight / repeat: one way of mixing, weights on every entry and not all 0;
    data.eval is read whole (README "Mixing datasets")."""
    for i, ds in enumerate(data.eval):
        for name in ("weight", "repeat"):
            if getattr(ds, name) is not None:
                raise ConfigError(
                    f"data.eval.{i}.{name} is set, but evaluation reads every sample of data.eval "
                    f"once: remove it (mixing applies to data.train)"
                )
    weighted = [i for i, ds in enumerate(data.train) if ds.weight is not None]
    repeated = [i for i, ds in enumerate(data.train) if ds.repeat is not None]
    if weighted and repeated:
        both = [i for i in weighted if i in repeated]
        where = (
            f"data.train.{both[0]} sets both"
            if both
            else f"data.train.{weighted[0]}.weight and data.train.{repeated[0]}.repeat are set"
        )
        raise ConfigError(
            f"{where}: weight and repeat are two ways of mixing; use one of them: weight on "
            "every entry (shares of an epoch) or repeat (passes per epoch)"
        )
    if weighted and len(weighted) < len(data.train):
        missing = [f"data.train.{i}.weight" for i in range(len(data.train)) if i not in weighted]
        raise ConfigError(
            f"{', '.join(missing)} is not set: with weights, every dataset's share is its "
            "weight / the sum of all weights: set a weight on every entry (0 leaves one out)"
        )
    if weighted and not any(ds.weight for ds in data.train):
        raise ConfigError(
            "data.train: every weight is 0, so no dataset is trained on: give at least one "
            "dataset a positive weight"
        )


def _check_preference(cfg: RunConfig) -> None:
    """finetune.stage=preference and the preference section: settings that cannot apply."""
    pref, stage = cfg.preference, cfg.finetune.stage
    if stage == "sft":
        if pref != PreferenceConfig():
            set_ = sorted(k for k, v in pref if v != getattr(PreferenceConfig(), k))
            raise ConfigError(
                f"preference.{', preference.'.join(set_)} is set, but finetune.stage=sft does "
                "not read it: set finetune.stage=preference to train on answer pairs"
            )
        return
    if pref.loss in ("simpo", "orpo") and pref.reference != "auto":
        raise ConfigError(
            f"preference.reference={pref.reference} is set, but preference.loss={pref.loss} "
            "uses no reference model: remove it, or use loss dpo or ipo"
        )
    if pref.reference == "adapters_off" and cfg.finetune.method != "lora":
        raise ConfigError(
            f"preference.reference=adapters_off needs finetune.method=lora (the reference is "
            f"the model without its adapters); this run is {cfg.finetune.method}: use "
            "preference.reference=live (a frozen copy) or auto"
        )
    if pref.reference == "live" and cfg.train.strategy == "fsdp":
        raise ConfigError(
            "a live reference model with train.strategy=fsdp would hold a whole copy of the "
            "model on every process: use finetune.method=lora (its reference is the base), a "
            "reference-free loss (preference.loss=simpo or orpo), or train.strategy=ddp"
        )
    refused = {
        "data.packing": "a micro-batch holds each pair's two answers, not packed rows",
        "data.val_fraction": "held-out pairs come from data.eval (a file of pairs)",
    }
    set_ = {
        "data.packing": cfg.data.packing,
        "data.val_fraction": bool(cfg.data.val_fraction),
    }
    for key, why in refused.items():
        if set_[key]:
            raise ConfigError(
                f"{key} does not apply with finetune.stage=preference ({why}): remove {key}"
            )


def known_keys() -> list[str]:
    """Every dotted key of a run config (sections and leaves); list items as key.N.field."""
    return config_text.known_keys(RunConfig)


# ---------------------------------------------------------------- output


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def config_hash(cfg: RunConfig, exclude: tuple[str, ...] = ()) -> str:
    """A short, stable hash of the resolved config (canonical JSON), less `exclude` sections."""
    data = {k: v for k, v in to_dict(cfg).items() if k not in exclude}
    canon = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def dump(cfg: RunConfig, path: str | Path) -> str:
    """Write the resolved config (loadable again as a config) with its hash; return the hash."""
    h = config_hash(cfg)
    body = yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
    Path(path).write_text(f"# lockstep resolved config; config_hash: {h}\n{body}", encoding="utf-8")
    return h
