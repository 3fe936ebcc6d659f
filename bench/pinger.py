"""ICMP echo at a fixed rate; reports when replies stopped and resumed.

Run inside the client namespace (needs root for the raw socket):

    python bench/pinger.py TARGET --interval-ms 5 --duration 10 --mark-file F

Sends an echo request every interval and records the wall-clock time of
every reply.  When ``--mark-file`` appears the bench has written two times
into it: ``T0 T1`` -- T0 when the box's processes were frozen (its last
heartbeat left before T0: the takeover's detection runs from there), T1 when
its link was down (until T1 the dying box's *kernel* still answered echoes
sent to the VIP).  The pinger reports the first reply *to an echo sent after
T1* (the request's send time travels in its payload), so no reply of the
dying box counts, and the outage from T0 (one time alone: both).  Then it
exits.  Prints one JSON object:
``{"sent": N, "replies": N, "failure_at": T0, "link_down_at": T1,
"first_reply_after": T, "first_reply_sent_at": S, "outage_ms": X}`` (S: when
the first answered echo past T1 left; the VIP answered somewhere between the
previous echo's send and T, so ``--interval-ms 1`` times it to about 1 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import struct
import time


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def echo_request(ident: int, seq: int) -> bytes:
    payload = struct.pack("!d", time.time()) + b"appliance-bench"
    header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    return struct.pack("!BBHHH", 8, 0, checksum(header + payload), ident, seq) + payload


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("target")
    ap.add_argument("--interval-ms", type=float, default=5.0)
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--mark-file", default=None)
    ap.add_argument("--after-mark", type=float, default=0.3,
                    help="seconds to keep pinging after the first reply past the mark")
    args = ap.parse_args()
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock.setblocking(False)
    ident = os.getpid() & 0xFFFF
    interval = args.interval_ms / 1000.0
    start = time.time()
    next_send = start
    seq = sent = replies = 0
    failure_at = first_after = first_sent = link_down_at = None
    last_reply = None
    stop_at = start + args.duration
    while time.time() < stop_at:
        now = time.time()
        if now >= next_send:
            seq = (seq + 1) & 0xFFFF
            try:
                sock.sendto(echo_request(ident, seq), (args.target, 0))
                sent += 1
            except OSError:
                pass                      # no route while the link is down: keep going
            next_send += interval
        if failure_at is None and args.mark_file and os.path.exists(args.mark_file):
            try:
                times = [float(x) for x in open(args.mark_file).read().split()]
            except ValueError:
                times = []
            if times:
                failure_at, link_down_at = times[0], times[-1]
        timeout = max(0.0, min(next_send - time.time(), 0.05))
        ready, _, _ = select.select([sock], [], [], timeout)
        if not ready:
            continue
        try:
            packet, addr = sock.recvfrom(2048)
        except BlockingIOError:
            continue
        ihl = (packet[0] & 0x0F) * 4
        icmp_type, _, _, rid, _ = struct.unpack("!BBHHH", packet[ihl:ihl + 8])
        if icmp_type != 0 or rid != ident or addr[0] != args.target:
            continue
        t = time.time()
        try:
            (sent_at,) = struct.unpack("!d", packet[ihl + 8:ihl + 16])
        except struct.error:
            continue
        replies += 1
        last_reply = t
        if failure_at is not None and first_after is None and sent_at > link_down_at:
            first_after, first_sent = t, sent_at
            stop_at = min(stop_at, t + args.after_mark)
    result = {"sent": sent, "replies": replies, "failure_at": failure_at,
              "link_down_at": link_down_at,
              "first_reply_after": first_after, "first_reply_sent_at": first_sent,
              "last_reply": last_reply,
              "outage_ms": None if (failure_at is None or first_after is None)
              else round((first_after - failure_at) * 1000, 1)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
