"""A progress bar on a pass (rows/s and ETA), on stderr, silent when disabled."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tqdm import tqdm


@contextmanager
def progress_bar(total: int, description: str, *, enabled: bool) -> Iterator[Any]:
    bar = tqdm(
        total=total,
        desc=description,
        unit="row",
        unit_scale=True,
        disable=not enabled,
        dynamic_ncols=True,
        leave=False,
    )
    try:
        yield bar
    finally:
        bar.close()
