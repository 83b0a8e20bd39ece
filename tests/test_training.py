"""Training targets on TRL (specdsl.training.trl) on the tiny random-init model.

What matters most is that the loss sees exactly the labels the spec designed: the batches are captured at
the model's boundary (a forward pre-hook) and compared with the dataset, and the reported loss is
recomputed by hand from the labels.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from specdsl.training.trl import (
    CpuTarget,
    CudaTarget,
    PARAMS_SCHEMA,
    accelerate_config,
    choose_target,
    inspect_dataset,
    plan_settings,
    resolve_params,
)
from specdsl.errors import RunError
from specdsl.contract.hookspecs import TrainingTarget, TrainRequest

CARD = {"spec": "orca-erasure", "data_fingerprint": "fp-1234abcd", "mask_policy": "assistant answer only"}


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def write_parquet(path: Path, rows: list[dict], *, infer_types: bool = False) -> Path:
    """Rows as the tokenize step writes them: list<int64> columns (unless ``infer_types``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = list(rows[0]) if rows else ["input_ids", "labels"]
    if infer_types:
        table = pa.Table.from_pylist(rows)
    else:
        schema = pa.schema([(c, pa.list_(pa.int64())) for c in cols])
        table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, path)
    return path


def answer_ids(tokenizer, text="Alice has 12 apples and gives 5 to Bob. Answer: 7") -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def garbage_ids(tokenizer, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, len(tokenizer)) for _ in range(n)]


def batch_spy():
    """A TrainerCallback recording every tensor the model's forward receives (after collation and
    device placement: the exact boundary where the loss is computed)."""
    import torch
    from transformers import TrainerCallback

    class BatchSpy(TrainerCallback):
        def __init__(self):
            self.batches: list[dict] = []
            self._handle = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            def hook(module, args_, kwargs_):
                self.batches.append({k: v.detach().cpu().clone() for k, v in kwargs_.items()
                                     if isinstance(v, torch.Tensor)})

            self._handle = model.register_forward_pre_hook(hook, with_kwargs=True)

        def on_train_end(self, args, state, control, **kwargs):
            if self._handle is not None:
                self._handle.remove()

    return BatchSpy()


