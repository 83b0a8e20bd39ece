from __future__ import annotations

import os
from pathlib import Path

import pytest

# litellm fetches a remote cost map at import unless told not to; tests never touch the network.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent

# The markers of the heavy tiers (pyproject.toml): a test with none of them is in the fast tier.
HEAVY_TIERS = ("slow", "training", "multiprocess", "ray", "browser")


@pytest.hookimpl(tryfirst=True)  # before -m deselects: `pytest -m fast` must see the marker
def pytest_collection_modifyitems(config, items):
    """Mark every test outside the heavy tiers `fast`, so the quick loop is one short `pytest -m fast`
    (the same tests as `-m "not slow and not training and not multiprocess and not ray and not browser"`)."""
    for item in items:
        if not any(item.get_closest_marker(name) for name in HEAVY_TIERS):
            item.add_marker(pytest.mark.fast)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-init two-layer Llama chat model with a ChatML BPE tokenizer (built once per session)."""
    from tests.tinymodel import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def lively_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with weights redrawn at a larger scale.

    At its initial scale (std 0.02) the tiny model's logits are nearly flat and greedy decoding
    answers every prompt with the same newline; larger weights make the answer depend on the prompt,
    so batch invariance is tested on text that differs from row to row.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("lively-tiny-model")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.2, generator=gen)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out
