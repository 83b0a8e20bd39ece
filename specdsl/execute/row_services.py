"""What a row-parallel op sees as ``ctx.services`` in a process that has not the run's services.

The local executor runs a row-parallel op in the run's own process, with the run's
:class:`~specdsl.execute.services.Services`. An executor that runs the batches elsewhere (Ray workers)
pickles the op with its parameters, and the store, the journal and the plugin registry stay behind. What
such a batch may still need is a model's tokenizer (``tokenize``, ``segment``): the driver resolves the
local folder of every model the op names (:meth:`RowServices.for_node`, through the run's services, so a
named model is the folder the run pulled and a trained one its folder in the store), and the worker loads
the tokenizer from that folder itself, once per process, never from a model hub.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from specdsl.errors import RunError

# Tokenizers loaded in this process, by folder: a worker that runs many batches of a node loads it once.
_TOKENIZERS: dict[str, Any] = {}

SHARED_MODEL_HINT = ("put the model folder (and the run store, for a trained model) on storage every "
                     "machine mounts at the same path")


@dataclass(frozen=True)
class RowServices:
    """``tokenizer(ref)`` and ``model_dir(ref)`` for the models an op's ``model_keys`` name, picklable.

    ``model_dirs`` maps each model ref to its local folder; ``unresolved`` maps a ref that has none (a
    model served by a provider) to the error the run's services gave, raised only if the op asks for it.
    """

    model_dirs: Mapping[str, str] = field(default_factory=dict)
    unresolved: Mapping[str, tuple[str, str | None]] = field(default_factory=dict)

    @classmethod
    def for_node(cls, services: Any, op: Any, params: Mapping[str, Any]) -> "RowServices":
        """Resolve, on the driver, the folders of the models ``op`` names in ``params``."""
        dirs: dict[str, str] = {}
        unresolved: dict[str, tuple[str, str | None]] = {}
        for key in getattr(op, "model_keys", ()) or ():
            ref = params.get(key)
            if not isinstance(ref, str) or ref in dirs or ref in unresolved:
                continue
            try:
                dirs[ref] = str(Path(services.model_dir(ref)).absolute())  # workers have another cwd
            except RunError as exc:
                unresolved[ref] = (exc.message, exc.hint)
        return cls(dirs, unresolved)

    def model_dir(self, ref: str) -> Path:
        if ref in self.unresolved:
            message, hint = self.unresolved[ref]
            raise RunError(message, hint=hint)
        if ref not in self.model_dirs:
            raise RunError(f"model '{ref}' is not one this step names in its parameters",
                           hint="a row-parallel op reads only the models its model_keys name")
        return Path(self.model_dirs[ref])

    def tokenizer(self, ref: str) -> Any:
        """The model's fast tokenizer, loaded from its local folder once per process."""
        return load_tokenizer(self.model_dir(ref), ref)


def load_tokenizer(path: Path, ref: str) -> Any:
    """The fast tokenizer in the local folder ``path`` (cached per process). ``local_files_only``: a
    folder missing on this machine is an error naming it, never a hub download."""
    key = str(path)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = read_fast_tokenizer(Path(path), ref)
    return _TOKENIZERS[key]


def read_fast_tokenizer(path: Path, ref: str) -> Any:
    """Load the tokenizer of model ``ref`` from its local folder ``path`` (never a hub); exact masks and
    segment offsets need a fast tokenizer, so a slow one is an error that says so."""
    if not path.is_dir():
        raise RunError(f"model '{ref}': its folder {path} is not there on {socket.gethostname()}",
                       hint=SHARED_MODEL_HINT)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if not getattr(tok, "is_fast", False):
        raise RunError(f"model '{ref}' has no fast tokenizer; exact masks need offsets",
                       hint="use a model whose folder has a tokenizer.json (a fast tokenizer)")
    return tok