def token_losses(model_dir: Path, ids: list[int], *, adapter: Path | None = None):
    """Per-position next-token cross-entropy of ``ids`` (position t = loss of predicting ids[t])."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    ce = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")
    return [float("nan")] + ce.tolist()


def request(tmp_path: Path, base: Path, data: Path, name="out", **params) -> TrainRequest:
    return TrainRequest(base_model=base, dataset=data, output_dir=tmp_path / name,
                        params={"logging_steps": 1, **params}, seed=0, card=CARD)


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".specdsl-" in p.name]


# --------------------------------------------------------------------------------------------------
# cheap checks
# --------------------------------------------------------------------------------------------------


def test_import_is_cheap():
    code = ("import sys, specdsl.training.trl, specdsl.training.trl.worker; "
            "heavy = [m for m in ('torch', 'transformers', 'trl', 'datasets', 'peft', 'accelerate', 'pyarrow') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_targets_follow_the_protocol():
    for t in (CpuTarget(), CudaTarget()):
        assert isinstance(t, TrainingTarget)
        assert t.params_schema is PARAMS_SCHEMA
    assert CpuTarget().name == "cpu" and CudaTarget().name == "cuda"


def test_choose_target():
    import torch

    cpu, cuda = CpuTarget(), CudaTarget()
    has_gpu = torch.cuda.is_available()
    assert choose_target("auto", [cpu, cuda]) is (cuda if has_gpu else cpu)
    assert choose_target("cpu", {"cpu": cpu, "cuda": cuda}) is cpu
    with pytest.raises(RunError, match="unknown training target 'cpux'") as err:
        choose_target("cpux", [cpu, cuda])
    assert "cpu" in err.value.hint
    if not has_gpu:
        with pytest.raises(RunError, match="not available"):
            choose_target("cuda", [cpu, cuda])


def test_params_defaults_and_mistakes():
    p = resolve_params({"lora": {"r": 8}})
    assert p["lora"] == {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear", "merge": False}
    assert p["learning_rate"] == 2e-4 and resolve_params({})["learning_rate"] == 2e-5
    with pytest.raises(RunError, match="unknown training parameter") as err:
        resolve_params({"learning_rat": 1e-4})
    assert "learning_rate" in err.value.hint
    with pytest.raises(RunError, match="batch_size"):
        resolve_params({"batch_size": 0})
    with pytest.raises(RunError, match="unknown lora option"):
        resolve_params({"lora": {"rank": 8}})
    # Every default the schema declares is accepted by the resolver.
    assert resolve_params(None)["epochs"] == 1


def _caps(**over):
    caps = {"cuda": True, "capability": [9, 0], "bf16": True, "flash_attention_3": False,
            "flash_attention_2": False, "flex_attention": True, "liger": False}
    caps.update(over)
    return caps


def test_cuda_plan_chooses_only_what_is_installed():
    p = resolve_params({})
    s = plan_settings(p, "cuda", _caps())
    assert s["attn_implementation"] == "flex_attention" and not s["liger"]
    assert s["bf16"] and s["packing"] and s["padding_free"] and s["max_tokens_per_batch"] == 16384
    assert plan_settings(p, "cuda", _caps(flash_attention_2=True))["attn_implementation"] == "flash_attention_2"
    assert plan_settings(p, "cuda", _caps(flash_attention_3=True, flash_attention_2=True))[
        "attn_implementation"] == "flash_attention_3"
    # FA3 kernels are Hopper-only: an Ampere card with both installed gets FA2.
    assert plan_settings(p, "cuda", _caps(capability=[8, 0], flash_attention_3=True, flash_attention_2=True))[
        "attn_implementation"] == "flash_attention_2"
    assert plan_settings(p, "cuda", _caps(flex_attention=False))["attn_implementation"] == "sdpa"
    assert plan_settings(p, "cuda", _caps(liger=True))["liger"]
    with pytest.raises(RunError, match="flash_attention_2 is not available"):
        plan_settings(resolve_params({"attn_implementation": "flash_attention_2"}), "cuda", _caps())
    with pytest.raises(RunError, match="liger_kernel is not installed"):
        plan_settings(resolve_params({"liger": True}), "cuda", _caps())
    with pytest.raises(RunError, match="needs a CUDA GPU"):
        plan_settings(p, "cuda", _caps(cuda=False))
    with pytest.raises(RunError, match="needs packing"):
        plan_settings(resolve_params({"packing": False, "max_tokens_per_batch": 4096}), "cuda", _caps())
    with pytest.raises(RunError, match="needs the cuda target"):
        plan_settings(resolve_params({"attn_implementation": "flex_attention"}), "cpu", {"flex_attention": True})
    cpu = plan_settings(p, "cpu", {"cuda": False})
    assert (cpu["attn_implementation"], cpu["bf16"], cpu["packing"], cpu["padding_free"]) == ("sdpa", False, False, False)


SMOLLM2_360M = dict(hidden=960, intermediate=2560, layers=32, vocab=49152, heads=15, kv_heads=5, tied=True)
SMOLLM2_1_7B = dict(hidden=2048, intermediate=8192, layers=24, vocab=49152, heads=32, kv_heads=32, tied=True)


def test_auto_token_budget_follows_the_model_and_the_card():
    from specdsl.training.trl.settings import ModelShape, auto_token_budget

    small, big = ModelShape(**SMOLLM2_360M), ModelShape(**SMOLLM2_1_7B)
    assert small.params == 361_820_160 and big.params == 1_711_374_336  # the published models' counts
    h100, l4 = 80 * 2**30, 24 * 2**30
    # 1.7B full fine-tune on 80 GiB: 0.85 x 80 GiB - 2 GiB - 18 B x 1.711e9 = 40.31e9 bytes for activations;
    # 24 layers x (36 x 2048 + 12 x 8192) + 8 x 2048 = 4,145,152 bytes a token -> 9,725 -> 9,216 tokens.
    assert auto_token_budget(big, h100, lora=False, gradient_checkpointing=False) == 9216
    # LoRA keeps 6 B a parameter: 60.85e9 / 4,145,152 -> 14,680 -> 14,336.
    assert auto_token_budget(big, h100, lora=True, gradient_checkpointing=False) == 14336
    # Gradient checkpointing keeps a layer's input (4 h) per layer, plus one layer: the cap.
    assert auto_token_budget(big, h100, lora=False, gradient_checkpointing=True) == 16384
    # The weights and optimizer states alone (30.8e9) overflow a 24 GiB card: the floor (the first steps'
    # out-of-memory then says so).
    assert auto_token_budget(big, l4, lora=False, gradient_checkpointing=False) == 1024
    assert auto_token_budget(small, h100, lora=False, gradient_checkpointing=False) == 16384
    assert auto_token_budget(small, l4, lora=False, gradient_checkpointing=False) == 6144


def test_cuda_plan_sizes_the_budget_from_the_model_shape(tiny_model_dir):
    from specdsl.training.trl.settings import ModelShape, model_shape

    caps = _caps(memory_bytes=80 * 2**30)
    s = plan_settings(resolve_params({}), "cuda", caps, ModelShape(**SMOLLM2_1_7B))
    assert s["max_tokens_per_batch"] == 9216 and s["budget_auto"]
    assert any("9216 tokens (sized for a 1,711M-parameter model on 80 GiB" in r for r in s["reasons"])
    assert plan_settings(resolve_params({}), "cuda", caps)["max_tokens_per_batch"] == 16384  # no shape known
    mine = plan_settings(resolve_params({"max_tokens_per_batch": 2048}), "cuda", caps, ModelShape(**SMOLLM2_1_7B))
    assert mine["max_tokens_per_batch"] == 2048 and not mine["budget_auto"]  # the user's number stands
    shape = model_shape(tiny_model_dir)
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert (shape.hidden, shape.layers, shape.vocab) == (cfg["hidden_size"], cfg["num_hidden_layers"],
                                                         cfg["vocab_size"])
    assert model_shape(tiny_model_dir / "nowhere") is None


@pytest.mark.training
def test_an_automatic_budget_is_halved_when_the_first_steps_run_out_of_memory(tmp_path, tiny_model_dir,
                                                                               tiny_tokenizer):
    """The device is the boundary faked here: a forward pre-hook plays a GPU with room for 1,500 tokens and
    raises torch's out-of-memory error above that. Training starts over with 2,048, then 1,024 tokens a
    batch, and finishes; the metrics and the card record both restarts."""
    import torch
    from transformers import TrainerCallback

    from specdsl.training.trl.trainer import smaller_budget, train_worker

    class SmallDevice(TrainerCallback):
        def __init__(self):
            self.sizes: list[int] = []

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            def hook(module, args_, kwargs_):
                n = kwargs_["input_ids"].numel()
                self.sizes.append(n)
                if n > 1500:
                    raise torch.OutOfMemoryError(f"CUDA out of memory (fake device): {n} tokens")

            model.register_forward_pre_hook(hook, with_kwargs=True)

    rows = [{"input_ids": g + a, "labels": [-100] * len(g) + a}
            for i in range(120) for g, a in [(garbage_ids(tiny_tokenizer, 10 + i % 30, seed=i), answer_ids(tiny_tokenizer))]]
    data = write_parquet(tmp_path / "d.parquet", rows)
    caps = _caps(memory_bytes=80 * 2**30)
    params = resolve_params({"max_steps": 2, "logging_steps": 1})
    settings = plan_settings(params, "cuda", caps)
    assert settings["budget_auto"]
    settings = {**settings, "device": "cpu", "bf16": False, "attn_implementation": "sdpa",
                "max_tokens_per_batch": 4096}  # the same choices, on this CPU, from a smaller start
    device = SmallDevice()
    stage = tmp_path / "stage"
    stage.mkdir()
    metrics = train_worker(base_model=tiny_model_dir, dataset=data, stage=stage, params=params, settings=settings,
                           stats=inspect_dataset(data), seed=0, progress=lambda e: None, callbacks=[device])
    # (a batch of the last, partly filled packed rows may fit before a full one fails)
    assert [r["max_tokens_per_batch"] for r in metrics["oom_retries"]] == [4096, 2048]
    assert all(r["step"] < 10 for r in metrics["oom_retries"])
    assert metrics["max_tokens_per_batch"] == 1024 and metrics["global_step"] == 2
    assert max(device.sizes[-2:]) <= 1024 and math.isfinite(metrics["train_loss"])

    stats = inspect_dataset(data)
    auto = {"budget_auto": True, "max_tokens_per_batch": 8192}
    assert smaller_budget(auto, stats, step=0, processes=1) == 4096
    assert smaller_budget(auto, stats, step=10, processes=1) is None  # real training would be thrown away
    assert smaller_budget(auto, stats, step=0, processes=2) is None   # a worker cannot restart alone
    assert smaller_budget({**auto, "budget_auto": False}, stats, step=0, processes=1) is None  # the user's
    assert smaller_budget({**auto, "max_tokens_per_batch": 1024}, stats, step=0, processes=1) is None


def test_accelerate_config_strategies():
    base = resolve_params({"processes": 4})
    cfg = accelerate_config(base, "cpu", bf16=False)
    assert (cfg["distributed_type"], cfg["use_cpu"], cfg["num_processes"], cfg["num_machines"]) == (
        "MULTI_CPU", True, 4, 1)
    assert accelerate_config(base, "cuda", bf16=True)["distributed_type"] == "MULTI_GPU"
    fsdp = accelerate_config(resolve_params({"processes": 8, "strategy": "fsdp"}), "cuda", bf16=True)
    assert fsdp["distributed_type"] == "FSDP" and fsdp["fsdp_config"]["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    ds = accelerate_config(resolve_params({"processes": 8, "strategy": "deepspeed", "zero_stage": 3}), "cuda",
                           bf16=True)
    assert ds["distributed_type"] == "DEEPSPEED" and ds["deepspeed_config"]["zero_stage"] == 3
    multi = accelerate_config(resolve_params({"processes": 8, "nodes": 2}), "cuda", bf16=True, machine_rank=1,
                              main_process_ip="10.0.0.1")
    assert (multi["num_processes"], multi["num_machines"], multi["machine_rank"], multi["main_process_port"]) == (
        16, 2, 1, 29500)
    with pytest.raises(RunError, match="address of machine 0"):
        accelerate_config(resolve_params({"nodes": 2}), "cuda", bf16=True)
    with pytest.raises(RunError, match="needs the cuda target"):
        accelerate_config(resolve_params({"processes": 2, "strategy": "fsdp"}), "cpu", bf16=False)


def test_inspect_dataset_counts(tmp_path):
    rows = [
        {"input_ids": [5, 6, 7, 8, 0, 0], "labels": [-100, -100, 7, 8, -100, -100], "attention_mask": [1, 1, 1, 1, 0, 0]},
        {"input_ids": [5, 6, 7], "labels": [-100, -100, -100], "attention_mask": [1, 1, 1]},
        {"input_ids": [9] * 10, "labels": [-100] * 8 + [9, 9], "attention_mask": [1] * 10},
    ]
    s = inspect_dataset(write_parquet(tmp_path / "d.parquet", rows), vocab_size=100, max_length=8)
    assert s.rows == 3 and s.padded_positions == 2 and s.has_attention_mask
    assert s.rows_over_max_length == 1  # the third row; its trained tokens lie past the cut ...
    assert s.fully_masked_rows == 2     # ... so it joins the all -100 second row
    assert s.trained_tokens == 2 and s.longest == 8 and s.tokens == 4 + 3 + 8


@pytest.mark.parametrize("rows, message", [
    ([{"input_ids": [1, 2, 3]}], "lacks column"),
    ([], "is empty"),
    ([{"input_ids": [4, 5, 6], "labels": [-100, -100, -100]}], "every label is -100"),
    ([{"input_ids": [4, 5, 6], "labels": [-100, 5]}], "has 3 input_ids but 2 labels"),
    ([{"input_ids": [4, 5, 99999], "labels": [-100, 5, 99999]}], "outside the model's vocabulary"),
    ([{"input_ids": [], "labels": []}], "is empty \\(no tokens\\)"),
    ([{"input_ids": ["a"], "labels": ["b"]}], "expected a list of integers"),
])
def test_bad_datasets_are_run_errors(tmp_path, tiny_model_dir, rows, message):
    data = write_parquet(tmp_path / "bad.parquet", rows, infer_types="expected a list" in message)
    with pytest.raises(RunError, match=message):
        CpuTarget().train(request(tmp_path, tiny_model_dir, data), lambda e: None)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_missing_or_unreadable_dataset(tmp_path, tiny_model_dir):
    with pytest.raises(RunError, match="does not exist"):
        CpuTarget().train(request(tmp_path, tiny_model_dir, tmp_path / "nope.parquet"), lambda e: None)
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(RunError, match="not a readable Parquet file"):
        CpuTarget().train(request(tmp_path, tiny_model_dir, junk), lambda e: None)


def test_one_config_reader_knows_every_name_of_the_context_length(tmp_path):
    from specdsl.modelcache.config import context_length, decoder_shape, read_model_config, vocab_size

    def folder(name, cfg):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        return tmp_path / name

    gpt2 = read_model_config(folder("gpt2", {"model_type": "gpt2", "n_positions": 1024, "n_ctx": 1024,
                                             "vocab_size": 50257, "n_embd": 768}))
    assert (context_length(gpt2), vocab_size(gpt2)) == (1024, 50257)
    assert context_length({"n_ctx": 2048}) == 2048 and context_length({"max_position_embeddings": None}) is None
    # A composite model: the language model's sub-config is what a causal LM built from the folder uses.
    vlm = read_model_config(folder("vlm", {"model_type": "llava", "vocab_size": None, "text_config": {
        "max_position_embeddings": 4096, "vocab_size": 32064, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4}}))
    assert (context_length(vlm), vocab_size(vlm)) == (4096, 32064)
    assert decoder_shape(vlm) == {"hidden": 64, "intermediate": 128, "layers": 2, "vocab": 32064, "heads": 4,
                                  "kv_heads": 4, "tied": True}
    assert decoder_shape(gpt2) is None
    with pytest.raises(RunError, match="no config.json"):
        read_model_config(tmp_path / "nowhere")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("[1, 2]")
    with pytest.raises(RunError, match="not a JSON object"):
        read_model_config(tmp_path / "broken")


def test_max_length_null_cuts_samples_to_a_gpt2_style_context(tmp_path, tiny_tokenizer):
    """A GPT-2 style config gives its context as n_positions (no max_position_embeddings): with max_length
    null the samples are cut to those 32 positions (past them GPT-2's position embedding has no row)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    base = tmp_path / "gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_positions=32, n_embd=32, n_layer=1, n_head=2,
                               bos_token_id=tiny_tokenizer.bos_token_id,
                               eos_token_id=tiny_tokenizer.eos_token_id)).save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    assert "max_position_embeddings" not in json.loads((base / "config.json").read_text())
    rows = [{"input_ids": g + a, "labels": [-100] * 10 + (g + a)[10:]}
            for i in range(4) for g, a in [(garbage_ids(tiny_tokenizer, 40 + i, seed=i), answer_ids(tiny_tokenizer))]]
    data = write_parquet(tmp_path / "d.parquet", rows)
    spy = batch_spy()
    out = CpuTarget().train(request(tmp_path, base, data, max_steps=1, batch_size=4), lambda e: None,
                            callbacks=[spy])
    record = json.loads((out / "specdsl_train.json").read_text())
    assert record["params"]["max_length"] is None
    assert record["data"]["max_length"] == 32 and record["data"]["rows_over_max_length"] == 4
    assert record["data"]["longest"] == 32
    (batch,) = spy.batches
    assert batch["input_ids"].shape == (4, 32)


