"""The cuda training target on a real GPU (skipped where torch sees none, as in CI; run by bench/gpu_check.sh
on the lent GPU machine). The CPU-side checks of the same set-up are in test_training.py."""

from __future__ import annotations

import json
import math

import pytest

from tests.test_training import answer_ids, batch_spy, garbage_ids, request, write_parquet

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _rows(tokenizer, n: int = 12) -> list[dict]:
    rows = []
    for i in range(n):
        g = garbage_ids(tokenizer, 3 + 5 * i, seed=100 + i)
        a = answer_ids(tokenizer, f"Answer: {i * 7}. The sum of the two numbers is {i * 7}.")
        rows.append({"input_ids": g + a, "labels": [-100] * len(g) + a})
    return rows


def test_cuda_fast_path_trains_on_exactly_the_designed_labels(tmp_path, tiny_model_dir, tiny_tokenizer):
    from specdsl.training.trl import CudaTarget

    rows = _rows(tiny_tokenizer)
    data = write_parquet(tmp_path / "d.parquet", rows)
    spy, events = batch_spy(), []
    out = CudaTarget().train(request(tmp_path, tiny_model_dir, data, max_steps=3, max_tokens_per_batch=256),
                             events.append, callbacks=[spy])
    record = json.loads((out / "specdsl_train.json").read_text())
    settings = record["settings"]
    assert settings["bf16"] and settings["packing"] and settings["padding_free"]
    assert settings["attn_implementation"] in ("flash_attention_3", "flash_attention_2", "flex_attention", "sdpa")
    assert all(math.isfinite(e["loss"]) for e in events if e["loss"] is not None)

    by_ids = {tuple(r["input_ids"]): r["labels"] for r in rows}
    seen = 0
    for batch in spy.batches:
        ids, labels, pos = batch["input_ids"][0], batch["labels"][0], batch["position_ids"][0]
        starts = [i for i, p in enumerate(pos.tolist()) if p == 0] + [len(pos)]
        for s, e in zip(starts, starts[1:]):
            seg = tuple(ids[s:e].tolist())
            if seg in by_ids:  # a sample (the rest is the pad tail, one-token sequences without loss)
                assert labels[s].item() == -100 and labels[s + 1:e].tolist() == by_ids[seg][1:]
                seen += 1
            else:
                assert e - s == 1 and labels[s].item() == -100
    assert seen >= len(rows)  # every sample reached the model with its labels (3 steps cover the table)


@pytest.mark.parametrize("precision, attn, tol", [("fp32", "sdpa", 1e-4), ("auto", "auto", 3e-2)])
def test_cuda_first_loss_matches_the_cpu_path(tmp_path, tiny_model_dir, tiny_tokenizer, precision, attn, tol):
    """The same batch of 4 samples: step-1 loss on the GPU (fp32 sdpa: tight; bf16 with the chosen attention
    kernel: within bf16 rounding) equals the CPU target's."""
    from specdsl.training.trl import CpuTarget, CudaTarget

    data = write_parquet(tmp_path / "d.parquet", _rows(tiny_tokenizer, 4))
    first = {}
    for name, target, params in (
            ("cpu", CpuTarget(), {}),
            ("cuda", CudaTarget(), {"precision": precision, "attn_implementation": attn})):
        events = []
        target.train(request(tmp_path, tiny_model_dir, data, name=name, max_steps=1, batch_size=4, packing=False,
                             padding_free=True, **params), events.append)
        first[name] = next(e["loss"] for e in events if e["loss"] is not None)
    assert first["cuda"] == pytest.approx(first["cpu"], rel=tol)


def test_local_generation_on_the_gpu_matches_the_cpu(lively_model_dir):
    """The transformers backend with device: auto generates on the GPU; in fp32, greedy answers equal the
    CPU's (batched, so left padding and per-row stopping are exercised on the GPU too). ``lively_model_dir`` is
    the tiny model with larger weights, whose answers differ by prompt (no near-ties to flip)."""
    from specdsl.backends.transformers.backend import TransformersBackend
    from tests.test_transformers_backend import PROMPTS, _requests, _run

    backend, reqs = TransformersBackend(), _requests(system="You are a helpful assistant.")
    base = {"model": str(lively_model_dir), "max_new_tokens": 12, "dtype": "float32", "batch_size": 4}
    cpu = _run(backend, {**base, "device": "cpu"}, reqs)
    gpu = _run(backend, {**base, "device": "auto"}, reqs)
    assert len(reqs) == len(PROMPTS)
    for r in reqs:
        assert gpu[r.key].ok, gpu[r.key].error
        assert gpu[r.key].text == cpu[r.key].text and gpu[r.key].output_tokens == cpu[r.key].output_tokens
