"""Training targets on TRL: ``cpu``, ``cuda`` and the ``auto`` choice between them.

A target receives a :class:`~specdsl.contract.hookspecs.TrainRequest` whose dataset is a Parquet table of
*pre-tokenized* samples (``input_ids``, ``labels`` with -100 where no loss is taken, optionally
``attention_mask``). The masks are the product of the spec (principle 6 of the design): TRL must train on
exactly those labels, so this module never lets TRL tokenize, template or mask again. TRL 1.16's
``SFTTrainer`` recognises a dataset with an ``input_ids`` column as processed and keeps a ``labels``
column "as is" (``SFTTrainer._prepare_dataset``); its collator pads labels with -100 and, padding-free,
only sets -100 on the first token of each sample, a position no causal loss ever reads. The tests assert
this at the model's boundary.

Output: a standard Hugging Face model directory (or a PEFT adapter directory, or with ``lora.merge`` a
merged model) with the tokenizer, a ``README.md`` model card and ``specdsl_train.json`` (resolved
parameters, what the target chose and why, metrics). It is trained in a staging directory beside
``output_dir`` and renamed into place at the very end, so an interrupted run never looks complete.

``processes: N`` (> 1) or ``nodes: M`` (> 1) runs the same training through ``accelerate launch`` with a
generated config (kept in the output as ``accelerate_config.yaml``); each worker is
``python -m specdsl.training.worker REQUEST.json``. With ``nodes: M`` the user starts the step on
every node, each with ``SPECDSL_MACHINE_RANK`` (0 .. M-1) and ``SPECDSL_MAIN_PROCESS_IP`` (the address of
machine 0) in its environment and the output directory on a filesystem machine 0 can write; machine 0
writes the output, the others only train.

Heavy imports (torch, transformers, trl, datasets, peft, accelerate, pyarrow) happen inside functions:
importing this module must stay cheap (``specdsl validate``).
"""

from __future__ import annotations

import abc
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from specdsl.errors import RunError, StopRun
from specdsl.contract.hookspecs import TrainRequest

log = logging.getLogger("specdsl.train")

TARGET_VERSION = "1"

# Marker for the lines a worker process prints for its parent (progress, errors); anything else it prints
# goes to the training log.
WORKER_MARK = "@@specdsl "

LR_SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay",
)
ATTN_CHOICES = ("auto", "sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")

# The JSON Schema fragment of a train step's parameters (the integrator merges it into the spec schema).
PARAMS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "epochs": {"type": "number", "exclusiveMinimum": 0, "default": 1,
                   "description": "Passes over the dataset (fractions allowed)."},
        "max_steps": {"type": ["integer", "null"], "minimum": 1, "default": None,
                      "description": "Stop after this many optimizer steps (overrides epochs)."},
        "learning_rate": {"type": ["number", "null"], "exclusiveMinimum": 0, "default": None,
                          "description": "Peak learning rate; null = 2e-5 for a full fine-tune, 2e-4 with lora."},
        "batch_size": {"type": "integer", "minimum": 1, "default": 8,
                       "description": "Samples per device per micro-step (padded or padding-free batches). "
                                      "With packing, the token budget is batch_size x longest sample unless "
                                      "max_tokens_per_batch is set."},
        "gradient_accumulation": {"type": "integer", "minimum": 1, "default": 1},
        "max_length": {"type": ["integer", "null"], "minimum": 1, "default": None,
                       "description": "Samples longer than this are cut (keep the start); null = the model's "
                                      "max_position_embeddings. Cut samples are counted in the card."},
        "packing": {"type": ["boolean", "null"], "default": None,
                    "description": "Best-fit-decreasing packing into padding-free batches, no attention across "
                                   "samples; null = false on cpu, true on cuda."},
        "padding_free": {"type": ["boolean", "null"], "default": None,
                         "description": "Concatenate each batch's samples into one row (no pad tokens, no "
                                        "attention across samples); null = true on cuda, and whenever packing."},
        "max_tokens_per_batch": {"type": ["integer", "null"], "minimum": 1, "default": None,
                                 "description": "Token budget of one micro-batch per device (needs packing); "
                                                "null = on cuda, up to 16384, what the GPU's memory holds "
                                                "for this model (halved if the first steps run out of "
                                                "memory); on cpu, batch_size x longest sample."},
        "seed": {"type": ["integer", "null"], "default": None,
                 "description": "null = the request's seed."},
        "lr_scheduler": {"enum": list(LR_SCHEDULERS), "default": "linear"},
        "warmup_ratio": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": 0.0},
        "weight_decay": {"type": "number", "minimum": 0, "default": 0.0},
        "max_grad_norm": {"type": "number", "minimum": 0, "default": 1.0},
        "logging_steps": {"type": "integer", "minimum": 1, "default": 10,
                          "description": "Steps between progress reports (loss)."},
        "precision": {"enum": ["auto", "fp32", "bf16"], "default": "auto",
                      "description": "auto = bf16 mixed precision on a GPU that supports it, fp32 on cpu."},
        "attn_implementation": {"enum": list(ATTN_CHOICES), "default": "auto",
                                "description": "auto = sdpa on cpu; on cuda the best installed of "
                                               "flash_attention_3 (Hopper), flash_attention_2, flex_attention, sdpa."},
        "liger": {"type": ["boolean", "null"], "default": None,
                  "description": "Liger Triton kernels (RMSNorm, RoPE, SwiGLU); null = on when liger_kernel "
                                 "is installed and the target is cuda."},
        "gradient_checkpointing": {"type": "boolean", "default": False},
        "torch_compile": {"type": "boolean", "default": False},
        "lora": {
            "type": ["object", "null"], "default": None, "additionalProperties": False,
            "properties": {
                "r": {"type": "integer", "minimum": 1, "default": 16},
                "alpha": {"type": ["number", "null"], "exclusiveMinimum": 0, "default": None,
                          "description": "null = 2 x r."},
                "dropout": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": 0.05},
                "target_modules": {"oneOf": [{"const": "all-linear"},
                                             {"type": "array", "items": {"type": "string"}, "minItems": 1}],
                                   "default": "all-linear"},
                "merge": {"type": "boolean", "default": False,
                          "description": "Write a merged full model instead of the adapter."},
            },
        },
        "processes": {"type": "integer", "minimum": 1, "default": 1,
                      "description": "Processes per node; > 1 runs through accelerate launch."},
        "nodes": {"type": "integer", "minimum": 1, "default": 1,
                  "description": "Machines (accelerate num_machines); run the step on every node."},
        "strategy": {"enum": ["ddp", "fsdp", "deepspeed"], "default": "ddp"},
        "zero_stage": {"type": "integer", "minimum": 1, "maximum": 3, "default": 2,
                       "description": "DeepSpeed ZeRO stage (strategy: deepspeed)."},
        "main_process_ip": {"type": ["string", "null"], "default": None,
                            "description": "Machine 0's address for nodes > 1 (or SPECDSL_MAIN_PROCESS_IP)."},
        "main_process_port": {"type": ["integer", "null"], "minimum": 0, "maximum": 65535, "default": None,
                              "description": "null = a free port on one node, 29500 across nodes."},
    },
}

