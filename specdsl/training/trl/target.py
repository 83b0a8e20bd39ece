"""Training targets on TRL: ``cpu``, ``cuda`` and the ``auto`` choice between them.

A target receives a :class:`~specdsl.contract.hookspecs.TrainRequest` whose dataset is a Parquet table of
*pre-tokenized* samples (``input_ids``, ``labels`` with -100 where no loss is taken, optionally
``attention_mask``). The masks are the product of the spec (principle 6 of the design): TRL must train on
exactly those labels, so this module never lets TRL tokenize, template or mask again. TRL 1.16's
``SFTTrainer`` recognises a dataset with an ``input_ids`` column as processed and keeps a ``labels``
column "as is" (``SFTTrainer._prepare_dataset``); its collator pads labels with -100 and, padding-free,
only sets -100 on the first token of each sample, a position no causal loss ever reads. The tests assert
this at the model's boundary.

Output: a standard Hugging Face model directory (or a PEFT adapter directory, or with ``lora.merge`` a
merged model) with the tokenizer, a ``README.md`` model card and ``specdsl_train.json`` (resolved
parameters, what the target chose and why, metrics). It is trained in a staging directory beside
``output_dir`` and renamed into place at the very end, so an interrupted run never looks complete.

``processes: N`` (> 1) or ``nodes: M`` (> 1) runs the same training through ``accelerate launch`` with a
generated config (kept in the output as ``accelerate_config.yaml``); each worker is
``python -m specdsl.training.worker REQUEST.json``. With ``nodes: M`` the user starts the step on
every node, each with ``SPECDSL_MACHINE_RANK`` (0 .. M-1) and ``SPECDSL_MAIN_PROCESS_IP`` (the address of
machine 0) in its environment and the output directory on a filesystem machine 0 can write; machine 0
writes the output, the others only train.

Heavy imports (torch, transformers, trl, datasets, peft, accelerate, pyarrow) happen inside functions:
importing this module must stay cheap (``specdsl validate``).
"""

from __future__ import annotations

import abc
import importlib.util
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from specdsl.errors import RunError, StopRun
from specdsl.contract.hookspecs import TrainRequest
from specdsl.training.trl.config import PARAMS_SCHEMA, TARGET_VERSION, default_params, resolve_params
from specdsl.training.trl.data import DataStats, inspect_dataset
from specdsl.training.trl.settings import detect_capabilities, model_shape, plan_settings
from specdsl.training.trl.launch import accelerate_config, launch_distributed
from specdsl.training.trl.trainer import merge_adapter, train_worker
from specdsl.modelcache.config import context_length, read_model_config, vocab_size

log = logging.getLogger("specdsl.train")




# --------------------------------------------------------------------------------------------------
# Staging and publishing the output directory
# --------------------------------------------------------------------------------------------------


def _staging_dir(output_dir: Path) -> Path:
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    # Beside output_dir (same filesystem, so the final rename is atomic) and hidden, with a name that can
    # never be mistaken for the finished model.
    stage = output_dir.parent / f".{output_dir.name}.specdsl-partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    return stage


def _publish(stage: Path, output_dir: Path) -> None:
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


def _model_card(request: TrainRequest, target: str, params: Mapping[str, Any], settings: Mapping[str, Any],
                stats: DataStats, metrics: Mapping[str, Any], kind: str, launch: Mapping[str, Any] | None) -> str:
    card = dict(request.card or {})
    spec = card.pop("spec", None) or card.pop("spec_name", None) or card.pop("name", None) or "(unnamed spec)"
    fingerprint = card.pop("data_fingerprint", None) or card.pop("fingerprint", None) or "(not given)"
    mask = card.pop("mask_policy", None) or card.pop("loss", None) or "(not given)"
    step = card.pop("step", None)
    fm = ["---", "library_name: " + ("peft" if kind == "adapter" else "transformers"),
          f"base_model: {json.dumps(str(request.base_model))}", "tags:", "  - specdsl", "  - trl", "  - sft"]
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
        f"- base model: `{request.base_model}`",
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
        f"- steps: {metrics.get('global_step')}, loss: first {metrics.get('first_loss')}, last "
        f"{metrics.get('last_loss')}, mean {metrics.get('train_loss')}",
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


def _finalize(request: TrainRequest, target: str, params: Mapping[str, Any], settings: Mapping[str, Any],
              stats: DataStats, stage: Path, metrics: dict[str, Any], launch: Mapping[str, Any] | None) -> None:
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
    (stage / "README.md").write_text(_model_card(request, target, params, settings, stats, metrics, kind, launch),
                                     encoding="utf-8")
    record = {
        "specdsl_target": target, "target_version": TARGET_VERSION, "kind": kind,
        "base_model": str(request.base_model), "dataset": str(request.dataset),
        "card": dict(request.card or {}), "params": dict(params), "settings": dict(settings),
        "data": stats.as_dict(), "metrics": metrics, "launch": dict(launch) if launch else None,
    }
    (stage / "specdsl_train.json").write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# The targets
# --------------------------------------------------------------------------------------------------