# --------------------------------------------------------------------------------------------------
# training on the tiny model
# --------------------------------------------------------------------------------------------------


@pytest.mark.training
def test_full_finetune_learns_only_the_labelled_tokens(tmp_path, tiny_model_dir, tiny_tokenizer):
    """A repeated sample: random garbage (-100) then an answer (trained). Loss falls on the answer only,
    the labels the model receives are ours, and the first reported loss is the masked mean by hand."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    garbage = garbage_ids(tiny_tokenizer, 24, seed=1)
    answer = answer_ids(tiny_tokenizer)
    ids = garbage + answer
    labels = [-100] * len(garbage) + answer
    data = write_parquet(tmp_path / "d.parquet", [{"input_ids": ids, "labels": labels}] * 8)
    spy, events = batch_spy(), []
    out = CpuTarget().train(request(tmp_path, tiny_model_dir, data, max_steps=12, learning_rate=1e-2, lr_scheduler="constant",
                                    batch_size=4), events.append, callbacks=[spy])

    # The labels at the model's boundary are ours, row for row.
    assert len(spy.batches) == 12
    for batch in spy.batches:
        assert batch["labels"].tolist() == [labels] * 4
        assert batch["input_ids"].tolist() == [ids] * 4

    # The first loss (before any update) is the mean over the labelled tokens only.
    before = token_losses(tiny_model_dir, ids)
    trained_pos = [t for t in range(1, len(ids)) if labels[t] != -100]
    garbage_pos = list(range(1, len(garbage)))
    masked_mean = sum(before[t] for t in trained_pos) / len(trained_pos)
    full_mean = sum(before[1:]) / (len(ids) - 1)
    losses = [e["loss"] for e in events if e["loss"] is not None]
    assert losses[0] == pytest.approx(masked_mean, abs=1e-4)
    assert abs(full_mean - masked_mean) > 1e-3  # so the check above can tell the two apart
    assert events[-1]["step"] == events[-1]["total"] == 12

    after = token_losses(out, ids)
    answer_before = sum(before[t] for t in trained_pos) / len(trained_pos)
    answer_after = sum(after[t] for t in trained_pos) / len(trained_pos)
    garbage_before = sum(before[t] for t in garbage_pos) / len(garbage_pos)
    garbage_after = sum(after[t] for t in garbage_pos) / len(garbage_pos)
    assert answer_after < 0.5 * answer_before, (answer_before, answer_after)
    # The garbage repeats in every sample too: had it been trained on, its loss would fall like the answer's.
    assert garbage_after > 0.9 * garbage_before, (garbage_before, garbage_after)

    # A standard HF model directory with tokenizer and card, and nothing half-written beside it.
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(tok)
    card = (out / "README.md").read_text()
    for text in ("orca-erasure", "fp-1234abcd", "assistant answer only", "library_name: transformers"):
        assert text in card
    record = json.loads((out / "specdsl_train.json").read_text())
    assert record["metrics"]["global_step"] == 12 and record["settings"]["attn_implementation"] == "sdpa"
    assert not (out / "training_args.bin").exists() and not (out / ".scratch").exists()
    assert not leftovers(tmp_path)


@pytest.mark.training
def test_packed_padding_free_batches_match_padded_ones(tmp_path, tiny_model_dir, tiny_tokenizer):
    """Packing concatenates samples into one padding-free row. With position_ids restarting per sample the
    attention must stay inside each sample: the step-1 loss equals the padded batch's to float precision."""
    rows = []
    for i, (n_garbage, text) in enumerate([(5, "Paris is the capital of France."), (17, "Answer: 42"),
                                           (2, "def add(a, b):\n    return a + b\n"), (11, "7 times 8 is 56")]):
        g, a = garbage_ids(tiny_tokenizer, n_garbage, seed=10 + i), answer_ids(tiny_tokenizer, text)
        rows.append({"input_ids": g + a, "labels": [-100] * len(g) + a})
    data = write_parquet(tmp_path / "d.parquet", rows)
    first = {}
    spies = {}
    for mode in ("padded", "packed"):
        spy, events = batch_spy(), []
        CpuTarget().train(request(tmp_path, tiny_model_dir, data, name=mode, max_steps=1, batch_size=4,
                                  packing=(mode == "packed")), events.append, callbacks=[spy])
        first[mode] = [e["loss"] for e in events if e["loss"] is not None][0]
        spies[mode] = spy
    assert first["packed"] == pytest.approx(first["padded"], rel=1e-5, abs=1e-6)

    (packed,) = spies["packed"].batches
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 1
    pos = packed["position_ids"][0].tolist()
    starts = [i for i, p in enumerate(pos) if p == 0]
    assert len(starts) == 4
    by_ids = {tuple(r["input_ids"]): r["labels"] for r in rows}
    for s, e in zip(starts, starts[1:] + [len(pos)]):
        seg_ids = tuple(packed["input_ids"][0, s:e].tolist())
        seg_labels = packed["labels"][0, s:e].tolist()
        # The collator sets -100 on each sample's first token so no sample predicts across the seam;
        # a causal loss never reads a sequence's first label, so the loss sees exactly our labels.
        assert seg_labels[0] == -100 and seg_labels[1:] == by_ids[seg_ids][1:]
    (padded,) = spies["padded"].batches
    for row_ids, row_labels, row_mask in zip(padded["input_ids"], padded["labels"], padded["attention_mask"]):
        n = int(row_mask.sum())
        assert row_labels[:n].tolist() == by_ids[tuple(row_ids[:n].tolist())]
        assert set(row_labels[n:].tolist()) <= {-100}