_LORA_DEFAULTS = {"r": 16, "alpha": None, "dropout": 0.05, "target_modules": "all-linear", "merge": False}
CUDA_DEFAULT_TOKEN_BUDGET = 16384   # the most a default budget grows to: past it, small models gain little
MIN_AUTO_TOKEN_BUDGET = 1024
OOM_RETRY_STEPS = 10   # an automatic budget is halved after running out of memory within this many steps


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs from a decoder's config.json."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool

    @property
    def params(self) -> int:
        head_dim = self.hidden // max(self.heads, 1)
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        mlp = 3 * self.hidden * self.intermediate  # gate, up, down (SwiGLU)
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * (attention + mlp + 2 * self.hidden) + embeddings

    def activation_bytes_per_token(self, gradient_checkpointing: bool) -> int:
        """Bytes autograd keeps per token in a bf16-autocast step with a kernel that stores no L x L scores.

        A decoder layer keeps its fp32 residual stream and norm inputs, the bf16 inputs of each projection,
        q/k/v and the attention output, and the MLP's gate, up and activated tensors: about 36 h + 12 i
        bytes. With gradient checkpointing a layer keeps only its input, plus one layer recomputed at a time.
        """
        per_layer = 36 * self.hidden + 12 * self.intermediate
        if gradient_checkpointing:
            return self.layers * 4 * self.hidden + per_layer
        return self.layers * per_layer + 8 * self.hidden


def model_shape(base_model: Path | Mapping[str, Any]) -> ModelShape | None:
    """The decoder's shape from its config.json (a model folder, or the config already read); None when
    the file cannot be read or does not describe a decoder the memory estimate knows."""
    if not isinstance(base_model, Mapping):
        try:
            base_model = _model_config(Path(base_model))
        except RunError:
            return None
    cfg = base_model
    try:
        heads = int(cfg["num_attention_heads"])
        return ModelShape(hidden=int(cfg["hidden_size"]), intermediate=int(cfg["intermediate_size"]),
                          layers=int(cfg["num_hidden_layers"]), vocab=int(cfg["vocab_size"]), heads=heads,
                          kv_heads=int(cfg.get("num_key_value_heads") or heads),
                          tied=bool(cfg.get("tie_word_embeddings", True)))
    except (KeyError, TypeError, ValueError):
        return None


