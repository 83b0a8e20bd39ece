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
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from specdsl.errors import RunError, StopRun
from specdsl.contract.hookspecs import TrainRequest
from specdsl.training.trl.config import PARAMS_SCHEMA, TARGET_VERSION, default_params, resolve_params
from specdsl.training.trl.data import DataStats, inspect_dataset, load_training_dataset
from specdsl.training.trl.settings import MIN_AUTO_TOKEN_BUDGET, detect_capabilities, model_shape, plan_settings
from specdsl.training.trl.launch import accelerate_config, launch_distributed
from specdsl.modelcache.config import context_length, read_model_config, vocab_size

log = logging.getLogger("specdsl.train")

OOM_RETRY_STEPS = 10   # an automatic budget is halved after running out of memory within this many steps


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


# --------------------------------------------------------------------------------------------------
# The training itself (runs in this process, or in each accelerate worker)
# --------------------------------------------------------------------------------------------------


def _progress_callback_class():
    from transformers import TrainerCallback

    class SpecdslProgress(TrainerCallback):
        """Forwards step, total and loss to the executor's progress function (rank 0 only)."""

        def __init__(self, progress: Callable[[Mapping[str, Any]], None]):
            self.progress = progress
            self.losses: list[tuple[int, float]] = []

        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero:
                self.progress({"step": 0, "total": state.max_steps, "loss": None})

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs and state.is_world_process_zero:
                loss = float(logs["loss"])
                self.losses.append((state.global_step, loss))
                self.progress({"step": state.global_step, "total": state.max_steps, "loss": loss})

    return SpecdslProgress