@pytest.mark.training
def test_cuda_flex_attention_batches_keep_samples_apart(tmp_path, tiny_model_dir, tiny_tokenizer):
    """The cuda target's default batches, built by the same trainer set-up on the CPU: bfd packing into
    one padding-free row padded to the full token budget (one shape for flex attention's compiled kernels).

    Checked without a GPU: the labels of every packed sample are exactly the dataset's, the pad tail adds no
    loss and sits at position 0, and flex attention (forward only: torch has no flex backward on the CPU)
    computes for each packed sample exactly the logits it has alone, so no sample sees another one."""
    import torch

    from specdsl.training.trl.data import load_training_dataset
    from specdsl.training.trl.trainer import build_trainer

    rows = []
    for i, (n_garbage, text) in enumerate([(5, "Paris is the capital of France."), (17, "Answer: 42"),
                                           (2, "def add(a, b):\n    return a + b\n"), (11, "7 times 8 is 56")]):
        g, a = garbage_ids(tiny_tokenizer, n_garbage, seed=20 + i), answer_ids(tiny_tokenizer, text)
        rows.append({"input_ids": g + a, "labels": [-100] * len(g) + a})
    data = write_parquet(tmp_path / "d.parquet", rows)
    caps = {"cuda": True, "bf16": True, "capability": [9, 0], "flash_attention_2": False,
            "flash_attention_3": False, "flex_attention": True, "liger": False}
    params = resolve_params({"max_tokens_per_batch": 256})
    settings = plan_settings(params, "cuda", caps)
    assert settings["attn_implementation"] == "flex_attention" and settings["packing"]
    # The same choices, run on this machine's CPU in fp32 (no GPU here; only the device differs).
    settings = {**settings, "device": "cpu", "bf16": False}
    stats = inspect_dataset(data)
    ds = load_training_dataset(data, stats, tmp_path / "cache")
    trainer = build_trainer(base_model=tiny_model_dir, dataset=ds, params=params, settings=settings,
                             stats=stats, seed=0, scratch=tmp_path / "scratch")
    batch = next(iter(trainer.get_train_dataloader()))
    ids, labels, pos = batch["input_ids"][0], batch["labels"][0], batch["position_ids"][0]
    assert "attention_mask" not in batch and ids.shape[0] == 256  # padded to the token budget

    starts = [i for i, p in enumerate(pos.tolist()) if p == 0]
    real = sum(len(r["input_ids"]) for r in rows)
    assert len(starts) == 4 + (256 - real)  # four samples, then each pad token its own sequence
    assert set(labels[real:].tolist()) == {-100}
    by_ids = {tuple(r["input_ids"]): r["labels"] for r in rows}
    model = trainer.model.eval()
    with torch.no_grad():
        # The whole batch as the trainer passes it (cu_seq_lens, max_length, ... included), labels aside.
        packed_logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[0]
        model.set_attn_implementation("sdpa")
        for s, e in zip(starts[:4], starts[1:5]):
            seg = tuple(ids[s:e].tolist())
            assert labels[s].item() == -100 and labels[s + 1:e].tolist() == by_ids[seg][1:]
            alone = model(input_ids=ids[None, s:e], use_cache=False).logits[0]
            assert torch.allclose(packed_logits[s:e], alone, atol=1e-5), "a packed sample attended to another"


