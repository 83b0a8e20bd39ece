"""A train step's ``output:`` folder: a portable copy of the trained model or adapter, beside the spec.

The store keeps the model the later steps use (its ``adapter_config.json`` names the base model's local
folder, so it loads offline here). The copy in ``output:`` is for taking away: the same files, with the
adapter's ``base_model_name_or_path`` set to the base model's Hub id when it is known (the embedded
default knows its own), as the model card's ``base_model`` is. A base given as a local folder stays a
path. The folder follows :mod:`specdsl.ops.outputs` (inside the spec's folder, only specdsl's own files
overwritten, written again when missing or changed); writing it again never trains again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from specdsl.contract.ops import Rows, RunContext
from specdsl.ops.outputs import OutputWriter, outputs_current, record_summary, resolve_output_dir, run_error

ADAPTER_CONFIG = "adapter_config.json"
TRAIN_RECORD = "specdsl_train.json"


def _folder(params: Mapping[str, Any], spec_file: str, node: str) -> Path:
    return resolve_output_dir(spec_file, params["output"], allow_outside=bool(params.get("allow_outside")), node=node)


def output_current(params: Mapping[str, Any], fingerprint: str, spec_file: str) -> bool:
    try:
        return outputs_current(_folder(params, spec_file, ""), fingerprint)
    except Exception:  # noqa: BLE001 - a folder that cannot be resolved now is not current; the run says why
        return False


def trained_before(ctx: RunContext) -> tuple[Rows, dict[str, Any]] | None:
    """The node's rows and meta when its model is already in the store (the node runs again only because
    its output folder is missing or changed), else None."""
    store = ctx.services.store
    fingerprint = ctx.services.plan.node(ctx.node_id).fingerprint
    if not store.has(fingerprint):
        return None
    meta = store.meta(fingerprint)
    if not (store.node_dir(fingerprint) / meta.get("model_dir", "model")).is_dir():
        return None
    ctx.services.note(ctx.node_id, "model taken from the store; output folder written again")
    return store.load(fingerprint), {k: meta[k] for k in ("model_dir", "target", "metrics") if k in meta}


def portable_adapter_config(model_dir: Path) -> str | None:
    """The adapter's config with the base model named by its Hub id, when the model is an adapter and
    its base is a known model; else None (the file is copied as it is)."""
    try:
        config = json.loads((model_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        base_id = json.loads((model_dir / TRAIN_RECORD).read_text(encoding="utf-8"))["card"].get("base_model_id")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not base_id:
        return None
    config["base_model_name_or_path"] = base_id
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def publish_model(ctx: RunContext, model_dir: Path) -> dict[str, Any]:
    """Copy the trained model in ``model_dir`` into the step's ``output:`` folder; the artifact entry."""
    plan = ctx.services.plan
    node = plan.node(ctx.node_id)
    folder = _folder(ctx.params, plan.spec_file, ctx.node_id)
    names = sorted(f.relative_to(model_dir).as_posix() for f in model_dir.rglob("*") if f.is_file())
    writer = OutputWriter(folder, node=ctx.node_id, fingerprint=node.fingerprint, spec_file=plan.spec_file)
    writer.plan(names, sources={name: model_dir / name for name in names})
    adapter_config = portable_adapter_config(model_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            if name == ADAPTER_CONFIG and adapter_config is not None:
                writer.write_text(name, adapter_config)
            else:
                writer.copy(name, model_dir / name)
        record = writer.finish({"kind": "model"})
    except OSError as exc:
        raise run_error(exc, folder, ctx.node_id) from None
    return record_summary(folder, record, "model output")
