"""``appliance-en``: the encapsulation client (EN).

Usage: ``appliance-en --config PATH [--status-file PATH]``.  Config (TOML)::

    [en]
    id = "en1"                      # this EN's identity (1-64 printable ASCII)
    psk_file = "etc/encap.psk"      # the key of this EN's id (per-EN keys) or the shared PSK
    tun = "en0"                     # TUN device (created; needs CAP_NET_ADMIN)
    routes = ["10.210.0.0/24"]      # destinations sent through the tunnel
    keepalive_ms = 50               # keepalive (echo) interval to every DN
    active_keepalive_ms = 20        # ... to the primary while data flows (0: same as idle)
    dead_after = 4                  # silent intervals before a DN is dead
    handshake_retry_ms = 250        # HELLO retry while a DN is down
    soft_handoff = true             # send on old and new DN until the new path is confirmed
    handoff_max_ms = 2000           # ... at most this long
    status_interval_s = 1.0         # how often --status-file is rewritten

    [[en.dns]]                      # in preference order: the first to answer is primary
    id = "dn1"
    address = "10.99.0.1"
    port = 7400

:class:`ENClient` is the logic with its I/O injected (``send(dn, data)``,
``tun_write(packets)``, ``configure(address, prefixlen, mtu)``); :func:`main`
wires it to one *connected* UDP socket per DN (so an ICMP port-unreachable
from a dead DN process reaches us as ``connectionRefused``) and a TUN device.

Failover: the primary is declared dead after ``dead_after`` keepalive
intervals without any record from it, after ``dead_after`` probes without any
record back, each awaited its RTO, while data flows (a probe burst, ``_probe``: it
starts when data went to the primary and nothing came back within its echo RTO,
``_watch``, or with the active tick's probe, and its probes overlap), at once on an ICMP
port-unreachable from it, or when a secondary says ``primary_down`` (the fast
rules never drop the only DN left; a tick that runs late -- the EN's own process
was not scheduled -- judges no DN on its silence before the reactor has read
what waits in the sockets).  The EN then makes the
next DN that is up (config order) its primary (``promote``); with soft
handoff every packet also goes to the old DN, with the same flow number,
until the new DN answers ``promoted``.  When the home DN (the one that
assigned the address) is back, the EN moves back to it the same way and
``demote``s the DN that served it meanwhile.  A DN declared dead that is in
fact alive still delivers on its old session until a new one is up.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
import time
import tomllib
from dataclasses import dataclass, field

from twisted.internet import defer, protocol, task
from twisted.logger import Logger

from services.encap import wire as W

_log = Logger(namespace="services.encap.en")

DOWN, HANDSHAKING, UP = "down", "handshaking", "up"
#: The EN counts as active (fast keepalives to its primary) this long after a data packet.
ACTIVE_FOR_S = 0.5
#: an unconfirmed switch re-sends promote after this many keepalive intervals
PROMOTE_RETRY_INTERVALS = 4
#: a demote not acknowledged (``secondary`` with ``demoted``) is sent again after this
#: many keepalive intervals, at most DEMOTE_MAX_RETRIES times
DEMOTE_MAX_RETRIES = 25
#: a tick later than this many active intervals after the previous one: our process
#: was not scheduled (see ENClient._tick)
TICK_LATE_INTERVALS = 2.5
#: the primary's probe timeout (srtt + 4 rttvar) is at least this fraction of the
#: active keepalive interval (a floor for the scheduling jitter of a busy host)
PROBE_TIMEOUT_FLOOR = 0.5
#: a probe burst sends its next probe this fraction of the probe timeout after the
#: previous one (overlapping: each probe is still awaited a full timeout)
BURST_SPACING = 0.5
#: data sent to the primary and nothing at all back from it within its echo RTO
#: (srtt + 4 rttvar, at least this): a probe burst starts (a trigger, not evidence)
SUSPECT_FLOOR_S = 0.002


@dataclass(frozen=True)
class DNEntry:
    id: str
    address: str
    port: int = 7400


@dataclass(frozen=True)
class ENConfig:
    id: str
    psk_file: str
    dns: tuple[DNEntry, ...]
    tun: str = "en0"
    routes: tuple[str, ...] = ()
    keepalive_ms: float = 50.0
    active_keepalive_ms: float = 20.0
    dead_after: int = 4
    handshake_retry_ms: float = 250.0
    soft_handoff: bool = True
    handoff_max_ms: float = 2000.0
    status_interval_s: float = 1.0


class ENConfigError(Exception):
    pass


def load_config(path: str) -> ENConfig:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ENConfigError(f"{path}: {e}") from e
    en = data.get("en")
    problems = []
    if not isinstance(en, dict):
        raise ENConfigError(f"{path}: en: missing table [en]")
    known = {"id", "psk_file", "dns", "tun", "routes", "keepalive_ms", "active_keepalive_ms",
             "dead_after",
             "handshake_retry_ms", "soft_handoff", "handoff_max_ms", "status_interval_s"}
    for k in en:
        if k not in known:
            problems.append(f"en.{k}: unknown key")
    ident = en.get("id")
    if not isinstance(ident, str) or not 0 < len(ident) <= W.MAX_ID_LEN or not ident.isascii() \
            or not ident.isprintable():
        problems.append(f"en.id: {ident!r} is not 1-64 printable ASCII characters")
    if not isinstance(en.get("psk_file"), str):
        problems.append("en.psk_file: missing (required)")
    dns = []
    for i, d in enumerate(en.get("dns") or []):
        try:
            ipaddress.ip_address(d["address"])
            dns.append(DNEntry(str(d["id"]), str(d["address"]), int(d.get("port", 7400))))
        except (KeyError, TypeError, ValueError) as e:
            problems.append(f"en.dns[{i}]: needs id and an IP address ({e})")
    if not dns:
        problems.append("en.dns: needs at least one DN")
    routes = []
    for i, r in enumerate(en.get("routes") or []):
        try:
            routes.append(str(ipaddress.ip_network(r)))
        except (TypeError, ValueError):
            problems.append(f"en.routes[{i}]: {r!r} is not a network")
    if problems:
        raise ENConfigError("\n".join(f"{path}: {p}" for p in problems))
    return ENConfig(
        ident, en["psk_file"], tuple(dns), tun=str(en.get("tun", "en0")), routes=tuple(routes),
        keepalive_ms=float(en.get("keepalive_ms", 50)),
        active_keepalive_ms=float(en.get("active_keepalive_ms", 20)),
        dead_after=int(en.get("dead_after", 4)),
        handshake_retry_ms=float(en.get("handshake_retry_ms", 250)),
        soft_handoff=bool(en.get("soft_handoff", True)),
        handoff_max_ms=float(en.get("handoff_max_ms", 2000)),
        status_interval_s=float(en.get("status_interval_s", 1.0)))


@dataclass
class Link:
    dn: DNEntry
    state: str = DOWN
    initiator: W.Initiator | None = None
    keys: W.SessionKeys | None = None
    last_rx: float = 0.0
    last_hello: float = -1e9
    up_since: float = 0.0
    index: int = 0                # our receiver index (records to us carry it)
    last_ka: float = -1e9         # last keepalive sent
    fast_since: float = 1e18      # probed at the active rate since then
    rx: int = 0
    tx: int = 0
    drops: dict = field(default_factory=dict)
    # probing of the primary while data flows (see ENClient._probe)
    probe_call: object = None      # the pending burst step (next probe or the verdict)
    misses: int = 0                # probes sent while data flows since the last record back
    burst_last: float = 0.0        # the newest of them
    nth_sent: float = 0.0          # the dead_after-th of them (its timeout is the verdict)
    watch_call: object = None      # data sent: the check that something came back
    last_trigger: float = -1e9     # the last burst the data watch started
    srtt: float | None = None      # echo round trip, smoothed (RFC 6298)
    rttvar: float = 0.0
    # the session of a DN we declared dead, receive-only until a new one is up
    rx_keys: W.SessionKeys | None = None
    rx_index: int = 0


class ENClient:
    """The EN's logic (see the module docstring)."""

    def __init__(self, reactor, config: ENConfig, psk: bytes, *, send, tun_write,
                 configure=None):
        self.reactor = reactor
        self.config = config
        self.psk = psk
        self.send = send                  # send(dn_id, data)
        self.tun_write = tun_write        # tun_write(list of packets) -> int
        self.configure = configure        # configure(address, prefixlen, mtu) -> Deferred
        self.links = {d.id: Link(d) for d in config.dns}
        self.order = [d.id for d in config.dns]
        self.address: str | None = None
        self.address_bytes: bytes | None = None
        self.home: str | None = None      # the DN that assigned our address
        self.ticket: str | None = None    # its address ticket (per-EN keys), shown in info
        self.primary: str | None = None
        self.handoff_from: str | None = None
        #: the DN we switched away from: told ``demote`` once the new path is confirmed
        #: (with or without soft handoff: it may hold a takeover route for us)
        self.switched_from: str | None = None
        self.handoff_until = 0.0
        self.last_promote = 0.0
        self.last_home_ask = 0.0          # last info(primary) to the home DN while away
        #: DNs told ``demote`` and not yet acknowledged: dn -> (last sent, retries)
        self.demote_pending: dict[str, tuple[float, int]] = {}
        self.confirmed = False            # the primary answered promoted/assign
        self.configured: str | None = None  # the address once the TUN carries it
        # flow numbers continue upward across restarts (microseconds at start)
        self.flow = int(time.time() * 1e6)
        self.interval = config.keepalive_ms / 1000.0
        active = config.active_keepalive_ms or config.keepalive_ms
        self.active_interval = min(active, config.keepalive_ms) / 1000.0
        self.dead_s = self.interval * config.dead_after
        self.active_dead_s = self.active_interval * config.dead_after
        self.last_data = -1e9             # last data packet sent or received
        self.stats = {"tx_packets": 0, "rx_packets": 0, "failovers": 0, "handoffs_confirmed": 0,
                      "moved_home": 0, "dual_sent": 0, "icmp_unreachable": 0,
                      "promote_retries": 0, "probe_failures": 0, "late_rx": 0,
                      "demote_retries": 0, "late_ticks": 0, "home_retries": 0,
                      "suspect_probes": 0}
        self.drops: dict[str, int] = {}
        self.events: list[dict] = []
        self._tun_queue: list[bytes] = []
        self._flush_call = None
        self._ticker = None
        self._last_tick: float | None = None
        self._judge_deferred = False      # the last tick skipped the silence rules

    # ------------------------------------------------------------------
    def drop(self, reason: str, link: Link | None = None) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1
        if link is not None:
            link.drops[reason] = link.drops.get(reason, 0) + 1

    def event(self, what: str, **kw) -> None:
        kw.update(what=what, t=time.time())
        self.events.append(kw)
        del self.events[:-50]
        _log.info("en: {what} {kw}", what=what, kw=kw)

    def start(self) -> None:
        for link in self.links.values():
            self._hello(link)
        self._ticker = task.LoopingCall(self.tick)
        self._ticker.clock = self.reactor
        self._ticker.start(self.active_interval, now=False).addErrback(
            lambda f: _log.failure("en: tick loop stopped", failure=f))

    def stop(self) -> None:
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        for link in self.links.values():
            self._cancel_timers(link)

    def _hello(self, link: Link) -> None:
        link.initiator = W.Initiator(self.psk, self.config.id)
        link.last_hello = self.reactor.seconds()
        if link.state != UP:
            link.state = HANDSHAKING
        self._raw(link, link.initiator.hello())

    def _raw(self, link: Link, data: bytes) -> None:
        try:
            self.send(link.dn.id, data)
        except OSError:
            self.drop("send_error", link)

    def _seal(self, link: Link, plain: bytes) -> None:
        if link.keys is None:
            return
        link.tx += 1
        self._raw(link, link.keys.seal(plain))

    def control(self, link: Link, msg: dict) -> None:
        self._seal(link, W.control_plain(msg))

    # ------------------------------------------------------------------
    def tick(self) -> None:
        try:
            self._tick()
        except Exception:
            _log.failure("en: tick failed")     # never stop the loop

    def _tick(self) -> None:
        now = self.reactor.seconds()
        retry = self.config.handshake_retry_ms / 1000.0
        # our own process was not scheduled for a while (a busy host): what the DNs sent
        # meanwhile may be waiting unread in the sockets (the reactor runs its timers
        # before it reads them), so no DN is judged on its silence before the reactor
        # has read them -- by the next tick (once: a host slow on every tick still
        # judges)
        last, self._last_tick = self._last_tick, now
        late = last is not None and now - last > TICK_LATE_INTERVALS * self.active_interval
        skip_silence = late and not self._judge_deferred
        self._judge_deferred = skip_silence
        if skip_silence:
            self.stats["late_ticks"] += 1
        # while data flows the primary is probed faster (and declared dead sooner): a
        # DN death then costs less than one TCP retransmission timeout
        active = now - self.last_data < ACTIVE_FOR_S
        for link in self.links.values():
            if link.state == UP:
                fast = active and link.dn.id == self.primary
                interval = self.active_interval if fast else self.interval
                # a probe sent at the fast rate gets its answer within one fast
                # interval; older silence counts against the idle threshold
                dead = self.active_dead_s if fast and now - link.fast_since >= self.active_dead_s \
                    else self.dead_s
                if link.dn.id == self.primary and not self._alternative(link):
                    # no other DN to switch to: declaring the only path dead loses more
                    # than it saves (a busy DN that took us over may be slow to answer
                    # for a moment); the idle threshold still ends a session that is gone
                    dead = self.dead_s
                if not fast:
                    link.fast_since = 1e18
                elif link.fast_since > now:
                    link.fast_since = now
                if now - link.last_rx > dead and not skip_silence:
                    self._link_dead(link, "keepalive_timeout")
                elif now - link.last_ka >= interval - 1e-6:
                    self._probe(link, now, fast)
                    if link.keys is not None and link.keys.send_seq > W.REKEY_AFTER_SEQ:
                        self._hello(link)
            elif now - link.last_hello >= retry:
                self._hello(link)
        if self.primary is not None and not self.confirmed and self.address is not None \
                and now - self.last_promote >= PROMOTE_RETRY_INTERVALS * self.interval:
            # the promote or its promoted was lost (a lossy underlay): ask again (a DN
            # answers a repeated promote with promoted: it already holds the address)
            link = self.links[self.primary]
            if link.state == UP and link.keys is not None:
                self.stats["promote_retries"] += 1
                self._promote("retry")
        if self.home is not None and self.primary != self.home and self.address is not None \
                and now - self.last_home_ask >= PROMOTE_RETRY_INTERVALS * self.interval:
            # away from home with its session up: our info(primary) or its assign was
            # lost (a lossy underlay) -- ask again, or we would stay away for good
            home = self.links.get(self.home)
            if home is not None and home.state == UP and home.keys is not None:
                self.stats["home_retries"] += 1
                self._ask_home(home)
        for dn, (last, retries) in list(self.demote_pending.items()):
            # the demote or its acknowledgement was lost (a lossy underlay): a DN that
            # took us over and never heard it would keep its route (and, with a routing
            # daemon carrying it, the ESR's traffic for us) for good
            link = self.links[dn]
            if dn == self.primary:
                del self.demote_pending[dn]
            elif link.state == UP and link.keys is not None \
                    and now - last >= PROMOTE_RETRY_INTERVALS * self.interval:
                if retries >= DEMOTE_MAX_RETRIES:
                    del self.demote_pending[dn]
                    self.event("demote_unacknowledged", dn=dn)
                    continue
                self.stats["demote_retries"] += 1
                self._demote(dn, retries + 1)
        if self.handoff_from is not None and now > self.handoff_until:
            self.event("handoff_expired", old=self.handoff_from, new=self.primary)
            self.handoff_from = None
        if self.primary is None and self.address is not None:
            self._choose_primary("no_primary")

    # ------------------------------------------------------------------
    # fast failure detection while data flows: probe bursts
    # ------------------------------------------------------------------
    def probe_timeout(self, link: Link) -> float:
        """How long an echo probe of ``link`` may wait for its answer: the RTO of
        RFC 6298 from the echo round trips seen (srtt + 4 rttvar), at least
        ``PROBE_TIMEOUT_FLOOR`` of the active interval, so a DN that is far away (MAN, WAN)
        is given its round trip and a near one is judged at once (before any sample:
        the idle dead time)."""
        floor = PROBE_TIMEOUT_FLOOR * self.active_interval
        if link.srtt is None:
            return max(floor, self.dead_s)      # no round trip seen yet: be patient
        return max(floor, link.srtt + 4 * link.rttvar)

    def suspect_timeout(self, link: Link) -> float:
        """How long after a data packet to the primary nothing at all may come back from
        it before a probe burst starts: its echo RTO without the scheduling floor (a
        probe costs one small packet; only the burst's verdict needs the floor)."""
        if link.srtt is None:
            return self.probe_timeout(link)
        return max(SUSPECT_FLOOR_S, link.srtt + 4 * link.rttvar)

    @staticmethod
    def _stamp(now: float) -> int:
        return int(now * 1000) % 0xFFFFFFFF + 1

    def _probe(self, link: Link, now: float, fast: bool) -> None:
        """Send an echo keepalive.  To the primary while data flows (``fast``) it is
        also a probe of a burst: while nothing at all comes back from the DN, the next
        probe goes out ``BURST_SPACING`` of the probe timeout after it (``_burst_step``),
        up to ``dead_after`` of them, and the DN is dead when the ``dead_after``-th has
        waited its full timeout without any record back -- the same evidence as
        ``dead_after`` probes awaited one after the other (each unanswered within its
        RTO), gathered in 2.5 timeouts instead of 4 (~25 ms on a LAN).  A burst starts
        with the active tick's probe or, sooner, with the data watch (``_watch``: data
        went to the DN and nothing came back within its RTO); the silence rule of the
        tick stays as the fallback."""
        link.last_ka = now
        self._seal(link, W.keepalive_plain(True, self._stamp(now)))
        if fast and link.keys is not None:
            link.misses += 1
            link.burst_last = now
            if link.misses == self.config.dead_after:
                link.nth_sent = now
            self._schedule_step(link, self._next_step(link))

    def _next_step(self, link: Link) -> float:
        """When the burst of ``link`` next acts: its verdict once ``dead_after`` probes
        are out, else its next probe."""
        timeout = self.probe_timeout(link)
        if link.misses >= self.config.dead_after:
            return link.nth_sent + timeout
        return link.burst_last + BURST_SPACING * timeout

    def _schedule_step(self, link: Link, at: float) -> None:
        call = link.probe_call
        if call is not None and call.active():
            if call.getTime() <= at + 1e-9:
                return                          # an earlier step re-reads the state
            call.cancel()
        link.probe_call = self.reactor.callLater(max(0.0, at - self.reactor.seconds()),
                                                 self._burst_step, link, at)

    def _burst_step(self, link: Link, due: float) -> None:
        link.probe_call = None
        try:
            if link.state != UP or link.dn.id != self.primary or link.keys is None:
                link.misses = 0
                return
            if link.misses == 0:
                return                          # something came back: the burst is over
            now = self.reactor.seconds()
            timeout = self.probe_timeout(link)
            if now - due > timeout / 2:
                # we ran late (our own process was not scheduled): the answer may be
                # waiting unread; judge after the reactor has read its sockets
                link.probe_call = self.reactor.callLater(0.001, self._burst_step, link,
                                                         now + 0.001)
                return
            at = self._next_step(link)
            if now < at - 1e-6:
                self._schedule_step(link, at)   # (the RTO grew meanwhile)
                return
            if link.misses >= self.config.dead_after:
                if not self._alternative(link):
                    link.misses = 0        # nowhere to go: the tick's idle threshold decides
                    return
                self.stats["probe_failures"] += 1
                self._link_dead(link, "probe_timeout")
                return
            self._probe(link, now, True)
        except Exception:
            _log.failure("en: probe burst step failed")

    def _watch(self, link: Link, since: float) -> None:
        """Data went to the primary at ``since`` (armed by ``tun_packets``): nothing at
        all came back from it within its echo RTO and no burst runs -- start one now
        rather than at the next active tick (at most one per probe timeout, so one-way
        traffic does not probe at the data rate)."""
        link.watch_call = None
        try:
            if link.state != UP or link.dn.id != self.primary or link.keys is None \
                    or link.last_rx > since or link.misses:
                return
            now = self.reactor.seconds()
            if now - link.last_trigger < self.probe_timeout(link):
                return
            link.last_trigger = now
            self.stats["suspect_probes"] += 1
            self._probe(link, now, True)
        except Exception:
            _log.failure("en: data watch failed")

    def _cancel_timers(self, link: Link) -> None:
        for name in ("probe_call", "watch_call"):
            call = getattr(link, name)
            if call is not None and call.active():
                call.cancel()
            setattr(link, name, None)

    def _alternative(self, link: Link) -> bool:
        """Another DN is up to switch to."""
        return any(other is not link and other.state == UP and other.keys is not None
                   for other in self.links.values())

    def _answered(self, link: Link, now: float, stamp: int) -> None:
        """A keepalive answer carrying our probe's stamp: an RTT sample."""
        sample = ((self._stamp(now) - stamp) % 0xFFFFFFFF) / 1000.0
        if sample > 60:
            return                                  # not ours (or absurd)
        if link.srtt is None:
            link.srtt, link.rttvar = sample, sample / 2
        else:
            link.rttvar = 0.75 * link.rttvar + 0.25 * abs(link.srtt - sample)
            link.srtt = 0.875 * link.srtt + 0.125 * sample

    def _link_dead(self, link: Link, reason: str) -> None:
        was_up = link.state == UP
        link.state = DOWN
        if link.keys is not None:
            # a DN declared dead may be alive after all (a stall, lost probes): what it
            # still forwards to us (the ESR routes the EN's replies there until the new
            # DN's route is in) is taken until a new session with it is up
            link.rx_keys, link.rx_index = link.keys, link.index
        link.keys = None
        link.misses = 0
        self._cancel_timers(link)
        if was_up:
            self.event("dn_down", dn=link.dn.id, reason=reason)
        if link.dn.id == self.primary:
            self.failover(reason)

    def refused(self, dn: str) -> None:
        """ICMP port-unreachable from ``dn`` (its process is gone)."""
        self.stats["icmp_unreachable"] += 1
        link = self.links.get(dn)
        if link is not None and link.state == UP:
            self._link_dead(link, "icmp_unreachable")

    def failover(self, reason: str, to: str | None = None) -> None:
        old = self.primary
        candidates = [to] if to else [d for d in self.order if d != old]
        new = next((d for d in candidates
                    if self.links[d].state == UP and self.links[d].keys is not None), None)
        self.stats["failovers"] += 1
        if new is None:
            self.event("failover_no_dn", old=old, reason=reason)
            self.primary = None
            return
        self._switch(old, new, reason)

    def _switch(self, old: str | None, new: str, reason: str) -> None:
        self.primary = new
        self.demote_pending.pop(new, None)
        self.confirmed = False
        self.switched_from = old if old != new else None
        if self.config.soft_handoff and old is not None and old != new:
            self.handoff_from = old
            self.handoff_until = self.reactor.seconds() + self.config.handoff_max_ms / 1000.0
        self.event("switch", old=old, new=new, reason=reason)
        self._promote(reason)

    def _demote(self, dn: str, retries: int = 0) -> None:
        """Tell ``dn`` (that we left) it is a secondary again; sent again until it
        answers ``secondary`` with ``demoted``."""
        self.demote_pending[dn] = (self.reactor.seconds(), retries)
        self.control(self.links[dn], {"t": W.C_DEMOTE, "address": self.address})
        self.control(self.links[dn], self._info("secondary"))

    def _promote(self, reason: str) -> None:
        self.last_promote = self.reactor.seconds()
        self.control(self.links[self.primary], {"t": W.C_PROMOTE, "address": self.address,
                                                "reason": reason})

    def _choose_primary(self, reason: str) -> None:
        for d in self.order:
            if self.links[d].state == UP:
                self._switch(None, d, reason)
                return

    # ------------------------------------------------------------------
    def datagram(self, dn: str, data: bytes) -> None:
        link = self.links.get(dn)
        if link is None:
            return self.drop("unknown_dn")
        keys = link.keys
        if keys is None and link.rx_keys is not None and data[:1] == b"\x04" \
                and len(data) >= W.MIN_RECORD:
            return self._late_record(link, data)
        if data[:1] == b"\x04" and keys is not None and len(data) >= W.MIN_RECORD:
            # the hot path: a RECORD on an established session
            receiver, seq = W.RECORD_INDEX_SEQ.unpack_from(data, 1)
            if receiver != link.index:
                return self.drop("unknown_session", link)
            try:
                plain = keys.open_datagram(data, seq)
                kind, value = W.parse_inner(plain)
            except W.Drop as d:
                return self.drop(d.reason, link)
            self._inner(link, kind, value)
            return
        try:
            msg = W.decode(data)
            if isinstance(msg, W.Challenge):
                self._challenged(link, msg)
            elif isinstance(msg, W.Record):
                self._record(link, msg)
            else:
                raise W.Drop("unexpected_type")
        except W.Drop as d:
            self.drop(d.reason, link)

    def _late_record(self, link: Link, data: bytes) -> None:
        """A RECORD on the session of a DN we declared dead: its DATA is delivered
        (counted ``late_rx``), nothing else is acted on."""
        receiver, seq = W.RECORD_INDEX_SEQ.unpack_from(data, 1)
        if receiver != link.rx_index:
            return self.drop("unknown_session", link)
        try:
            kind, value = W.parse_inner(link.rx_keys.open_datagram(data, seq))
        except W.Drop as d:
            return self.drop(d.reason, link)
        if kind != W.K_DATA:
            return
        self.stats["late_rx"] += 1
        self.stats["rx_packets"] += 1
        self._tun_queue.append(value[1])
        if self._flush_call is None:
            self._flush_call = self.reactor.callLater(0, self._flush)

    def _challenged(self, link: Link, ch: W.Challenge) -> None:
        if link.initiator is None:
            raise W.Drop("unknown_session")
        confirm, keys, ident = link.initiator.challenged(ch)
        if ident != link.dn.id:
            raise W.Drop("wrong_dn")
        self._raw(link, confirm)
        link.index = link.initiator.index
        link.initiator = None
        link.keys = keys
        link.rx_keys = None
        link.state = UP
        now = self.reactor.seconds()
        link.last_rx = link.up_since = now
        # a new session may be a new process (a revived DN whose start still takes its
        # CPU): the round trip of its previous life does not judge it -- the fast rules
        # wait for an answer of this session (until then the probe timeout is the idle
        # dead time)
        link.srtt, link.rttvar, link.misses = None, 0.0, 0
        self.event("dn_up", dn=link.dn.id)
        if self.address is None:
            if self.primary is None:
                self.primary = link.dn.id      # the first to answer
                self.control(link, {"t": W.C_INFO, "en": self.config.id, "role": "primary",
                                    "dns": self.order})
            return                             # secondaries wait for the address
        if link.dn.id == self.home and self.primary != self.home:
            # home again: ask it to serve us (it answers assign, then we move back)
            self._ask_home(link)
        elif self.primary is None or link.dn.id == self.primary:
            self.primary = link.dn.id
            self.control(link, self._info("primary"))
        else:
            self.control(link, self._info("secondary"))

    def _ask_home(self, link: Link) -> None:
        self.last_home_ask = self.reactor.seconds()
        self.control(link, self._info("primary"))

    def _info(self, role: str) -> dict:
        info = {"t": W.C_INFO, "en": self.config.id, "role": role, "dns": self.order,
                "address": self.address, "primary": self.primary}
        if self.ticket is not None:
            info["ticket"] = self.ticket    # per-EN keys: our claim to the address
        return info

    def _record(self, link: Link, rec: W.Record) -> None:
        if link.keys is None or rec.receiver != link.index:
            raise W.Drop("unknown_session")
        plain = link.keys.open(rec)
        kind, value = W.parse_inner(plain)
        self._inner(link, kind, value)

    def _inner(self, link: Link, kind: int, value) -> None:
        link.last_rx = now = self.reactor.seconds()
        link.rx += 1
        link.misses = 0
        if kind == W.K_KEEPALIVE and value >> 8:
            self._answered(link, now, value >> 8)
        if kind == W.K_DATA:
            packet = value[1]
            self.last_data = link.last_rx
            self.stats["rx_packets"] += 1
            self._tun_queue.append(packet)
            if self._flush_call is None:
                self._flush_call = self.reactor.callLater(0, self._flush)
        elif kind == W.K_CONTROL:
            self._control(link, value)

    def _flush(self) -> None:
        self._flush_call = None
        queue, self._tun_queue = self._tun_queue, []
        if queue:
            self.tun_write(queue)

    def _control(self, link: Link, msg: dict) -> None:
        t = msg["t"]
        dn = link.dn.id
        if t == W.C_ASSIGN:
            try:
                address = str(ipaddress.IPv4Address(msg.get("address")))
            except (ValueError, TypeError):
                return self.drop("bad_control", link)
            first = self.address is None
            if self.address is not None and address != self.address:
                self.event("address_changed", old=self.address, new=address, dn=dn)
            self.home = dn
            ticket = msg.get("ticket")
            renewed = self.ticket is not None and ticket != self.ticket
            self.ticket = ticket if isinstance(ticket, str) else None
            self._set_address(address, int(msg.get("mtu") or 1400))
            if self.primary != dn:
                self.stats["moved_home"] += 1
                old = self.primary
                self._switch(old, dn, "home")
            if first or renewed:
                # (a renewed ticket: the DNs' ticket key changed; show them the new one)
                for other in self.links.values():
                    if other.dn.id != dn and other.state == UP:
                        self.control(other, self._info("secondary"))
        elif t == W.C_PROMOTED:
            if dn == self.primary:
                self.confirmed = True
                self.stats["handoffs_confirmed"] += 1
                old = self.switched_from
                self.handoff_from = self.switched_from = None
                self.event("confirmed", dn=dn, latency_ms=msg.get("latency_ms"))
                if old is not None and old != dn and self.links[old].state == UP:
                    self._demote(old)
        elif t == W.C_PRIMARY_DOWN:
            if self.primary is not None and msg.get("primary") == self.primary \
                    and dn != self.primary:
                link_old = self.links[self.primary]
                if link_old.keys is not None:
                    link_old.rx_keys, link_old.rx_index = link_old.keys, link_old.index
                link_old.state = DOWN
                link_old.keys = None
                self.stats["failovers"] += 1
                self._switch(self.primary, dn, "primary_down")
        elif t == W.C_PRIMARY_BACK:
            self.event("primary_back", dn=dn, primary=msg.get("primary"))
        elif t == W.C_SECONDARY:
            if msg.get("demoted"):
                self.demote_pending.pop(dn, None)
        elif t == W.C_ERROR:
            self.event("dn_error", dn=dn, reason=msg.get("reason"))
            if msg.get("reason") == "session_ended" and link.state == UP:
                # the DN's keys were reloaded: handshake again now (a removed EN's
                # HELLO goes unanswered)
                self._link_dead(link, "session_ended")
                link.last_hello = -1e9
        else:
            self.drop("unexpected_control", link)

    def _set_address(self, address: str, mtu: int) -> None:
        if address == self.address:
            return
        self.address = address
        self.address_bytes = ipaddress.IPv4Address(address).packed
        self.event("address", address=address)
        self.configured = None
        if self.configure is not None:
            d = defer.maybeDeferred(self.configure, address, 32, mtu)
            d.addCallback(lambda _: setattr(self, "configured", address))
            d.addErrback(lambda f: _log.error("en: configuring {a} failed: {e}", a=address,
                                              e=f.getErrorMessage()))

    # ------------------------------------------------------------------
    def tun_packets(self, packets: list[bytes]) -> None:
        primary = self.links.get(self.primary) if self.primary else None
        if primary is None or primary.keys is None:
            self.drops["no_primary"] = self.drops.get("no_primary", 0) + len(packets)
            return
        old = self.links.get(self.handoff_from) if self.handoff_from else None
        if old is not None and old.keys is None:
            old = None
        self.last_data = self.reactor.seconds()
        # the hot loop: names bound once, no per-packet helper calls
        send, seal, dn = self.send, primary.keys.seal, primary.dn.id
        pack, mine, flow, sent = W.FLOW.pack, self.address_bytes, self.flow, 0
        for packet in packets:
            if packet[12:16] != mine or packet[0] >> 4 != 4:
                self.drop("not_from_us")
                continue
            flow += 1
            plain = b"\0" + pack(flow) + packet
            try:
                send(dn, seal(plain))
                sent += 1
            except OSError:
                self.drop("send_error", primary)
            if old is not None:
                self._seal(old, plain)
                self.stats["dual_sent"] += 1
        self.flow = flow
        primary.tx += sent
        self.stats["tx_packets"] += sent
        if sent and primary.watch_call is None:
            # did anything come back? (see _watch)
            primary.watch_call = self.reactor.callLater(self.suspect_timeout(primary),
                                                        self._watch, primary,
                                                        self.last_data)

    def describe(self) -> dict:
        now = self.reactor.seconds()
        return {"en": self.config.id, "address": self.address, "home": self.home,
                "configured": self.configured,
                "primary": self.primary, "confirmed": self.confirmed,
                "handoff_from": self.handoff_from,
                "links": {d: {"state": l.state,
                              "idle_s": round(now - l.last_rx, 3) if l.keys else None,
                              "srtt_ms": round(l.srtt * 1000, 3) if l.srtt is not None
                              else None,
                              "rx": l.rx, "tx": l.tx, "drops": dict(l.drops)}
                          for d, l in self.links.items()},
                "stats": dict(self.stats), "drops": dict(self.drops), "events": self.events[-20:]}


