"""Training speed on one GPU: plain TRL SFTTrainer vs specdsl's CudaTarget fast path.

Run on the lent H100 (finishes in < 6 minutes with the defaults):

    python3 bench/bench_gpu_training.py                  # 360M and 135M SmolLM2 shapes, 50 steps each
    python3 bench/bench_gpu_training.py --device cpu --tiny   # smoke run of the same code on a CPU

All GPU checks in one device call (tests/test_gpu.py, then this benchmark): bench/gpu_check.sh, with the
wheels fetched by bench/gpu_wheels.sh.

The GPU box (python3: torch 2.11 cu130, transformers 5.17, accelerate, peft, pyarrow, pandas, pluggy,
pyyaml, tokenizers, xxhash) lacks these wheels; carry them (see the device README) and put them on
PYTHONPATH before running:

    trl==1.16.0  datasets==5.2.0  dill==0.4.1  multiprocess==0.70.19
    jsonschema==4.26.0 (+ referencing, jsonschema-specifications, rpds-py: for tests/test_gpu.py and specdsl)
    optional: liger-kernel==0.8.5 (pure Python + Triton: the fast path then uses Liger's layer kernels)
    optional: xxhash (only if `python3 -m pip show xxhash` finds none there)
    flash-attn has no prebuilt wheel for torch 2.11/cu130 on PyPI; without it the fast path uses flex attention.

What is compared, on the same random-init model (built from a config, saved once, loaded by both) and the
same synthetic pre-tokenized samples of 200-2,000 tokens whose first 10-50% carry label -100:

* ``trl-default``: ``SFTTrainer`` with TRL's defaults (bf16 autocast, gradient checkpointing on, sdpa,
  padded batches) and ``per_device_train_batch_size=16``, ``max_length=2048`` (so no sample is cut).
* ``specdsl-same-batches``: ``CudaTarget`` with ``packing: false, batch_size: 16``: padding-free batches of
  the same 16 samples in the same order (same seed), so its per-step loss must track ``trl-default``'s;
  the max abs difference over the first 50 steps is the correctness check of the fast path.
* ``specdsl-fast``: ``CudaTarget`` with its defaults: bfd packing into padding-free batches of
  ``max_tokens_per_batch`` (16,384) tokens.
* ``specdsl-fast-compile``: the same with ``torch_compile: true`` (its compilation falls in the warm-up
  steps; on a short run it may not pay for itself, which is what this measures). Last, so the deadline
  skips it first.

tokens/s counts real (non-pad) tokens and excludes the first ``--warmup`` steps (compilation, autotuning).
MFU = 6 * N * tokens/s / peak, N = all parameters (embeddings included, tied once), peak = 989e12 FLOP/s
(H100 SXM dense bf16); pass ``--peak`` for another card.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

H100_SXM_BF16_DENSE = 989e12
RUNS = ("trl-default", "specdsl-same-batches", "specdsl-fast", "specdsl-fast-compile")

SHAPES = {
    # SmolLM2-360M and -135M shapes (their config.json), random init.
    "360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                 num_key_value_heads=5, vocab_size=49152, rope_theta=100000.0),
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=600, rope_theta=10000.0),
}


def build_model_dir(path: Path, shape: str, seed: int) -> int:
    """A random-init Llama of ``shape`` with a small offline tokenizer; returns the parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tinymodel import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, tie_word_embeddings=True,
                      rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path)
    tok.save_pretrained(path)  # vocab ids beyond the tokenizer's are fine: the data is pre-tokenized
    return n_params


def build_dataset(path: Path, *, n: int, lo: int, hi: int, vocab: int, seed: int) -> tuple[list, list]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    ids_col, labels_col = [], []
    for _ in range(n):
        length = rng.randint(lo, hi)
        # ids from 3 up: 0-2 are the specials (pad = 0); the meter counts non-pad tokens.
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        masked = int(length * rng.uniform(0.1, 0.5))
        ids_col.append(ids)
        labels_col.append([-100] * masked + ids[masked:])
    schema = pa.schema([("input_ids", pa.list_(pa.int64())), ("labels", pa.list_(pa.int64()))])
    pq.write_table(pa.table({"input_ids": ids_col, "labels": labels_col}, schema=schema), path)
    return ids_col, labels_col


