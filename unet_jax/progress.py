"""Progress of a long loop over images: a bar on a terminal, a plain line now and then
in a log.

tqdm's bar redraws one line with carriage returns, which only a terminal shows as
one line; written to a file (``nohup``, Slurm, a Kaggle notebook's log) it becomes
noise, so tqdm is switched off there, and an hours-long job (submit's 100,064 photos)
would say nothing until it ends. Where stderr is not a terminal, ``progress`` prints
a line every ``every`` seconds instead: done, total, rate and time left.
"""

from __future__ import annotations

import sys
import time


def progress(iterable, total: int, unit: str = "image", desc: str | None = None,
             every: float = 60.0):
    """Yields what ``iterable`` yields, reporting on stderr as it goes (see above)."""
    stream = sys.stderr
    if _is_terminal(stream):
        from tqdm import tqdm

        yield from tqdm(iterable, total=total, unit=unit, desc=desc)
        return
    start = last = time.monotonic()
    done = 0
    for item in iterable:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every and done < total:
            last = now
            rate = done / (now - start)
            left = _duration((total - done) / rate) if rate > 0 else "?"
            stream.write(f"{desc + ': ' if desc else ''}{done:,} of {total:,} {unit}s "
                         f"({done / total:.0%}), {rate:.3g} {unit}s/s, about {left} left\n")
            stream.flush()


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
