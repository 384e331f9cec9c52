"""The `Progress` callback a task hands to library code: the scheduler's UI, and a bar on a terminal."""
from __future__ import annotations

import sys
import time

import luigi
from tqdm import tqdm

# Progress is shown, never read back: it cannot change a result (see pipeline.fingerprint).
AFFECTS_RESULTS = False


class TaskProgress:
    """Relays progress to the scheduler, which the UI shows live, at most once a second (each
    update is an RPC), and draws a bar when stderr is a terminal, so that CI logs stay clean."""

    def __init__(self, task: luigi.Task, interval_s: float = 1.0):
        self._task, self._interval_s = task, interval_s
        self._sent_at = float("-inf")
        self._bar: tqdm | None = None

    def __call__(self, done: int, total: int | None, unit: str, detail: str) -> None:
        finished = total is not None and done >= total
        now = time.monotonic()
        if finished or now - self._sent_at >= self._interval_s:
            self._sent_at = now
            of_total = f"/{total}" if total is not None else ""
            self._task.set_status_message(f"{done}{of_total} {unit}" + (f" - {detail}" if detail else ""))
            if total:
                self._task.set_progress_percentage(min(100, round(100 * done / total)))
        if sys.stderr.isatty():
            self._draw(done, total, unit, detail)

    def _draw(self, done: int, total: int | None, unit: str, detail: str) -> None:
        if self._bar is None or self._bar.unit != unit:
            self.close()
            self._bar = tqdm(total=total, unit=unit, desc=self._task.task_family, leave=False, dynamic_ncols=True,
                             unit_scale=unit == "bytes")
        self._bar.total = total
        self._bar.set_postfix_str(detail, refresh=False)
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> TaskProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
