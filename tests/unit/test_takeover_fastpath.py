"""The takeover fast path's hand-packed RTM_NEWADDR and its acknowledgement
(appliance/net/takeover.py); the real kernel: tests/integration/test_vip_netns.py."""

from __future__ import annotations

import errno
import socket
import struct

from appliance.net import takeover as T


def test_ipv4_newaddr_is_what_ip_address_add_sends():
    msg = T.newaddr_message(7, "10.77.0.100/24", seq=42)
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", msg)
    assert (length, kind, seq, pid) == (len(msg), T.RTM_NEWADDR, 42, 0)
    assert flags == T.NLM_F_REQUEST | T.NLM_F_ACK | T.NLM_F_CREATE | T.NLM_F_EXCL
    family, prefixlen, ifa_flags, scope, index = struct.unpack_from("=BBBBI", msg, 16)
    assert (family, prefixlen, ifa_flags, scope, index) == (socket.AF_INET, 24, 0, 0, 7)
    ip = socket.inet_aton("10.77.0.100")
    # IFA_LOCAL then IFA_ADDRESS, both the address (8-byte attributes)
    assert msg[24:] == struct.pack("=HH", 8, T.IFA_LOCAL) + ip + struct.pack("=HH", 8, T.IFA_ADDRESS) + ip


def test_ipv6_newaddr_has_nodad():
    msg = T.newaddr_message(3, "fd77::100/64", seq=1)
    family, prefixlen, ifa_flags, _, index = struct.unpack_from("=BBBBI", msg, 16)
    assert (family, prefixlen, ifa_flags, index) == (socket.AF_INET6, 64, T.IFA_F_NODAD, 3)
    assert msg[24:28] == struct.pack("=HH", 20, T.IFA_ADDRESS)
    assert msg[28:44] == socket.inet_pton(socket.AF_INET6, "fd77::100")
    assert msg[44:] == struct.pack("=HHI", 8, T.IFA_FLAGS, T.IFA_F_NODAD)
    assert struct.unpack_from("=I", msg)[0] == len(msg) == 52


def ack(seq: int, code: int) -> bytes:
    return struct.pack("=IHHII", 36, T.NLMSG_ERROR, 0, seq, 0) + struct.pack("=i", -code) + b"\0" * 16


def test_ack_error_finds_its_own_acknowledgement():
    assert T.ack_error(ack(5, 0), 5) == 0
    assert T.ack_error(ack(5, errno.EEXIST), 5) == errno.EEXIST
    assert T.ack_error(ack(4, 0) + ack(5, errno.ENODEV), 5) == errno.ENODEV
    assert T.ack_error(ack(4, 0), 5) is None          # not ours
    assert T.ack_error(b"", 5) is None
    assert T.ack_error(b"\0" * 16, 5) is None          # a malformed header ends the walk
