"""The TRL training targets ``cpu`` and ``cuda``, the ``auto`` choice between them, and one training run.

:func:`run_training` is the whole run: resolve the parameters (:mod:`.config`), read the base model's
config.json and check the table (:mod:`.data`), choose the settings (:mod:`.settings`), train in this
process (:mod:`.trainer`) or through ``accelerate launch`` (:mod:`.launch`), then finish and publish the
output directory (:mod:`.card`). Each target publishes :data:`~.config.PARAMS_SCHEMA` as its
``params_schema``: the ``train`` step's parameters it accepts.
"""

from __future__ import annotations

import abc
import importlib.util
import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from specdsl.contract.hookspecs import TrainRequest
from specdsl.errors import RunError, StopRun
from specdsl.modelcache.config import context_length, read_model_config, vocab_size
from specdsl.training.trl.card import finalize_output, publish, staging_dir
from specdsl.training.trl.config import PARAMS_SCHEMA, TARGET_VERSION, resolve_params
from specdsl.training.trl.data import inspect_dataset
from specdsl.training.trl.launch import launch_distributed
from specdsl.training.trl.settings import detect_capabilities, model_shape, plan_settings
from specdsl.training.trl.trainer import train_worker

log = logging.getLogger("specdsl.train")


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
        stage = staging_dir(output_dir)
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
        finalize_output(request, target_name or device, params, settings, stats, stage, metrics, launch)
        publish(stage, output_dir)
    except BaseException:
        # Whatever stopped us (an error, Ctrl-C), no partial directory is left to look like a model.
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return output_dir


class _TrlTarget(abc.ABC):
    name = "?"
    requires = tuple((module, "train") for module in ("torch", "transformers", "trl", "datasets", "peft", "accelerate"))
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

