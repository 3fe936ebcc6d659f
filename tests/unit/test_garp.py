"""Gratuitous ARP and unsolicited NA frames, byte for byte."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from appliance.net import garp

MAC = bytes.fromhex("02aabbccddee")
VIP4 = "10.9.0.100"
VIP6 = "fd00:9::100"


def _ones_sum(data: bytes) -> int:
    """Plain ones' complement sum (independent of garp.internet_checksum)."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return total


def test_arp_request_form_layout():
    """The request form: broadcast, ethertype 0x0806, Ethernet/IPv4 ARP,
    opcode 1, sender = target = VIP, sender MAC = ours, target MAC zero,
    padded to the 60-byte Ethernet minimum with zeros."""
    frame = garp.arp_announcement(MAC, VIP4)
    assert len(frame) == 60
    assert frame[0:6] == b"\xff" * 6
    assert frame[6:12] == MAC
    assert frame[12:14] == b"\x08\x06"
    htype, ptype, hlen, plen, op = struct.unpack("!HHBBH", frame[14:22])
    assert (htype, ptype, hlen, plen, op) == (1, 0x0800, 6, 4, 1)
    assert frame[22:28] == MAC
    assert frame[28:32] == bytes([10, 9, 0, 100])
    assert frame[32:38] == b"\x00" * 6
    assert frame[38:42] == bytes([10, 9, 0, 100])
    assert frame[42:] == b"\x00" * 18


def test_arp_reply_form_layout():
    """The reply form differs only in opcode 2 and target MAC = our MAC."""
    request = garp.arp_announcement(MAC, VIP4)
    reply = garp.arp_announcement(MAC, ipaddress.IPv4Address(VIP4), reply=True)
    assert len(reply) == 60
    assert reply[0:6] == b"\xff" * 6
    assert struct.unpack("!H", reply[20:22]) == (2,)
    assert reply[32:38] == MAC
    assert reply[:20] == request[:20]
    assert reply[22:32] == request[22:32]
    assert reply[38:] == request[38:]


def test_arp_exact_bytes():
    """A golden frame, so any change to the layout is visible at a glance."""
    expected = bytes.fromhex(
        "ffffffffffff" "02aabbccddee" "0806"
        "0001" "0800" "06" "04" "0001"
        "02aabbccddee" "0a090064" "000000000000" "0a090064"
    ) + b"\x00" * 18
    assert garp.arp_announcement(MAC, VIP4) == expected


def test_arp_rejects_bad_input():
    """A MAC that is not 6 bytes or an IPv6 address is refused."""
    with pytest.raises(ValueError):
        garp.arp_announcement(b"\x01\x02", VIP4)
    with pytest.raises(ValueError):
        garp.arp_announcement(MAC, VIP6)


def test_unsolicited_na_layout():
    """Ethernet to 33:33:00:00:00:01 type 0x86dd; IPv6 version 6, payload
    32, next header 58, hop limit 255, src = target, dst ff02::1; ICMPv6
    type 136 code 0, flags Override only, target, TLLA option (2, 1, MAC)."""
    frame = garp.unsolicited_na(MAC, VIP6)
    assert len(frame) == 14 + 40 + 32
    assert frame[0:6] == bytes.fromhex("333300000001")
    assert frame[6:12] == MAC
    assert frame[12:14] == b"\x86\xdd"
    ip = frame[14:54]
    assert ip[0] >> 4 == 6
    assert ip[0:4] == b"\x60\x00\x00\x00"
    payload_len, next_header, hop_limit = struct.unpack("!HBB", ip[4:8])
    assert (payload_len, next_header, hop_limit) == (32, 58, 255)
    assert ip[8:24] == ipaddress.IPv6Address(VIP6).packed
    assert ip[24:40] == ipaddress.IPv6Address("ff02::1").packed
    icmp = frame[54:]
    assert len(icmp) == payload_len
    assert icmp[0] == 136 and icmp[1] == 0
    flags = struct.unpack("!I", icmp[4:8])[0]
    assert flags == 0x20000000  # O set, R and S clear
    assert icmp[8:24] == ipaddress.IPv6Address(VIP6).packed
    assert icmp[24:26] == b"\x02\x01"
    assert icmp[26:32] == MAC


def test_unsolicited_na_checksum_verifies():
    """The ICMPv6 checksum over pseudo-header + message sums to 0xffff,
    computed independently of the module's own checksum routine."""
    for src in (None, "fe80::aa:bbff:fecc:ddee"):
        frame = garp.unsolicited_na(MAC, VIP6, src=src)
        ip, icmp = frame[14:54], frame[54:]
        pseudo = ip[8:24] + ip[24:40] + struct.pack("!I", len(icmp)) + b"\0\0\0\x3a"
        assert _ones_sum(pseudo + icmp) == 0xFFFF
        assert struct.unpack("!H", icmp[2:4])[0] != 0


def test_unsolicited_na_known_checksum():
    """Against a checksum computed by hand-written RFC 1071 arithmetic for a
    fixed input (guards against a self-consistent but wrong pseudo-header)."""
    frame = garp.unsolicited_na(MAC, VIP6)
    icmp = bytearray(frame[54:])
    got = struct.unpack("!H", icmp[2:4])[0]
    icmp[2:4] = b"\0\0"
    src = ipaddress.IPv6Address(VIP6).packed
    dst = ipaddress.IPv6Address("ff02::1").packed
    pseudo = src + dst + (32).to_bytes(4, "big") + (58).to_bytes(4, "big")
    assert got == (~_ones_sum(pseudo + bytes(icmp))) & 0xFFFF


def test_unsolicited_na_source_and_router_flag():
    """An explicit source goes in the IPv6 header; router=True sets R."""
    frame = garp.unsolicited_na(MAC, VIP6, src="fe80::1", router=True)
    assert frame[22:38] == ipaddress.IPv6Address("fe80::1").packed
    assert struct.unpack("!I", frame[58:62])[0] == 0xA0000000


def test_announcement_frames_per_family():
    """IPv4 announces with request + reply, IPv6 with one NA."""
    v4 = garp.announcement_frames(MAC, VIP4)
    assert [f[12:14] for f in v4] == [b"\x08\x06", b"\x08\x06"]
    assert [struct.unpack("!H", f[20:22])[0] for f in v4] == [1, 2]
    v6 = garp.announcement_frames(MAC, ipaddress.IPv6Address(VIP6))
    assert len(v6) == 1 and v6[0] == garp.unsolicited_na(MAC, VIP6)


def test_internet_checksum_rfc1071_example():
    """The RFC 1071 section 3 example words sum to 0xddf2 (checksum 0x220d)."""
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert garp.internet_checksum(data) == 0x220D
    assert garp.internet_checksum(b"\x01") == (~0x0100) & 0xFFFF


def test_in_netns_missing_namespace_is_not_created(tmp_path):
    """Entering a namespace that does not exist fails with its name and
    creates nothing (pyroute2's default would create it)."""
    path = tmp_path / "no-such-ns"
    with pytest.raises(FileNotFoundError, match="no-such-ns"):
        with garp.in_netns(str(path)):
            pass
    assert not path.exists()
