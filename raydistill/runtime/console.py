"""What a run prints: a progress bar per epoch (when stderr is a terminal), a line per epoch, the final table."""
from __future__ import annotations

import sys


class Console:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar = enabled and sys.stderr.isatty()

    def progress(self, epoch: int, epochs: int, step: int, steps: int) -> None:
        if self.bar:
            filled = int(30 * step / steps)
            sys.stderr.write(f"\repoch {epoch + 1}/{epochs} [{'#' * filled}{'.' * (30 - filled)}] {step}/{steps}")
            sys.stderr.flush()

    def line(self, text: str, force: bool = False) -> None:
        """force: printed under --quiet too (how a run ended, and how to go on)."""
        if self.enabled or force:
            if self.bar:
                sys.stderr.write("\r" + " " * 60 + "\r")
            print(text, flush=True)