def run_training(request: TrainRequest, device: str, progress: Callable[[Mapping[str, Any]], None] | None = None,
                 *, callbacks: Sequence[Any] = (), target_name: str | None = None) -> Path:
    """Train ``request`` on ``device`` ("cpu" or "cuda") and return the published output directory."""
    progress = progress or (lambda _event: None)
    params = resolve_params(request.params)
    seed = int(params["seed"] if params["seed"] is not None else request.seed)
    config = read_model_config(request.base_model)
    max_length = params["max_length"] or context_length(config)
    vocab = vocab_size(config)
    stats = inspect_dataset(Path(request.dataset), vocab_size=vocab, max_length=max_length)
    caps = detect_capabilities()
    settings = plan_settings(params, device, caps, model_shape(config))
    settings["capability"] = caps.get("capability")
    settings["device_name"] = caps.get("device_name")
    settings["versions"] = {k: caps[k] for k in ("torch", "transformers", "trl")}
    for reason in settings["reasons"]:
        log.info("%s target: %s", device, reason)
    distributed = params["processes"] * params["nodes"] > 1
    if distributed and callbacks:
        raise RunError("callbacks cannot travel to accelerate worker processes")
    output_dir = Path(request.output_dir)
    try:
        stage = _staging_dir(output_dir)
    except OSError as exc:
        raise RunError(f"cannot write beside the output directory {output_dir}: {exc}") from exc
    try:
        launch = None
        if distributed:
            metrics, launch = launch_distributed(request, params=params, settings=settings, stats=stats,
                                                  seed=seed, stage=stage, progress=progress)
            if launch["machine_rank"] != 0:
                # Machine 0 writes the output; the other machines only contributed their gradients. Their run
                # ends here: no model exists on this machine for later steps to use, or for a cache to keep.
                shutil.rmtree(stage, ignore_errors=True)
                raise StopRun(f"machine {launch['machine_rank']} of {launch['num_machines']}: this machine's "
                              "share of the training is done; machine 0 writes the model and runs the later steps")
        else:
            metrics = train_worker(base_model=Path(request.base_model), dataset=Path(request.dataset), stage=stage,
                                   params=params, settings=settings, stats=stats, seed=seed, progress=progress,
                                   callbacks=callbacks)
        metrics["seed"] = seed
        if metrics.get("oom_retries"):
            settings["max_tokens_per_batch"] = metrics["max_tokens_per_batch"]
            settings["reasons"].append(f"token budget lowered to {metrics['max_tokens_per_batch']} after running "
                                       f"out of memory ({len(metrics['oom_retries'])} restart(s))")
        _finalize(request, target_name or device, params, settings, stats, stage, metrics, launch)
        _publish(stage, output_dir)
    except BaseException:
        # Whatever stopped us (an error, Ctrl-C), no partial directory is left to look like a model.
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return output_dir


class _TrlTarget(abc.ABC):
    name = "?"
    device = "cpu"
    version = TARGET_VERSION
    params_schema = PARAMS_SCHEMA

    @abc.abstractmethod
    def available(self) -> bool:
        """Whether this machine can train on the target's device."""

    def train(self, request: TrainRequest, progress: Callable[[Mapping[str, Any]], None],
              *, callbacks: Sequence[Any] = ()) -> Path:
        """Train and return the output directory. ``callbacks`` (transformers TrainerCallbacks) observe a
        single-process run; they cannot travel to the workers of a multi-process one."""
        return run_training(request, self.device, progress, callbacks=callbacks, target_name=self.name)

    def plan(self, params: Mapping[str, Any] | None = None, base_model: Path | None = None) -> dict[str, Any]:
        """What this target would choose for ``params`` (and ``base_model``) on this machine (imports torch)."""
        shape = model_shape(Path(base_model)) if base_model is not None else None
        return plan_settings(resolve_params(params), self.device, detect_capabilities(), shape)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class CpuTarget(_TrlTarget):
    """Full fine-tune or LoRA on the CPU, fp32, padded batches (or packed with ``packing: true``)."""

    name = "cpu"
    device = "cpu"

    def available(self) -> bool:
        return importlib.util.find_spec("torch") is not None and importlib.util.find_spec("trl") is not None


class CudaTarget(_TrlTarget):
    """The GPU fast path: bf16, padding-free bfd packing by token budget, the best installed attention
    that keeps samples apart (flash attention 3/2 varlen, else flex attention's block mask, else sdpa),
    Liger's layer kernels when installed, TRL's fused LM-head loss, optional torch.compile. It chooses
    only from what is installed, logs each choice and writes them to specdsl_train.json and the card."""

    name = "cuda"
    device = "cuda"

    def available(self) -> bool:
        if importlib.util.find_spec("torch") is None or importlib.util.find_spec("trl") is None:
            return False
        import torch

        return bool(torch.cuda.is_available())


def choose_target(name: str, targets: Iterable[Any] | Mapping[str, Any]):
    """The target a step asked for: by name, or for "auto" cuda when available, else cpu.

    ``targets`` is the registered targets (an iterable, or a mapping of name to target). Raises RunError
    for an unknown name or a named target that is not available on this machine.
    """
    pool = list(targets.values()) if isinstance(targets, Mapping) else list(targets)
    by_name = {t.name: t for t in pool}
    if name == "auto":
        for candidate in ("cuda", "cpu"):
            t = by_name.get(candidate)
            if t is not None and t.available():
                return t
        for t in pool:  # a third-party target, when neither built-in one is there
            if t.available():
                return t
        raise RunError("no training target is available on this machine",
                       hint=f"registered: {', '.join(sorted(by_name)) or 'none'}")
    if name not in by_name:
        from specdsl.errors import did_you_mean

        raise RunError(f"unknown training target {name!r}", hint=did_you_mean(name, list(by_name) + ["auto"]))
    t = by_name[name]
    if not t.available():
        raise RunError(f"training target {name!r} is not available on this machine",
                       hint="use target: auto to fall back to the cpu" if name == "cuda" else None)
    return t


__all__ = [
    "CpuTarget", "CudaTarget", "choose_target", "run_training", "resolve_params", "plan_settings",
    "detect_capabilities", "inspect_dataset", "accelerate_config", "DataStats", "PARAMS_SCHEMA",
    "default_params", "TARGET_VERSION",
]
