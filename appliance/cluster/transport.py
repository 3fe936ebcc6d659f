"""Heartbeat transport: the UDP socket, key, incarnation, sequence, encode and
verify, the drift-free monotonic send schedule and the datagram size budget.

``HeartbeatChannel`` knows nothing about peers' meaning: each beat's content
comes from ``build()`` (the manager's ``build_heartbeat``), each authentic
beat goes to ``on_beat(hb)``, and ``on_tick()`` runs after every beat sent.
"""

from __future__ import annotations

import collections
import os
import secrets
import time
from pathlib import Path
from typing import Callable

from twisted.internet import protocol
from twisted.logger import Logger

from appliance.cluster.heartbeat import (Heartbeat, HeartbeatError, HeartbeatVerifier, decode,
                                         encode)
from appliance.net.sockets import set_receive_buffer

_log = Logger(namespace="appliance.cluster")

HEARTBEAT_RCVBUF = 1 << 20  # bytes of kernel receive buffer for the heartbeat socket
SIZE_BUDGET = 1400          # bytes: above this a beat is IP-fragmented on a 1500 MTU path
MAX_PACKET = 65535          # read whole datagrams, so an oversize one is counted as such
#: Extra beats (a state a peer waits for changed: want, claim, release,
#: releasing, demoted, an intent): at least this long after the previous extra one ...
URGENT_MIN_GAP_S = 0.002
#: ... and from a bucket of this many, refilled at one per beat period, so a
#: flapping state adds at most one beat per period to the schedule (plus a burst).
URGENT_BURST = 4


def load_key(path: str) -> bytes:
    """Read the heartbeat HMAC key (text, stripped; at least 16 bytes)."""
    try:
        key = Path(path).read_bytes().strip()
    except OSError as e:
        raise ValueError(f"cluster.auth_key_file {path}: {e.strerror or e}") from None
    if len(key) < 16:
        raise ValueError(f"cluster.auth_key_file {path}: key is shorter than 16 bytes")
    return key


def new_cluster_key() -> str:
    return secrets.token_hex(32)


