"""Where a run reports: a JSONL log (metrics and allocation decisions), TensorBoard when installed, a progress bar.

Every line of `log.jsonl` is one JSON object with a `type`: `train` (step, loss, lr, trainable_params), `eval`
(step and the task's metrics), `allocation` (one rank decision: step, module, old_rank, new_rank, score),
`checkpoint` (step, path) or `final`. On resume the log is cut back to the checkpoint's step first, so a
resumed run's log reads like an uninterrupted one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _clean(value: Any) -> Any:
    """JSON has no NaN / Infinity: write them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class RunLog:
    def __init__(self, output_dir: Path, *, tensorboard: bool, progress: bool, total_steps: int, start_step: int = 0):
        self.path = output_dir / "log.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = self.path.open("a", encoding="utf-8")
        self.writer = _tensorboard_writer(output_dir / "tensorboard") if tensorboard else None
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    @staticmethod
    def truncate(output_dir: Path, step: int) -> None:
        """Drop entries written after `step` (by the part of an interrupted run that is redone)."""
        path = output_dir / "log.jsonl"
        if not path.is_file():
            return
        kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step and json.loads(line)["type"] != "final"]
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def write(self, kind: str, **fields: Any) -> None:
        record = {"type": kind, **{k: _clean(v) for k, v in fields.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None and "step" in fields:
            for key, value in fields.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{kind}/{key}", value, fields["step"])

    def progress(self, step: int, **postfix: Any) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.refresh()

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        self.file.close()


def _tensorboard_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: the JSONL log has the same numbers
        return None
    return SummaryWriter(str(path))