# ----------------------------------------------------------------------
# process wiring
# ----------------------------------------------------------------------
class _DNProtocol(protocol.DatagramProtocol):
    def __init__(self, sock: "_DNSocket"):
        self.sock = sock

    def startProtocol(self):
        self.transport.connect(self.sock.dn.address, self.sock.dn.port)

    def datagramReceived(self, data, addr):
        self.sock.ref[0].datagram(self.sock.dn.id, data)

    def connectionRefused(self):
        self.sock.ref[0].refused(self.sock.dn.id)

    def stopProtocol(self):
        self.sock.lost(self)


class _DNSocket:
    """One connected UDP socket to one DN (ICMP errors reach us on it).

    Twisted closes a UDP port whose read fails with an error it does not
    expect (``EHOSTUNREACH`` when the DN's link is down): the socket is then
    reopened on a new port, and the error counts as an ICMP error from the DN.
    """

    def __init__(self, reactor, ref: list, dn: DNEntry):
        self.reactor, self.ref, self.dn = reactor, ref, dn
        self.port = None
        self.protocol = None
        self.closing = False
        self.reopened = 0
        self.open()

    def open(self) -> None:
        if self.closing:
            return
        self.protocol = _DNProtocol(self)
        self.port = self.reactor.listenUDP(0, self.protocol)

    def lost(self, proto) -> None:
        if self.closing or proto is not self.protocol:
            return
        self.port = None
        self.reopened += 1
        client = self.ref[0]
        if client is not None:
            client.refused(self.dn.id)
        self.reactor.callLater(0.05, self.open)

    def write(self, data: bytes) -> None:
        port = self.port
        if port is None or getattr(port, "socket", None) is None:
            raise OSError("socket to the DN is being reopened")
        port.write(data)

    def close(self):
        self.closing = True
        if self.port is not None:
            return self.port.stopListening()


