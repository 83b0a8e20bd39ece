"""GGUF -> float32 safetensors: load the GGUF with transformers, rebuild a plain model from its config,
save it with its tokenizer, and check that the saved model reproduces the GGUF model's logits."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

from specdsl.errors import RunError
from specdsl.modelcache.progress import Steps

# The largest |logit difference| tolerated between the saved model and the GGUF-loaded one. The
# conversion is a float32 copy, so the difference is 0.0 in practice; the margin only absorbs kernel
# noise should a future torch pick different kernels for the two loads.
_LOGIT_TOLERANCE = 1e-3


def convert_gguf(gguf: Path, out: Path, progress: "Steps") -> dict[str, Any]:
    """GGUF -> float32 safetensors + tokenizer in ``out``; returns facts for the manifest."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: everything below is local
    with progress.step("loading torch and transformers"):
        import torch  # noqa: F401  (the slow imports, shown as their own step)
        import transformers  # noqa: F401
        from transformers.utils import logging as hf_logging

    # Our own progress display replaces transformers' tqdm bars for the duration of the conversion.
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with _quiet_gguf_tqdm():
            return _convert_loaded(gguf, out, progress)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _quiet_gguf_tqdm() -> Iterator[None]:
    """transformers' GGUF reader draws its own tqdm bar, deaf to ``disable_progress_bar()``; silence
    it for the duration of the conversion (it would tear through the rich display)."""
    try:
        import functools

        from transformers import modeling_gguf_pytorch_utils as gguf_utils
        original = gguf_utils.tqdm
    except (ImportError, AttributeError):  # another transformers layout: leave it be
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _convert_loaded(gguf: Path, out: Path, progress: "Steps") -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    with progress.step("dequantizing the GGUF (transformers + gguf)"):
        kw = dict(gguf_file=gguf.name, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, **kw).eval()
    if not getattr(tokenizer, "chat_template", None):
        raise RunError(f"{gguf.name} carries no chat template; refusing to cache a chat model "
                       "that cannot format messages")

    with progress.step("rebuilding as a plain float32 model"):
        config = gguf_model.config
        # The GGUF loader marks the model as quantized; a model built from a config without that
        # marker holds the same (already dequantized) tensors and can be saved normally.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config._name_or_path = ""  # the GGUF's internal training-run name is noise here
        model = AutoModelForCausalLM.from_config(config)  # float32: config.dtype says so
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        model.eval()
        model.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id)
        # The GGUF tokenizer leaves model_max_length unset (a 1e30 sentinel); record the real
        # context so tokenizers and trainers truncate sensibly.
        tokenizer.model_max_length = int(config.max_position_embeddings)

    with progress.step("saving safetensors + tokenizer"):
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        _harmonize_modes(out)
    del model

    with progress.step("checking the saved model against the GGUF"):
        diff, prompt_ids = _compare_logits(gguf_model, tokenizer, out)
    if not diff <= _LOGIT_TOLERANCE:  # `not <=` also catches NaN
        raise RunError(f"conversion check failed: the saved model's logits differ from the GGUF "
                       f"model's by {diff:.3g} (tolerance {_LOGIT_TOLERANCE})",
                       hint="report this with the versions of torch, transformers and gguf")
    return {
        "parameters": sum(p.numel() for p in gguf_model.parameters()),
        "context_length": int(config.max_position_embeddings),
        "check": {"prompt_tokens": prompt_ids, "max_abs_logit_diff": diff},
    }


def _compare_logits(gguf_model: Any, gguf_tokenizer: Any, saved: Path) -> tuple[float, int]:
    """Reload ``saved`` the way the backend will and compare its logits with the GGUF model's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(saved, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(saved, local_files_only=True, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if text != gguf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False):
        raise RunError("conversion check failed: the saved chat template differs from the GGUF's")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    ref_ids = gguf_tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    if not torch.equal(ids, ref_ids):
        raise RunError("conversion check failed: the saved tokenizer encodes differently from the GGUF's")
    with torch.inference_mode():
        diff = (model(ids).logits - gguf_model(ids).logits).abs().max().item()
    return float(diff), int(ids.shape[1])


def _harmonize_modes(folder: Path) -> None:
    """safetensors writes its file owner-only (0600) while the JSON files follow the umask; give the
    weights the JSON files' mode so a cache shared through SPECDSL_HOME is readable by its group."""
    mode = (folder / "config.json").stat().st_mode & 0o777
    for p in folder.iterdir():
        if p.is_file():
            p.chmod(mode)
