"""Server transactions (RFC 3261 §17.2): retransmissions get the same answer.

A request is matched to its transaction by the top Via's branch (RFC 3261
magic cookie ``z9hG4bK``), its sent-by and its method (ACK matches the
INVITE); a request without the cookie falls back to the RFC 2543 key
(Request-URI, From tag, Call-ID, CSeq, top Via).

- A retransmission that arrives while the request is still being handled
  (waiting for the store) is absorbed: no second write, no second answer.
- One that arrives after the final response gets that response again,
  byte for byte, for ``linger_s`` (Timer J: 64*T1 = 32 s on UDP; reliable
  transports do not retransmit, so the entry goes at once).
- A non-2xx final response to an INVITE over UDP is retransmitted (Timer G,
  T1 doubling up to T2) until the ACK arrives or Timer H (64*T1) runs out.

Entries are swept once a second in arrival order; the table holds at most
``max_entries`` (oldest answered entries go first).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from twisted.logger import Logger

from services.sip.message import Message

_log = Logger(namespace="services.sip.transaction")

T1 = 0.5
T2 = 4.0
MAGIC = "z9hG4bK"


def transaction_key(msg: Message) -> tuple:
    via = msg.top_via
    method = "INVITE" if msg.method == "ACK" else msg.method
    branch = via.branch
    if branch and branch.startswith(MAGIC):
        return ("3261", branch, via.sent_by, method)
    from_tag = None
    try:
        from services.sip.message import parse_name_addr
        from_tag = parse_name_addr(msg.get("From", "")).tag
    except ValueError:
        pass
    number = msg.cseq[0]
    return ("2543", msg.uri, from_tag, msg.call_id, number, method, msg.get_all("Via")[0])


class _Entry:
    __slots__ = ("send", "response", "done_at", "retransmit", "interval", "started", "acked")

    def __init__(self, send: Callable[[bytes], None], now: float):
        self.send = send
        self.response: bytes | None = None
        self.done_at: float | None = None
        self.retransmit = None
        self.interval = T1
        self.started = now
        self.acked = False


class ServerTransactions:
    """The table of server transactions of one SIP service."""

    def __init__(self, reactor, *, linger_s: float = 64 * T1, max_entries: int = 200_000,
                 stats: dict | None = None):
        self.reactor = reactor
        self.linger_s = linger_s
        self.max_entries = max_entries
        self.entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self.stats = stats if stats is not None else {}
        for k in ("retransmissions_absorbed", "responses_resent", "acks_matched",
                  "acks_unmatched", "invite_retransmits", "invite_timeouts"):
            self.stats.setdefault(k, 0)

    def __len__(self) -> int:
        return len(self.entries)

    def received(self, msg: Message, key: tuple, send: Callable[[bytes], None]):
        """The transaction of a new request (to be answered with :meth:`respond`),
        or None when ``msg`` was a retransmission or an ACK and is handled here."""
        entry = self.entries.get(key)
        if msg.method == "ACK":
            if entry is not None:
                self.stats["acks_matched"] += 1
                entry.acked = True
                self._stop_retransmit(entry)
            else:
                self.stats["acks_unmatched"] += 1
            return None
        if entry is not None:
            if entry.response is None:
                self.stats["retransmissions_absorbed"] += 1
            else:
                self.stats["responses_resent"] += 1
                entry.send(entry.response)
            return None
        entry = _Entry(send, self.reactor.seconds())
        self.entries[key] = entry
        if len(self.entries) > self.max_entries:
            self._evict()
        return key

    def respond(self, key: tuple, data: bytes, *, final: bool = True, reliable: bool = False,
                invite_failure: bool = False) -> None:
        """Send ``data`` for the transaction ``key`` and remember it for retransmissions."""
        entry = self.entries.get(key)
        if entry is None:
            return       # evicted meanwhile: nothing to answer to
        entry.send(data)
        if not final:
            return
        entry.response = data
        now = self.reactor.seconds()
        if invite_failure and not reliable:
            # keep it until ACK or Timer H; Timer G retransmits meanwhile
            entry.done_at = now + 64 * T1
            entry.retransmit = self.reactor.callLater(entry.interval, self._timer_g, key)
        elif reliable:
            entry.done_at = now if not invite_failure else now + 64 * T1
        else:
            entry.done_at = now + self.linger_s
        # re-queue at the end so the sweep stays in done order
        self.entries.move_to_end(key)

    def _timer_g(self, key: tuple) -> None:
        entry = self.entries.get(key)
        if entry is None or entry.acked or entry.response is None:
            return
        if self.reactor.seconds() >= entry.done_at:
            self.stats["invite_timeouts"] += 1
            entry.retransmit = None
            return
        self.stats["invite_retransmits"] += 1
        try:
            entry.send(entry.response)
        except Exception:
            _log.failure("sip: INVITE response retransmission failed")
        entry.interval = min(entry.interval * 2, T2)
        entry.retransmit = self.reactor.callLater(entry.interval, self._timer_g, key)

    def _stop_retransmit(self, entry: _Entry) -> None:
        if entry.retransmit is not None and entry.retransmit.active():
            entry.retransmit.cancel()
        entry.retransmit = None

    def sweep(self) -> int:
        """Drop finished entries past their linger time (and stuck ones); return how many."""
        now = self.reactor.seconds()
        stale_pending = now - 64 * T1
        gone = []
        # in done order: stop at the first answered entry still lingering (no copy of
        # the whole table: it holds linger_s worth of requests)
        for key, entry in self.entries.items():
            if entry.done_at is not None:
                if entry.done_at > now:
                    break
            elif entry.started > stale_pending:
                continue
            gone.append((key, entry))
        for key, entry in gone:
            self._stop_retransmit(entry)
            del self.entries[key]
        return len(gone)

    def _evict(self) -> None:
        while len(self.entries) > self.max_entries:
            key, entry = self.entries.popitem(last=False)
            self._stop_retransmit(entry)

    def clear(self) -> None:
        for entry in self.entries.values():
            self._stop_retransmit(entry)
        self.entries.clear()
