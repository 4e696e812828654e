"""Per-stage wall time for run.json: laps for sequential stages, ``add`` for spans inside the loop."""

from __future__ import annotations

import time


class Stopwatch:
    """``lap(name)`` books the time since the previous lap to ``name``; ``add`` books a measured span."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.started = self._last = time.perf_counter()

    def elapsed(self) -> float:
        """Wall seconds since the stopwatch was made (stages plus everything between them)."""
        return time.perf_counter() - self.started

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.add(name, now - self._last)
        self._last = now

    def restart(self) -> None:
        """Start the next lap now (after a span that is booked separately)."""
        self._last = time.perf_counter()

    def add(self, name: str, seconds: float) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + seconds
