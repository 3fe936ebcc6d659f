"""Per-EN state kept by a DN: one :class:`DNSession` per established session.

Pure bookkeeping (no I/O): the DN (:mod:`services.encap.dn`) owns the tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.encap.wire import ReplayWindow, SessionKeys

ROLE_PRIMARY = "primary"        # this DN assigned the EN's address / serves it
ROLE_SECONDARY = "secondary"    # backup: takes over on promote / first data
ROLE_TAKEN_OVER = "taken_over"  # secondary that now serves the EN (route injected)


@dataclass
class DNSession:
    index: int                   # our receiver index
    keys: SessionKeys
    en: str                      # the EN's authenticated identity
    addr: tuple                  # the EN's UDP (host, port), follows roaming
    created: float
    last_rx: float
    role: str | None = None      # None until the EN's info
    address: str | None = None   # the EN's tunnel address
    primary: str | None = None   # the EN's primary DN id (as the EN says)
    dns: tuple = ()
    rx_packets: int = 0
    tx_packets: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0
    drops: dict = field(default_factory=dict)
    claiming: bool = False
    confirm_pending: bool = False
    next_claim: float = 0.0       # first-data takeovers wait until then (after a lost claim)
    address_bytes: bytes | None = None
    epoch: int | None = None

    def drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def describe(self, now: float) -> dict:
        return {"en": self.en, "index": self.index, "peer": f"{self.addr[0]}:{self.addr[1]}",
                "role": self.role, "address": self.address, "primary": self.primary,
                "dns": list(self.dns), "age_s": round(now - self.created, 3),
                "idle_s": round(now - self.last_rx, 3), "rx_packets": self.rx_packets,
                "tx_packets": self.tx_packets, "rx_bytes": self.rx_bytes,
                "tx_bytes": self.tx_bytes, "drops": dict(self.drops), "epoch": self.epoch}


class FlowFilter:
    """Per-EN duplicate filter on the EN's ``flow`` numbers (soft handoff
    copies carry the same number on every session of the EN)."""

    def __init__(self, size: int = 4096):
        self.size = size
        self.windows: dict[str, ReplayWindow] = {}

    def fresh(self, en: str, flow: int) -> bool:
        w = self.windows.get(en)
        if w is None:
            w = self.windows[en] = ReplayWindow(self.size)
        if w.check(flow) is not None:
            return False
        w.accept(flow)
        return True

    def forget(self, en: str) -> None:
        self.windows.pop(en, None)
