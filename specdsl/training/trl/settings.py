"""What a TRL target trains with: the device, precision, batching, attention and kernels, and why.

:func:`detect_capabilities` asks the machine what is installed and usable (it imports torch);
:func:`plan_settings` chooses from that alone, as a pure function of the parameters, the device and the
capabilities, and gives a reason for every choice (logged, and written to specdsl_train.json and the
card). On cuda the token budget of a packed micro-batch is sized from the base model's shape
(:class:`ModelShape`, read from its config.json) against the GPU's memory (:func:`auto_token_budget`).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from specdsl.errors import RunError
from specdsl.modelcache.config import decoder_shape, read_model_config

log = logging.getLogger("specdsl.train")

CUDA_DEFAULT_TOKEN_BUDGET = 16384   # the most a default budget grows to: past it, small models gain little
MIN_AUTO_TOKEN_BUDGET = 1024


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
            base_model = read_model_config(Path(base_model))
        except RunError:
            return None
    dims = decoder_shape(base_model)
    return ModelShape(**dims) if dims is not None else None


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
            raise RunError("precision: bf16 needs a GPU with bfloat16 support (Ampere or newer)",
                           hint="use `precision: auto` (bf16 where the GPU supports it, else fp32) or `precision: fp32`")
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
        raise RunError("max_tokens_per_batch needs packing: true (a token budget fills packed batches)",
                       hint="add `packing: true`, or give `batch_size:` instead")
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
            raise RunError(f"attn_implementation: {attn} needs the cuda target",
                           hint="remove `attn_implementation:` on cpu (sdpa is used), or run with `target: cuda`")
        why.append(f"attention {attn} (requested)")

    liger = params["liger"]
    if liger is None:
        liger = bool(cuda and caps.get("liger"))
        why.append("liger kernels on (installed)" if liger else
                   ("liger kernels off (liger_kernel not installed)" if cuda else "liger kernels off (cpu)"))
    elif liger:
        if not cuda:
            raise RunError("liger: true needs the cuda target (Liger's kernels are Triton GPU kernels)",
                           hint="remove `liger: true` on cpu, or run with `target: cuda`")
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
