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


def _clock(seconds: float) -> str:
    seconds = int(round(max(seconds, 0.0)))
    return (
        f"{seconds // 3600}h{seconds // 60 % 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


class JobClock:
    """Progress and ETA of a job made of named parts (a pipeline's data, stages and evaluation).

    Each part has an expected duration (measured on a reference machine); the ETA scales the expected time of the
    parts still to run by how fast the finished parts went against their expectations (shrunk towards the
    reference speed while little has finished), so a slower machine gets a longer, honest estimate as it goes. Each part's own progress bar shows its ETA within the part.
    """

    def __init__(self, parts: list[str], expected_s: dict[str, float], *, out=print, clock=None):
        import time

        default = sum(expected_s.values()) / len(expected_s) if expected_s else 1.0
        self.expected = {p: float(expected_s.get(p, default)) for p in parts}
        self.parts, self.out, self.now = list(parts), out, clock or time.monotonic
        self.t0, self.current, self.started, self.done_expected = self.now(), None, 0.0, 0.0

    def _close_current(self) -> None:
        if self.current is not None:
            self.done_expected += self.expected[self.current]
            self.current = None

    def eta(self) -> float:
        """Seconds left, the parts not yet finished scaled by the observed speed (expected if nothing finished)."""
        total = sum(self.expected.values())
        left = total - self.done_expected
        elapsed = self.now() - self.t0 - (self.now() - self.started if self.current else 0.0)
        # The speed estimate starts at the reference machine's (1.0) and moves to the observed one as finished
        # parts add up: a prior worth a tenth of the job keeps a first, tiny part from swinging the ETA.
        prior = 0.1 * total
        speed = (elapsed + prior) / (self.done_expected + prior) if prior > 0 else 1.0
        return left * speed - (self.now() - self.started if self.current else 0.0)

    def start(self, part: str, title: str = "") -> None:
        """Part `part` begins: one line with its number, the share of the job done, elapsed time and ETA."""
        self._close_current()
        i = self.parts.index(part)
        total = sum(self.expected.values())
        share = 100 * self.done_expected / total if total else 0.0
        self.current, self.started = part, self.now()
        self.out(
            f"[{i + 1}/{len(self.parts)}] {part}{': ' + title if title else ''}  (job {share:.0f}% done, "
            f"{_clock(self.now() - self.t0)} elapsed, about {_clock(self.eta())} left)"
        )

    def finish(self) -> None:
        self._close_current()
        self.out(f"job done in {_clock(self.now() - self.t0)}")
