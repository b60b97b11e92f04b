"""Progress of a long loop: a bar on a terminal, a plain line now and then in a log.

tqdm's bar redraws one line with carriage returns, which only a terminal shows as
one line; written to a file (``nohup``, Slurm, a Kaggle notebook's log) it becomes
noise, so tqdm is switched off there, and an hours-long job (submit's 100,064 photos,
an epoch at 512x512 on a CPU) would say nothing until it ends. Where stderr is not a
terminal, ``progress`` prints a line every ``every`` seconds instead: done, total,
rate, time left and what ``set_postfix`` last gave (the training loss, say).
"""

from __future__ import annotations

import math
import sys
import time


def progress(iterable, total: int, unit: str = "image", desc: str | None = None,
             every: float = 60.0, show: bool = True, **bar):
    """An iterable over ``iterable`` that reports on stderr as it goes (see above), with
    tqdm's ``set_postfix``. ``show=False`` reports nothing (a run's other processes);
    ``bar`` goes to tqdm (``leave=False``, say)."""
    if show and _is_terminal(sys.stderr):
        from tqdm import tqdm

        return tqdm(iterable, total=total, unit=unit, desc=desc, **bar)
    return _Lines(iterable, total, unit, desc, every if show else math.inf)


class _Lines:
    """``progress`` where stderr is a file or a pipe."""

    def __init__(self, iterable, total: int, unit: str, desc: str | None, every: float):
        self.iterable, self.total, self.unit, self.every = iterable, total, unit, every
        self.prefix = f"{desc}: " if desc else ""
        self.postfix = ""

    def set_postfix(self, **values) -> None:
        self.postfix = "".join(f", {key} {value}" for key, value in values.items())

    def __iter__(self):
        start = last = time.monotonic()
        for done, item in enumerate(self.iterable, start=1):
            yield item
            now = time.monotonic()
            if now - last >= self.every and done < self.total:
                last = now
                rate = done / max(now - start, 1e-9)
                sys.stderr.write(
                    f"{self.prefix}{done:,} of {self.total:,} {self.unit}s "
                    f"({done / self.total:.0%}), {rate:.3g} {self.unit}s/s, about "
                    f"{_duration((self.total - done) / rate)} left{self.postfix}\n")
                sys.stderr.flush()


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def _duration(seconds: float) -> str:
    """``seconds`` in words a person reads at a glance: 40 s, 12 min, 3 h 25 min."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"