def auto_token_budget(shape: ModelShape, memory_bytes: int, *, lora: bool, gradient_checkpointing: bool) -> int:
    """The tokens one packed micro-batch may hold on a GPU of ``memory_bytes`` (pure; an estimate).

    Static memory: a full fine-tune keeps fp32 weights, gradients and AdamW's two moments (16 bytes a
    parameter) plus autocast's bf16 weight copies (2); LoRA keeps the fp32 frozen weights and their bf16
    copies (6). What is left of 85% of the card, less 2 GiB for the CUDA context, workspaces and
    fragmentation, goes to activations. The result is a multiple of 1024 between MIN_AUTO_TOKEN_BUDGET and
    CUDA_DEFAULT_TOKEN_BUDGET. If the estimate is off, the first steps' out-of-memory halves it.
    """
    static = shape.params * (6 if lora else 18)
    free = 0.85 * memory_bytes - 2 * 2**30 - static
    per_token = shape.activation_bytes_per_token(gradient_checkpointing)
    tokens = int(free // per_token) if free > 0 else 0
    return max(MIN_AUTO_TOKEN_BUDGET, min(CUDA_DEFAULT_TOKEN_BUDGET, tokens // 1024 * 1024))


def default_params() -> dict[str, Any]:
    return {k: v.get("default") for k, v in PARAMS_SCHEMA["properties"].items()}


def resolve_params(params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Defaults filled in and the values checked.

    The spec schema already validates them; this second check exists because a target can also be called
    from Python, and a misspelled key that is silently ignored trains the wrong model.
    """
    params = dict(params or {})
    known = PARAMS_SCHEMA["properties"]
    unknown = sorted(set(params) - set(known))
    if unknown:
        from specdsl.errors import did_you_mean

        hint = did_you_mean(unknown[0], known)
        raise RunError(f"unknown training parameter(s): {', '.join(unknown)}", hint=hint)
    out = default_params()
    out.update(params)

    def bad(key: str, why: str) -> RunError:
        return RunError(f"training parameter {key}={out[key]!r}: {why}")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for key in ("batch_size", "gradient_accumulation", "logging_steps", "processes", "nodes", "zero_stage"):
        if not is_int(out[key]) or out[key] < 1:
            raise bad(key, "must be an integer >= 1")
    for key in ("max_steps", "max_length", "max_tokens_per_batch"):
        if out[key] is not None and (not is_int(out[key]) or out[key] < 1):
            raise bad(key, "must be an integer >= 1 or null")
    if not isinstance(out["epochs"], (int, float)) or isinstance(out["epochs"], bool) or out["epochs"] <= 0:
        raise bad("epochs", "must be a number > 0")
    if out["learning_rate"] is not None and (not isinstance(out["learning_rate"], (int, float))
                                             or out["learning_rate"] <= 0):
        raise bad("learning_rate", "must be a number > 0")
    if not 0 <= float(out["warmup_ratio"]) < 1:
        raise bad("warmup_ratio", "must be in [0, 1)")
    if out["lr_scheduler"] not in LR_SCHEDULERS:
        raise bad("lr_scheduler", f"expected one of {', '.join(LR_SCHEDULERS)}")
    if out["precision"] not in ("auto", "fp32", "bf16"):
        raise bad("precision", "expected auto, fp32 or bf16")
    if out["attn_implementation"] not in ATTN_CHOICES:
        raise bad("attn_implementation", f"expected one of {', '.join(ATTN_CHOICES)}")
    if out["strategy"] not in ("ddp", "fsdp", "deepspeed"):
        raise bad("strategy", "expected ddp, fsdp or deepspeed")
    for key in ("packing", "liger", "padding_free"):
        if out[key] is not None and not isinstance(out[key], bool):
            raise bad(key, "must be true, false or null")
    if out["seed"] is not None and not is_int(out["seed"]):
        raise bad("seed", "must be an integer")
    lora = out["lora"]
    if lora is not None:
        if not isinstance(lora, Mapping):
            raise bad("lora", "must be a mapping such as {r: 16}")
        extra = sorted(set(lora) - set(_LORA_DEFAULTS))
        if extra:
            raise RunError(f"unknown lora option(s): {', '.join(extra)}",
                           hint=f"lora accepts {', '.join(_LORA_DEFAULTS)}")
        merged = {**_LORA_DEFAULTS, **lora}
        if not is_int(merged["r"]) or merged["r"] < 1:
            raise RunError(f"lora.r={merged['r']!r} must be an integer >= 1")
        if not 0 <= float(merged["dropout"]) < 1:
            raise RunError(f"lora.dropout={merged['dropout']!r} must be in [0, 1)")
        tm = merged["target_modules"]
        if tm != "all-linear" and not (isinstance(tm, (list, tuple)) and tm and all(isinstance(x, str) for x in tm)):
            raise RunError(f"lora.target_modules={tm!r} must be 'all-linear' or a list of module names")
        merged["target_modules"] = tm if isinstance(tm, str) else list(tm)
        if merged["alpha"] is None:
            merged["alpha"] = 2 * merged["r"]
        out["lora"] = merged
    if out["learning_rate"] is None:
        out["learning_rate"] = 2e-4 if lora is not None else 2e-5
    return out


# --------------------------------------------------------------------------------------------------
# The dataset: checked with pyarrow before any model is loaded, so a bad table fails in a second
# --------------------------------------------------------------------------------------------------


@dataclass
class DataStats:
    rows: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    longest: int = 0
    fully_masked_rows: int = 0       # rows with no trained token: dropped (they cost compute, add no loss)
    rows_over_max_length: int = 0    # cut to max_length (keep the start)
    padded_positions: int = 0        # attention_mask == 0 positions: removed before training
    has_attention_mask: bool = False
    max_length: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _model_config(base_model: Path) -> dict[str, Any]:
    """config.json of a model folder, without importing transformers. A composite model's language-model
    settings (``text_config``) fill in what the top level does not say."""
    cfg_path = Path(base_model) / "config.json"
    if not Path(base_model).is_dir() or not cfg_path.is_file():
        raise RunError(f"base model {base_model} is not a Hugging Face model directory (no config.json)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot read {cfg_path}: {exc}") from exc
    if not isinstance(cfg, dict):
        raise RunError(f"cannot read {cfg_path}: not a JSON object")
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    return {**text, **{k: v for k, v in cfg.items() if v is not None}}


def _vocab_and_context(config: Mapping[str, Any]) -> tuple[int | None, int | None]:
    vocab, ctx = config.get("vocab_size"), config.get("max_position_embeddings")
    return (int(vocab) if vocab else None, int(ctx) if ctx else None)


def inspect_dataset(path: Path, *, vocab_size: int | None = None, max_length: int | None = None) -> DataStats:
    """Check the Parquet table a target trains on and count what the card reports.

    Streams record batches, so a large table is checked in bounded memory. Every problem is a RunError
    naming the file and, where one row is at fault, its index.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise RunError(f"training dataset {path} does not exist")
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise RunError(f"training dataset {path} is not a readable Parquet file: {exc}") from exc
    schema = pf.schema_arrow
    missing = [c for c in ("input_ids", "labels") if c not in schema.names]
    if missing:
        raise RunError(
            f"training dataset {path} lacks column(s) {', '.join(missing)} (has: {', '.join(schema.names) or 'none'})",
            hint="a train step needs pre-tokenized samples: input_ids and labels (-100 = no loss), "
                 "as the tokenize step writes them")
    cols = ["input_ids", "labels"]
    if "attention_mask" in schema.names:
        cols.append("attention_mask")
    for c in cols:
        t = schema.field(c).type
        if not ((pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t))
                and pa.types.is_integer(t.value_type)):
            raise RunError(f"training dataset {path}: column {c} has type {t}, expected a list of integers")

    stats = DataStats(has_attention_mask="attention_mask" in cols, max_length=max_length)
    offset = 0
    for batch in pf.iter_batches(batch_size=2048, columns=cols):
        n = batch.num_rows
        ids, labels = batch.column("input_ids"), batch.column("labels")
        for name, col in (("input_ids", ids), ("labels", labels)):
            if col.null_count:
                row = offset + int(np.flatnonzero(np.asarray(col.is_null()))[0])
                raise RunError(f"training dataset {path}: row {row} has no {name} (null)")
        lens = np.asarray(pc.list_value_length(ids), dtype=np.int64)
        llens = np.asarray(pc.list_value_length(labels), dtype=np.int64)
        bad = np.flatnonzero(lens != llens)
        if bad.size:
            r = int(bad[0])
            raise RunError(f"training dataset {path}: row {offset + r} has {lens[r]} input_ids but "
                           f"{llens[r]} labels", hint="labels must align one to one with input_ids")
        empty = np.flatnonzero(lens == 0)
        if empty.size:
            raise RunError(f"training dataset {path}: row {offset + int(empty[0])} is empty (no tokens)")
        flat_ids = np.asarray(pc.list_flatten(ids), dtype=np.int64)
        flat_labels = np.asarray(pc.list_flatten(labels), dtype=np.int64)
        keep = np.ones(flat_ids.shape, dtype=bool)
        if stats.has_attention_mask:
            am = batch.column("attention_mask")
            alens = np.asarray(pc.list_value_length(am), dtype=np.int64)
            bad = np.flatnonzero(alens != lens)
            if bad.size:
                r = int(bad[0])
                raise RunError(f"training dataset {path}: row {offset + r} has {lens[r]} input_ids but "
                               f"{alens[r]} attention_mask values")
            keep = np.asarray(pc.list_flatten(am), dtype=np.int64) != 0
            stats.padded_positions += int((~keep).sum())
        if vocab_size is not None and flat_ids.size:
            lo, hi = int(flat_ids.min()), int(flat_ids.max())
            if lo < 0 or hi >= vocab_size:
                raise RunError(f"training dataset {path}: token id {hi if hi >= vocab_size else lo} is outside "
                               f"the model's vocabulary (size {vocab_size})",
                               hint="the dataset was tokenized with another tokenizer than the base model's")
        trained = (flat_labels != -100) & keep
        if vocab_size is not None and trained.any():
            lab = flat_labels[trained]
            if int(lab.min()) < 0 or int(lab.max()) >= vocab_size:
                raise RunError(f"training dataset {path}: a label outside the vocabulary (size {vocab_size}) "
                               "and not -100")
        parents = np.repeat(np.arange(n), lens)
        kept_len = np.bincount(parents[keep], minlength=n) if stats.has_attention_mask else lens
        per_row_trained = np.bincount(parents[trained], minlength=n)
        if max_length is not None:
            # Trained tokens past the cut are lost: count rows whose every trained token lies past it.
            pos = np.arange(flat_ids.size) - np.repeat(np.cumsum(lens) - lens, lens)
            if stats.has_attention_mask:  # positions count kept tokens only
                kept_cum = np.cumsum(keep) - 1
                row_start = np.repeat(np.concatenate(([0], np.cumsum(kept_len)[:-1])), lens)
                pos = kept_cum - row_start
            per_row_trained = np.bincount(parents[trained & (pos < max_length)], minlength=n)
            stats.rows_over_max_length += int((kept_len > max_length).sum())
        stats.rows += n
        stats.tokens += int(np.minimum(kept_len, max_length).sum() if max_length else kept_len.sum())
        stats.trained_tokens += int(per_row_trained.sum())
        stats.longest = max(stats.longest, int(np.minimum(kept_len, max_length or 1 << 62).max()))
        stats.fully_masked_rows += int((per_row_trained == 0).sum())
        offset += n
    if stats.rows == 0:
        raise RunError(f"training dataset {path} is empty (0 rows)",
                       hint="an upstream filter step may have removed every row")
    if stats.trained_tokens == 0:
        cut = f" within max_length={max_length}" if max_length else ""
        raise RunError(f"training dataset {path}: every label is -100{cut}: there is nothing to train on",
                       hint="check the loss/mask policy of the step that produced the dataset")
    return stats


# --------------------------------------------------------------------------------------------------
# What the machine offers, and what each target chooses from it
# --------------------------------------------------------------------------------------------------


def detect_capabilities() -> dict[str, Any]:
    """What is installed and usable here; the fast path chooses only from this."""
    import torch
    import transformers
    import trl

    caps: dict[str, Any] = {
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
        "cuda": bool(torch.cuda.is_available()), "device_name": None, "capability": None, "bf16": False,
        "memory_bytes": None, "flash_attention_3": False, "flash_attention_2": False, "flex_attention": False,
        "liger": importlib.util.find_spec("liger_kernel") is not None,
    }
    if caps["cuda"]:
        caps["device_name"] = torch.cuda.get_device_name(0)
        caps["capability"] = list(torch.cuda.get_device_capability(0))
        caps["bf16"] = bool(torch.cuda.is_bf16_supported())
        caps["memory_bytes"] = int(torch.cuda.get_device_properties(0).total_memory)
    try:
        from transformers.utils import import_utils as iu

        # transformers' own checks also verify the distribution name (flash-attn vs flash-attn-3/4 share
        # module names), so a wrong package never gets picked.
        caps["flash_attention_2"] = bool(getattr(iu, "is_flash_attn_2_available", lambda: False)())
        caps["flash_attention_3"] = bool(getattr(iu, "is_flash_attn_3_available", lambda: False)())
        caps["flex_attention"] = bool(getattr(iu, "is_torch_flex_attn_available", lambda: False)())
    except Exception:  # an odd transformers build: fall back to sdpa rather than fail the run
        log.debug("attention capability probe failed", exc_info=True)
    return caps


def plan_settings(params: Mapping[str, Any], device: str, caps: Mapping[str, Any],
                  shape: ModelShape | None = None) -> dict[str, Any]:
    """The concrete settings a target trains with, and why (pure: tested with any ``caps``).

    ``device`` is "cpu" or "cuda"; ``shape`` (the base model's) sizes the cuda token budget against
    ``caps["memory_bytes"]``. Returns a dict with attn_implementation, liger, bf16, packing, padding_free,
    torch_compile, gradient_checkpointing, max_tokens_per_batch, budget_auto and a list of reasons.
    """
    why: list[str] = []
    cuda = device == "cuda"
    if cuda and not caps.get("cuda"):
        raise RunError("the cuda training target needs a CUDA GPU, and torch sees none",
                       hint="use target: cpu, or target: auto to pick cuda only when it is there")

    # Precision: bf16 mixed precision (fp32 master weights) where the GPU supports it.
    if params["precision"] == "bf16":
        if cuda and not caps.get("bf16"):
            raise RunError("precision: bf16 needs a GPU with bfloat16 support (Ampere or newer)")
        bf16 = True
    elif params["precision"] == "fp32":
        bf16 = False
    else:
        bf16 = bool(cuda and caps.get("bf16"))
    why.append(f"precision {'bf16 mixed (fp32 master weights)' if bf16 else 'fp32'}"
               + (" (auto)" if params["precision"] == "auto" else ""))

    packing = params["packing"] if params["packing"] is not None else cuda
    budget = params["max_tokens_per_batch"]
    if budget is not None and not packing:
        raise RunError("max_tokens_per_batch needs packing: true (a token budget fills packed batches)")
    budget_auto = bool(packing and budget is None and cuda)
    budget_why = ""
    if budget_auto:
        memory = caps.get("memory_bytes")
        if shape is not None and memory:
            budget = auto_token_budget(shape, int(memory), lora=params["lora"] is not None,
                                       gradient_checkpointing=bool(params["gradient_checkpointing"]))
            budget_why = (f" (sized for a {shape.params / 1e6:,.0f}M-parameter model on "
                          f"{int(memory) / 2**30:.0f} GiB; halved if the first steps run out of memory)")
        else:
            budget = CUDA_DEFAULT_TOKEN_BUDGET
            budget_why = " (default; halved if the first steps run out of memory)"
    # On cuda every batch is padding-free by default: samples are concatenated with position_ids restarting
    # at 0, and no compute is spent on pad tokens. TRL's bfd packing always implies it.
    padding_free = params["padding_free"]
    if padding_free is None:
        padding_free = bool(packing or cuda)
    elif packing and not padding_free:
        raise RunError("packing: true needs padding-free batches (TRL's bfd packing is padding-free)",
                       hint="drop padding_free: false, or set packing: false")
    if packing:
        why.append("bfd packing into padding-free batches "
                   + (f"of <= {budget} tokens{budget_why}" if budget else "of batch_size x longest-sample tokens"))
    elif padding_free:
        why.append(f"padding-free batches of {params['batch_size']} samples")
    else:
        why.append(f"padded batches of {params['batch_size']} samples")

    # Attention. Padding-free batches must not attend across samples: flash attention gets the sample
    # boundaries as cu_seq_lens from TRL's collator; sdpa, eager and flex rebuild a block-diagonal causal
    # mask from the restarting position_ids (transformers 5 masking_utils.find_packed_sequence_indices).
    # sdpa then uses a dense L x L mask and computes every block, flex skips the masked blocks, flash
    # attention runs variable-length kernels: prefer them in that order when installed.
    attn = params["attn_implementation"]
    if attn == "auto":
        if not cuda:
            attn = "sdpa"
            why.append("attention sdpa (cpu)")
        else:
            cap = caps.get("capability") or [0, 0]
            if caps.get("flash_attention_3") and cap[0] == 9:
                attn = "flash_attention_3"
                why.append("attention flash_attention_3 (installed, Hopper GPU)")
            elif caps.get("flash_attention_2"):
                attn = "flash_attention_2"
                why.append("attention flash_attention_2 (flash-attn installed)")
            elif caps.get("flex_attention") and padding_free:
                attn = "flex_attention"
                why.append("attention flex_attention (no flash-attn installed; block-sparse mask skips "
                           "cross-sample blocks that sdpa would compute)")
            else:
                attn = "sdpa"
                why.append("attention sdpa (no flash-attn or flex attention available)")
    else:
        if attn in ("flash_attention_2", "flash_attention_3", "flex_attention") and not caps.get(attn):
            raise RunError(f"attn_implementation: {attn} is not available here",
                           hint="install it or leave attn_implementation: auto")
        if (attn.startswith("flash") or attn == "flex_attention") and not cuda:
            # flash attention is CUDA-only; torch's flex attention has no backward pass on the CPU.
            raise RunError(f"attn_implementation: {attn} needs the cuda target")
        why.append(f"attention {attn} (requested)")

    liger = params["liger"]
    if liger is None:
        liger = bool(cuda and caps.get("liger"))
        why.append("liger kernels on (installed)" if liger else
                   ("liger kernels off (liger_kernel not installed)" if cuda else "liger kernels off (cpu)"))
    elif liger:
        if not cuda:
            raise RunError("liger: true needs the cuda target (Liger's kernels are Triton GPU kernels)")
        if not caps.get("liger"):
            raise RunError("liger: true but liger_kernel is not installed", hint="pip install liger-kernel")
        why.append("liger kernels on (requested)")
    if cuda:
        # TRL 1.16 refuses Liger's fused linear cross-entropy in SFTTrainer because it already computes the
        # loss with its own fused, chunked LM head (no (tokens x vocab) logits); Liger adds the layer kernels.
        why.append("loss through TRL's fused chunked LM head (never materialises the logits)")
    if params["torch_compile"]:
        why.append("torch.compile on (requested)")
    if params["gradient_checkpointing"]:
        why.append("gradient checkpointing on (requested)")
    return {
        "device": device, "bf16": bf16, "packing": bool(packing), "padding_free": padding_free,
        "max_tokens_per_batch": budget, "budget_auto": budget_auto, "attn_implementation": attn,
        "liger": bool(liger),
        "torch_compile": bool(params["torch_compile"]),
        "gradient_checkpointing": bool(params["gradient_checkpointing"]),
        "reasons": why,
    }


# --------------------------------------------------------------------------------------------------
# accelerate configuration for processes > 1 / nodes > 1
# --------------------------------------------------------------------------------------------------


def accelerate_config(params: Mapping[str, Any], device: str, *, bf16: bool, machine_rank: int = 0,
                      main_process_ip: str | None = None) -> dict[str, Any]:
    """The ``accelerate launch`` config for a multi-process run (pure; written to accelerate_config.yaml).

    ``num_processes`` is the total over all machines (accelerate's meaning): processes x nodes.
    """
    procs, nodes, strategy = params["processes"], params["nodes"], params["strategy"]
    if device == "cpu" and strategy != "ddp":
        raise RunError(f"strategy: {strategy} needs the cuda target; on cpu only ddp (gloo) is supported")
    cfg: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "num_processes": procs * nodes,
        "num_machines": nodes,
        "machine_rank": machine_rank,
        "mixed_precision": "bf16" if bf16 else "no",
        "use_cpu": device == "cpu",
        "gpu_ids": "all",
        "rdzv_backend": "static",
        "same_network": True,
        "main_training_function": "main",
        "downcast_bf16": "no",
        "debug": False,
    }
    if nodes > 1:
        if not main_process_ip:
            raise RunError("nodes > 1 needs the address of machine 0",
                           hint="set main_process_ip in the step or SPECDSL_MAIN_PROCESS_IP on every node")
        cfg["main_process_ip"] = main_process_ip
        cfg["main_process_port"] = params["main_process_port"] or 29500
    else:
        # 0 = accelerate picks a free port: parallel runs (tests, other users) on one machine don't collide.
        cfg["main_process_port"] = params["main_process_port"] or 0
    if device == "cpu":
        cfg["distributed_type"] = "MULTI_CPU"
    elif strategy == "ddp":
        cfg["distributed_type"] = "MULTI_GPU"
    elif strategy == "fsdp":
        cfg["distributed_type"] = "FSDP"
        cfg["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # wraps the model's _no_split_modules
            "fsdp_reshard_after_forward": True,
            "fsdp_offload_params": False,
            "fsdp_cpu_ram_efficient_loading": True,
            # FULL_STATE_DICT: the saved output is an ordinary HF model directory, not shards.
            "fsdp_state_dict_type": "FULL_STATE_DICT",
            "fsdp_activation_checkpointing": bool(params["gradient_checkpointing"]),
        }
    else:
        cfg["distributed_type"] = "DEEPSPEED"
        cfg["deepspeed_config"] = {
            "zero_stage": params["zero_stage"],
            "gradient_accumulation_steps": params["gradient_accumulation"],
            "gradient_clipping": params["max_grad_norm"],
            "offload_optimizer_device": "none",
            "offload_param_device": "none",
            # ZeRO-3 shards the weights: gather them at save time so the output is a plain model directory.
            "zero3_init_flag": params["zero_stage"] == 3,
            "zero3_save_16bit_model": params["zero_stage"] == 3,
        }
    return cfg


# --------------------------------------------------------------------------------------------------
# Staging and publishing the output directory
# --------------------------------------------------------------------------------------------------


def _staging_dir(output_dir: Path) -> Path:
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    # Beside output_dir (same filesystem, so the final rename is atomic) and hidden, with a name that can
    # never be mistaken for the finished model.
    stage = output_dir.parent / f".{output_dir.name}.specdsl-partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    return stage


def _publish(stage: Path, output_dir: Path) -> None:
    """Rename the finished staging directory to output_dir, replacing an older output if present."""
    output_dir = Path(output_dir)
    old = None
    if output_dir.exists() or output_dir.is_symlink():
        old = output_dir.parent / f".{output_dir.name}.specdsl-old-{uuid.uuid4().hex[:8]}"
        os.replace(output_dir, old)
    os.replace(stage, output_dir)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# The training itself (runs in this process, or in each accelerate worker)
# --------------------------------------------------------------------------------------------------


def _progress_callback_class():
    from transformers import TrainerCallback

    class SpecdslProgress(TrainerCallback):
        """Forwards step, total and loss to the executor's progress function (rank 0 only)."""

        def __init__(self, progress: Callable[[Mapping[str, Any]], None]):
            self.progress = progress
            self.losses: list[tuple[int, float]] = []

        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero:
                self.progress({"step": 0, "total": state.max_steps, "loss": None})

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs and state.is_world_process_zero:
                loss = float(logs["loss"])
                self.losses.append((state.global_step, loss))
                self.progress({"step": state.global_step, "total": state.max_steps, "loss": loss})

    return SpecdslProgress


def _load_training_dataset(path: Path, stats: DataStats, cache_dir: Path):
    """The Parquet table as a datasets.Dataset of input_ids + labels, cleaned as the card reports.

    Positions with attention_mask == 0 are removed (TRL builds its own masks and would otherwise attend to
    them), samples are cut to max_length, and samples without a trained token are dropped.
    """
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_parquet(str(path), cache_dir=str(cache_dir))
    max_length = stats.max_length
    needs_fix = stats.padded_positions > 0 or (max_length is not None and stats.rows_over_max_length > 0)
    if needs_fix:
        has_mask = stats.has_attention_mask

        def fix(batch):
            out_ids, out_labels = [], []
            masks = batch["attention_mask"] if has_mask else [None] * len(batch["input_ids"])
            for ids, labels, mask in zip(batch["input_ids"], batch["labels"], masks):
                if mask is not None and 0 in mask:
                    ids = [t for t, m in zip(ids, mask) if m]
                    labels = [t for t, m in zip(labels, mask) if m]
                if max_length is not None:
                    ids, labels = ids[:max_length], labels[:max_length]
                out_ids.append(ids)
                out_labels.append(labels)
            return {"input_ids": out_ids, "labels": out_labels}

        ds = ds.map(fix, batched=True, batch_size=512)
    ds = ds.select_columns(["input_ids", "labels"])
    if stats.fully_masked_rows:
        ds = ds.filter(lambda b: [any(t != -100 for t in row) for row in b["labels"]], batched=True)
    return ds


def _build_trainer(*, base_model: Path, dataset, params: Mapping[str, Any], settings: Mapping[str, Any],
                   stats: DataStats, seed: int, scratch: Path, callbacks: Sequence[Any] = (),
                   model=None, tokenizer=None):
    """An SFTTrainer configured from resolved params + planned settings. Used by train() and the bench.

    ``model``/``tokenizer`` may be given (the benchmark builds a random-init model in memory); otherwise
    they are loaded from ``base_model``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    cuda = settings["device"] == "cuda"
    bf16 = settings["bf16"]
    packing = settings["packing"]
    if packing:
        # One packed row holds the micro-batch's token budget (padding-free: rows are concatenated anyway,
        # and longer rows pack tighter). A row is never shorter than the longest sample, so bfd packing never
        # cuts a sample (we already cut them to max_length, and counted it).
        budget = settings["max_tokens_per_batch"] or params["batch_size"] * stats.longest
        row_len = max(budget, stats.longest)
        per_device_batch = 1
    else:
        row_len = None
        per_device_batch = params["batch_size"]

    lora = params["lora"]
    peft_config = None
    if lora is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                 # "all-linear" leaves out the output layer, as TRL 1.16 requires (its fused
                                 # LM head reads lm_head.weight directly, so an adapter there never trains).
                                 target_modules=lora["target_modules"], task_type="CAUSAL_LM")

    pad_multiple = None
    if settings["attn_implementation"] == "flex_attention" or settings["torch_compile"]:
        # Compiled kernels (flex attention always is) specialise on shapes: padding each packed batch to the
        # full token budget gives one shape and one compilation. The pad tokens sit at position 0 with label
        # -100, each its own one-token sequence, so they attend to nothing real and add no loss; bfd fills
        # rows well, so little compute is lost. Without packing, a multiple of flex's 128-token block.
        pad_multiple = row_len if packing else 128
    optim = "adamw_torch_fused" if cuda else "adamw_torch"
    cfg = dict(
        output_dir=str(scratch / "trainer"),
        num_train_epochs=float(params["epochs"]),
        max_steps=params["max_steps"] or -1,
        learning_rate=float(params["learning_rate"]),
        per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=params["gradient_accumulation"],
        lr_scheduler_type=params["lr_scheduler"],
        warmup_steps=float(params["warmup_ratio"]),  # transformers 5: a float < 1 is a ratio of the steps
        weight_decay=float(params["weight_decay"]),
        max_grad_norm=float(params["max_grad_norm"]),
        logging_steps=params["logging_steps"],
        seed=seed,
        data_seed=seed,
        bf16=bf16,
        fp16=False,
        tf32=bool(cuda and (settings.get("capability") or [8])[0] >= 8) or None,
        use_cpu=not cuda,
        ddp_find_unused_parameters=False,
        optim=optim,
        gradient_checkpointing=settings["gradient_checkpointing"],
        torch_compile=settings["torch_compile"],
        use_liger_kernel=settings["liger"],
        # Pre-tokenized data: TRL keeps our labels. max_length is the packing row length when packing;
        # otherwise None, since samples were already cut (TRL rejects max_length with padding_free and no
        # packing, and would re-scan the table for nothing).
        max_length=row_len,
        packing=packing,
        packing_strategy="bfd",
        padding_free=settings["padding_free"],
        pad_to_multiple_of=pad_multiple,
        completion_only_loss=False,
        assistant_only_loss=False,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=True,
    )
    import dataclasses

    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    if "warmup_ratio" in fields:  # transformers < 5.2x; later ones take a float < 1 in warmup_steps
        cfg["warmup_ratio"] = cfg.pop("warmup_steps")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars are noise in an executor's output
    with warnings.catch_warnings():
        # transformers 5.2x renames gradient_checkpointing; TRL 1.16's config still defines the old field.
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
        args = SFTConfig(**cfg)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(str(base_model))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(
            str(base_model), dtype=torch.float32, attn_implementation=settings["attn_implementation"])
    else:
        model.set_attn_implementation(settings["attn_implementation"])
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=list(callbacks))
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    # Progress goes through the executor's callback; the printers would only add noise to its output.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def train_worker(*, base_model: Path, dataset: Path, stage: Path, params: Mapping[str, Any],
                 settings: Mapping[str, Any], stats: DataStats, seed: int,
                 progress: Callable[[Mapping[str, Any]], None], callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train and save into ``stage`` (the model, or the adapter; the adapter goes to stage/.scratch/adapter
    when it will be merged). Runs in every process of a distributed run; returns metrics (rank 0's count).
    """
    scratch = stage / ".scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    from transformers import set_seed

    set_seed(seed)
    from accelerate import PartialState

    state = PartialState(cpu=settings["device"] == "cpu")
    with state.main_process_first():
        ds = _load_training_dataset(dataset, stats, scratch / f"datasets-{state.process_index}")
    import torch

    settings = dict(settings)
    oom_retries: list[dict[str, int]] = []
    while True:
        progress_cb = _progress_callback_class()(progress)
        trainer = _build_trainer(base_model=base_model, dataset=ds, params=params, settings=settings, stats=stats,
                                 seed=seed, scratch=scratch, callbacks=[progress_cb, *callbacks])
        t0 = time.time()
        smaller = None
        try:
            out = trainer.train()
            break
        except torch.OutOfMemoryError as exc:
            budget, step = settings["max_tokens_per_batch"], trainer.state.global_step
            smaller = _smaller_budget(settings, stats, step, state.num_processes)
            if smaller is None:
                raise RunError(f"out of memory while training on {settings['device']}: {str(exc).splitlines()[0]}",
                               hint="lower max_tokens_per_batch (or batch_size), or set gradient_checkpointing: true"
                               ) from exc
        # Outside the except block, so the traceback's frames no longer hold the failed step's tensors.
        log.warning("out of memory at step %d with %d-token batches; starting again with %d", step, budget, smaller)
        oom_retries.append({"step": step, "max_tokens_per_batch": budget})
        _release(trainer)
        del trainer
        settings["max_tokens_per_batch"] = smaller
    runtime = time.time() - t0
    lora = params["lora"]
    save_to = scratch / "adapter" if (lora and lora["merge"]) else stage
    trainer.save_model(str(save_to))
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(str(save_to))
        (save_to / "training_args.bin").unlink(missing_ok=True)  # a pickle, not part of a model directory
    hist = trainer.state.log_history
    metrics = {
        "global_step": int(out.global_step),
        "train_loss": float(out.training_loss),
        "first_loss": progress_cb.losses[0][1] if progress_cb.losses else None,
        "last_loss": progress_cb.losses[-1][1] if progress_cb.losses else None,
        "losses": progress_cb.losses,
        "runtime_s": round(runtime, 3),
        "train_tokens": next((h["num_tokens"] for h in reversed(hist) if "num_tokens" in h), None),
        "world_size": state.num_processes,
        "max_tokens_per_batch": settings["max_tokens_per_batch"],
        "oom_retries": oom_retries,
    }
    if trainer.is_world_process_zero():
        (scratch / "metrics.json").write_text(json.dumps(metrics))
    if trainer.is_world_process_zero():
        progress({"step": int(out.global_step), "total": int(trainer.state.max_steps), "loss": metrics["last_loss"]})
    return metrics


def _smaller_budget(settings: Mapping[str, Any], stats: DataStats, step: int, processes: int) -> int | None:
    """The token budget to start again with after running out of memory, or None to give up.

    Only a budget we chose ourselves is halved, only in a single process (a worker of a distributed run
    cannot restart alone), and only within the first OOM_RETRY_STEPS steps: bfd packing fills every batch
    to about the budget, so memory peaks at once, and a later failure would throw away real training.
    """
    budget = settings.get("max_tokens_per_batch")
    if not (settings.get("budget_auto") and budget and processes == 1 and step < OOM_RETRY_STEPS):
        return None
    smaller = max(budget // 2, MIN_AUTO_TOKEN_BUDGET)
    # A packed row is never shorter than the longest sample: past that, halving changes nothing.
    if max(smaller, stats.longest) >= max(budget, stats.longest):
        return None
    return smaller


def _release(trainer: Any) -> None:
    """Give the failed attempt's GPU memory back before the next one loads its model."""
    import gc

    import torch

    free_memory = getattr(trainer.accelerator, "free_memory", None)
    if callable(free_memory):
        free_memory()
    trainer.model = trainer.model_wrapped = trainer.optimizer = trainer.lr_scheduler = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _merge_adapter(base_model: Path, adapter_dir: Path, out_dir: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    base = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(out_dir))
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(str(out_dir))


def _model_card(request: TrainRequest, target: str, params: Mapping[str, Any], settings: Mapping[str, Any],
                stats: DataStats, metrics: Mapping[str, Any], kind: str, launch: Mapping[str, Any] | None) -> str:
    card = dict(request.card or {})
    spec = card.pop("spec", None) or card.pop("spec_name", None) or card.pop("name", None) or "(unnamed spec)"
    fingerprint = card.pop("data_fingerprint", None) or card.pop("fingerprint", None) or "(not given)"
    mask = card.pop("mask_policy", None) or card.pop("loss", None) or "(not given)"
    step = card.pop("step", None)
    fm = ["---", "library_name: " + ("peft" if kind == "adapter" else "transformers"),
          f"base_model: {json.dumps(str(request.base_model))}", "tags:", "  - specdsl", "  - trl", "  - sft"]
    if kind == "adapter":
        fm.append("  - lora")
    fm.append("---")
    lines = fm + [
        "",
        f"# {spec}" + (f" / {step}" if step else ""),
        "",
        "Fine-tuned by [specdsl](https://pypi.org/project/specdsl/) from a data-design spec, with TRL's "
        f"SFTTrainer on the `{target}` training target. This directory is "
        + {"model": "a full Hugging Face model.",
           "adapter": "a LoRA adapter (load it with peft on top of the base model).",
           "merged": "a full model: the trained LoRA adapter merged into the base weights."}[kind],
        "",
        "## Data",
        "",
        f"- spec: `{spec}`",
        f"- data fingerprint: `{fingerprint}`",
        f"- mask policy: {mask}",
        f"- samples: {stats.rows - stats.fully_masked_rows} trained ({stats.rows} in the table; "
        f"{stats.fully_masked_rows} without a trained token dropped)",
        f"- tokens: {stats.tokens} ({stats.trained_tokens} with loss, "
        f"{(100.0 * stats.trained_tokens / max(stats.tokens, 1)):.1f}%)",
        f"- longest sample: {stats.longest} tokens; cut at max_length {stats.max_length}: "
        f"{stats.rows_over_max_length} samples",
    ]
    if stats.padded_positions:
        lines.append(f"- padding positions removed (attention_mask 0): {stats.padded_positions}")
    for k, v in card.items():
        lines.append(f"- {k}: {v}")
    lines += [
        "",
        "Loss is taken only on tokens whose label is not -100, exactly as the dataset gives them: the "
        "table was pre-tokenized and TRL did not re-tokenize, re-template or re-mask it.",
        "",
        "## Training",
        "",
        f"- base model: `{request.base_model}`",
        f"- target: {target} ({settings['device']}), processes: {params['processes']} x nodes: {params['nodes']}"
        + (f", strategy: {params['strategy']}" if launch else ""),
        "- choices: " + "; ".join(settings["reasons"]),
        f"- epochs: {params['epochs']}, max_steps: {params['max_steps']}, learning rate: "
        f"{params['learning_rate']} ({params['lr_scheduler']}, warmup ratio {params['warmup_ratio']}), "
        f"batch size: {params['batch_size']} x accumulation {params['gradient_accumulation']}, "
        f"seed: {metrics.get('seed')}",
    ]
    if params["lora"]:
        lo = params["lora"]
        lines.append(f"- LoRA: r={lo['r']}, alpha={lo['alpha']}, dropout={lo['dropout']}, "
                     f"target_modules={lo['target_modules']}, merged={lo['merge']}")
    lines += [
        f"- steps: {metrics.get('global_step')}, loss: first {metrics.get('first_loss')}, last "
        f"{metrics.get('last_loss')}, mean {metrics.get('train_loss')}",
        f"- wall time: {metrics.get('runtime_s')} s; versions: torch {settings.get('versions', {}).get('torch')}, "
        f"transformers {settings.get('versions', {}).get('transformers')}, trl "
        f"{settings.get('versions', {}).get('trl')}",
        "- weights are saved in float32 (the master precision of training).",
        "",
        "## Load",
        "",
        "```python",
    ]
    if kind == "adapter":
        lines += ["from peft import AutoPeftModelForCausalLM",
                  "model = AutoPeftModelForCausalLM.from_pretrained(PATH_TO_THIS_DIR)"]
    else:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained(PATH_TO_THIS_DIR)",
                  "tokenizer = AutoTokenizer.from_pretrained(PATH_TO_THIS_DIR)"]
    lines += ["```", ""]
    if launch:
        lines += ["## Distributed launch", "",
                  f"Launched with `accelerate launch` ({launch['num_processes']} processes on "
                  f"{launch['num_machines']} machine(s)); the config is `accelerate_config.yaml` in this "
                  "directory.", ""]
    return "\n".join(lines)


def _finalize(request: TrainRequest, target: str, params: Mapping[str, Any], settings: Mapping[str, Any],
              stats: DataStats, stage: Path, metrics: dict[str, Any], launch: Mapping[str, Any] | None) -> None:
    lora = params["lora"]
    kind = "model"
    if lora:
        kind = "merged" if lora["merge"] else "adapter"
        if lora["merge"]:
            _merge_adapter(request.base_model, stage / ".scratch" / "adapter", stage)
    shutil.rmtree(stage / ".scratch", ignore_errors=True)
    if not (stage / "config.json").is_file() and not (stage / "adapter_config.json").is_file():
        raise RunError(f"training finished but wrote no model into {stage}")
    # Written last and over any card peft wrote: ours names the spec, data and mask policy.
    (stage / "README.md").write_text(_model_card(request, target, params, settings, stats, metrics, kind, launch),
                                     encoding="utf-8")
    record = {
        "specdsl_target": target, "target_version": TARGET_VERSION, "kind": kind,
        "base_model": str(request.base_model), "dataset": str(request.dataset),
        "card": dict(request.card or {}), "params": dict(params), "settings": dict(settings),
        "data": stats.as_dict(), "metrics": metrics, "launch": dict(launch) if launch else None,
    }
    (stage / "specdsl_train.json").write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# Multi-process launch through accelerate
# --------------------------------------------------------------------------------------------------


def _launch_distributed(request: TrainRequest, *, params: Mapping[str, Any], settings: Mapping[str, Any],
                        stats: DataStats, seed: int, stage: Path,
                        progress: Callable[[Mapping[str, Any]], None]) -> tuple[dict[str, Any], dict[str, Any]]:
    import yaml

    device = settings["device"]
    if params["strategy"] == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise RunError("strategy: deepspeed needs the deepspeed package", hint="pip install deepspeed")
    machine_rank = int(os.environ.get("SPECDSL_MACHINE_RANK", "0"))
    ip = params["main_process_ip"] or os.environ.get("SPECDSL_MAIN_PROCESS_IP")
    cfg = accelerate_config(params, device, bf16=settings["bf16"], machine_rank=machine_rank, main_process_ip=ip)
    cfg_path = stage / "accelerate_config.yaml"
    cfg_path.write_text("# Generated by specdsl for this training run; kept so the run can be inspected.\n"
                        + yaml.safe_dump(cfg, sort_keys=True), encoding="utf-8")
    scratch = stage / ".scratch"
    scratch.mkdir(exist_ok=True)
    req_path = scratch / "request.json"
    req_path.write_text(json.dumps({
        "base_model": str(request.base_model), "dataset": str(request.dataset), "stage": str(stage),
        "params": dict(params), "settings": dict(settings), "stats": stats.as_dict(), "seed": seed,
    }, default=str), encoding="utf-8")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg_path)]
    if device == "cpu":
        # accelerate starts local worker processes only through its torchrun launcher (the --multi_gpu path;
        # its plain CPU path spawns one process unless mpirun is configured). use_cpu/ACCELERATE_USE_CPU keep
        # every worker on the CPU, where PartialState picks DDP over gloo.
        cmd.append("--multi_gpu")
    cmd += ["-m", "specdsl.training.worker", str(req_path)]
    env = dict(os.environ)
    import specdsl

    pkg_root = str(Path(specdsl.__file__).resolve().parents[1])  # the folder that holds the specdsl package
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    if device == "cpu":
        env["ACCELERATE_USE_CPU"] = "true"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // params["processes"])))
    launch = {"command": cmd, "config": cfg, "num_processes": cfg["num_processes"],
              "num_machines": cfg["num_machines"], "machine_rank": machine_rank}
    log.info("launching: %s", " ".join(cmd))
    log_path = stage / "train.log"
    error: dict[str, Any] | None = None
    tail: list[str] = []
    with open(log_path, "w", encoding="utf-8") as logf:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                bufsize=1)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(WORKER_MARK):
                    try:
                        msg = json.loads(line[len(WORKER_MARK):])
                    except ValueError:
                        msg = {}
                    if msg.get("event") == "progress":
                        progress(msg["data"])
                        continue
                    if msg.get("event") == "error":
                        error = msg
                logf.write(line)
                tail.append(line)
                del tail[:-40]
            rc = proc.wait()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    if rc != 0:
        if error is not None:
            raise RunError(error.get("message", "a training worker failed"), hint=error.get("hint"))
        raise RunError(f"distributed training failed (accelerate launch exited with {rc})",
                       hint="last lines of the log:\n" + "".join(tail[-15:]))
    metrics_path = scratch / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    return metrics, launch


