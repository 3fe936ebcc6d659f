"""Retry delays: exponential backoff with jitter (pure; the caller owns the clock)."""

from __future__ import annotations

import random
from typing import Callable


class Backoff:
    """``initial * factor**n`` seconds for the n-th consecutive failure, capped at
    ``maximum``, each spread by +/- ``jitter`` (a fraction) so that nodes that
    failed together do not retry together.  :meth:`reset` after a success."""

    def __init__(self, initial: float = 0.5, maximum: float = 30.0, factor: float = 2.0,
                 jitter: float = 0.2, rng: Callable[[], float] = random.random):
        if initial <= 0 or maximum < initial or factor < 1 or not 0 <= jitter < 1:
            raise ValueError("backoff needs 0 < initial <= maximum, factor >= 1, 0 <= jitter < 1")
        self.initial, self.maximum, self.factor, self.jitter = initial, maximum, factor, jitter
        self._rng = rng
        self.failures = 0

    def next_delay(self) -> float:
        """The delay before the next attempt (counts one more failure)."""
        base = min(self.maximum, self.initial * self.factor ** min(self.failures, 64))
        self.failures += 1
        spread = 1.0 + self.jitter * (2.0 * self._rng() - 1.0)
        return min(self.maximum, max(0.0, base * spread))

    def reset(self) -> None:
        self.failures = 0
