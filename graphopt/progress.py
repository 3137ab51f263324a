"""Progress bars for long work (calibration, recovery training), drawn by rich on a terminal.

On a terminal the bar is transient: it disappears when the work ends. Where the output is not a
terminal (a log file, a notebook cell's captured output, a test) nothing is drawn.

Example:
    >>> list(track(range(3), "counting", enabled=False))
    [0, 1, 2]
"""

from __future__ import annotations

from typing import Iterable, TypeVar

T = TypeVar("T")


def track(items: Iterable[T], description: str, *, total: int | None = None,
          enabled: bool = True) -> Iterable[T]:
    """`items`, with a progress bar named `description` while they are consumed (when `enabled`)."""
    if not enabled:
        return items
    from rich.console import Console
    from rich.progress import track as rich_track

    console = Console(stderr=True)
    if not (console.is_terminal or console.is_jupyter):
        return items
    return rich_track(items, description=description, total=total, transient=True, console=console)