# --------------------------------------------------------------------------------------------------
# The targets
# --------------------------------------------------------------------------------------------------


def run_training(request: TrainRequest, device: str, progress: Callable[[Mapping[str, Any]], None] | None = None,
                 *, callbacks: Sequence[Any] = (), target_name: str | None = None) -> Path:
    """Train ``request`` on ``device`` ("cpu" or "cuda") and return the published output directory."""
    progress = progress or (lambda _event: None)
    params = resolve_params(request.params)
    seed = int(params["seed"] if params["seed"] is not None else request.seed)
    config = _model_config(Path(request.base_model))
    vocab, ctx = _vocab_and_context(config)
    max_length = params["max_length"] or ctx
    stats = inspect_dataset(Path(request.dataset), vocab_size=vocab, max_length=max_length)
    caps = detect_capabilities()
    settings = plan_settings(params, device, caps, model_shape(config))
    settings["capability"] = caps.get("capability")
    settings["device_name"] = caps.get("device_name")
    settings["versions"] = {k: caps[k] for k in ("torch", "transformers", "trl")}
    for reason in settings["reasons"]:
        log.info("%s target: %s", device, reason)
    distributed = params["processes"] * params["nodes"] > 1
    if distributed and callbacks:
        raise RunError("callbacks cannot travel to accelerate worker processes")
    output_dir = Path(request.output_dir)
    try:
        stage = _staging_dir(output_dir)
    except OSError as exc:
        raise RunError(f"cannot write beside the output directory {output_dir}: {exc}") from exc
    try:
        launch = None
        if distributed:
            metrics, launch = _launch_distributed(request, params=params, settings=settings, stats=stats,
                                                  seed=seed, stage=stage, progress=progress)
            if launch["machine_rank"] != 0:
                # Machine 0 writes the output; the other machines only contributed their gradients. Their run
                # ends here: no model exists on this machine for later steps to use, or for a cache to keep.
                shutil.rmtree(stage, ignore_errors=True)
                raise StopRun(f"machine {launch['machine_rank']} of {launch['num_machines']}: this machine's "
                              "share of the training is done; machine 0 writes the model and runs the later steps")
        else:
            metrics = train_worker(base_model=Path(request.base_model), dataset=Path(request.dataset), stage=stage,
                                   params=params, settings=settings, stats=stats, seed=seed, progress=progress,
                                   callbacks=callbacks)
        metrics["seed"] = seed
        if metrics.get("oom_retries"):
            settings["max_tokens_per_batch"] = metrics["max_tokens_per_batch"]
            settings["reasons"].append(f"token budget lowered to {metrics['max_tokens_per_batch']} after running "
                                       f"out of memory ({len(metrics['oom_retries'])} restart(s))")
        _finalize(request, target_name or device, params, settings, stats, stage, metrics, launch)
        _publish(stage, output_dir)
    except BaseException:
        # Whatever stopped us (an error, Ctrl-C), no partial directory is left to look like a model.
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return output_dir


