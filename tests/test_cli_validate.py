"""`specdsl validate`, `specdsl plan --json` and `specdsl schema` as a user runs them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from specdsl.cli import main
from specdsl.ir.plan import Plan

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "specs"
HEAVY = ("torch", "transformers", "trl", "litellm", "datasets")
BAD = """\
specdsl: 1
name: bad
models:
  teacher: {model: smollm2-135m-instruct, max_new_token: 5}
sources:
  problems: {path: data/problems.jsonl}
steps:
  - id: answers
    generate: {from: problems, model: teacher, user: "{{ row.question }}", temperature: -1}
"""


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    shutil.copytree(FIXTURES / "data", tmp_path / "data")
    shutil.copy(FIXTURES / "full.yaml", tmp_path / "good.yaml")
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "bad.yaml").write_text(BAD.replace("data/", "../data/"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def test_validate_a_good_file_exits_0(project):
    result = cli("validate", "good.yaml")
    assert result.exit_code == 0, result.output
    assert result.stdout == "ok: good.yaml\n"


def test_validate_a_bad_file_exits_2_with_positioned_errors(project):
    result = cli("validate", "more/bad.yaml")
    assert result.exit_code == 2
    headlines = [line for line in result.stderr.splitlines() if ": error[" in line]
    assert headlines == [
        "more/bad.yaml:4:43: error[S104]: unknown key 'max_new_token'",
        "more/bad.yaml:9:89: error[S103]: steps[0].generate.temperature: -1 is less than the minimum of 0",
    ]
    assert "    4 |   teacher: {model: smollm2-135m-instruct, max_new_token: 5}" in result.stderr
    assert "  hint: did you mean 'max_new_tokens'?" in result.stderr
    assert result.stderr.rstrip().endswith("2 errors")
    assert "Traceback" not in result.output


def test_validate_a_folder_reports_every_file(project):
    result = cli("validate", ".")
    assert result.exit_code == 2
    assert "ok: good.yaml" in result.stdout
    assert "more/bad.yaml:4:43: error[S104]" in result.stderr


def test_validate_json(project):
    result = cli("validate", "--json", "good.yaml", "more/bad.yaml")
    assert result.exit_code == 2
    data = json.loads(result.stdout)
    assert data["good.yaml"] == []
    assert [(e["code"], e["line"], e["col"]) for e in data["more/bad.yaml"]] == [("S104", 4, 43), ("S103", 9, 89)]
    assert data["more/bad.yaml"][0]["hint"] == "did you mean 'max_new_tokens'?"


def test_validate_an_empty_folder_is_a_usage_error(project):
    (project / "empty").mkdir()
    result = cli("validate", "empty")
    assert result.exit_code == 1
    assert "no spec files found" in result.stderr


def test_plan_json_is_versioned_and_loads_back(project):
    result = cli("plan", "--json", "good.yaml")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["format"] == 1 and data["name"] == "full"
    plan = Plan.from_dict(data)
    assert plan.node("answers").op == "generate" and plan.node("answers").fingerprint
    assert Plan.from_dict(json.loads(plan.to_json())) == plan


def test_plan_of_a_bad_spec_exits_2(project):
    result = cli("plan", "--json", "more/bad.yaml")
    assert result.exit_code == 2 and result.stdout == ""
    assert "error[S104]" in result.stderr


def run_cli(*args: str, cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "specdsl.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def test_no_traceback_unless_debug(project):
    (project / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    plain = run_cli("validate", "more/bad.yaml", "binary.yaml", cwd=project)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert "more/bad.yaml:4:43: error[S104]: unknown key 'max_new_token'" in plain.stderr
    assert "binary.yaml:3:1: error[S006]: spec file contains NUL bytes" in plain.stderr
    plan = run_cli("plan", "more/bad.yaml", cwd=project)
    assert plan.returncode == 2 and "Traceback" not in plan.stderr and "error[S104]" in plan.stderr
    debug = run_cli("--debug", "plan", "more/bad.yaml", cwd=project)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "SpecErrors" in debug.stderr


CHECK_IMPORTS = """\
import json, sys
from specdsl.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "heavy": sorted(m for m in %r if m in sys.modules)}), file=sys.stderr)
""" % (HEAVY,)


@pytest.mark.parametrize("args", [
    ("validate", "good.yaml", "more/bad.yaml"),
    ("validate", str(ROOT / "specs")),
    ("plan", "--json", "good.yaml"),
])
def test_validate_and_plan_import_no_heavy_library(project, args):
    out = subprocess.run([sys.executable, "-c", CHECK_IMPORTS, *args], capture_output=True, text=True,
                         cwd=project, env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=120)
    report = json.loads(out.stderr.strip().splitlines()[-1])
    assert report["heavy"] == [], f"`specdsl {' '.join(args)}` imported {report['heavy']}"
    assert report["code"] in (0, 2)


def test_a_secret_in_the_wrong_place_never_reaches_the_json_output(project):
    secret = "sk-live-0123456789abcdefABCDEF"
    (project / "leak.yaml").write_text(BAD.replace("data/", "").replace("max_new_token: 5", f"device: {secret}")
                                       .replace("temperature: -1", f"temperature: {secret}"))
    for args in (("validate", "--json", "leak.yaml"), ("validate", "leak.yaml")):
        result = cli(*args)
        assert result.exit_code == 2
        assert secret not in result.output and "sk-live" not in result.output
    codes = [e["code"] for e in json.loads(cli("validate", "--json", "leak.yaml").stdout)["leak.yaml"]]
    assert codes == ["S210", "S404", "S102", "S404"]


MODEL_OPTIONS = """\
specdsl: 1
name: options
models:
  teacher: {model: ./models/teacher}
  judge: {backend: litellm, model: hosted_vllm/qwen, api_base: "http://10.0.0.5:8000/v1/chat/completions"}
