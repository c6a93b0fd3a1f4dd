"""One progress display for cuig's long steps outside training (anchor generation, evaluation sampling)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """``items`` with a bar on stderr named ``desc`` (a few lines a minute when stderr is a log file)."""
    yield from tqdm(items, desc=desc, total=total, file=sys.stderr, leave=False, dynamic_ncols=True,
                    mininterval=0.5 if sys.stderr.isatty() else 10.0)
