"""A tiny DHCPv4 relay-agent probe: DISCOVER -> REQUEST (-> RELEASE) to a server.

    python -m services.dhcp.v4.probe SERVER:PORT GIADDR [--mac 02:00:00:00:00:01] [--release]

Speaks as a relay agent (giaddr set, hops 1, option 82 circuit id), so it
works against a server listening on loopback.  Prints each step; exit 0 if
the server ACKed.  Used by the demo README and the tests.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from ipaddress import IPv4Address

from services.dhcp.v4 import codec as C


def packet(mtype: int, mac: bytes, giaddr: str, xid: int, **opts) -> bytes:
    options = {C.OPT_MESSAGE_TYPE: bytes([mtype]),
               C.OPT_PARAMETER_REQUEST_LIST: bytes([1, 3, 6, 51, 54])}
    for code, value in opts.items():
        options[int(code.lstrip("o"))] = value
    options[C.OPT_RELAY_AGENT_INFO] = C.encode_option_value(C.OPT_RELAY_AGENT_INFO,
                                                             {1: b"probe-port-1"})
    pkt = C.DHCPPacket(op=1, htype=1, hlen=6, hops=1, xid=xid, giaddr=IPv4Address(giaddr),
                       chaddr=mac, options=options)
    return C.encode(pkt)


def exchange(sock, server, data, want: int, timeout: float = 2.0) -> C.DHCPPacket:
    sock.settimeout(timeout)
    sock.sendto(data, server)
    while True:
        reply, _ = sock.recvfrom(4096)
        pkt = C.parse(reply)
        if pkt.message_type in (want, C.NAK):
            return pkt


def run(server: tuple[str, int], giaddr: str, mac: bytes, release: bool, out=print,
        bind: str | None = None, hostname: str | None = None) -> IPv4Address | None:
    """One relayed DORA; returns the ACKed address (or None)."""
    xid = int.from_bytes(os.urandom(4), "big")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        # A relay receives replies on port 67 at giaddr; on loopback we listen anywhere.
        sock.bind((bind or "127.0.0.1", 0))
        offer = exchange(sock, server, packet(C.DISCOVER, mac, giaddr, xid), C.OFFER)
        if offer.message_type != C.OFFER:
            out(f"DISCOVER -> {offer.message_type_name}")
            return None
        out(f"DISCOVER -> OFFER {offer.yiaddr} from {offer.server_id}")
        extra = {"o12": hostname.encode()} if hostname else {}
        ack = exchange(sock, server, packet(C.REQUEST, mac, giaddr, xid,
                                            o50=offer.yiaddr.packed,
                                            o54=offer.server_id.packed, **extra), C.ACK)
        out(f"REQUEST  -> {ack.message_type_name} {ack.yiaddr}"
            f" lease {int.from_bytes(ack.options.get(C.OPT_LEASE_TIME, b'0'), 'big')}s")
        if ack.message_type != C.ACK:
            return None
        if release:
            rel = C.DHCPPacket(op=1, htype=1, hlen=6, hops=1, xid=xid + 1,
                               ciaddr=ack.yiaddr, giaddr=IPv4Address(giaddr), chaddr=mac,
                               options={C.OPT_MESSAGE_TYPE: bytes([C.RELEASE]),
                                        C.OPT_SERVER_ID: ack.server_id.packed})
            sock.sendto(C.encode(rel), server)
            out(f"RELEASE  {ack.yiaddr}")
        return ack.yiaddr


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("server", help="HOST:PORT of the DHCP server")
    ap.add_argument("giaddr", help="the relay address (selects the subnet)")
    ap.add_argument("--mac", default="02:00:00:00:00:01")
    ap.add_argument("--release", action="store_true")
    ap.add_argument("--hostname", help="send option 12 (host name) in the REQUEST")
    args = ap.parse_args(argv)
    host, _, port = args.server.rpartition(":")
    mac = bytes.fromhex(args.mac.replace(":", ""))
    try:
        addr = run((host, int(port)), args.giaddr, mac, args.release, hostname=args.hostname)
    except socket.timeout:
        print("no answer (timeout)", file=sys.stderr)
        return 1
    return 0 if addr is not None else 1


if __name__ == "__main__":
    sys.exit(main())