def _build_trainer(*, base_model: Path, dataset, params: Mapping[str, Any], settings: Mapping[str, Any],
                   stats: DataStats, seed: int, scratch: Path, callbacks: Sequence[Any] = (),
                   model=None, tokenizer=None):
    """An SFTTrainer configured from resolved params + planned settings. Used by train() and the bench.

    ``model``/``tokenizer`` may be given (the benchmark builds a random-init model in memory); otherwise
    they are loaded from ``base_model``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    cuda = settings["device"] == "cuda"
    bf16 = settings["bf16"]
    packing = settings["packing"]
    if packing:
        # One packed row holds the micro-batch's token budget (padding-free: rows are concatenated anyway,
        # and longer rows pack tighter). A row is never shorter than the longest sample, so bfd packing never
        # cuts a sample (we already cut them to max_length, and counted it).
        budget = settings["max_tokens_per_batch"] or params["batch_size"] * stats.longest
        row_len = max(budget, stats.longest)
        per_device_batch = 1
    else:
        row_len = None
        per_device_batch = params["batch_size"]

    lora = params["lora"]
    peft_config = None
    if lora is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                 # "all-linear" leaves out the output layer, as TRL 1.16 requires (its fused
                                 # LM head reads lm_head.weight directly, so an adapter there never trains).
                                 target_modules=lora["target_modules"], task_type="CAUSAL_LM")

    pad_multiple = None
    if settings["attn_implementation"] == "flex_attention" or settings["torch_compile"]:
        # Compiled kernels (flex attention always is) specialise on shapes: padding each packed batch to the
        # full token budget gives one shape and one compilation. The pad tokens sit at position 0 with label
        # -100, each its own one-token sequence, so they attend to nothing real and add no loss; bfd fills
        # rows well, so little compute is lost. Without packing, a multiple of flex's 128-token block.
        pad_multiple = row_len if packing else 128
    optim = "adamw_torch_fused" if cuda else "adamw_torch"
    cfg = dict(
        output_dir=str(scratch / "trainer"),
        num_train_epochs=float(params["epochs"]),
        max_steps=params["max_steps"] or -1,
        learning_rate=float(params["learning_rate"]),
        per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=params["gradient_accumulation"],
        lr_scheduler_type=params["lr_scheduler"],
        warmup_steps=float(params["warmup_ratio"]),  # transformers 5: a float < 1 is a ratio of the steps
        weight_decay=float(params["weight_decay"]),
        max_grad_norm=float(params["max_grad_norm"]),
        logging_steps=params["logging_steps"],
        seed=seed,
        data_seed=seed,
        bf16=bf16,
        fp16=False,
        tf32=bool(cuda and (settings.get("capability") or [8])[0] >= 8) or None,
        use_cpu=not cuda,
        ddp_find_unused_parameters=False,
        optim=optim,
        gradient_checkpointing=settings["gradient_checkpointing"],
        torch_compile=settings["torch_compile"],
        use_liger_kernel=settings["liger"],
        # Pre-tokenized data: TRL keeps our labels. max_length is the packing row length when packing;
        # otherwise None, since samples were already cut (TRL rejects max_length with padding_free and no
        # packing, and would re-scan the table for nothing).
        max_length=row_len,
        packing=packing,
        packing_strategy="bfd",
        padding_free=settings["padding_free"],
        pad_to_multiple_of=pad_multiple,
        completion_only_loss=False,
        assistant_only_loss=False,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=True,
    )
    import dataclasses

    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    if "warmup_ratio" in fields:  # transformers < 5.2x; later ones take a float < 1 in warmup_steps
        cfg["warmup_ratio"] = cfg.pop("warmup_steps")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars are noise in an executor's output
    with warnings.catch_warnings():
        # transformers 5.2x renames gradient_checkpointing; TRL 1.16's config still defines the old field.
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
        args = SFTConfig(**cfg)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(str(base_model))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(
            str(base_model), dtype=torch.float32, attn_implementation=settings["attn_implementation"])
    else:
        model.set_attn_implementation(settings["attn_implementation"])
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=list(callbacks))
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    # Progress goes through the executor's callback; the printers would only add noise to its output.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def train_worker(*, base_model: Path, dataset: Path, stage: Path, params: Mapping[str, Any],
                 settings: Mapping[str, Any], stats: DataStats, seed: int,
                 progress: Callable[[Mapping[str, Any]], None], callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train and save into ``stage`` (the model, or the adapter; the adapter goes to stage/.scratch/adapter
    when it will be merged). Runs in every process of a distributed run; returns metrics (rank 0's count).
    """
    scratch = stage / ".scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    from transformers import set_seed

    set_seed(seed)
    from accelerate import PartialState

    state = PartialState(cpu=settings["device"] == "cpu")
    with state.main_process_first():
        ds = load_training_dataset(dataset, stats, scratch / f"datasets-{state.process_index}")
    import torch

    settings = dict(settings)
    oom_retries: list[dict[str, int]] = []
    while True:
        progress_cb = _progress_callback_class()(progress)
        trainer = _build_trainer(base_model=base_model, dataset=ds, params=params, settings=settings, stats=stats,
                                 seed=seed, scratch=scratch, callbacks=[progress_cb, *callbacks])
        t0 = time.time()
        smaller = None
        try:
            out = trainer.train()
            break
        except torch.OutOfMemoryError as exc:
            budget, step = settings["max_tokens_per_batch"], trainer.state.global_step
            smaller = _smaller_budget(settings, stats, step, state.num_processes)
            if smaller is None:
                raise RunError(f"out of memory while training on {settings['device']}: {str(exc).splitlines()[0]}",
                               hint="lower max_tokens_per_batch (or batch_size), or set gradient_checkpointing: true"
                               ) from exc
        # Outside the except block, so the traceback's frames no longer hold the failed step's tensors.
        log.warning("out of memory at step %d with %d-token batches; starting again with %d", step, budget, smaller)
        oom_retries.append({"step": step, "max_tokens_per_batch": budget})
        _release(trainer)
        del trainer
        settings["max_tokens_per_batch"] = smaller
    runtime = time.time() - t0
    lora = params["lora"]
    save_to = scratch / "adapter" if (lora and lora["merge"]) else stage
    trainer.save_model(str(save_to))
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(str(save_to))
        (save_to / "training_args.bin").unlink(missing_ok=True)  # a pickle, not part of a model directory
    hist = trainer.state.log_history
    metrics = {
        "global_step": int(out.global_step),
        "train_loss": float(out.training_loss),
        "first_loss": progress_cb.losses[0][1] if progress_cb.losses else None,
        "last_loss": progress_cb.losses[-1][1] if progress_cb.losses else None,
        "losses": progress_cb.losses,
        "runtime_s": round(runtime, 3),
        "train_tokens": next((h["num_tokens"] for h in reversed(hist) if "num_tokens" in h), None),
        "world_size": state.num_processes,
        "max_tokens_per_batch": settings["max_tokens_per_batch"],
        "oom_retries": oom_retries,
    }
    if trainer.is_world_process_zero():
        (scratch / "metrics.json").write_text(json.dumps(metrics))
    if trainer.is_world_process_zero():
        progress({"step": int(out.global_step), "total": int(trainer.state.max_steps), "loss": metrics["last_loss"]})
    return metrics


def _smaller_budget(settings: Mapping[str, Any], stats: DataStats, step: int, processes: int) -> int | None:
    """The token budget to start again with after running out of memory, or None to give up.

    Only a budget we chose ourselves is halved, only in a single process (a worker of a distributed run
    cannot restart alone), and only within the first OOM_RETRY_STEPS steps: bfd packing fills every batch
    to about the budget, so memory peaks at once, and a later failure would throw away real training.
    """
    budget = settings.get("max_tokens_per_batch")
    if not (settings.get("budget_auto") and budget and processes == 1 and step < OOM_RETRY_STEPS):
        return None
    smaller = max(budget // 2, MIN_AUTO_TOKEN_BUDGET)
    # A packed row is never shorter than the longest sample: past that, halving changes nothing.
    if max(smaller, stats.longest) >= max(budget, stats.longest):
        return None
    return smaller


def _release(trainer: Any) -> None:
    """Give the failed attempt's GPU memory back before the next one loads its model."""
    import gc

    import torch

    free_memory = getattr(trainer.accelerator, "free_memory", None)
    if callable(free_memory):
        free_memory()
    trainer.model = trainer.model_wrapped = trainer.optimizer = trainer.lr_scheduler = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _merge_adapter(base_model: Path, adapter_dir: Path, out_dir: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    base = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(out_dir))
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(str(out_dir))


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
            _merge_adapter(request.base_model, stage / ".scratch" / "adapter", stage)
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
