"""Multi-process training through ``accelerate launch`` (``processes: N`` > 1 or ``nodes: M`` > 1).

:func:`accelerate_config` writes the run's accelerate config (kept in the output as
``accelerate_config.yaml``); :func:`launch_distributed` starts ``accelerate launch`` with each worker
being ``python -m specdsl.training.trl.worker REQUEST.json``, relays the progress and errors the
workers print behind :data:`WORKER_MARK`, and keeps the rest in ``train.log``. With ``nodes: M`` the user starts
the step on every node, each with ``SPECDSL_MACHINE_RANK`` (0 .. M-1) and ``SPECDSL_MAIN_PROCESS_IP``
(the address of machine 0) in its environment and the output directory on a filesystem machine 0 can
write; machine 0 writes the output, the others only train.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

from specdsl.contract.hookspecs import TrainRequest
from specdsl.errors import RunError
from specdsl.training.trl.data import DataStats

log = logging.getLogger("specdsl.train")

# Marker for the lines a worker process prints for its parent (progress, errors); anything else it prints
# goes to the training log.
WORKER_MARK = "@@specdsl "


def accelerate_config(params: Mapping[str, Any], device: str, *, bf16: bool, machine_rank: int = 0,
                      main_process_ip: str | None = None) -> dict[str, Any]:
    """The ``accelerate launch`` config for a multi-process run (pure; written to accelerate_config.yaml).

    ``num_processes`` is the total over all machines (accelerate's meaning): processes x nodes.
    """
    procs, nodes, strategy = params["processes"], params["nodes"], params["strategy"]
    if device == "cpu" and strategy != "ddp":
        raise RunError(f"strategy: {strategy} needs the cuda target; on cpu only ddp (gloo) is supported",
                       hint="use `strategy: ddp` on cpu, or run on a machine with GPUs (`target: cuda`)")
    cfg: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "num_processes": procs * nodes,
        "num_machines": nodes,
        "machine_rank": machine_rank,
        "mixed_precision": "bf16" if bf16 else "no",
        "use_cpu": device == "cpu",
        "gpu_ids": "all",
        "rdzv_backend": "static",
        "same_network": True,
        "main_training_function": "main",
        "downcast_bf16": "no",
        "debug": False,
    }
    if nodes > 1:
        if not main_process_ip:
            raise RunError("nodes > 1 needs the address of machine 0",
                           hint="set main_process_ip in the step or SPECDSL_MAIN_PROCESS_IP on every node")
        cfg["main_process_ip"] = main_process_ip
        cfg["main_process_port"] = params["main_process_port"] or 29500
    else:
        # 0 = accelerate picks a free port: parallel runs (tests, other users) on one machine don't collide.
        cfg["main_process_port"] = params["main_process_port"] or 0
    if device == "cpu":
        cfg["distributed_type"] = "MULTI_CPU"
    elif strategy == "ddp":
        cfg["distributed_type"] = "MULTI_GPU"
    elif strategy == "fsdp":
        cfg["distributed_type"] = "FSDP"
        cfg["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # wraps the model's _no_split_modules
            "fsdp_reshard_after_forward": True,
            "fsdp_offload_params": False,
            "fsdp_cpu_ram_efficient_loading": True,
            # FULL_STATE_DICT: the saved output is an ordinary HF model directory, not shards.
            "fsdp_state_dict_type": "FULL_STATE_DICT",
            "fsdp_activation_checkpointing": bool(params["gradient_checkpointing"]),
        }
    else:
        cfg["distributed_type"] = "DEEPSPEED"
        cfg["deepspeed_config"] = {
            "zero_stage": params["zero_stage"],
            "gradient_accumulation_steps": params["gradient_accumulation"],
            "gradient_clipping": params["max_grad_norm"],
            "offload_optimizer_device": "none",
            "offload_param_device": "none",
            # ZeRO-3 shards the weights: gather them at save time so the output is a plain model directory.
            "zero3_init_flag": params["zero_stage"] == 3,
            "zero3_save_16bit_model": params["zero_stage"] == 3,
        }
    return cfg


def launch_distributed(request: TrainRequest, *, params: Mapping[str, Any], settings: Mapping[str, Any],
                       stats: DataStats, seed: int, stage: Path,
                       progress: Callable[[Mapping[str, Any]], None]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train through ``accelerate launch`` into ``stage``; return rank 0's metrics and what was launched."""
    import yaml

    device = settings["device"]
    if params["strategy"] == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise RunError("strategy: deepspeed needs the deepspeed package", hint="pip install deepspeed")
    machine_rank = int(os.environ.get("SPECDSL_MACHINE_RANK", "0"))
    ip = params["main_process_ip"] or os.environ.get("SPECDSL_MAIN_PROCESS_IP")
    cfg = accelerate_config(params, device, bf16=settings["bf16"], machine_rank=machine_rank, main_process_ip=ip)
    cfg_path = stage / "accelerate_config.yaml"
    cfg_path.write_text("# Generated by specdsl for this training run; kept so the run can be inspected.\n"
                        + yaml.safe_dump(cfg, sort_keys=True), encoding="utf-8")
    scratch = stage / ".scratch"
    scratch.mkdir(exist_ok=True)
    req_path = scratch / "request.json"
    req_path.write_text(json.dumps({
        "base_model": str(request.base_model), "dataset": str(request.dataset), "stage": str(stage),
        "params": dict(params), "settings": dict(settings), "stats": stats.as_dict(), "seed": seed,
    }, default=str), encoding="utf-8")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg_path)]
    if device == "cpu":
        # accelerate starts local worker processes only through its torchrun launcher (the --multi_gpu path;
        # its plain CPU path spawns one process unless mpirun is configured). use_cpu/ACCELERATE_USE_CPU keep
        # every worker on the CPU, where PartialState picks DDP over gloo.
        cmd.append("--multi_gpu")
    cmd += ["-m", "specdsl.training.trl.worker", str(req_path)]
    env = dict(os.environ)
    import specdsl

    pkg_root = str(Path(specdsl.__file__).resolve().parents[1])  # the folder that holds the specdsl package
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    if device == "cpu":
        env["ACCELERATE_USE_CPU"] = "true"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // params["processes"])))
    launch = {"command": cmd, "config": cfg, "num_processes": cfg["num_processes"],
              "num_machines": cfg["num_machines"], "machine_rank": machine_rank}
    log.info("launching: %s", " ".join(cmd))
    log_path = stage / "train.log"
    error: dict[str, Any] | None = None
    tail: list[str] = []
    with open(log_path, "w", encoding="utf-8") as logf:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                bufsize=1)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(WORKER_MARK):
                    try:
                        msg = json.loads(line[len(WORKER_MARK):])
                    except ValueError:
                        msg = {}
                    if msg.get("event") == "progress":
                        progress(msg["data"])
                        continue
                    if msg.get("event") == "error":
                        error = msg
                logf.write(line)
                tail.append(line)
                del tail[:-40]
            rc = proc.wait()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    if rc != 0:
        if error is not None:
            raise RunError(error.get("message", "a training worker failed"), hint=error.get("hint"))
        raise RunError(f"distributed training failed (accelerate launch exited with {rc})",
                       hint="last lines of the log:\n" + "".join(tail[-15:]))
    metrics_path = scratch / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    return metrics, launch
