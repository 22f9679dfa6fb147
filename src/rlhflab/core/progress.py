"""A live progress bar with ETA for long jobs."""

from __future__ import annotations


class Progress:
    """A rich progress bar with ETA and the latest metrics; silent when disabled or not a terminal-ish run."""

    def __init__(self, total: int, description: str, *, enabled: bool = True, completed: int = 0):
        self._bar = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                transient=False,
            )
            self._task = self._bar.add_task(description, total=total, completed=completed, info="")
            self._bar.start()

    def update(self, advance: int = 1, info: dict[str, float] | None = None) -> None:
        if self._bar is None:
            return
        text = "  ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in (info or {}).items())
        self._bar.update(self._task, advance=advance, **({"info": text} if info is not None else {}))

    def print(self, message: str) -> None:
        """Print above the bar (a plain print would be overwritten by the live display)."""
        if self._bar is None:
            print(message)
        else:
            self._bar.console.print(message, markup=False, highlight=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
