"""Training targets on TRL: ``cpu``, ``cuda`` and the ``auto`` choice between them.

A target receives a :class:`~specdsl.contract.hookspecs.TrainRequest` whose dataset is a Parquet table of
*pre-tokenized* samples (``input_ids``, ``labels`` with -100 where no loss is taken, optionally
``attention_mask``). The masks are the product of the spec (principle 6 of the design): TRL must train on
exactly those labels, so this package never lets TRL tokenize, template or mask again. TRL 1.16's
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
``python -m specdsl.training.trl.worker REQUEST.json``. With ``nodes: M`` the user starts the step on
every node, each with ``SPECDSL_MACHINE_RANK`` (0 .. M-1) and ``SPECDSL_MAIN_PROCESS_IP`` (the address of
machine 0) in its environment and the output directory on a filesystem machine 0 can write; machine 0
writes the output, the others only train.

The package, in TRL's config-and-trainer style, one concern a module, each importing only those above it:

* :mod:`.config`: the step's parameters (:data:`PARAMS_SCHEMA`, defaults, :func:`resolve_params`);
* :mod:`.data`: the tokenized Parquet table (checks, counts, reading it for TRL);
* :mod:`.settings`: device, precision, batching, attention, kernels and the cuda token budget;
* :mod:`.trainer`: building and running ``SFTTrainer``, the out-of-memory restart, merging LoRA;
* :mod:`.launch`: ``accelerate launch`` for several processes or machines; :mod:`.worker` is one process;
* :mod:`.card`: the output directory (staging, model card, ``specdsl_train.json``, publishing);
* :mod:`.targets`: :class:`CpuTarget`, :class:`CudaTarget`, :func:`choose_target`, :func:`run_training`.

Heavy imports (torch, transformers, trl, datasets, peft, accelerate, pyarrow) happen inside functions:
importing any of these modules must stay cheap (``specdsl validate``).
"""

from __future__ import annotations

from specdsl.training.trl.config import PARAMS_SCHEMA, TARGET_VERSION, default_params, resolve_params
from specdsl.training.trl.data import DataStats, inspect_dataset
from specdsl.training.trl.launch import accelerate_config
from specdsl.training.trl.settings import detect_capabilities, plan_settings
from specdsl.training.trl.targets import CpuTarget, CudaTarget, choose_target, run_training

__all__ = [
    "CpuTarget", "CudaTarget", "choose_target", "run_training", "resolve_params", "plan_settings",
    "detect_capabilities", "inspect_dataset", "accelerate_config", "DataStats", "PARAMS_SCHEMA",
    "default_params", "TARGET_VERSION",
]