def _fsync_dir(state_dir: Path) -> None:
    try:
        fd = os.open(state_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _write_durable(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, fsynced with its directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def next_incarnation(state_dir: Path) -> int:
    """A number larger than any previous start's (wall-clock ns, persisted,
    fsynced with its directory).  A lost state dir with a clock behind gives
    a *lower* one: the receivers' echo check re-admits it (heartbeat.py)."""
    path = state_dir / "cluster.incarnation"
    try:
        last = int(path.read_text().strip())
    except (OSError, ValueError):
        last = 0
    inc = max(time.time_ns(), last + 1)
    _write_durable(path, str(inc))
    return inc


class MaintenanceMark:
    """The operator's maintenance, kept across a restart: ``cluster.maintenance``
    in the state dir exists while maintenance is on (written by
    ``cluster.maintenance {on:true}``, removed by ``{on:false}``; never by the
    shutdown's own maintenance beat).  ``save`` does disk I/O with fsync: the
    manager runs it in a thread when its reactor has one."""

    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / "cluster.maintenance"

    def load(self) -> bool:
        return self.path.exists()

    def save(self, on: bool) -> None:
        if on:
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            _write_durable(self.path, f"maintenance on since {since}\n")
        else:
            try:
                self.path.unlink()
            except FileNotFoundError:
                return
            _fsync_dir(self.path.parent)


class _Protocol(protocol.DatagramProtocol):
    def __init__(self, channel: "HeartbeatChannel"):
        self.channel = channel

    def datagramReceived(self, data, addr):
        try:
            self.channel.received(data, addr)
        except Exception:
            _log.failure("heartbeat handling failed for a datagram from {addr}", addr=addr)


class HeartbeatChannel:
    """Sends a beat to every peer every ``beat_period`` on ``clock`` (absolute
    times, so the period never drifts by the tick's cost) and verifies what
    arrives.

    ``peers`` maps a peer to its address, or to a list of addresses (several
    heartbeat paths): every beat goes out on every path and counts from
    whichever path brings it first (the copy from another path is a
    ``path_duplicates``, not a replay), so a peer is suspected only when
    every path is silent.  Each path's own loss comes from its sequence gaps
    (:meth:`path_status`)."""

    def __init__(self, reactor, clock, *, node_id: str, key: bytes, incarnation: int,
                 peers: dict[str, str], port: int, beat_period: float, window: int,
                 build: Callable[[], Heartbeat], on_beat: Callable[[Heartbeat], None],
                 on_tick: Callable[[], None], stats: dict):
        self.reactor, self.clock = reactor, clock
        self.node_id, self.key, self.incarnation = node_id, key, incarnation
        self.peer_addresses = {pid: [str(a) for a in (a if isinstance(a, (list, tuple)) else [a])]
                               for pid, a in peers.items()}
        self.multipath = {addr: pid for pid, addrs in self.peer_addresses.items()
                          if len(addrs) > 1 for addr in addrs}
        self.paths: dict[str, dict[str, dict]] = {
            pid: {addr: {"received": 0, "lost": 0, "incarnation": None, "last_seq": 0,
                         "last_seen": None} for addr in addrs}
            for pid, addrs in self.peer_addresses.items() if len(addrs) > 1}
        self.udp_port = port
        self.beat_period = beat_period
        self.build, self.on_beat, self.on_tick = build, on_beat, on_tick
        self.stats = stats
        self.seq = 0
        self.sent_at: dict[int, float] = {}     # our recent beats: seq -> send time
        self.verifier = HeartbeatVerifier(key, node_id, peers, incarnation=incarnation,
                                          window=window)
        self.port = None
        self._call = None
        self._next_at: float | None = None
        self._stalls: collections.deque = collections.deque(maxlen=8)   # (at, late) own ticks
        self._warned_size = False
        self._stopped = False
        self._last_urgent: float | None = None
        self._tokens = float(URGENT_BURST)
        self._tokens_at: float | None = None
        self._urgent = None             # pending extra beat (DelayedCall)

    def listen(self, interface: str = ""):
        try:
            self.port = self.reactor.listenUDP(self.udp_port, _Protocol(self), interface=interface,
                                               maxPacketSize=MAX_PACKET)
        except TypeError:        # a test reactor without maxPacketSize
            self.port = self.reactor.listenUDP(self.udp_port, _Protocol(self), interface=interface)
        # A burst of junk (a forger, a misconfigured box) queues instead of
        # crowding the partner's real heartbeats out of a ~200 KiB default buffer.
        sock = getattr(self.port, "socket", None)       # (a test reactor's port has none)
        if sock is not None:
            set_receive_buffer(sock, HEARTBEAT_RCVBUF)
        return self.port

    def next_seq(self) -> int:
        self.seq += 1
        self.verifier.sent_seq = self.seq
        self.sent_at[self.seq] = self.clock.seconds()
        self.sent_at.pop(self.seq - self.verifier.window, None)
        return self.seq

    def sent_time(self, seq: int) -> float | None:
        """When (monotonic) our beat ``seq`` left, if it is recent."""
        return self.sent_at.get(seq)

    def send(self, port=None):
        port = port if port is not None else self.port
        if port is None:
            return
        datagram = encode(self.build(), self.key)
        if len(datagram) > SIZE_BUDGET:
            self.stats["oversize_sent"] = self.stats.get("oversize_sent", 0) + 1
            if not self._warned_size:
                self._warned_size = True
                _log.warn("heartbeat of {n} bytes exceeds the {budget}-byte budget (IP "
                          "fragments: one lost fragment loses the beat); fewer resources per "
                          "node, or shorter names", n=len(datagram), budget=SIZE_BUDGET)
        if self._urgent is not None and self._urgent.active():
            self._urgent.cancel()       # this beat carries the state already
        self._urgent = None
        for peer, addresses in self.peer_addresses.items():
            for address in addresses:
                try:
                    port.write(datagram, (address, self.udp_port))
                    self.stats["sent"] += 1
                except Exception as e:   # unreachable network, no route: counted, not fatal
                    self.stats["send_errors"] += 1
                    _log.debug("heartbeat to {peer} at {address} failed: {why}", peer=peer,
                               address=address, why=e)

    def received(self, data: bytes, addr):
        pid = self.multipath.get(addr[0]) if addr else None
        if pid is not None and self._path_copy(pid, addr[0], data):
            return
        hb = self.verifier.accept(data)
        if hb is None:
            return
        self.stats["received"] += 1
        self.on_beat(hb)

    def _path_copy(self, pid: str, src: str, data: bytes) -> bool:
        """Account a beat on its path; True if another path brought it first.
        Decoded with the current key and the previous ones, as the verifier
        does (during a key rotation the peer's beats may be signed with
        either; a copy signed with the previous key is still a copy)."""
        hb = None
        for key in (self.key, *self.verifier.previous_keys):
            try:
                hb = decode(data, key)
                break
            except HeartbeatError as e:
                if e.reason != "bad_mac":
                    return False           # the verifier counts it
        if hb is None:
            return False                   # the verifier counts it
        if hb.node != pid:
            return False
        path = self.paths[pid][src]
        if path["incarnation"] != hb.incarnation:
            path["incarnation"], path["last_seq"] = hb.incarnation, hb.seq
            path["received"] += 1
            path["last_seen"] = self.clock.seconds()
        elif hb.seq > path["last_seq"]:
            path["lost"] += hb.seq - path["last_seq"] - 1
            path["last_seq"] = hb.seq
            path["received"] += 1
            path["last_seen"] = self.clock.seconds()
        last = self.verifier.latest.get(hb.node)
        if last is not None and last[0] == hb.incarnation and hb.seq <= last[1]:
            self.stats["path_duplicates"] = self.stats.get("path_duplicates", 0) + 1
            return True
        return False

    def path_status(self, pid: str, now: float) -> dict[str, dict] | None:
        """Per heartbeat path of ``pid`` (None with one path): beats received,
        lost (sequence gaps on that path), loss ratio, ms since the last one."""
        paths = self.paths.get(pid)
        if paths is None:
            return None
        out = {}
        for addr, p in paths.items():
            total = p["received"] + p["lost"]
            out[addr] = {"received": p["received"], "lost": p["lost"],
                         "loss": round(p["lost"] / total, 4) if total else None,
                         "last_seen_ms": (None if p["last_seen"] is None
                                          else round((now - p["last_seen"]) * 1000))}
        return out

    # -- extra beats -------------------------------------------------------------
    def _refill(self, now: float) -> None:
        if self._tokens_at is not None:
            self._tokens = min(float(URGENT_BURST),
                               self._tokens + (now - self._tokens_at) / self.beat_period)
        self._tokens_at = now

    def send_soon(self, send: Callable[[], None]) -> None:
        """An extra beat, outside the schedule, as soon as the rate limit
        allows: a local state a peer waits for changed (a handshake step),
        so it goes out now rather than at the next tick.  ``send()`` sends it
        (the manager's, which knows whether the node still has its port).
        Several requests before it leaves make one beat (it is built when it
        leaves, with the state of then); a scheduled beat leaving first
        makes it unneeded.  At most :data:`URGENT_BURST` in a burst and one
        per beat period on average, never closer than
        :data:`URGENT_MIN_GAP_S` to the previous extra one: past that the state
        waits for the next scheduled beat (counted ``urgent_limited``).  The
        schedule itself is untouched (absolute times)."""
        if self._stopped or (self._urgent is not None and self._urgent.active()):
            return
        now = self.clock.seconds()
        self._refill(now)
        if self._tokens < 1.0:
            self.stats["urgent_limited"] = self.stats.get("urgent_limited", 0) + 1
            return
        at = now if self._last_urgent is None else max(now, self._last_urgent + URGENT_MIN_GAP_S)
        self._urgent = self.clock.callLater(at - now, self._send_urgent, send)

    def _send_urgent(self, send: Callable[[], None]) -> None:
        self._urgent = None
        if self._stopped:
            return
        self._refill(self.clock.seconds())
        if self._tokens < 1.0:
            self.stats["urgent_limited"] = self.stats.get("urgent_limited", 0) + 1
            return
        self._tokens -= 1.0
        self._last_urgent = self.clock.seconds()
        self.stats["urgent_sent"] = self.stats.get("urgent_sent", 0) + 1
        try:
            send()
        except Exception:
            _log.failure("extra heartbeat failed")

    # -- the schedule ----------------------------------------------------------
    def start(self):
        self.tick()

    def tick(self):
        self._call = None
        if self._next_at is not None:
            late = self.clock.seconds() - self._next_at
            if late > self.beat_period / 2:
                self._stalls.append((self.clock.seconds(), late))
        try:
            self.on_tick()
        except Exception:
            _log.failure("cluster tick failed")
        if not self._stopped:
            self._schedule()

    def _schedule(self):
        now = self.clock.seconds()
        if self._next_at is None:
            self._next_at = now
        self._next_at += self.beat_period
        if self._next_at <= now:
            missed = int((now - self._next_at) / self.beat_period) + 1
            self.stats["late_beats"] += missed
            self._next_at += missed * self.beat_period
        self._call = self.clock.callLater(self._next_at - now, self.tick)

    def stall_end(self, now: float) -> tuple[float, float] | None:
        """``(when, how long)`` of this node's latest stall: its latest tick
        that ran more than half a beat period late (a stall, not epoll's
        rounding), or ``now`` while a tick is that overdue (the detector can
        run first after a stall); None if it never stalled."""
        if self._next_at is not None and not self._stopped:
            overdue = now - self._next_at
            if overdue > self.beat_period / 2:
                return now, overdue
        return self._stalls[-1] if self._stalls else None

    def stop(self):
        self._stopped = True
        for call in (self._call, self._urgent):
            if call is not None and call.active():
                call.cancel()
        self._call = self._urgent = None
