"""A crowd of DHCPv4 clients behind one relay address, recording every reply on the wire.

Runs in a client namespace (``python -m tests.support.dhcp4_crowd ...``): one UDP
socket bound to ``giaddr:67`` (a relay agent: the servers answer to giaddr, port 67),
requests broadcast to 255.255.255.255:67 so every server on the segment hears them.
New clients arrive at ``--rate`` per second for ``--duration`` seconds; each runs
DISCOVER -> REQUEST (server id of the first OFFER), retransmitting every second with
``secs`` growing, and (``--renew``) renews at T1 and every second after (rebinding:
ciaddr, no server id) until its lease runs out or it is NAKed.

Every ACK and NAK that reaches the socket is written as one JSON line to ``--out``
(``t`` wall time, ``type``, ``mac``, ``ip``, ``server``, ``lease`` seconds), whether
the client wanted it or not: the judge (:func:`overlapping`) works from the wire,
not from what the clients chose to keep.

Used by tests/integration/test_dhcp4_kill_under_load.py and bench/dhcp4.py (the
``partition`` case).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import struct
import sys
import time
from ipaddress import IPv4Address


def overlapping(acks: list[dict]) -> list[tuple[dict, dict]]:
    """Pairs of ACKs of one address to two MACs whose lease times overlap."""
    by_address: dict[str, list[dict]] = {}
    for a in acks:
        if a.get("type") == "ACK":
            by_address.setdefault(a["ip"], []).append(a)
    bad = []
    for holds in by_address.values():
        holds.sort(key=lambda a: a["t"])
        for i, x in enumerate(holds):
            for y in holds[i + 1:]:
                if x["mac"] != y["mac"] and y["t"] < x["t"] + x["lease"]:
                    bad.append((x, y))
    return bad


def duplicate_addresses(acks: list[dict]) -> list[str]:
    """Distinct addresses ACKed to two clients with overlapping lease times."""
    return sorted({x["ip"] for x, _ in overlapping(acks)})


def read_acks(path) -> list[dict]:
    out = []
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


class _Client:
    __slots__ = ("mac", "xid", "state", "start", "next", "tries", "ip", "server", "expires")

    def __init__(self, mac: bytes, now: float):
        self.mac = mac
        self.xid = int.from_bytes(os.urandom(4), "big")
        self.state = "discover"
        self.start = now
        self.next = now
        self.tries = 0
        self.ip = None
        self.server = None
        self.expires = 0.0


def main(argv=None) -> int:
    from services.dhcp.v4 import codec as C
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--giaddr", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rate", type=float, default=50.0, help="new clients per second")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds new clients arrive")
    ap.add_argument("--linger", type=float, default=0.0,
                    help="seconds to keep running (renewing) after the last arrival")
    ap.add_argument("--renew", action="store_true", help="renew at T1 until expiry or NAK")
    ap.add_argument("--tries", type=int, default=4, help="DISCOVER/REQUEST attempts")
    ap.add_argument("--mac-prefix", default="0266", help="2 hex bytes; then 4 counter bytes")
    ap.add_argument("--marks", help="file: one line per second with the ACK count so far")
    a = ap.parse_args(argv)

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((a.giaddr, 67))
    sock.setblocking(False)
    giaddr = IPv4Address(a.giaddr)
    prefix = bytes.fromhex(a.mac_prefix)
    out = open(a.out, "a", buffering=1)
    clients: dict[int, _Client] = {}
    by_mac: dict[bytes, _Client] = {}
    t0 = time.time()
    made = acks = 0

    def send(c: _Client, mtype: int, now: float, **kw):
        opts = {C.OPT_MESSAGE_TYPE: bytes([mtype]), C.OPT_PARAMETER_REQUEST_LIST: bytes([1, 3, 51, 54])}
        if kw.get("requested"):
            opts[C.OPT_REQUESTED_IP] = IPv4Address(kw["requested"]).packed
        if kw.get("server_id"):
            opts[C.OPT_SERVER_ID] = IPv4Address(kw["server_id"]).packed
        pkt = C.DHCPPacket(op=1, htype=1, hlen=6, hops=1, xid=c.xid,
                           secs=min(0xFFFF, int(now - c.start)), giaddr=giaddr, chaddr=c.mac,
                           ciaddr=IPv4Address(kw.get("ciaddr") or 0), options=opts)
        try:
            sock.sendto(C.encode(pkt), ("255.255.255.255", 67))
        except OSError:
            pass

    def step(c: _Client, now: float):
        if c.state == "discover":
            if c.tries >= a.tries:
                c.state = "gone"
                return
            c.tries += 1
            send(c, C.DISCOVER, now)
            c.next = now + 1.0
        elif c.state == "request":
            if c.tries >= a.tries:
                c.state = "gone"
                return
            c.tries += 1
            send(c, C.REQUEST, now, requested=c.ip, server_id=c.server)
            c.next = now + 1.0
        elif c.state == "bound":
            if not a.renew or now >= c.expires:
                c.state = "gone"
                return
            send(c, C.REQUEST, now, ciaddr=c.ip)
            c.next = min(now + 1.0, c.expires)

    last_mark = t0
    while True:
        now = time.time()
        arriving = now - t0 < a.duration
        if arriving:
            due = int((now - t0) * a.rate) + 1
            while made < due:
                mac = prefix + struct.pack(">I", made)
                c = _Client(mac, now)
                clients[c.xid] = c
                by_mac[mac] = c
                made += 1
                step(c, now)
        elif now - t0 >= a.duration + a.linger:
            break
        for c in list(clients.values()):
            if c.next <= now and c.state != "gone":
                step(c, now)
            if c.state == "gone":
                clients.pop(c.xid, None)
        if a.marks and now - last_mark >= 1.0:
            last_mark = now
            with open(a.marks, "a") as fh:
                fh.write(f"{now} {acks}\n")
        r, _, _ = select.select([sock], [], [], 0.01)
        if not r:
            continue
        while True:
            try:
                raw, _src = sock.recvfrom(4096)
            except BlockingIOError:
                break
            try:
                p = C.parse(raw)
            except Exception:
                continue
            if p.op != 2:
                continue
            now = time.time()
            mt = p.message_type
            if mt in (C.ACK, C.NAK):
                lease = p.options.get(C.OPT_LEASE_TIME)
                rec = {"t": now, "type": "ACK" if mt == C.ACK else "NAK", "mac": p.chaddr[:6].hex(),
                       "ip": str(p.yiaddr), "server": str(p.server_id),
                       "lease": struct.unpack(">I", lease)[0] if lease and len(lease) == 4 else 0}
                out.write(json.dumps(rec) + "\n")
                acks += mt == C.ACK
            c = clients.get(p.xid)
            if c is None or c.mac != p.chaddr[:6]:
                continue
            if mt == C.OFFER and c.state == "discover":
                c.state, c.tries = "request", 0
                c.ip, c.server = str(p.yiaddr), str(p.server_id)
                step(c, now)
            elif mt == C.ACK and c.state in ("request", "bound"):
                lease = p.options.get(C.OPT_LEASE_TIME)
                secs = struct.unpack(">I", lease)[0] if lease and len(lease) == 4 else 0
                c.state, c.ip = "bound", str(p.yiaddr)
                c.expires = now + secs
                c.next = now + secs / 2.0
                c.start = c.next     # secs of a renewal count from T1
            elif mt == C.NAK:
                c.state = "gone"
    out.close()
    print(json.dumps({"clients": made, "acks": acks}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
