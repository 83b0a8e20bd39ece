"""The output directory of a TRL target: staged, finished with a model card and a record, then published.

Training writes into a hidden staging directory beside ``output_dir`` (:func:`staging_dir`, on the same
filesystem); :func:`finalize_output` merges a LoRA adapter when asked, writes the ``README.md`` model
card (:func:`model_card`: the spec, the data fingerprint, the mask policy, what the target chose and why)
and ``specdsl_train.json`` (resolved parameters, settings, data counts, metrics); :func:`publish`
renames it into place at the very end, so an interrupted run never looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

from specdsl.contract.hookspecs import TrainRequest
from specdsl.errors import RunError
from specdsl.training.trl.config import TARGET_VERSION
from specdsl.training.trl.data import DataStats
from specdsl.training.trl.trainer import merge_adapter


def staging_dir(output_dir: Path) -> Path:
    """A new, empty staging directory for ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    # Beside output_dir (same filesystem, so the final rename is atomic) and hidden, with a name that can
    # never be mistaken for the finished model.
    stage = output_dir.parent / f".{output_dir.name}.specdsl-partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    return stage


def publish(stage: Path, output_dir: Path) -> None:
    """Rename the finished staging directory to output_dir, replacing an older output if present."""
    output_dir = Path(output_dir)
    old = None
    if output_dir.exists() or output_dir.is_symlink():
        old = output_dir.parent / f".{output_dir.name}.specdsl-old-{uuid.uuid4().hex[:8]}"
        os.replace(output_dir, old)
    os.replace(stage, output_dir)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def model_card(request: TrainRequest, target: str, params: Mapping[str, Any], settings: Mapping[str, Any],
               stats: DataStats, metrics: Mapping[str, Any], kind: str, launch: Mapping[str, Any] | None) -> str:
    """The README.md of the output: front matter for the Hub, then the data, the training and how to load it."""
    card = dict(request.card or {})
    spec = card.pop("spec", None) or card.pop("spec_name", None) or card.pop("name", None) or "(unnamed spec)"
    fingerprint = card.pop("data_fingerprint", None) or card.pop("fingerprint", None) or "(not given)"
    mask = card.pop("mask_policy", None) or card.pop("loss", None) or "(not given)"
    step = card.pop("step", None)
    # The Hub id when the base is a known model (portable); else the folder it was trained from.
    base_id = card.pop("base_model_id", None) or str(request.base_model)
    fm = ["---", "library_name: " + ("peft" if kind == "adapter" else "transformers"),
          f"base_model: {json.dumps(base_id)}", "tags:", "  - specdsl", "  - trl", "  - sft"]
    if kind == "adapter":
        fm.append("  - lora")
    fm.append("---")
    lines = fm + [
        "",
        f"# {spec}" + (f" / {step}" if step else ""),
        "",
        "Fine-tuned by [specdsl](https://pypi.org/project/specdsl/) from a data-design spec, with TRL's "
        f"SFTTrainer on the `{target}` training target. This directory is "
        + {"model": "a full Hugging Face model.",
           "adapter": "a LoRA adapter (load it with peft on top of the base model).",
           "merged": "a full model: the trained LoRA adapter merged into the base weights."}[kind],
        "",
        "## Data",
        "",
        f"- spec: `{spec}`",
        f"- data fingerprint: `{fingerprint}`",
        f"- mask policy: {mask}",
        f"- samples: {stats.rows - stats.fully_masked_rows} trained ({stats.rows} in the table; "
        f"{stats.fully_masked_rows} without a trained token dropped)",
        f"- tokens: {stats.tokens} ({stats.trained_tokens} with loss, "
        f"{(100.0 * stats.trained_tokens / max(stats.tokens, 1)):.1f}%)",
        f"- longest sample: {stats.longest} tokens; cut at max_length {stats.max_length}: "
        f"{stats.rows_over_max_length} samples",
    ]
    if stats.padded_positions:
        lines.append(f"- padding positions removed (attention_mask 0): {stats.padded_positions}")
    for k, v in card.items():
        lines.append(f"- {k}: {v}")
    lines += [
        "",
        "Loss is taken only on tokens whose label is not -100, exactly as the dataset gives them: the "
        "table was pre-tokenized and TRL did not re-tokenize, re-template or re-mask it.",
        "",
        "## Training",
        "",
        f"- base model: `{base_id}`" + (f" (trained from `{request.base_model}`)"
                                          if base_id != str(request.base_model) else ""),
        f"- target: {target} ({settings['device']}), processes: {params['processes']} x nodes: {params['nodes']}"
        + (f", strategy: {params['strategy']}" if launch else ""),
        "- choices: " + "; ".join(settings["reasons"]),
        f"- epochs: {params['epochs']}, max_steps: {params['max_steps']}, learning rate: "
        f"{params['learning_rate']} ({params['lr_scheduler']}, warmup ratio {params['warmup_ratio']}), "
        f"batch size: {params['batch_size']} x accumulation {params['gradient_accumulation']}, "
        f"seed: {metrics.get('seed')}",
    ]
    if params["lora"]:
        lo = params["lora"]
        lines.append(f"- LoRA: r={lo['r']}, alpha={lo['alpha']}, dropout={lo['dropout']}, "
                     f"target_modules={lo['target_modules']}, merged={lo['merge']}")
    lines += [
        f"- steps: {metrics.get('global_step')}, mean loss: {_num(metrics.get('train_loss'))}",
        *loss_curve(metrics.get("losses") or []),
        f"- wall time: {metrics.get('runtime_s')} s; versions: torch {settings.get('versions', {}).get('torch')}, "
        f"transformers {settings.get('versions', {}).get('transformers')}, trl "
        f"{settings.get('versions', {}).get('trl')}",
        "- weights are saved in float32 (the master precision of training).",
        "",
        "## Load",
        "",
        "```python",
    ]
    if kind == "adapter":
        lines += ["from peft import AutoPeftModelForCausalLM",
                  "model = AutoPeftModelForCausalLM.from_pretrained(PATH_TO_THIS_DIR)"]
    else:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained(PATH_TO_THIS_DIR)",
                  "tokenizer = AutoTokenizer.from_pretrained(PATH_TO_THIS_DIR)"]
    lines += ["```", ""]
    if launch:
        lines += ["## Distributed launch", "",
                  f"Launched with `accelerate launch` ({launch['num_processes']} processes on "
                  f"{launch['num_machines']} machine(s)); the config is `accelerate_config.yaml` in this "
                  "directory.", ""]
    return "\n".join(lines)


