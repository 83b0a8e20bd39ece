"""Local generation with Hugging Face transformers (CPU or one CUDA GPU).

A model entry ``{backend: transformers, model: NAME_OR_DIR, ...options}`` names a known model (see
:mod:`specdsl.modelcache.models`; the embedded default is ``smollm2-135m-instruct``) or a local Hugging Face model
folder. Nothing is ever downloaded from a model hub.

How requests are answered:

* Each request's messages go through the model's chat template (``add_generation_prompt=True``).
* Requests are sorted by prompt length and cut into batches of ``batch_size``, so a batch holds
  prompts of similar length and little padding. Prompts are padded on the left and decoded together
  with a KV cache (``model.generate``).
* ``temperature: 0`` (the default) is greedy decoding. With ``temperature > 0`` every request samples
  from its *own* random stream, seeded from the request key and ``seed``: a request gets the same text
  whichever batch it lands in (up to float rounding between batch shapes), and a resumed run
  reproduces the same samples.
* ``on_result`` is called after every batch, once per request, from the calling thread.
* A request that cannot be answered on its own (a prompt longer than the model's context, messages
  the chat template rejects, a batch of one that runs out of memory) comes back as
  ``GenResult(error=...)``; problems that concern every request (the model cannot be found or loaded,
  CUDA asked for but absent) raise :class:`~specdsl.errors.RunError`.

Models load once per process (cached by folder, content signature, device and dtype). torch and
transformers are imported only when a method runs.

The package: ``options`` (schema, defaults, checks, model fingerprint), ``loading`` (a model folder,
once per process), ``generation`` (batching, decoding, per-request sampling), and this module, which
ties them into the backend the plugin registers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from specdsl.backends.transformers.generation import generate_batches
from specdsl.backends.transformers.loading import LoadedModel, clear_model_cache, load_model
from specdsl.backends.transformers.options import (DEFAULTS, OPTIONS_SCHEMA, check_options, model_fingerprint,
                                                   model_ref, read_settings)
from specdsl.contract.hookspecs import GenRequest, GenResult, OptionProblem


class TransformersBackend:
    """The ``transformers`` generation backend (see the module docstring)."""

    name = "transformers"
    requires = (("torch", "local"), ("transformers", "local"), ("gguf", "local"))  # gguf: the embedded model
    # Bump when a change here changes outputs for the same identity (decoding, seeding, templates).
    version = "1"
    options_schema = OPTIONS_SCHEMA
    model_is_path = True  # a `model:` that names a folder is relative to the spec, like a source

    def model_dir(self, options: Mapping[str, Any]) -> Path:
        """The local Hugging Face folder of this model (a named model is pulled on first use)."""
        from specdsl.modelcache.models import resolve_model

        return Path(resolve_model(model_ref(options)))

    def prepare(self, options: Mapping[str, Any]) -> None:
        """Pull a named model (the embedded default) before the run's live display starts."""
        from specdsl.modelcache import models

        if models.is_known(options["model"]) and not models.is_cached(options["model"]):
            models.pull(options["model"])

    def identity(self, options: Mapping[str, Any]) -> Mapping[str, Any]:
        """Model reference, a content fingerprint of the model, and every option that shapes outputs.

        ``batch_size`` and ``device`` are left out: they are execution choices (greedy outputs do not
        depend on them beyond float rounding). ``dtype`` is kept as written.
        """
        settings = read_settings(options)
        ref = model_ref(options)
        return {
            "model": ref,
            "fingerprint": model_fingerprint(ref),
            "max_new_tokens": settings["max_new_tokens"],
            "temperature": settings["temperature"],
            "top_p": settings["top_p"],
            "seed": settings["seed"],
            "dtype": settings["dtype"],
        }

    def check_options(self, options: Mapping[str, Any]) -> list[OptionProblem]:
        """What plan or run would reject in these options, found from a few small files (no torch): see
        :func:`specdsl.backends.transformers.options.check_options`."""
        return check_options(options)

    def price(self, options: Mapping[str, Any], input_tokens: int, output_tokens: int) -> float | None:
        return 0.0  # local compute: nothing is billed

    def generate(self, options: Mapping[str, Any], requests: Sequence[GenRequest],
                 on_result: Callable[[GenResult], None]) -> None:
        settings = read_settings(options)
        if not requests:
            return
        from specdsl.modelcache.models import resolve_model

        path = resolve_model(model_ref(options))
        lm = load_model(path, device=settings["device"], dtype=settings["dtype"])
        with lm.lock:  # one generate at a time per loaded model: concurrent ones only fight for cores
            generate_batches(lm, settings, requests, on_result)


# What this module has always offered its importers (tests, the built-in plugin).
__all__ = ["DEFAULTS", "OPTIONS_SCHEMA", "LoadedModel", "TransformersBackend", "clear_model_cache", "load_model",
           "model_fingerprint"]