class _TrlTarget(abc.ABC):
    name = "?"
    requires = tuple((module, "train") for module in ("torch", "transformers", "trl", "datasets", "peft", "accelerate"))
    device = "cpu"
    version = TARGET_VERSION
    params_schema = PARAMS_SCHEMA

    @abc.abstractmethod
    def available(self) -> bool:
        """Whether this machine can train on the target's device."""

    def train(self, request: TrainRequest, progress: Callable[[Mapping[str, Any]], None],
              *, callbacks: Sequence[Any] = ()) -> Path:
        """Train and return the output directory. ``callbacks`` (transformers TrainerCallbacks) observe a
        single-process run; they cannot travel to the workers of a multi-process one."""
        return run_training(request, self.device, progress, callbacks=callbacks, target_name=self.name)

    def plan(self, params: Mapping[str, Any] | None = None, base_model: Path | None = None) -> dict[str, Any]:
        """What this target would choose for ``params`` (and ``base_model``) on this machine (imports torch)."""
        shape = model_shape(Path(base_model)) if base_model is not None else None
        return plan_settings(resolve_params(params), self.device, detect_capabilities(), shape)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class CpuTarget(_TrlTarget):
    """Full fine-tune or LoRA on the CPU, fp32, padded batches (or packed with ``packing: true``)."""

    name = "cpu"
    device = "cpu"

    def available(self) -> bool:
        return importlib.util.find_spec("torch") is not None and importlib.util.find_spec("trl") is not None