sources:
  problems: {path: data/problems.jsonl}
steps:
  - id: answers
    generate: {from: problems, model: teacher, user: "{{ row.question }}"}
  - id: judged
    generate: {from: answers, model: judge, user: "{{ row.response }}", into: verdict}
"""


def test_validate_catches_backend_option_problems_that_only_plan_caught_before(project):
    # Until backends could check their options, `validate` said "ok" here and `plan` failed on the
    # missing model folder (positioned on the whole entry), and the doubled URL failed every request at run.
    (project / "options.yaml").write_text(MODEL_OPTIONS)
    expected = [
        "options.yaml:4:20: error[S210]: model 'teacher': no model folder at './models/teacher'",
        "options.yaml:5:64: error[S210]: model 'judge': api_base ends with /chat/completions, which this "
        "backend appends itself: every request would go to .../chat/completions/chat/completions",
    ]
    for args in (("validate", "options.yaml"), ("plan", "options.yaml")):
        result = cli(*args)
        assert result.exit_code == 2, result.output
        assert [line for line in result.stderr.splitlines() if ": error[" in line] == expected
    assert "  hint: give the base URL: api_base: http://10.0.0.5:8000/v1" in cli("validate", "options.yaml").stderr
    data = json.loads(cli("validate", "--json", "options.yaml").stdout)["options.yaml"]
    assert [(e["code"], e["line"], e["col"]) for e in data] == [("S210", 4, 20), ("S210", 5, 64)]


@pytest.mark.parametrize("args", [("validate", "options.yaml"), ("plan", "--json", "options.yaml")])
def test_backend_option_checks_import_no_heavy_library(project, args):
    # The litellm entry is checked without litellm, the model folder without torch.
    (project / "options.yaml").write_text(MODEL_OPTIONS.replace("./models/teacher", "smollm2-135m-instruct")
                                          .replace("/chat/completions", ""))
    out = subprocess.run([sys.executable, "-c", CHECK_IMPORTS, *args], capture_output=True, text=True,
                         cwd=project, env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=120)
    report = json.loads(out.stderr.strip().splitlines()[-1])
    assert report == {"code": 0, "heavy": []}, out.stderr


EXIT_WITHOUT_TEARDOWN = """\
import atexit, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

out = Path(sys.argv[1])
atexit.register(lambda: (out / "atexit").write_text("ran"))


def late():
    time.sleep(1.5)  # longer than the command takes: only a join lets it finish
    (out / "thread").write_text("joined")


threading.Thread(target=late).start()  # not a daemon: the exit waits for it
ThreadPoolExecutor(1).submit(lambda: None).result()  # an idle pool worker must not hang the exit
sys.stdout.write("written before, not flushed;")
sys.argv = ["specdsl", *sys.argv[2:]]
from specdsl.cli import entry
entry()
"""


@pytest.mark.parametrize("args, code", [(("validate", "good.yaml"), 0), (("validate", "more/bad.yaml"), 2)])
def test_the_program_skips_teardown_but_joins_threads_runs_exit_handlers_and_flushes(project, args, code):
    out = subprocess.run([sys.executable, "-c", EXIT_WITHOUT_TEARDOWN, str(project), *args], capture_output=True,
                         text=True, cwd=project, timeout=120)
    assert out.returncode == code, out.stderr
    assert out.stdout.startswith("written before, not flushed;")
    assert (project / "atexit").read_text() == "ran" and (project / "thread").read_text() == "joined"
    assert ("error[S104]" in out.stderr) == (code == 2)
