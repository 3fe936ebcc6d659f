"""The sorted set of the embedded store's in-memory mirror."""

from __future__ import annotations

from sortedcontainers import SortedList


class ZSet:
    """A sorted set: member -> score, plus the (score, member) pairs in a
    ``SortedList`` (O(log n) updates: no list shifting with 1M members)."""

    __slots__ = ("scores", "order")

    def __init__(self, items: dict[str, float] | None = None):
        self.scores: dict[str, float] = {}
        if items:
            self.scores = {m: float(s) for m, s in items.items()}
        self.order = SortedList((s, m) for m, s in self.scores.items())

    def add(self, member: str, score: float) -> bool:
        old = self.scores.get(member)
        if old is not None:
            if old == score:
                return False
            self.order.remove((old, member))
        self.scores[member] = score
        self.order.add((score, member))
        return old is None

    def remove(self, member: str) -> bool:
        old = self.scores.pop(member, None)
        if old is None:
            return False
        self.order.remove((old, member))
        return True

    def range(self, lo: float, hi: float, limit: int | None) -> list[tuple[str, float]]:
        out = []
        for score, member in self.order.irange((lo, ""), None):
            if score > hi or (limit is not None and len(out) >= limit):
                break
            out.append((member, score))
        return out

    def __len__(self) -> int:
        return len(self.scores)
