"""One process of a multi-process training run: ``python -m specdsl.training.trl.worker REQUEST.json``.

``accelerate launch`` starts this module once per process (see
``specdsl.training.trl.launch.launch_distributed``, which writes REQUEST.json and the accelerate config).
Each process trains its share; the main process saves into the staging directory. Lines starting with
``@@specdsl `` carry progress and errors back to the launching process as JSON; everything else a worker
prints goes to ``train.log``.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path


def _emit(event: str, data) -> None:
    from specdsl.training.trl.launch import WORKER_MARK

    print(WORKER_MARK + json.dumps({"event": event, **data}, default=str), flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m specdsl.training.trl.worker REQUEST.json", file=sys.stderr)
        return 2
    from specdsl.training.trl.data import DataStats
    from specdsl.training.trl.trainer import train_worker
    from specdsl.errors import RunError

    try:
        req = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
        train_worker(
            base_model=Path(req["base_model"]), dataset=Path(req["dataset"]), stage=Path(req["stage"]),
            params=req["params"], settings=req["settings"], stats=DataStats(**req["stats"]), seed=int(req["seed"]),
            # train_worker reports from the main process only, so each event reaches the parent once.
            progress=lambda event: _emit("progress", {"data": dict(event)}),
        )
    except RunError as exc:
        _emit("error", {"message": exc.message, "hint": exc.hint})
        return 1
    except Exception as exc:  # the parent shows this line and the log tail
        traceback.print_exc()
        _emit("error", {"message": f"training worker failed: {type(exc).__name__}: {exc}", "hint": None})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
