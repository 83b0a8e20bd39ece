"""What a Hugging Face model folder's ``config.json`` says, read without importing transformers.

The one place specdsl reads a model's config.json: the vocabulary size, the context length and the
decoder's shape all come from :func:`read_model_config`, so two readers can never disagree about a
model (one finding ``n_positions`` in a GPT-2 style config and the other not, say).

transformers knows a key under several names through each config class's ``attribute_map`` (GPT-2's
``n_positions`` is its ``max_position_embeddings``); without the classes, the names are listed here.
A composite model (vision-language, say) keeps its language model's settings in a sub-config
(``text_config``; ``PretrainedConfig.get_text_config`` also looks at ``text_encoder``, ``decoder`` and
``generator``): those settings are what a causal language model built from the folder uses, so they
win over the top level's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from specdsl.errors import RunError

# The names the context length goes by, in the order transformers' configs prefer them.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")
# Where a composite config keeps its language model's settings (PretrainedConfig.get_text_config).
TEXT_SECTIONS = ("text_encoder", "decoder", "generator", "text_config")


def read_model_config(folder: Path | str) -> dict[str, Any]:
    """``folder``/config.json as one flat mapping, the language model's sub-config merged over the top level.

    Keys whose value is null are left out (they say nothing). With more than one language-model section
    (an encoder and a decoder) none is merged: which one applies is for the caller's model class to say.
    Raises RunError when the folder has no readable config.json holding a JSON object.
    """
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not folder.is_dir() or not cfg_path.is_file():
        raise RunError(f"base model {folder} is not a Hugging Face model directory (no config.json)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot read {cfg_path}: {exc}") from exc
    if not isinstance(cfg, dict):
        raise RunError(f"cannot read {cfg_path}: not a JSON object")
    sections = [cfg[k] for k in TEXT_SECTIONS if isinstance(cfg.get(k), dict)]
    text = sections[0] if len(sections) == 1 else {}
    return {**{k: v for k, v in cfg.items() if v is not None}, **{k: v for k, v in text.items() if v is not None}}


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def vocab_size(config: Mapping[str, Any]) -> int | None:
    """The vocabulary size (``vocab_size``), or None when the config does not say."""
    return _positive_int(config.get("vocab_size"))


def context_length(config: Mapping[str, Any]) -> int | None:
    """The most positions the model takes (``max_position_embeddings`` or one of its other names in
    :data:`CONTEXT_KEYS`), or None when the config does not spell it out."""
    for key in CONTEXT_KEYS:
        value = _positive_int(config.get(key))
        if value is not None:
            return value
    return None


def decoder_shape(config: Mapping[str, Any]) -> dict[str, int | bool] | None:
    """A decoder's sizes: hidden, intermediate, layers, vocab, heads, kv_heads (grouped-query attention;
    = heads when the config does not say) and tied (input and output embeddings shared). None when the
    config lacks one of them or they are not numbers."""
    try:
        heads = int(config["num_attention_heads"])
        return {"hidden": int(config["hidden_size"]), "intermediate": int(config["intermediate_size"]),
                "layers": int(config["num_hidden_layers"]), "vocab": int(config["vocab_size"]), "heads": heads,
                "kv_heads": int(config.get("num_key_value_heads") or heads),
                "tied": bool(config.get("tie_word_embeddings", True))}
    except (KeyError, TypeError, ValueError):
        return None
