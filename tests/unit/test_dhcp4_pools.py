"""Split scope and RFC 3074 load balancing: pure decisions, checked exhaustively and with hypothesis."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import given, settings

from services.dhcp.v4 import pools as P
from services.dhcp.v4.pools import (COMM_INTERRUPTED, LOADB_MX_TBL, NORMAL, PARTNER_DOWN, PRIMARY,
                                    RECOVER, SECONDARY, STARTUP)

# RFC 3074 section 6, first and last rows of the table as printed in the RFC.
RFC_FIRST_ROW = (251, 175, 119, 215, 81, 14, 79, 191, 103, 49, 181, 143, 186, 157, 0)
RFC_LAST_ROW = (149, 80, 170, 68, 6, 169, 234, 151)


def rfc_loadb_p_hash(key: bytes) -> int:
    """Line-by-line transcription of the RFC's C function, for comparison."""
    hash_ = len(key) % 256
    i = len(key)
    while i > 0:
        i -= 1
        hash_ = LOADB_MX_TBL[hash_ ^ key[i]]
    return hash_


def test_mixing_table_is_the_rfc_permutation():
    """The table has 256 distinct values 0..255 and the RFC's first and last rows."""
    assert len(LOADB_MX_TBL) == 256
    assert sorted(LOADB_MX_TBL) == list(range(256))
    assert LOADB_MX_TBL[:15] == RFC_FIRST_ROW
    assert LOADB_MX_TBL[-8:] == RFC_LAST_ROW


def test_hash_known_values():
    """Hand-computed values: empty key -> its length 0; one byte b -> T[1 ^ b]; a MAC."""
    assert P.rfc3074_hash(b"") == 0
    assert P.rfc3074_hash(b"\x00") == LOADB_MX_TBL[1] == 175
    assert P.rfc3074_hash(b"\x01") == LOADB_MX_TBL[0] == 251
    # two bytes: h = T[2 ^ k1], then T[h ^ k0]
    assert P.rfc3074_hash(b"\x00\x00") == LOADB_MX_TBL[LOADB_MX_TBL[2]] == LOADB_MX_TBL[119] == 150
    mac = bytes.fromhex("525400000001")
    assert P.rfc3074_hash(mac) == rfc_loadb_p_hash(mac)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=300))
def test_hash_matches_rfc_code_and_is_deterministic(key):
    """For any key the hash equals the RFC's C code, lies in 0..255 and never changes."""
    h = P.rfc3074_hash(key)
    assert 0 <= h <= 255
    assert h == rfc_loadb_p_hash(key) == P.rfc3074_hash(bytes(key))


def test_hash_spreads_macs_evenly():
    """Sequential MACs spread over the buckets: a 50 % split gives each server about half."""
    keys = [bytes.fromhex("5254") + i.to_bytes(4, "big") for i in range(20000)]
    primary = sum(1 for k in keys if P.hash_owner(k, 50) == PRIMARY)
    assert 0.45 < primary / len(keys) < 0.55


def test_percent_split_of_buckets():
    """split percent maps to round(split * 256 / 100) primary buckets (50 % -> dhcpd's 128)."""
    assert P.primary_buckets(0) == 0
    assert P.primary_buckets(50) == 128
    assert P.primary_buckets(100) == 256
    assert P.primary_buckets(80) == 205
    for split in range(101):
        owners = [P.bucket_owner(b, split) for b in range(256)]
        assert owners.count(PRIMARY) == P.primary_buckets(split)
        assert owners == sorted(owners)        # primary buckets are the low ones


def test_client_key_prefers_client_id():
    """The STID is the client identifier when present, else chaddr."""
    mac = bytes.fromhex("525400000001")
    assert P.client_hash_key(b"\x01" + mac, mac) == b"\x01" + mac
    assert P.client_hash_key(None, mac) == mac
    assert P.client_hash_key(b"", mac) == mac


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=32), st.integers(0, 100),
       st.sampled_from(["split-scope", "load-balancing", "hot-standby"]))
def test_exactly_one_server_answers_in_normal(key, split, mode):
    """In NORMAL, with no delay elapsed, exactly one of the two partners answers any client."""
    owner = P.owner_of(mode, key, split)
    answering = [role for role in (PRIMARY, SECONDARY)
                 if P.answers(mode, role, NORMAL, owner, secs=0, delay_s=2)]
    assert answering == [owner]
    if mode == "load-balancing":
        assert [r for r in (PRIMARY, SECONDARY) if P.serves(key, r, split, NORMAL)] == [owner]