@pytest.mark.training
def test_lora_adapter_and_merge(tmp_path, tiny_model_dir, tiny_tokenizer):
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    a = answer_ids(tiny_tokenizer)
    data = write_parquet(tmp_path / "d.parquet", [{"input_ids": a, "labels": a}] * 4)
    adapter = CpuTarget().train(request(tmp_path, tiny_model_dir, data, name="adapter", max_steps=4,
                                        batch_size=4, lora={"r": 4}), lambda e: None)
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "config.json").exists()
    assert PeftConfig.from_pretrained(adapter).r == 4
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = PeftModel.from_pretrained(base, adapter)
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())
    assert "library_name: peft" in (adapter / "README.md").read_text()
    assert (adapter / "tokenizer.json").is_file()

    merged = CpuTarget().train(request(tmp_path, tiny_model_dir, data, name="merged", max_steps=4,
                                       batch_size=4, lora={"r": 4, "merge": True}), lambda e: None)
    m = AutoModelForCausalLM.from_pretrained(merged)
    b = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not any("lora" in n for n, _ in m.named_parameters())
    diff = max((p1 - p2).abs().max().item() for (_, p1), (_, p2) in
               zip(m.named_parameters(), b.named_parameters()))
    assert diff > 0  # the adapter's update is in the weights
    # Same adapter seed and steps: the merged model computes what base + adapter computes.
    x = torch.tensor([a])
    with torch.no_grad():
        assert torch.allclose(m(input_ids=x).logits, peft_model.eval()(input_ids=x).logits, atol=1e-4)


