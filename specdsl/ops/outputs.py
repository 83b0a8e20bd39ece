"""Files a step writes outside the store (an export folder, a train step's ``output:`` folder).

Three rules, shared by every op that writes such files:

* **Where**: the folder is relative to the spec and must stay inside the spec's folder (symlinks
  resolved) unless the step says ``allow_outside: true``. :func:`check_output_path` rejects what can be
  seen at compile time (an absolute path, ``..``); :func:`resolve_output_dir` checks again at run time.
* **Whose**: specdsl overwrites only files it wrote itself. Each folder holds a record,
  ``.specdsl-output.json``, naming the node, its fingerprint and every file written with its sha256;
  a file in the way that the record does not name (the README.md beside a spec, for ``path: .``) and
  whose content differs is never touched: the run stops with a message naming it.
* **Current**: a cached node's files are checked against the record (:func:`outputs_current`); a file
  that is gone or changed, or a record of another fingerprint, makes the node run again, which rewrites
  them. Sizes and modification times spare re-hashing files that did not change (as git's index does).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

from specdsl.errors import RunError

RECORD = ".specdsl-output.json"

ALLOW_OUTSIDE = {"type": "boolean",
                 "description": "allow the output folder outside the spec's folder (default: false)"}


def check_output_path(ctx: Any, key: str = "path") -> None:
    """Compile-time check of an output folder (a ``CheckContext``): inside the spec's folder as written."""
    value = ctx.params.get(key)
    if not isinstance(value, str) or ctx.params.get("allow_outside"):
        return
    normal = posixpath.normpath(value.replace("\\", "/"))
    if os.path.isabs(value) or value.startswith(("/", "~")) or normal == ".." or normal.startswith("../"):
        ctx.error("S105", f"output folder '{value}' is outside the spec's folder", key,
                  hint="write under the spec's folder, or add `allow_outside: true` to the step if you mean it")


def resolve_output_dir(spec_file: str | Path, value: str, *, allow_outside: bool, node: str) -> Path:
    """The absolute output folder for ``value`` (relative to the spec), checked against the spec's folder
    with symlinks resolved."""
    base = Path(spec_file).resolve().parent
    out = (base / Path(value).expanduser()).resolve()
    if not allow_outside and out != base and base not in out.parents:
        raise RunError(f"output folder '{value}' resolves to {out}, outside the spec's folder {base}", node=node,
                       hint="write under the spec's folder, or add `allow_outside: true` to the step if you mean it")
    if out.exists() and not out.is_dir():
        raise RunError(f"output folder '{value}' is a file: {out}", node=node, hint="choose another `path`")
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_record(folder: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("files"), dict) else None


def _entry(path: Path) -> dict[str, Any]:
    # Content only (no timestamps): the same output written by two runs, or in two checkouts, gives the
    # same record byte for byte.
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


def _unchanged(path: Path, entry: Mapping[str, Any]) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    if not path.is_file() or st.st_size != entry.get("size"):
        return False
    return sha256_file(path) == entry.get("sha256")


def outputs_current(folder: Path, fingerprint: str) -> bool:
    """Whether ``folder`` holds, unchanged, the files the node of ``fingerprint`` wrote there."""
    record = read_record(folder)
    if record is None or record.get("fingerprint") != fingerprint:
        return False
    return all(_unchanged(folder / name, entry) for name, entry in record["files"].items())


class OutputWriter:
    """Writes files into an output folder under the ownership rule, then the record.

    ``plan(names)`` first: it refuses (RunError) before anything is written when a file in the way was
    not written by specdsl. Then ``write_bytes``/``write_text``/``copy``/``write_with`` per file, and
    ``finish()``, which removes files an older record named that this write did not produce and writes
    the new record. Each file lands by an atomic rename.
    """

    def __init__(self, folder: Path, *, node: str, fingerprint: str, spec_file: str):
        self.folder, self.node, self.fingerprint, self.spec_file = Path(folder), node, fingerprint, spec_file
        self.previous = read_record(self.folder) or {"files": {}}
        self.files: dict[str, dict[str, Any]] = {}

    def plan(self, names: Iterable[str], sources: Mapping[str, Path] | None = None) -> None:
        """Refuse before writing when one of ``names`` is in the way and not specdsl's; a file whose content
        is already what ``sources`` gives for it is not in the way."""
        theirs = []
        for name in names:
            target = self.folder / name
            if not (target.exists() or target.is_symlink()) or name in self.previous["files"]:
                continue
            source = (sources or {}).get(name)
            if source is not None and target.is_file() and sha256_file(target) == sha256_file(source):
                continue
            theirs.append(target)
        if theirs:
            shown = ", ".join(str(t) for t in theirs[:5]) + (f" and {len(theirs) - 5} more" if len(theirs) > 5 else "")
            raise RunError(f"will not overwrite {shown}: specdsl did not write "
                           f"{'it' if len(theirs) == 1 else 'them'}", node=self.node,
                           hint="choose another output folder (`path:`/`output:`), or move the file away")

    def _target(self, name: str) -> tuple[Path, Path]:
        target = self.folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        return target, target.with_name(f".{target.name}.specdsl-tmp")

    def write_with(self, name: str, write: Any) -> Path:
        """``write(tmp_path)`` writes the file; it is then renamed into place and recorded."""
        target, tmp = self._target(name)
        try:
            write(tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        self.files[name] = _entry(target)
        return target

    def write_text(self, name: str, text: str) -> Path:
        return self.write_with(name, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def copy(self, name: str, source: Path) -> Path:
        return self.write_with(name, lambda tmp: shutil.copyfile(source, tmp))

    def finish(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        for name in self.previous["files"]:
            if name not in self.files:
                (self.folder / name).unlink(missing_ok=True)  # ours, from an older write, no longer produced
        # The spec by name only: the record travels with the folder (two checkouts write the same bytes).
        record = {"specdsl_output": 1, "node": self.node, "fingerprint": self.fingerprint,
                  "spec": Path(self.spec_file).name,
                  **(extra or {}), "files": self.files}
        tmp = self.folder / f".{RECORD}.tmp"
        tmp.write_text(json.dumps(record, indent=2), encoding="utf-8")
        os.replace(tmp, self.folder / RECORD)
        return record


def record_summary(folder: Path, record: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """The node-meta entry of an output folder: what the run summary, run.json and report.html list."""
    return {"kind": kind, "path": str(folder), "files": {k: v["sha256"] for k, v in record["files"].items()}}


def run_error(exc: OSError, folder: Path, node: str) -> RunError:
    return RunError(f"cannot write to {folder}: {exc.strerror or exc}", node=node,
                    hint="check that the folder is writable and the disk has room, or change the step's `path:`")
