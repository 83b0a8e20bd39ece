"""The training itself: TRL's SFTTrainer built from the resolved parameters and planned settings, and run.

Runs in the target's own process, or in each worker of an accelerate launch (:mod:`.worker`).
The dataset is pre-tokenized: TRL 1.16's ``SFTTrainer`` recognises a dataset with an ``input_ids``
column as processed and keeps its ``labels`` "as is", so TRL never tokenizes, templates or masks again.
:func:`train_worker` starts again with half the token budget when an automatically sized budget runs
out of memory in the first steps (:func:`smaller_budget`).
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from specdsl.errors import RunError
from specdsl.training.trl.data import DataStats, load_training_dataset
from specdsl.training.trl.settings import MIN_AUTO_TOKEN_BUDGET

log = logging.getLogger("specdsl.train")

OOM_RETRY_STEPS = 10   # an automatic budget is halved after running out of memory within this many steps


def _progress_callback_class():
    from transformers import TrainerCallback

    class SpecdslProgress(TrainerCallback):
        """One progress event per optimizer step (rank 0 only): step, total, loss, learning rate, tokens/s.

        The trainer only logs every ``logging_steps``; asking it to log after every step (``should_log``
        set in ``on_step_end``, which runs just before the trainer's logging check) gives each step's own
        loss. ``losses`` (the curve in the metrics and the card) keeps one point per ``logging_steps``
        steps, plus the first and the last, each the mean loss since the previous point.
        """

        def __init__(self, progress: Callable[[Mapping[str, Any]], None], logging_steps: int = 1):
            self.progress = progress
            self.logging_steps = max(int(logging_steps or 1), 1)
            self.losses: list[tuple[int, float]] = []
            self._window: list[float] = []
            self._last_tokens: tuple[float, float] | None = None  # (time, tokens seen) at the previous event

        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero:
                self._last_tokens = (time.monotonic(), 0.0)
                self.progress({"step": 0, "total": state.max_steps, "loss": None})

        def on_step_end(self, args, state, control, **kw):
            control.should_log = True
            return control

        def on_log(self, args, state, control, logs=None, **kw):
            if not (logs and "loss" in logs and state.is_world_process_zero):
                return
            step, loss = state.global_step, float(logs["loss"])
            self._window.append(loss)
            if step == 1 or step % self.logging_steps == 0 or step >= state.max_steps:
                self.losses.append((step, sum(self._window) / len(self._window)))
                self._window.clear()
            event: dict[str, Any] = {"step": step, "total": state.max_steps, "loss": loss}
            if logs.get("learning_rate") is not None:
                event["learning_rate"] = float(logs["learning_rate"])
            tokens = logs.get("num_tokens")
            now = time.monotonic()
            if tokens is not None and self._last_tokens is not None and now > self._last_tokens[0]:
                event["tokens_per_s"] = (float(tokens) - self._last_tokens[1]) / (now - self._last_tokens[0])
                self._last_tokens = (now, float(tokens))
            self.progress(event)

    return SpecdslProgress


def build_trainer(*, base_model: Path, dataset, params: Mapping[str, Any], settings: Mapping[str, Any],
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
        progress_cb = _progress_callback_class()(progress, params.get("logging_steps") or 1)
        trainer = build_trainer(base_model=base_model, dataset=ds, params=params, settings=settings, stats=stats,
                                seed=seed, scratch=scratch, callbacks=[progress_cb, *callbacks])
        t0 = time.time()
        smaller = None
        try:
            out = trainer.train()
            break
        except torch.OutOfMemoryError as exc:
            budget, step = settings["max_tokens_per_batch"], trainer.state.global_step
            smaller = smaller_budget(settings, stats, step, state.num_processes)
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
    # The loss curve (model card, run record): what the trainer logged, every `logging_steps` steps.
    losses = progress_cb.losses or [(int(h["step"]), float(h["loss"])) for h in hist if "loss" in h and "step" in h]
    metrics = {
        "global_step": int(out.global_step),
        "train_loss": float(out.training_loss),
        "first_loss": losses[0][1] if losses else None,
        "last_loss": losses[-1][1] if losses else None,
        "min_loss": min(loss for _, loss in losses) if losses else None,
        "losses": losses,
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


def smaller_budget(settings: Mapping[str, Any], stats: DataStats, step: int, processes: int) -> int | None:
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


def merge_adapter(base_model: Path, adapter_dir: Path, out_dir: Path) -> None:
    """Write into ``out_dir`` the base model with the LoRA adapter in ``adapter_dir`` merged into its weights."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    base = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(out_dir))
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(str(out_dir))
