"""The local transformers backend, on the tiny random-init chat model (no downloads, a few seconds).

The tiny model's text is gibberish; what matters is that decoding is deterministic, batch-invariant,
seeded per request, and that per-request problems come back as errors instead of crashing the run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jsonschema
import pytest

from specdsl.backends.transformers.backend import (DEFAULTS, OPTIONS_SCHEMA, TransformersBackend,
                                                   clear_model_cache, model_fingerprint)
from specdsl.errors import RunError
from specdsl.contract.hookspecs import GenerationBackend, GenRequest, GenResult

PROMPTS = [
    "What is 7 times 8?",
    "Alice has 12 apples and gives 5 to Bob. How many apples does Alice have left?",
    "Name the capital of France.",
    "Write a function that adds two numbers.",
    "Below is a context and an instruction. Based on the information provided in the context, write "
    "a response for the instruction. The quick brown fox jumps over the lazy dog.",
    "2 + 2 = ?",
    "Think carefully before you answer the question: where is Rome?",
]


def _requests(prompts=PROMPTS, *, system: str | None = None, params=None) -> list[GenRequest]:
    out = []
    for i, p in enumerate(prompts):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": p}]
        out.append(GenRequest(key=f"req-{i}", messages=tuple(messages), params=params or {}))
    return out


def _run(backend, options, requests) -> dict[str, GenResult]:
    results: dict[str, GenResult] = {}

    def on_result(r: GenResult) -> None:
        assert r.key not in results, "a result was reported twice"
        results[r.key] = r

    backend.generate(options, requests, on_result)
    assert set(results) == {r.key for r in requests}, "every request gets exactly one result"
    return results


@pytest.fixture
def backend():
    return TransformersBackend()


@pytest.fixture(scope="module")
def model_dir(lively_model_dir):
    return lively_model_dir


@pytest.fixture
def options(model_dir):
    return {"backend": "transformers", "model": str(model_dir), "max_new_tokens": 12,
            "device": "cpu"}


def test_satisfies_the_protocol_and_schema_is_valid(backend):
    assert isinstance(backend, GenerationBackend)
    assert backend.name == "transformers"
    jsonschema.Draft202012Validator.check_schema(backend.options_schema)
    assert backend.options_schema["additionalProperties"] is False
    # Every option has a documented default, and the defaults themselves are valid.
    for key, prop in backend.options_schema["properties"].items():
        assert prop["default"] == DEFAULTS[key]
        assert prop["description"]
    jsonschema.validate(DEFAULTS, OPTIONS_SCHEMA)
    assert backend.price({"model": "x"}, 1000, 1000) == 0.0


def test_schema_rejects_typos_and_bad_values():
    v = jsonschema.Draft202012Validator(OPTIONS_SCHEMA)
    assert not list(v.iter_errors({"max_new_tokens": 8, "temperature": 0.7, "device": "cuda"}))
    assert list(v.iter_errors({"max_new_token": 8}))      # typo: additionalProperties false
    assert list(v.iter_errors({"temperature": -1}))
    assert list(v.iter_errors({"top_p": 0}))
    assert list(v.iter_errors({"device": "tpu"}))
    assert list(v.iter_errors({"dtype": "int8"}))
    assert list(v.iter_errors({"batch_size": 0}))


def test_import_is_cheap():
    # specdsl validate imports the plugins; torch must not come with them.
    code = ("import sys, specdsl.backends.transformers.backend, specdsl.modelcache.models; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_greedy_is_deterministic_and_batch_invariant(backend, options):
    reqs = _requests(system="You are a helpful assistant.")
    one = _run(backend, {**options, "batch_size": 1}, reqs)
    three = _run(backend, {**options, "batch_size": 3}, reqs)
    all_ = _run(backend, {**options, "batch_size": 16}, reqs)
    for r in reqs:
        assert one[r.key].ok, one[r.key].error
        assert one[r.key].text == three[r.key].text == all_[r.key].text
        assert one[r.key].output_tokens == all_[r.key].output_tokens
        assert 0 < one[r.key].output_tokens <= 12
        assert one[r.key].input_tokens == all_[r.key].input_tokens > 0
        assert one[r.key].cost == 0.0
    # Different prompts give different answers (the batch rows are not mixed up).
    assert len({one[r.key].text for r in reqs}) > 1


def test_input_tokens_follow_the_chat_template(backend, options, tiny_tokenizer):
    req = _requests(["Name the capital of France."])[0]
    res = _run(backend, options, [req])[req.key]
    text = tiny_tokenizer.apply_chat_template([dict(m) for m in req.messages],
                                              add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    assert res.input_tokens == len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"])


def test_sampling_is_seeded_per_request_not_per_batch(backend, options):
    sampled = {**options, "temperature": 1.0, "seed": 7}
    reqs = _requests()
    a = _run(backend, {**sampled, "batch_size": 16}, reqs)
    b = _run(backend, {**sampled, "batch_size": 16}, reqs)
    assert {k: r.text for k, r in a.items()} == {k: r.text for k, r in b.items()}
    # The same request alone, or in another batch composition, draws the same tokens.
    alone = _run(backend, {**sampled, "batch_size": 1}, reqs[2:3])
    assert alone[reqs[2].key].text == a[reqs[2].key].text
    shuffled = _run(backend, {**sampled, "batch_size": 2}, list(reversed(reqs)))
    assert {k: r.text for k, r in shuffled.items()} == {k: r.text for k, r in a.items()}
    # Another seed gives other samples; sampling differs from greedy.
    c = _run(backend, {**sampled, "batch_size": 16, "seed": 8}, reqs)
    assert [c[r.key].text for r in reqs] != [a[r.key].text for r in reqs]
    greedy = _run(backend, options, reqs)
    assert [greedy[r.key].text for r in reqs] != [a[r.key].text for r in reqs]
    # Identical messages under different keys (e.g. sample 0 and 1 of a row) draw different samples.
    twins = [GenRequest(key=f"twin-{i}", messages=reqs[0].messages) for i in range(4)]
    t = _run(backend, sampled, twins)
    assert len({r.text for r in t.values()}) > 1


def test_top_p_small_is_greedy(backend, options):
    # With top_p tiny only the most likely token survives the nucleus: sampling equals greedy.
    reqs = _requests()
    nucleus = _run(backend, {**options, "temperature": 1.5, "top_p": 1e-6}, reqs)
    greedy = _run(backend, options, reqs)
    assert {k: r.text for k, r in nucleus.items()} == {k: r.text for k, r in greedy.items()}
    # A vanishing temperature is greedy too (and does not turn the logits into NaN).
    cold = _run(backend, {**options, "temperature": 1e-12}, reqs)
    assert {k: r.text for k, r in cold.items()} == {k: r.text for k, r in greedy.items()}


def test_request_params_override_options(backend, options):
    reqs = _requests(PROMPTS[:3])
    short = [GenRequest(key="short", messages=reqs[0].messages, params={"max_tokens": 3})]
    res = _run(backend, {**options, "max_new_tokens": 12}, reqs + short)
    assert res["short"].output_tokens <= 3
    # max_tokens only truncates: the first tokens agree with the longer greedy answer.
    long = _run(backend, {**options, "max_new_tokens": 3}, reqs[:1])
    assert res["short"].text == long[reqs[0].key].text


def test_per_request_errors_do_not_stop_the_others(backend, options, model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    ctx = cfg["max_position_embeddings"]
    good = _requests(PROMPTS[:2])
    too_long = GenRequest(key="too-long", messages=({"role": "user", "content": "apples " * ctx},))
    no_messages = GenRequest(key="empty", messages=())
    bad_params = GenRequest(key="bad-params", messages=good[0].messages, params={"temperature": -1})
    bad_role = GenRequest(key="bad-role", messages=({"content": "no role"},))
    res = _run(backend, options, [too_long, *good, no_messages, bad_params, bad_role])
    assert all(res[r.key].ok and res[r.key].text is not None for r in good)
    assert "prompt too long" in res["too-long"].error and str(ctx) in res["too-long"].error
    assert res["too-long"].input_tokens > ctx
    assert "no messages" in res["empty"].error
    assert "temperature" in res["bad-params"].error
    assert "chat template" in res["bad-role"].error


def test_results_arrive_batch_by_batch(backend, options):
    import time

    reqs = _requests()
    arrivals: list[tuple[float, GenResult]] = []
    backend.generate({**options, "batch_size": 2}, reqs,
                     lambda r: arrivals.append((time.perf_counter(), r)))
    # Results of one batch share its latency_s; 7 requests in batches of 2 make 4 batches.
    batches: dict[float, list[float]] = {}
    for t, r in arrivals:
        batches.setdefault(r.latency_s, []).append(t)
    assert [len(v) for v in batches.values()] == [2, 2, 2, 1]
    # Each batch is reported before the next one is decoded: the gap between two batches' reports
    # covers the later batch's whole decoding time (reporting at the end would leave no gap).
    groups = list(batches.items())
    for (_, before), (latency, after) in zip(groups, groups[1:]):
        assert min(after) - max(before) >= 0.9 * latency


def test_identity_is_stable_and_tracks_the_model(backend, options, model_dir, tmp_path):
    ident = backend.identity(options)
    assert ident == backend.identity(dict(options))
    json.dumps(ident)  # goes into fingerprints: plain JSON
    # Defaults written out explicitly change nothing; execution choices do not either.
    assert backend.identity({**options, "temperature": 0.0, "top_p": 1.0, "seed": 0}) == ident
    assert backend.identity({**options, "batch_size": 1, "device": "auto"}) == ident
    # Decoding options do.
    assert backend.identity({**options, "temperature": 0.7}) != ident
    assert backend.identity({**options, "max_new_tokens": 13}) != ident

    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    moved = backend.identity({**options, "model": str(copy)})
    assert moved["fingerprint"] == ident["fingerprint"]  # same content, same fingerprint
    # Retrained weights in the same folder: new fingerprint (and a fresh load in generate).
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # the last byte belongs to the last tensor
    weights.write_bytes(bytes(data))
    changed = model_fingerprint(str(copy))
    assert changed != ident["fingerprint"]
    # Big files (weights of real models) are tracked by size and modification time, not read.
    big = copy / "model-00002-of-00002.safetensors"
    big.write_bytes(b"\0" * (17 * 1024 * 1024))
    os.utime(big, ns=(1_000_000_000, 1_000_000_000))
    with_big = model_fingerprint(str(copy))
    assert with_big != changed
    os.utime(big, ns=(2_000_000_000, 2_000_000_000))
    assert model_fingerprint(str(copy)) != with_big
    big.unlink()
    assert model_fingerprint(str(copy)) == changed
    cfg = json.loads((copy / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (copy / "config.json").write_text(json.dumps(cfg))
    assert model_fingerprint(str(copy)) != moved["fingerprint"]


def test_identity_of_the_known_model_needs_no_download(backend, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDSL_HOME", str(tmp_path / "empty-home"))
    ident = backend.identity({"model": "smollm2-135m-instruct"})
    assert ident["model"] == "smollm2-135m-instruct" and len(ident["fingerprint"]) == 32
    assert not (tmp_path / "empty-home").exists()


def test_bad_options_and_models_raise_run_errors(backend, options, tmp_path):
    with pytest.raises(RunError, match="max_new_token"):
        backend.identity({**options, "max_new_token": 5})
    with pytest.raises(RunError, match="needs `model`"):
        backend.identity({"backend": "transformers"})
    with pytest.raises(RunError, match="unknown model"):
        backend.generate({"model": "gpt-17"}, _requests(PROMPTS[:1]), lambda r: None)
    with pytest.raises(RunError, match="no model folder"):
        backend.identity({"model": str(tmp_path / "missing")})
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(RunError, match="cuda"):
            backend.generate({**options, "device": "cuda"}, _requests(PROMPTS[:1]), lambda r: None)


def test_model_without_chat_template_is_a_clear_error(backend, tiny_model_dir, tmp_path):
    copy = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, copy)
    (copy / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = copy / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    clear_model_cache()
    with pytest.raises(RunError, match="no chat template"):
        backend.generate({"model": str(copy), "device": "cpu"}, _requests(PROMPTS[:1]), lambda r: None)


def test_empty_request_list_does_nothing(backend, options):
    backend.generate(options, [], lambda r: pytest.fail("no results expected"))


def test_bfloat16_runs(backend, options):
    res = _run(backend, {**options, "dtype": "bfloat16", "max_new_tokens": 4}, _requests(PROMPTS[:2]))
    assert all(r.ok and r.output_tokens > 0 for r in res.values())


# --------------------------------------------------------------------------------------------------
# check_options: what `specdsl validate` learns without torch agrees with what loading and generating do
# --------------------------------------------------------------------------------------------------


def _problems(backend, options) -> list[tuple[tuple, str]]:
    return [(p.path, p.message) for p in backend.check_options(options)]


def test_check_options_accepts_the_known_model_and_a_model_folder(backend, options, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDSL_HOME", str(tmp_path / "empty-home"))
    assert backend.check_options({"model": "smollm2-135m-instruct"}) == []  # not downloaded: fine
    assert backend.check_options(options) == []
    assert not (tmp_path / "empty-home").exists()


def test_check_options_rejects_what_identity_rejects(backend, tmp_path):
    for ref, message in [(str(tmp_path / "missing"), "no model folder"), ("gpt-17", "unknown model 'gpt-17'"),
                         ("smollm2", "unknown model 'smollm2'")]:
        [(path, text)] = _problems(backend, {"model": ref})
        assert path == ("model",) and message in text
        with pytest.raises(RunError, match=message):
            backend.identity({"model": ref})
    (tmp_path / "empty").mkdir()
    [(path, text)] = _problems(backend, {"model": str(tmp_path / "empty")})
    assert "not a Hugging Face model folder" in text


def test_check_options_finds_a_missing_chat_template_before_loading(backend, tiny_model_dir, tmp_path):
    copy = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, copy)
    assert backend.check_options({"model": str(copy)}) == []
    (copy / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((copy / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (copy / "tokenizer_config.json").write_text(json.dumps(cfg))
    [(path, text)] = _problems(backend, {"model": str(copy)})
    assert path == ("model",) and "has no chat template" in text
    clear_model_cache()
    with pytest.raises(RunError, match="no chat template"):  # what a run would have said, after loading
        backend.generate({"model": str(copy), "device": "cpu"}, _requests(PROMPTS[:1]), lambda r: None)


def test_check_options_max_new_tokens_against_the_context(backend, tiny_model_dir, tmp_path):
    copy = tmp_path / "short-context"
    shutil.copytree(tiny_model_dir, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["max_position_embeddings"] = 64
    (copy / "config.json").write_text(json.dumps(cfg))
    opts = {"model": str(copy), "device": "cpu", "max_new_tokens": 64}
    [(path, text)] = _problems(backend, opts)
    assert path == ("max_new_tokens",) and "64-token context" in text
    # The generation it predicts: every request fails.
    clear_model_cache()
    results = _run(backend, opts, _requests(["hi", "2 + 2 = ?"]))
    assert all(not r.ok and "prompt too long" in r.error for r in results.values())
    assert backend.check_options({**opts, "max_new_tokens": 8}) == []
    assert backend.check_options({"model": "smollm2-135m-instruct", "max_new_tokens": 8191}) == []
    [(path, _)] = _problems(backend, {"model": "smollm2-135m-instruct", "max_new_tokens": 8192})
    assert path == ("max_new_tokens",)


def test_check_options_reads_no_weights_and_imports_no_torch(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 128}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    code = ("import sys, json; from specdsl.backends.transformers.backend import TransformersBackend; "
            f"p = TransformersBackend().check_options({{'model': {str(folder)!r}, 'max_new_tokens': 16}}); "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "assert p == [] and not bad, (p, bad)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_lora_adapter_folder_generates_merged_and_like_the_merged_model(backend, model_dir, tmp_path):
    """An adapter folder (what `train` keeps) is merged into its base weights when loaded for generation
    (one matrix product per layer instead of three) and answers exactly as the model that
    ``merge_and_unload`` writes to disk."""
    pytest.importorskip("peft")  # the `train` extra: without it no adapter folder exists to load
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from specdsl.backends.transformers.loading import load_model

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    # init_lora_weights=False draws B too, so the adapter changes what the model says.
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.save_pretrained(adapter)
    merged = tmp_path / "merged"
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter) \
        .merge_and_unload().save_pretrained(merged)
    tokenizer.save_pretrained(merged)

    loaded = load_model(adapter, device="cpu")
    lora_layers = [m for m in loaded.model.modules() if hasattr(m, "merged") and hasattr(m, "lora_A")]
    assert lora_layers and all(m.merged for m in lora_layers)

    reqs = _requests()
    from_adapter = _run(backend, {"backend": "transformers", "model": str(adapter), "max_new_tokens": 12,
                                  "device": "cpu"}, reqs)
    from_merged = _run(backend, {"backend": "transformers", "model": str(merged), "max_new_tokens": 12,
                                 "device": "cpu"}, reqs)
    from_base = _run(backend, {"backend": "transformers", "model": str(model_dir), "max_new_tokens": 12,
                               "device": "cpu"}, reqs)
    assert all(from_adapter[r.key].ok for r in reqs)
    assert [from_adapter[r.key].text for r in reqs] == [from_merged[r.key].text for r in reqs]
    assert [from_adapter[r.key].text for r in reqs] != [from_base[r.key].text for r in reqs]
