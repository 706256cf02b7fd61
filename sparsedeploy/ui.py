"""Console output shared by the stages: one rich console on stderr and a progress helper."""
from __future__ import annotations

import sys
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True)
out = Console(width=None if sys.stdout.isatty() else 230)  # tables stay readable in logs


@contextmanager
def progress(description: str, total: int):
    """Yields update(done, total) for a rich progress bar (plain when not a terminal)."""
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False, disable=not console.is_terminal) as bar:
        task = bar.add_task(description, total=total)

        def update(done: int, total_: int | None = None) -> None:
            bar.update(task, completed=done, total=total_ or total)

        yield update
    if not console.is_terminal:
        console.print(f"{description}: done")


def info(msg: str) -> None:
    console.print(msg, highlight=False)