SPARK = "▁▂▃▄▅▆▇█"
CURVE_ROWS = 20  # the card's loss table shows at most this many logged steps (evenly spaced, the last kept)


def _num(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.4f}"


def loss_curve(losses: Sequence[Sequence[float]]) -> list[str]:
    """The card's loss lines: first, last and lowest loss, a sparkline of every logged loss, and a small
    table of logged (step, loss) pairs. ``losses`` is [(step, loss), ...] as the trainer logged them."""
    points = [(int(step), float(loss)) for step, loss in losses]
    if not points:
        return ["- loss: none logged (training logged no step)"]
    lowest = min(points, key=lambda p: p[1])
    values = [loss for _, loss in points]
    lo, hi = min(values), max(values)
    spark = "".join(SPARK[0 if hi == lo else round((v - lo) / (hi - lo) * (len(SPARK) - 1))] for v in values)
    keep = points if len(points) <= CURVE_ROWS else \
        [points[round(i * (len(points) - 1) / (CURVE_ROWS - 1))] for i in range(CURVE_ROWS)]
    return [f"- loss: first {_num(points[0][1])} (step {points[0][0]}), last {_num(points[-1][1])} "
            f"(step {points[-1][0]}), lowest {_num(lowest[1])} (step {lowest[0]}); {len(points)} logged",
            f"- loss curve: `{spark}`",
            "", "| step | loss |", "| --- | --- |", *[f"| {step} | {loss:.4f} |" for step, loss in keep], ""]


def finalize_output(request: TrainRequest, target: str, params: Mapping[str, Any], settings: Mapping[str, Any],
                    stats: DataStats, stage: Path, metrics: dict[str, Any], launch: Mapping[str, Any] | None) -> None:
    """Finish the staged output: the merged model (``lora.merge``), no scratch files, the card and the record."""
    lora = params["lora"]
    kind = "model"
    if lora:
        kind = "merged" if lora["merge"] else "adapter"
        if lora["merge"]:
            merge_adapter(request.base_model, stage / ".scratch" / "adapter", stage)
    shutil.rmtree(stage / ".scratch", ignore_errors=True)
    if not (stage / "config.json").is_file() and not (stage / "adapter_config.json").is_file():
        raise RunError(f"training finished but wrote no model into {stage}")
    # Written last and over any card peft wrote: ours names the spec, data and mask policy.
    (stage / "README.md").write_text(model_card(request, target, params, settings, stats, metrics, kind, launch),
                                     encoding="utf-8")
    record = {
        "specdsl_target": target, "target_version": TARGET_VERSION, "kind": kind,
        "base_model": str(request.base_model), "dataset": str(request.dataset),
        "card": dict(request.card or {}), "params": dict(params), "settings": dict(settings),
        "data": stats.as_dict(), "metrics": metrics, "launch": dict(launch) if launch else None,
    }
    (stage / "specdsl_train.json").write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