@pytest.mark.training
def test_interrupted_training_never_looks_complete(tmp_path, tiny_model_dir, tiny_tokenizer):
    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt

    a = answer_ids(tiny_tokenizer)
    data = write_parquet(tmp_path / "d.parquet", [{"input_ids": a, "labels": a}] * 4)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "previous.txt").write_text("an earlier, complete output")
    with pytest.raises(KeyboardInterrupt):
        CpuTarget().train(request(tmp_path, tiny_model_dir, data, max_steps=5, batch_size=2), lambda e: None,
                          callbacks=[Interrupt()])
    assert sorted(os.listdir(tmp_path / "out")) == ["previous.txt"]
    assert not leftovers(tmp_path)


@pytest.mark.training
@pytest.mark.multiprocess
def test_two_processes_through_accelerate_launch(tmp_path, tiny_model_dir, tiny_tokenizer):
    """processes: 2 runs accelerate launch: two CPU workers, DDP over gloo, one output."""
    from transformers import AutoModelForCausalLM

    rows = [{"input_ids": g + a, "labels": [-100] * len(g) + a}
            for i in range(8)
            for g, a in [(garbage_ids(tiny_tokenizer, 6, seed=i), answer_ids(tiny_tokenizer))]]
    data = write_parquet(tmp_path / "d.parquet", rows)
    events = []
    out = CpuTarget().train(request(tmp_path, tiny_model_dir, data, max_steps=3, batch_size=2, processes=2),
                            events.append)
    AutoModelForCausalLM.from_pretrained(out)
    record = json.loads((out / "specdsl_train.json").read_text())
    assert record["metrics"]["world_size"] == 2 and record["metrics"]["global_step"] == 3
    cfg = (out / "accelerate_config.yaml").read_text()
    assert "distributed_type: MULTI_CPU" in cfg and "num_processes: 2" in cfg and "use_cpu: true" in cfg
    steps = [e["step"] for e in events]
    assert steps == sorted(steps) and steps[-1] == 3 and all(math.isfinite(e["loss"]) for e in events[1:])
    assert (out / "README.md").is_file() and not leftovers(tmp_path)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.training