def meter_callback(device: str, pad_token_id: int = 0):
    """Times each optimizer step and counts the real tokens the model received, at its forward."""
    import torch
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        def __init__(self):
            self.step_end: list[float] = []
            self.step_tokens: list[int] = []
            self.losses: dict[int, float] = {}
            self._tokens = None
            self._handle = None

        def _sync(self):
            if device == "cuda":
                torch.cuda.synchronize()

        def on_train_begin(self, args, state, control, model=None, **kw):
            def hook(module, a, kwargs):
                mask = kwargs.get("attention_mask")
                # Padded batches: the mask counts real tokens. Padding-free batches may be padded to a fixed
                # length (flex attention, compile): the synthetic data never uses the pad id, so count the rest.
                n = mask.sum() if mask is not None else (kwargs["input_ids"] != pad_token_id).sum()
                self._tokens = n if self._tokens is None else self._tokens + n

            self._handle = model.register_forward_pre_hook(hook, with_kwargs=True)
            self._sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self._sync()
            self.step_end.append(time.perf_counter())
            self.step_tokens.append(int(self._tokens))
            self._tokens = None

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses[state.global_step] = float(logs["loss"])

        def on_train_end(self, args, state, control, **kw):
            if self._handle is not None:
                self._handle.remove()

        def summary(self, warmup: int) -> dict:
            ends = [self.t0] + self.step_end
            w = min(warmup, max(len(self.step_end) - 1, 0))
            secs = ends[-1] - ends[w]
            toks = sum(self.step_tokens[w:])
            return {"steps": len(self.step_end), "timed_steps": len(self.step_end) - w, "seconds": secs,
                    "tokens": toks, "tokens_per_s": toks / secs if secs > 0 else float("nan")}

    return Meter()


def run_trl_default(model_dir: Path, parquet: Path, work: Path, *, steps: int, device: str, meter) -> None:
    import datasets
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    ds = datasets.Dataset.from_parquet(str(parquet), cache_dir=str(work / "ds-cache"))
    kwargs = dict(output_dir=str(work / "trl-default"), per_device_train_batch_size=16, max_length=2048,
                  max_steps=steps, logging_steps=1, report_to="none", save_strategy="no", seed=0,
                  disable_tqdm=True)
    if device == "cpu":
        kwargs.update(use_cpu=True, bf16=False)  # TRL defaults to bf16; the CPU smoke run stays in fp32
    trainer = SFTTrainer(model=str(model_dir), args=SFTConfig(**kwargs), train_dataset=ds,
                         processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[meter])
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the meter records the losses; keep the output readable
    trainer.train()