def _configure_routes(ifname: str, address: str, prefixlen: int, mtu: int, routes) -> None:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    from services.encap.tun import _configure
    _configure(ifname, address, prefixlen, mtu)
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)[0]
        for r in routes:
            net = ipaddress.ip_network(r)
            try:
                ipr.route("replace", dst=str(net.network_address), dst_len=net.prefixlen,
                          oif=idx, prefsrc=address)
            except NetlinkError as e:
                _log.error("en: route {r} via {ifname}: {e}", r=r, ifname=ifname, e=e)


def run(reactor, config: ENConfig, status_file: str | None = None):
    from twisted.internet import threads

    from services.encap import tun as T
    psk = W.load_psk(config.psk_file)
    fd, name = T.open_tun(config.tun)
    ref: list = [None]
    transports = {dn.id: _DNSocket(reactor, ref, dn) for dn in config.dns}

    def send(dn_id, data):
        transports[dn_id].write(data)

    reader = T.TunReader(reactor, fd, name, lambda packets: ref[0].tun_packets(packets))

    def configure(address, prefixlen, mtu):
        return threads.deferToThread(_configure_routes, name, address, prefixlen,
                                     min(mtu, 1400), config.routes)

    client = ENClient(reactor, config, psk, send=send, tun_write=reader.write_many,
                      configure=configure)
    ref[0] = client
    reader.start()
    client.start()
    if status_file:
        def write_status():
            tmp = status_file + ".tmp"
            try:
                with open(tmp, "w") as f:
                    json.dump(client.describe(), f)
                os.replace(tmp, status_file)
            except OSError as e:
                _log.warn("en: status file: {e}", e=e)
        loop = task.LoopingCall(write_status)
        loop.clock = reactor
        loop.start(config.status_interval_s, now=True).addErrback(
            lambda f: _log.failure("en: status loop stopped", failure=f))
    return client


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="appliance-en", description="encapsulation client (EN)")
    parser.add_argument("--config", "-c", required=True)
    parser.add_argument("--status-file", help="write the EN's state as JSON here every second")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        W.load_psk(config.psk_file)
    except (ENConfigError, OSError, ValueError) as e:
        print(f"appliance-en: {e}", file=sys.stderr)
        return 1
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver
    if not args.quiet:
        globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])
    try:
        run(reactor, config, args.status_file)
    except Exception as e:
        print(f"appliance-en: {e}", file=sys.stderr)
        return 1
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