def test_answer_rules_per_state_and_delay():
    """delay_s lets the non-owner answer a waiting client; states decide the rest."""
    key = b"\x52\x54\x00\x00\x00\x01"
    owner = P.owner_of("load-balancing", key, 50)
    other = SECONDARY if owner == PRIMARY else PRIMARY
    assert not P.answers("load-balancing", other, NORMAL, owner, secs=1, delay_s=2)
    assert P.answers("load-balancing", other, NORMAL, owner, secs=2, delay_s=2)
    assert P.answers("split-scope", other, COMM_INTERRUPTED, owner, secs=5, delay_s=2)
    assert not P.answers("split-scope", other, NORMAL, owner, secs=50, delay_s=0)  # 0 disables
    assert P.answers("load-balancing", other, PARTNER_DOWN, owner)
    for state in (STARTUP, RECOVER, P.RECOVER_DONE):
        assert not P.answers("load-balancing", owner, state, owner)
        assert not P.serves(key, owner, 50, state)
    # hot standby: the standby waits for PARTNER-DOWN whatever secs says
    assert P.owner_of("hot-standby", key, 10) == PRIMARY
    assert not P.answers("hot-standby", SECONDARY, NORMAL, PRIMARY, secs=100, delay_s=2)
    # COMMUNICATIONS-INTERRUPTED answers everybody (issue 12 deliver 4), in every mode
    for mode in P.MODES:
        assert P.answers(mode, SECONDARY, COMM_INTERRUPTED, PRIMARY, secs=0, delay_s=2)
    assert P.answers("hot-standby", SECONDARY, PARTNER_DOWN, PRIMARY)
    # split scope: a known client belongs to the segment of its address
    assert P.owner_of("split-scope", key, 50, address_role=SECONDARY) == SECONDARY
    assert P.owner_of("load-balancing", key, 50, address_role=SECONDARY) == owner
    # no failover: always
    assert P.answers(None, None, NORMAL, PRIMARY)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 70000), st.integers(0, 100))
def test_split_ranges_never_overlap_and_cover_the_pool(first, extra, split):
    """The primary's and secondary's ranges are disjoint, contiguous and cover the pool."""
    last = min(first + extra, 2**32 - 1)
    p, s = P.split_range(first, last, split)
    covered = []
    for r in (p, s):
        if r is not None:
            assert r[0] <= r[1]
            covered.append(r)
    assert covered[0][0] == first and covered[-1][1] == last
    if p and s:
        assert p[1] + 1 == s[0]
    n = (last - first + 1)
    assert (p[1] - p[0] + 1 if p else 0) == (n * split + 50) // 100
    segs = P.segments(first, last, split)
    assert sum(seg.size for seg in segs) == n
    assert P.segments(first, last, None) == [P.Segment(first, last, None)]


def test_my_ranges_by_state_and_mclt():
    """Own range in NORMAL/COMM-INT, nothing in RECOVER, the partner's too after MCLT in PARTNER-DOWN."""
    first, last = 100, 299          # 200 addresses
    assert P.my_ranges(first, last, 50, PRIMARY, NORMAL) == [(100, 199)]
    assert P.my_ranges(first, last, 50, SECONDARY, COMM_INTERRUPTED) == [(200, 299)]
    assert P.my_ranges(first, last, 50, SECONDARY, RECOVER) == []
    assert P.my_ranges(first, last, 50, SECONDARY, PARTNER_DOWN, 10, 3600) == [(200, 299)]
    assert P.my_ranges(first, last, 50, SECONDARY, PARTNER_DOWN, 3600, 3600) == [(100, 199), (200, 299)]
    assert not P.may_allocate_from_partner(COMM_INTERRUPTED, 99999, 3600)
    assert not P.may_allocate_from_partner(PARTNER_DOWN, None, 3600)
    assert P.may_allocate_from_partner(PARTNER_DOWN, 3600.0, 3600)
    assert P.allocation_roles(PRIMARY, NORMAL, failover=False) is None
    assert P.allocation_roles(PRIMARY, STARTUP) == ()


def test_lease_time_cap():
    """Lease times are capped by the MCLT in COMMUNICATIONS-INTERRUPTED only."""
    assert P.lease_time_cap(86400, COMM_INTERRUPTED, 3600) == 3600
    assert P.lease_time_cap(600, COMM_INTERRUPTED, 3600) == 600
    assert P.lease_time_cap(86400, NORMAL, 3600) == 86400
