"""Desired DNS state from ownership (services.dns.records): pure logic."""

from __future__ import annotations

import dns.name
import dns.rdatatype
import pytest
from hypothesis import given, strategies as st

from services.dns.records import (RecordSpec, desired_rdatas, guard_name, guard_rdata, parse_guard,
                                  parse_rdata, plan, srv_order, zone_of)

Z = dns.name.from_text("example.test.")


def spec(name, rdtype, values, resource="vip1", zone=Z, ttl=5):
    return RecordSpec(dns.name.from_text(name), dns.rdatatype.from_text(rdtype), ttl, resource,
                      {n: parse_rdata(rdtype, v) for n, v in values.items()}, zone)


def test_srv_owner_first_others_follow_in_configured_order():
    """The owner's target gets the lowest configured priority; the others follow
    one step apart ordered by (configured priority, node id), keeping weight/port/target."""
    values = {"a": parse_rdata("SRV", "10 5 5060 a.example.test."),
              "b": parse_rdata("SRV", "20 7 5061 b.example.test."),
              "c": parse_rdata("SRV", "30 1 5062 c.example.test.")}
    out = srv_order(values, "c")
    assert [r.to_text() for r in out] == ["10 1 5062 c.example.test.",
                                          "11 5 5060 a.example.test.",
                                          "12 7 5061 b.example.test."]
    assert srv_order(values, "a")[0] == values["a"]


@given(st.dictionaries(st.sampled_from("abcdef"), st.integers(0, 65535), min_size=1),
       st.data())
def test_srv_owner_always_strictly_first(prios, data):
    """For any priorities, the owner's entry is the unique lowest priority number."""
    values = {n: parse_rdata("SRV", f"{p} 1 5060 {n}.example.test.") for n, p in prios.items()}
    owner = data.draw(st.sampled_from(sorted(prios)))
    out = srv_order(values, owner)
    assert out[0].target == values[owner].target
    assert all(out[0].priority < r.priority for r in out[1:]) or len(out) == 1 or \
        out[0].priority == 65535
    assert len(out) == len(values)


@pytest.mark.parametrize("rdtype,a,b", [
    ("A", "10.9.0.1", "10.9.0.2"),
    ("AAAA", "fd00::1", "fd00::2"),
    ("NID", "10 0014:4fff:ff20:ee64", "10 0014:4fff:ff20:ee65"),
    ("LP", "10 l64-a.example.test.", "10 l64-b.example.test."),
])
def test_single_value_types_point_at_the_owner(rdtype, a, b):
    """A/AAAA and ILNP NID/LP (RFC 6742) publish exactly the owner's rdata."""
    s = spec("x.example.test.", rdtype, {"a": a, "b": b})
    assert desired_rdatas(s, "a") == {parse_rdata(rdtype, a)}
    assert desired_rdatas(s, "b") == {parse_rdata(rdtype, b)}


def test_no_owner_or_owner_without_value_means_no_opinion():
    """Without an owner (or for an owner with no value) nothing is desired: leave it alone."""
    s = spec("x.example.test.", "A", {"a": "10.9.0.1"})
    assert desired_rdatas(s, None) is None
    assert desired_rdatas(s, "b") is None


def test_plan_groups_owned_records_per_zone():
    """Only owned resources are published, grouped so each zone gets one UPDATE."""
    other = dns.name.from_text("other.test.")
    specs = [spec("a.example.test.", "A", {"n": "10.0.0.1"}),
             spec("b.example.test.", "AAAA", {"n": "fd00::1"}),
             spec("c.other.test.", "A", {"n": "10.0.0.3"}, zone=other),
             spec("d.example.test.", "A", {"n": "10.0.0.4"}, resource="sip:registrar")]
    out = plan(specs, {"vip1": 3}, "n")
    assert set(out) == {Z, other}
    assert [c.spec.name.to_text() for c in out[Z]] == ["a.example.test.", "b.example.test."]
    assert plan(specs, {"vip1": 3, "sip:registrar": 1}, "n", resources=["sip:registrar"]) == {
        Z: [plan(specs, {"sip:registrar": 1}, "n")[Z][0]]}


def test_guard_round_trip_and_highest_epoch_wins():
    """The guard TXT holds "v2 <cluster> <resource> <node> <epoch>" (the old
    "<node> <epoch>" still reads, without identity); garbled strings are ignored."""
    assert guard_name(dns.name.from_text("www.example.test.")).to_text() == \
        "_appliance-owner.www.example.test."
    assert parse_guard([guard_rdata("a", 7)]) == ("a", 7, None, None)
    assert parse_guard([guard_rdata("a", 7), guard_rdata("b", 9)]) == ("b", 9, None, None)
    assert parse_guard([guard_rdata("a", 7, "vip1", "c1")]) == ("a", 7, "vip1", "c1")
    assert guard_rdata("a", 7, "vip1", "c1").strings == (b"v2 c1 vip1 a 7",)
    assert parse_guard([parse_rdata_txt("garbage")]) is None
    assert parse_guard([]) is None


def parse_rdata_txt(text):
    import dns.rdata
    return dns.rdata.from_text("IN", "TXT", f'"{text}"')


def test_zone_of_picks_longest_match_and_rdata_errors_are_clear():
    """Names map to the most specific zone; bad rdata names type and text."""
    sub = dns.name.from_text("sub.example.test.")
    assert zone_of(dns.name.from_text("x.sub.example.test."), [Z, sub]) == sub
    assert zone_of(dns.name.from_text("x.nowhere."), [Z, sub]) is None
    with pytest.raises(ValueError, match="not valid A rdata"):
        parse_rdata("A", "10.0.0.300")
    with pytest.raises(ValueError, match="is not one of"):
        parse_rdata("MX", "10 mx.example.test.")


@pytest.mark.parametrize("rdtype,a,b", [
    ("L64", "10 2001:0db8:1140:1000", "20 2001:0db8:1140:2000"),
    ("L32", "10 10.1.2.0", "10 10.1.3.0"),
])
def test_locators_are_a_preference_ordered_set(rdtype, a, b):
    """Review M10: L64/L32 publish every node's locator, the owner's with the lowest
    preference, the others one step behind (like SRV)."""
    s = spec("x.example.test.", rdtype, {"a": a, "b": b})
    field = "locator64" if rdtype == "L64" else "locator32"
    loc = {n: getattr(parse_rdata(rdtype, v), field) for n, v in (("a", a), ("b", b))}
    for owner, other in (("a", "b"), ("b", "a")):
        out = desired_rdatas(s, owner)
        assert {(r.preference, getattr(r, field)) for r in out} == {(10, loc[owner]),
                                                                     (11, loc[other])}
