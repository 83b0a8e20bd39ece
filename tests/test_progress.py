"""Progress that can be trusted: lines when the output is not a terminal, rates and ETAs from what was
observed, names that say which bar is which, at most ~10 updates a second, and none when progress is off.

The generation tests talk to tests/fakeserver.py over real HTTP; nothing of specdsl's is mocked.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from specdsl import api
from specdsl.contract.hookspecs import GenRequest
from specdsl.execute.progress import Bar, Display, Throttle, choose_mode, format_duration
from specdsl.execute.services import Services
from specdsl.execute.store import Store
from specdsl.plugins import default_registry
from tests.conftest import ROOT
from tests.fakeserver import FakeServer

STAMP = re.compile(r"^\d\d:\d\d:\d\d ")

SPEC = """\
specdsl: 1
name: progress-test
models:
  teacher:
    backend: litellm
    model: openai/fake
    api_base: {api_base}
    api_key: ${{env:SPECDSL_TEST_KEY}}
    concurrency: {concurrency}
    timeout_s: 30
sources:
  problems: {{path: problems.jsonl}}
steps:
  - id: {step_id}
    generate: {{from: problems, model: teacher, user: "Q: {{{{ row.question }}}}"}}
"""


def write_spec(tmp_path: Path, srv: FakeServer, *, n: int, concurrency: int, step_id: str = "answers") -> Path:
    (tmp_path / "problems.jsonl").write_text(
        "".join(json.dumps({"id": f"q{i}", "question": f"question {i}"}) + "\n" for i in range(n)))
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(api_base=srv.api_base, concurrency=concurrency, step_id=step_id))
    return spec


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("SPECDSL_TEST_KEY", "sk-test-secret-value")
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")


# -- the pieces -----------------------------------------------------------------------------------------


def test_the_mode_follows_the_streams():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert choose_mode(False, Tty(), Tty()) == "off"
    assert choose_mode(True, Tty(), Tty()) == "live"
    assert choose_mode(True, io.StringIO(), Tty()) == "lines"   # `specdsl run spec | tee log`
    assert choose_mode(True, Tty(), io.StringIO()) == "lines"   # `specdsl run spec 2> log`


def test_no_eta_before_a_rate_then_one_from_the_observed_rate(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    bar = Bar("answers · teacher", total=100, unit="req")
    bar.observe({"done": 10, "total": 100, "cached": 10})  # a resumed run: 10 came from the journal
    assert bar.rate() is None and bar.eta_s() is None
    assert "eta" not in bar.line()
    clock[0] += 10
    bar.observe({"done": 30, "total": 100, "cached": 10})
    assert bar.rate() == pytest.approx(2.0)               # 20 new in 10 s; the cached 10 are not speed
    assert bar.eta_s() == pytest.approx(35.0)             # 70 left at 2/s
    assert "eta 0:35" in bar.line() and "30/100 req" in bar.line() and "2.0 req/s" in bar.line()


def test_a_line_carries_the_whole_name_and_the_training_numbers():
    name = "score · accuracy · " + "sft-with-a-rather-long-condition-name+generic-system-message" * 2
    bar = Bar(name, total=5, unit="step")
    bar.observe({"step": 0, "total": 5, "loss": None})
    bar.observe({"step": 1, "total": 5, "loss": 2.5, "learning_rate": 2e-5, "tokens_per_s": 1234.5})
    line = bar.line()
    assert line.startswith(name) and len(line) > 120
    assert "1/5 step" in line and "loss 2.5000" in line and "lr 2.00e-05" in line and "1,234 tok/s" in line
    assert format_duration(3725) == "1:02:05" and format_duration(65) == "1:05" and format_duration(None) == "?"


def test_the_throttle_lets_through_about_ten_a_second():
    throttle = Throttle()
    passed, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < 0.35:
        passed += throttle.due()
    assert 3 <= passed <= 5


def test_lines_mode_prints_timestamped_lines_at_a_steady_interval():
    out = io.StringIO()
    with Display(mode="lines", stream=out, interval_s=0.05) as display:
        display.node_started("answers", "generate")
        task = display.start("answers · teacher", total=10, unit="req")
        display.update(task, {"done": 3, "total": 10})
        time.sleep(0.2)
        display.update(task, {"done": 7, "total": 10})
        time.sleep(0.2)
        display.finish(task)
        display.node_finished("answers", "ran", 10, 0.4)
        display.log("[yellow]answers: 1 row skipped[/yellow]")
    lines = out.getvalue().splitlines()
    assert all(STAMP.match(line) for line in lines), lines
    ticks = [line for line in lines if "answers · teacher" in line and "/10 req" in line]
    assert len(ticks) >= 4 and any("3/10" in t for t in ticks) and any("7/10" in t for t in ticks)
    assert "answers (generate): started" in lines[0]
    assert lines[-2].endswith("answers: ran, 10 rows in 0:00") and lines[-1].endswith("answers: 1 row skipped")


def test_off_hands_out_no_task():
    display = Display(enabled=False)
    assert display.mode == "off" and display.start("x", total=3) is None
    display.update(None, {"done": 1})
    assert display.updates == 0


# -- generation through the services ----------------------------------------------------------------------


def generate_with(tmp_path: Path, display: Display, n: int) -> float:
    tmp_path.mkdir()
    with FakeServer() as srv:
        spec = write_spec(tmp_path, srv, n=n, concurrency=32)
        plan = api.compile_spec(spec)
        registry = default_registry()
        services = Services(plan, Store(tmp_path / "store"), registry, executor=registry.executors["local"],
                            progress=display)
        requests = [GenRequest(key=f"k{i}", messages=({"role": "user", "content": f"Q: {i}"},), params={},
                               row_id=str(i)) for i in range(n)]
        t0 = time.monotonic()
        with display:
            results = services.generate("answers", "teacher", requests)
        assert len(results) == n and all(r.ok for r in results.values())
        assert services.stats["answers"].requests == n  # the totals still come through, throttled or off
        return time.monotonic() - t0


def test_generation_updates_the_bar_at_most_ten_times_a_second_and_not_at_all_when_off(tmp_path):
    shown = Display(mode="lines", stream=io.StringIO(), interval_s=60)
    elapsed = generate_with(tmp_path / "on", shown, n=400)
    assert 1 <= shown.updates <= elapsed * 10 + 3, (shown.updates, elapsed)
    assert "400/400 req" in shown._stream.getvalue()  # the last count is always drawn
    off = Display(enabled=False)
    generate_with(tmp_path / "off", off, n=400)
    assert off.updates == 0


@pytest.mark.multiprocess
def test_a_piped_run_prints_progress_lines_during_its_first_half(tmp_path):
    """`specdsl run spec | cat`: a 20-second generate step prints advancing counts while it runs."""
    n, latency, concurrency = 40, 1.0, 2                       # 20 rounds of 1 s
    step_id = "answers_from_the_teacher_with_a_name_longer_than_eighty_columns_" + "x" * 30
    with FakeServer(latency=latency) as srv:
        spec = write_spec(tmp_path, srv, n=n, concurrency=concurrency, step_id=step_id)
        env = {**os.environ, "SPECDSL_PROGRESS_INTERVAL_S": "2", "COLUMNS": "80"}
        cmd = [sys.executable, "-m", "specdsl", "run", str(spec), "--store", str(tmp_path / "store")]
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        seen: list[tuple[float, str]] = []
        reader = threading.Thread(target=lambda: [seen.append((time.monotonic(), line)) for line in proc.stdout])
        reader.start()
        assert proc.wait(timeout=180) == 0, "".join(line for _, line in seen)[-3000:]
        reader.join()
    started = next(t for t, line in seen if f"{step_id} · teacher: started" in line)
    ended = next(t for t, line in seen if f"{step_id}: ran" in line)
    assert ended - started >= 15
    counts = [int(m.group(1)) for t, line in seen if t < started + (ended - started) / 2
              and (m := re.search(rf"{step_id} · teacher  (\d+)/{n} req", line))]
    assert len(counts) >= 2 and counts[-1] > counts[0], counts
    assert all(STAMP.match(line) for _, line in seen if step_id in line)
    # The summary table (80 columns wide in a pipe) wraps the long name instead of cutting it.
    text = "".join(line for _, line in seen)
    summary = text[text.index("run: progress-test"):]
    first_column = "".join(line.split("│")[1].strip() for line in summary.splitlines() if line.startswith("│"))
    assert step_id in first_column, summary


# -- training ---------------------------------------------------------------------------------------------


@pytest.mark.training
def test_training_reports_every_optimizer_step_with_its_loss(tmp_path, tiny_model_dir, tiny_tokenizer):
    from specdsl.training.trl.targets import CpuTarget
    from tests.test_training import answer_ids, request, write_parquet

    ids = answer_ids(tiny_tokenizer)
    data = write_parquet(tmp_path / "d.parquet", [{"input_ids": ids, "labels": ids}] * 8)
    events: list[dict] = []
    # logging_steps 10 > max_steps: before, TRL logged nothing and the bar sat at 0/5 until the end.
    out = CpuTarget().train(request(tmp_path, tiny_model_dir, data, max_steps=5, batch_size=2, logging_steps=10),
                            events.append)
    per_step = [e for e in events if e.get("loss") is not None]
    assert [e["step"] for e in per_step][:5] == [1, 2, 3, 4, 5]
    assert all(e["total"] == 5 and e["learning_rate"] is not None and e["tokens_per_s"] > 0 for e in per_step[:5])
    metrics = json.loads((out / "specdsl_train.json").read_text())["metrics"]
    # The curve keeps the first step, then one point per logging_steps (the mean since the last), and the last.
    assert [step for step, _ in metrics["losses"]] == [1, 5]
    assert metrics["first_loss"] == pytest.approx(per_step[0]["loss"])
    assert metrics["last_loss"] == pytest.approx(sum(e["loss"] for e in per_step[1:5]) / 4)