def run_specdsl(model_dir: Path, parquet: Path, work: Path, name: str, params: dict, *, device: str, meter):
    from specdsl.training.trl import CpuTarget, CudaTarget
    from specdsl.contract.hookspecs import TrainRequest

    target = CudaTarget() if device == "cuda" else CpuTarget()
    out = work / name
    req = TrainRequest(base_model=model_dir, dataset=parquet, output_dir=out,
                       params={"logging_steps": 1, **params}, seed=0, card={"spec": "bench"})
    target.train(req, lambda e: None, callbacks=[meter])
    record = json.loads((out / "specdsl_train.json").read_text())
    shutil.rmtree(out, ignore_errors=True)  # a 360M fp32 model is 1.4 GB: keep the disk free
    return record["settings"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny model and short samples (smoke run)")
    ap.add_argument("--shapes", default="360m,135m", help="comma list of: " + ", ".join(SHAPES))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of tokens/s")
    ap.add_argument("--budget", type=int, default=None,
                    help="max_tokens_per_batch of specdsl-fast (default 16384; 2048 with --tiny)")
    ap.add_argument("--attn", default="auto", help="attn_implementation for the specdsl runs")
    ap.add_argument("--runs", default=None,
                    help="comma list of: " + ", ".join(RUNS) + " (default: all on cuda; on cpu, all but "
                         "specdsl-fast-compile, whose CPU compilation takes minutes)")
    ap.add_argument("--peak", type=float, default=H100_SXM_BF16_DENSE, help="peak FLOP/s for MFU")
    ap.add_argument("--deadline", type=float, default=330.0, help="seconds; later runs are skipped")
    ap.add_argument("--json", type=Path, default=None, help="write the results here too")
    args = ap.parse_args(argv)
    t_start = time.time()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: nothing to measure. (Smoke-test the script with --device cpu --tiny.)")
        return 0
    import logging

    import datasets

    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("specdsl.train").setLevel(logging.INFO)
    shapes = ["tiny"] if args.tiny else [s.strip() for s in args.shapes.split(",") if s.strip()]
    runs = ([r.strip() for r in args.runs.split(",") if r.strip()] if args.runs
            else [r for r in RUNS if args.device == "cuda" or r != "specdsl-fast-compile"])
    lo, hi = (20, 200) if args.tiny else (200, 2000)
    steps = min(args.steps, 10) if args.tiny and args.steps == 50 else args.steps
    budget = args.budget or (2048 if args.tiny else 16384)
    dev_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"device: {dev_name}; torch {torch.__version__}; MFU peak used: {args.peak:.3e} FLOP/s "
          f"({'H100 SXM dense bf16' if args.peak == H100_SXM_BF16_DENSE else 'given'})")
    results = []
    work_root = Path(tempfile.mkdtemp(prefix="specdsl-bench-"))
    try:
        for shape in shapes:
            work = work_root / shape
            work.mkdir()
            model_dir = work / "model"
            n_params = build_model_dir(model_dir, shape, seed=0)
            # Enough samples for every run's steps: 16 per padded step, or the token budget per packed step.
            avg = (lo + hi) / 2
            n_samples = int(max(16 * steps, steps * budget / avg) * 1.1) + 16
            parquet = work / "data.parquet"
            build_dataset(parquet, n=n_samples, lo=lo, hi=hi, vocab=SHAPES[shape]["vocab_size"], seed=0)
            print(f"\n== shape {shape}: {n_params / 1e6:.1f}M parameters, {n_samples} samples of {lo}-{hi} tokens")
            shape_res = {}
            for run in runs:
                if time.time() - t_start > args.deadline:
                    print(f"   {run}: skipped (past the {args.deadline:.0f} s deadline)")
                    continue
                meter = meter_callback(args.device)
                if args.device == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.time()
                settings = None
                try:
                    if run == "trl-default":
                        run_trl_default(model_dir, parquet, work, steps=steps, device=args.device, meter=meter)
                    elif run in RUNS[1:]:
                        params = {"max_steps": steps,
                                  "attn_implementation": args.attn if args.device == "cuda" else "auto"}
                        if run == "specdsl-same-batches":
                            params.update(batch_size=16, packing=False, padding_free=True)
                        else:
                            params.update(packing=True, max_tokens_per_batch=budget,
                                          torch_compile=run == "specdsl-fast-compile")
                        try:
                            settings = run_specdsl(model_dir, parquet, work, run, params, device=args.device,
                                                   meter=meter)
                        except Exception as exc:
                            if args.device != "cuda" or args.attn != "auto":
                                raise
                            # Device time is scarce: if an optional kernel (flex attention's compile, Liger)
                            # breaks on this box, measure the conservative fast path instead of nothing.
                            print(f"   {run}: {type(exc).__name__}: {exc}\n"
                                  "      -> retrying with attn_implementation sdpa and liger off")
                            traceback.print_exc(limit=4)
                            meter = meter_callback(args.device)
                            torch.cuda.empty_cache()
                            torch.cuda.reset_peak_memory_stats()
                            params.update(attn_implementation="sdpa", liger=False)
                            settings = run_specdsl(model_dir, parquet, work, run, params, device=args.device,
                                                   meter=meter)
                    else:
                        print(f"   unknown run {run!r}")
                        continue
                except Exception as exc:  # one failing setup must not hide the others' figures
                    print(f"   {run}: FAILED after {time.time() - t0:.0f} s: {type(exc).__name__}: {exc}")
                    traceback.print_exc(limit=6)
                    shape_res[run] = {"error": f"{type(exc).__name__}: {exc}"}
                    continue
                s = meter.summary(args.warmup)
                s["mfu"] = 6 * n_params * s["tokens_per_s"] / args.peak
                s["wall_s"] = time.time() - t0
                s["losses"] = [meter.losses[k] for k in sorted(meter.losses)][:50]
                s["peak_mem_gib"] = (torch.cuda.max_memory_allocated() / 2**30) if args.device == "cuda" else None
                if settings:
                    s["choices"] = settings["reasons"]
                shape_res[run] = s
                mem = f", peak mem {s['peak_mem_gib']:.1f} GiB" if s["peak_mem_gib"] is not None else ""
                print(f"   {run:22s} {s['tokens_per_s']:>10,.0f} tokens/s  MFU {100 * s['mfu']:5.2f}%  "
                      f"({s['timed_steps']} timed steps, {s['tokens']:,} tokens in {s['seconds']:.1f} s; "
                      f"run {s['wall_s']:.0f} s{mem})")
                if settings:
                    print("      chose: " + "; ".join(settings["reasons"]))
                else:
                    print("      TRL defaults: bf16 autocast on a GPU, gradient checkpointing on, sdpa, padded batches of 16")
                ls = s["losses"]
                if ls:
                    print(f"      loss first 50 steps: {' '.join(f'{x:.4f}' for x in ls)}")
            a, b = shape_res.get("trl-default", {}), shape_res.get("specdsl-same-batches", {})
            if a.get("losses") and b.get("losses"):
                k = min(len(a["losses"]), len(b["losses"]))
                diff = max(abs(x - y) for x, y in zip(a["losses"][:k], b["losses"][:k]))
                shape_res["loss_max_abs_diff_same_batches"] = diff
                print(f"   max |loss(trl-default) - loss(specdsl-same-batches)| over {k} steps: {diff:.5f}")
            if a.get("tokens_per_s"):
                for r in RUNS[1:]:
                    if shape_res.get(r, {}).get("tokens_per_s"):
                        print(f"   speed-up {r} vs trl-default: {shape_res[r]['tokens_per_s'] / a['tokens_per_s']:.2f}x")
            results.append({"shape": shape, "params": n_params, "runs": shape_res})
            shutil.rmtree(work, ignore_errors=True)
    finally:
        shutil.rmtree(work_root, ignore_errors=True)
    print(f"\ntotal wall time {time.time() - t_start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"device": dev_name, "peak": args.peak, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
