"""Progress with an ETA for every phase longer than a few seconds (calibration, scoring, evaluation).

On a terminal it is a ``tqdm`` bar. Elsewhere (Ray worker logs, CI, ``tee``) a bar's carriage returns
never reach the reader, so the same ``tqdm`` meter (rate, elapsed, ETA) is written as a whole line at
most every ``every_s`` seconds, plus the last one.
"""
from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    def __init__(self, total: int, desc: str, *, unit: str = "it", every_s: float = 10.0, enabled: bool = True,
                 write=None):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.enabled = enabled and total > 0
        self.n, self.t0, self.last = 0, time.perf_counter(), 0.0
        self._write = write or (lambda line: print(line, file=sys.stderr, flush=True))
        self._bar = None
        if self.enabled and write is None and sys.stderr.isatty():
            self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=True)

    def line(self) -> str:
        return tqdm.format_meter(self.n, self.total, time.perf_counter() - self.t0, prefix=self.desc, unit=self.unit,
                                 ncols=0)

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.n >= self.total:
            self.last = now
            self._write(self.line())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
