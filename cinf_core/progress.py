"""Progress reporting shared by the engine, the CLI and background jobs.

The engine reports through a :data:`ProgressFn`. A CLI command draws it as one bar per stage on
stderr (:class:`ProgressBar`, lines ``stage: 42%|...``, which the job runner parses back into a
job's progress) and ends by printing one JSON summary line on stdout (:func:`emit`).
"""
from __future__ import annotations

import json
import sys
from typing import Callable

ProgressFn = Callable[[str, float], None] | None
"""``progress(stage, fraction)``: a long step reports how far it is (``None``: nobody listens)."""
ExamplesDoneFn = Callable[[int], None] | None
"""``done(k)``: a pass over the data just finished ``k`` more examples (the EK-FAC fit and the
gradient passes count with it; the caller turns counts into a stage's fraction)."""


def count_examples(progress: ProgressFn, stage: str, total: int) -> ExamplesDoneFn:
    """A :data:`ExamplesDoneFn` that reports ``stage`` as the fraction of ``total`` examples done
    (for the loops of :mod:`cinf_core.models`); None when nobody listens."""
    if progress is None:
        return None
    done = [0]

    def advance(n: int) -> None:
        done[0] += n
        progress(stage, done[0] / max(total, 1))

    progress(stage, 0.0)
    return advance


class ProgressBar:
    """A tqdm bar on stderr per stage; pass it where a :data:`ProgressFn` is taken."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar = None
        self.stage = None

    def __call__(self, stage: str, fraction: float) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if stage != self.stage:
            if self.bar is not None:
                self.bar.close()
            self.bar = tqdm(total=100, desc=stage, file=sys.stderr, leave=False,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}")
            self.stage = stage
        self.bar.n = int(round(100 * max(0.0, min(1.0, fraction))))
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def emit(result: dict) -> None:
    """Print a command's JSON summary as the last line of stdout."""
    sys.stdout.flush()
    print(json.dumps(result, default=str), flush=True)
