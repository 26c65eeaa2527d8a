"""Progress bars that suit where the output goes: tqdm on a terminal; in a log file or a
pipe, a plain line every ``every`` of the work (tqdm's carriage returns would otherwise
pile up into one line of tens of kilobytes)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, TypeVar

T = TypeVar("T")


def progress(
    iterable: Iterable[T],
    *,
    desc: str,
    total: int | None = None,
    unit: str = "it",
    file: IO[str] | None = None,
    every: float = 0.1,
    postfix=None,
) -> Iterator[T]:
    """Iterate ``iterable`` with a progress display on ``file`` (default stderr).

    ``postfix``, if given, is called after each item and its string is shown with the bar.
    """
    out = file or sys.stderr
    total = (
        total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
    )
    if out.isatty():
        from tqdm import tqdm

        bar = tqdm(iterable, desc=desc, total=total, unit=unit, file=out)
        for item in bar:
            yield item
            if postfix is not None:
                bar.set_postfix_str(str(postfix()))
        return
    start = time.perf_counter()
    step = max(1, int(total * every)) if total else None
    done = 0
    for item in iterable:
        yield item
        done += 1
        if step is not None and (done % step == 0 or done == total):
            extra = f" {postfix()}" if postfix is not None else ""
            elapsed = time.perf_counter() - start
            out.write(f"{desc}: {done}/{total} {unit} ({elapsed:.1f} s){extra}\n")
            out.flush()
