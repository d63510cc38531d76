"""What a run prints: a live progress line within an epoch (on a terminal only), a line per epoch, the final table."""
from __future__ import annotations

import os
import sys


class Console:
    def __init__(self, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.live = enabled and self.stream.isatty()     # the progress line: never in a pipe or a log file
        self.bar = None

    def epoch_bar(self, epoch: int, epochs: int, steps: int, start: int, batch_size: int) -> "EpochBar":
        """The epoch's progress line: images done of the epoch's, images/s, time left; updated a few times a second
        (tqdm) where the console is live, nothing elsewhere."""
        return EpochBar(self, epoch, epochs, steps, start, batch_size)

    def line(self, text: str, force: bool = False) -> None:
        """force: printed under --quiet too (how a run ended, and how to go on)."""
        if self.enabled or force:
            if self.bar is not None:
                self.bar.clear()
            print(text, flush=True)
            if self.bar is not None:
                self.bar.refresh()


def _fixed_size(stream) -> dict | None:
    """None where the terminal says its size (the line follows its width); a fixed size where it says 0 x 0 (a
    pseudo-terminal nobody sized), on which tqdm would draw nothing."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return {"ncols": 100, "nrows": 24}
    return None if size.columns and size.lines else {"ncols": size.columns or 100, "nrows": size.lines or 24}


class EpochBar:
    """``at(step)``: the epoch has run its steps up to ``step`` (the host's count: on a GPU, steps enqueued)."""

    def __init__(self, console: Console, epoch: int, epochs: int, steps: int, start: int, batch_size: int):
        self.console, self.bar = console, None
        if console.live:
            from tqdm import tqdm

            size = _fixed_size(console.stream)
            self.bar = tqdm(total=steps * batch_size, initial=start * batch_size, unit="img", unit_scale=True,
                            desc=f"epoch {epoch + 1}/{epochs}", file=console.stream, leave=False, mininterval=0.25,
                            dynamic_ncols=size is None, **(size or {}))
            self.batch_size = batch_size
            console.bar = self.bar

    def at(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step * self.batch_size - self.bar.n)

    def __enter__(self) -> "EpochBar":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
            self.console.bar = None
