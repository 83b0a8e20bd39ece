"""The parameters of a TRL ``train`` step: their JSON Schema, their defaults, and the checks they pass.

:data:`PARAMS_SCHEMA` is what the built-in ``cpu`` and ``cuda`` targets publish as their ``params_schema``
(the ``train`` op builds its part of the spec schema from the registered targets'); :func:`resolve_params`
fills in the defaults and checks the values again for callers that skip the spec (Python, the bench).
"""

from __future__ import annotations

from typing import Any, Mapping

from specdsl.errors import RunError

TARGET_VERSION = "1"

LR_SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay",
)
ATTN_CHOICES = ("auto", "sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")

# The JSON Schema fragment of a train step's parameters beyond the step's own keys (the targets' params_schema).
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
        "batch_size": {"type": "integer", "minimum": 1, "maximum": 65536, "default": 8,
                       "description": "Samples per device per micro-step (padded or padding-free batches). "
                                      "With packing, the token budget is batch_size x longest sample unless "
                                      "max_tokens_per_batch is set."},
        "gradient_accumulation": {"type": "integer", "minimum": 1, "maximum": 65536, "default": 1,
                                  "description": "Micro-steps whose gradients add up to one optimizer step."},
        "max_length": {"type": ["integer", "null"], "minimum": 1, "default": None,
                       "description": "Samples longer than this are cut (keep the start); null = the model's "
                                      "context length (max_position_embeddings, n_positions, ...). Cut samples "
                                      "are counted in the card."},
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
        "lr_scheduler": {"enum": list(LR_SCHEDULERS), "default": "linear",
                         "description": "How the learning rate moves after warmup (transformers' scheduler names)."},
        "warmup_ratio": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": 0.0,
                         "description": "Fraction of the optimizer steps spent raising the learning rate from 0."},
        "weight_decay": {"type": "number", "minimum": 0, "default": 0.0,
                         "description": "AdamW weight decay."},
        "max_grad_norm": {"type": "number", "minimum": 0, "default": 1.0,
                          "description": "Gradients are clipped to this global norm (0 = no clipping)."},
        "logging_steps": {"type": "integer", "minimum": 1, "default": 1,
                          "description": "Steps between the points of the loss curve kept in the metrics and the "
                                         "model card (default: every step; each point the mean since the previous "
                                         "one); progress shows every step's loss."},
        "precision": {"enum": ["auto", "fp32", "bf16"], "default": "auto",
                      "description": "auto = bf16 mixed precision on a GPU that supports it, fp32 on cpu."},
        "attn_implementation": {"enum": list(ATTN_CHOICES), "default": "auto",
                                "description": "auto = sdpa on cpu; on cuda the best installed of "
                                               "flash_attention_3 (Hopper), flash_attention_2, flex_attention, sdpa."},
        "liger": {"type": ["boolean", "null"], "default": None,
                  "description": "Liger Triton kernels (RMSNorm, RoPE, SwiGLU); null = on when liger_kernel "
                                 "is installed and the target is cuda."},
        "gradient_checkpointing": {"type": "boolean", "default": False,
                                   "description": "Recompute activations in the backward pass: less memory, "
                                                  "about a third more compute."},
        "torch_compile": {"type": "boolean", "default": False,
                          "description": "Compile the model with torch.compile (pays a compilation at the start)."},
        "lora": {
            "type": ["object", "null"], "default": None, "additionalProperties": False,
            "description": "Train a LoRA adapter instead of every weight; null = full fine-tune.",
            "properties": {
                "r": {"type": "integer", "minimum": 1, "default": 16, "description": "The adapter's rank."},
                "alpha": {"type": ["number", "null"], "exclusiveMinimum": 0, "default": None,
                          "description": "null = 2 x r."},
                "dropout": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": 0.05,
                            "description": "Dropout on the adapter's input."},
                "target_modules": {"oneOf": [{"const": "all-linear"},
                                             {"type": "array", "items": {"type": "string"}, "minItems": 1}],
                                   "default": "all-linear",
                                   "description": "Modules that get an adapter: all-linear (every linear layer "
                                                  "but the output layer) or a list of module names."},
                "merge": {"type": "boolean", "default": False,
                          "description": "Write a merged full model instead of the adapter."},
            },
        },
        "processes": {"type": "integer", "minimum": 1, "default": 1,
                      "description": "Processes per node; > 1 runs through accelerate launch."},
        "nodes": {"type": "integer", "minimum": 1, "default": 1,
                  "description": "Machines (accelerate num_machines); run the step on every node."},
        "strategy": {"enum": ["ddp", "fsdp", "deepspeed"], "default": "ddp",
                     "description": "How several processes share the work: data parallel (ddp), sharded "
                                    "(fsdp) or DeepSpeed ZeRO."},
        "zero_stage": {"type": "integer", "minimum": 1, "maximum": 3, "default": 2,
                       "description": "DeepSpeed ZeRO stage (strategy: deepspeed)."},
        # No `default: null` here: editors (yaml-language-server) take a default of a string-typed key for a
        # string and drop the whole `train` completion when it is not one; default_params() reads None anyway.
        "main_process_ip": {"type": ["string", "null"],
                            "description": "Machine 0's address for nodes > 1 (or SPECDSL_MAIN_PROCESS_IP)."},
        "main_process_port": {"type": ["integer", "null"], "minimum": 0, "maximum": 65535, "default": None,
                              "description": "null = a free port on one node, 29500 across nodes."},
    },
}

_LORA_DEFAULTS = {"r": 16, "alpha": None, "dropout": 0.05, "target_modules": "all-linear", "merge": False}


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
        return RunError(f"training parameter {key}={out[key]!r}: {why}",
                        hint=f"change `{key}:` in the train step")

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