class CudaTarget(_TrlTarget):
    """The GPU fast path: bf16, padding-free bfd packing by token budget, the best installed attention
    that keeps samples apart (flash attention 3/2 varlen, else flex attention's block mask, else sdpa),
    Liger's layer kernels when installed, TRL's fused LM-head loss, optional torch.compile. It chooses
    only from what is installed, logs each choice and writes them to specdsl_train.json and the card."""

    name = "cuda"
    device = "cuda"

    def available(self) -> bool:
        if importlib.util.find_spec("torch") is None or importlib.util.find_spec("trl") is None:
            return False
        import torch

        return bool(torch.cuda.is_available())


def choose_target(name: str, targets: Iterable[Any] | Mapping[str, Any]):
    """The target a step asked for: by name, or for "auto" cuda when available, else cpu.

    ``targets`` is the registered targets (an iterable, or a mapping of name to target). Raises RunError
    for an unknown name or a named target that is not available on this machine.
    """
    pool = list(targets.values()) if isinstance(targets, Mapping) else list(targets)
    by_name = {t.name: t for t in pool}
    if name == "auto":
        for candidate in ("cuda", "cpu"):
            t = by_name.get(candidate)
            if t is not None and t.available():
                return t
        for t in pool:  # a third-party target, when neither built-in one is there
            if t.available():
                return t
        raise RunError("no training target is available on this machine",
                       hint=f"registered: {', '.join(sorted(by_name)) or 'none'}")
    if name not in by_name:
        from specdsl.errors import did_you_mean

        raise RunError(f"unknown training target {name!r}", hint=did_you_mean(name, list(by_name) + ["auto"]))
    t = by_name[name]
    if not t.available():
        raise RunError(f"training target {name!r} is not available on this machine",
                       hint="use target: auto to fall back to the cpu" if name == "cuda" else None)
    return t


__all__ = [
    "CpuTarget", "CudaTarget", "choose_target", "run_training", "resolve_params", "plan_settings",
    "detect_capabilities", "inspect_dataset", "accelerate_config", "DataStats", "PARAMS_SCHEMA",
    "default_params", "TARGET_VERSION",
]
