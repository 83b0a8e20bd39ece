"""Loading a local model folder for generation, once per process.

A loaded model is cached by folder, a stat signature of its files (so a folder retrained in place
loads afresh), device and dtype. Loading never touches a model hub, and a folder's own
generation_config.json does not apply: decoding follows the spec's options only.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from specdsl.backends.transformers.options import folder_fingerprint
from specdsl.errors import RunError


@dataclass
class LoadedModel:
    """A model ready to generate: weights on their device, tokenizer, stop tokens, context length, and the
    lock that lets one batch run at a time."""

    path: Path
    device: str
    dtype: str
    model: Any
    tokenizer: Any
    pad_id: int
    eos_ids: frozenset[int]
    context_length: int | None
    lock: threading.Lock = field(default_factory=threading.Lock)


_LOADED: dict[tuple[str, str, str, str], LoadedModel] = {}
_LOADED_LOCK = threading.Lock()


def clear_model_cache() -> None:
    """Forget the models loaded in this process (frees their memory once nothing else holds them)."""
    with _LOADED_LOCK:
        _LOADED.clear()


def load_model(path: Path, *, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load the model folder ``path`` for generation, or reuse the copy this process already loaded."""
    device = _resolve_device(device)
    torch_dtype = _resolve_dtype(dtype, device)
    dtype_name = str(torch_dtype).removeprefix("torch.")
    # The stat signature makes a folder rewritten in place (a retrained model) load afresh.
    key = (str(Path(path).resolve()), folder_fingerprint(Path(path), content=False), device, dtype_name)
    with _LOADED_LOCK:
        lm = _LOADED.get(key)
        if lm is None:
            lm = _load(Path(path), device, torch_dtype, dtype_name)
            _LOADED[key] = lm
    return lm


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RunError("device: cuda was asked for but torch sees no CUDA GPU",
                       hint=f"use device: auto or cpu (torch {torch.__version__} "
                            f"{'has no CUDA support' if torch.version.cuda is None else 'found no GPU'})")
    return device


def _resolve_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        # float32 on CPU: bf16 matmuls are not faster there on most CPUs and change greedy outputs.
        if device == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, dtype)


def _load(path: Path, device: str, torch_dtype: Any, dtype_name: str) -> LoadedModel:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never the hub, even if a config names a hub id
    from transformers.utils import logging as hf_logging

    # The caller draws the run's progress; transformers' "Loading weights" bar would tear through it.
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return _load_quietly(path, device, torch_dtype, dtype_name)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


def _load_quietly(path: Path, device: str, torch_dtype: Any, dtype_name: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means "no usable tokenizer"
        tokenizer = _adapter_base_tokenizer(path)
        if tokenizer is None:
            raise RunError(f"could not load the tokenizer of {path}: {type(e).__name__}: {e}",
                           hint="the folder needs tokenizer files (what tokenizer.save_pretrained "
                                "writes)") from e
    if not getattr(tokenizer, "chat_template", None):
        raise RunError(f"the tokenizer in {path} has no chat template, so chat messages cannot be "
                       "formatted for it", hint="use an instruct/chat model, or add a chat_template "
                                                "to its tokenizer_config.json")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
        merge_lora_in_memory(model)
        model.to(device).eval()
    except Exception as e:  # noqa: BLE001
        raise RunError(f"could not load the model in {path}: {type(e).__name__}: {e}") from e

    config = model.config
    eos: set[int] = set()
    for value in (model.generation_config.eos_token_id, getattr(config, "eos_token_id", None),
                  tokenizer.eos_token_id):
        if isinstance(value, int):
            eos.add(value)
        elif isinstance(value, (list, tuple)):
            eos.update(int(v) for v in value)
    if not eos:
        raise RunError(f"the model in {path} defines no end-of-sequence token",
                       hint="set eos_token in its tokenizer or eos_token_id in its config")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    # Decoding is controlled by the spec's options only: a folder's generation_config.json may carry
    # sampling defaults or a repetition penalty that would otherwise apply silently.
    model.generation_config = GenerationConfig(eos_token_id=sorted(eos), pad_token_id=pad_id,
                                               bos_token_id=getattr(config, "bos_token_id", None))
    return LoadedModel(path=path, device=device, dtype=dtype_name, model=model, tokenizer=tokenizer,
                       pad_id=pad_id, eos_ids=frozenset(eos), context_length=context_length_of(model, tokenizer))


def merge_lora_in_memory(model: Any) -> int:
    """Fold a loaded LoRA adapter's update into the base weights of ``model``; return the layers merged.

    An adapter folder (what ``train`` keeps by default) loads as the base model with LoRA layers beside
    every targeted linear layer, which generation then runs as two extra small matrix products per layer:
    ~15% of a CPU decoding step for the 135M model with ``all-linear`` targets. Merged, each layer is one
    product, computing what ``PeftModel.merge_and_unload()`` writes to disk. A model without an adapter
    is left alone (no peft import).
    """
    if not getattr(model, "_hf_peft_config_loaded", False):
        return 0
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = 0
    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and not module.merged:
            module.merge()
            merged += 1
    return merged


def _adapter_base_tokenizer(path: Path) -> Any | None:
    """A PEFT adapter folder may lack tokenizer files: use its (local) base model's tokenizer."""
    from transformers import AutoTokenizer

    try:
        base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        return AutoTokenizer.from_pretrained(base, local_files_only=True) if Path(base).is_dir() else None
    except Exception:  # noqa: BLE001 - no adapter, no base, unreadable: the caller reports it
        return None


def context_length_of(model: Any, tokenizer: Any) -> int | None:
    """The most tokens (prompt + answer) the model takes: its config's position limit, else the
    tokenizer's model_max_length when that is a real number; None when neither says."""
    from specdsl.modelcache.config import context_length  # the one rule for every name of the limit

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    found = context_length(config.to_dict())
    if found:
        return found
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**9 else None