@pytest.mark.multiprocess
def test_two_machines_each_run_the_spec_and_only_machine_0_goes_on(tmp_path, tiny_model_dir):
    """nodes: 2, played by two `specdsl run` processes on this machine (machine ranks 0 and 1, each with its
    own store, as two machines would be). They train together over gloo; machine 0 commits the model and
    runs the later step with it; machine 1 stops after its share, commits nothing and exits 0."""
    from specdsl import api
    from specdsl.execute.store import Store

    chats = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                           {"role": "assistant", "content": f"Answer: {2 * i}"}]} for i in range(8)]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    (tmp_path / "spec.yaml").write_text(f"""specdsl: 1
name: two-machines
seed: 0
models:
  student: {{backend: transformers, model: {tiny_model_dir}, max_new_tokens: 3}}
sources:
  chats: {{path: chats.jsonl}}
steps:
  - id: sft
    train: {{from: chats, model: student, target: cpu, max_steps: 2, batch_size: 2, nodes: 2,
            main_process_ip: 127.0.0.1, main_process_port: {_free_port()}}}
  - id: answers
    generate: {{from: chats, model: sft, user: "{{{{ row.messages[0].content }}}}", into: reply}}
""")
    procs = {}
    for rank in (0, 1):
        env = {**os.environ, "SPECDSL_MACHINE_RANK": str(rank), "SPECDSL_PLUGINS": "none",
               "OMP_NUM_THREADS": "1", "COLUMNS": "250"}
        procs[rank] = subprocess.Popen(
            [sys.executable, "-m", "specdsl", "run", "--no-progress", "--store", str(tmp_path / f"store-{rank}"),
             str(tmp_path / "spec.yaml")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outs = {}
    for rank, proc in procs.items():
        try:
            outs[rank] = proc.communicate(timeout=300)[0]
        finally:
            proc.kill()
    assert procs[0].returncode == 0, outs[0][-3000:]
    assert procs[1].returncode == 0, outs[1][-3000:]
    assert "machine 1 of 2" in outs[1] and "machine 0 writes the model" in outs[1]

    plan = api.compile_spec(tmp_path / "spec.yaml")
    sft, answers = plan.node("sft").fingerprint, plan.node("answers").fingerprint
    store0, store1 = Store(tmp_path / "store-0"), Store(tmp_path / "store-1")
    assert store0.has(sft) and store0.has(answers)
    assert not store1.has(sft) and not store1.has(answers)
    (row,) = store0.load(sft)
    assert row["steps"] == 2 and math.isfinite(row["train_loss"])
    model_dirs = list((tmp_path / "store-0").rglob("specdsl_train.json"))
    (record_file,) = model_dirs
    record = json.loads(record_file.read_text())
    assert record["metrics"]["world_size"] == 2 and record["launch"]["num_machines"] == 2
    assert not list((tmp_path / "store-1").rglob("specdsl_train.json"))
    assert len(store0.load(answers)) == len(chats)
