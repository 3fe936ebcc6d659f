"""UPDATE building and answer classification (services.dns.message)."""

from __future__ import annotations

import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import pytest

from services.dns.guard import Guard
from services.dns.message import UpdateError, build_update, make_update, read_response
from services.dns.records import RecordSpec, guard_rdata, parse_rdata, plan
from services.dns.tsigkey import parse_key_file

Z = dns.name.from_text("example.test.")
KEY = parse_key_file('key "appliance-key" { algorithm hmac-sha256; '
                     'secret "rOCVIKJ7soCh+x7zgbchEgUzzIU7gM4ToLfTmkUx/xU="; };')[0]


def spec(name, rdtype, value):
    return RecordSpec(dns.name.from_text(name), dns.rdatatype.from_text(rdtype), 5, "vip1",
                      {"a": parse_rdata(rdtype, value)}, Z)


def test_one_update_holds_every_change_with_guard_prerequisites():
    """Two names in one zone: one UPDATE; per name one guard prerequisite (absent
    when nothing was read, value-dependent when a guard was read), each rrset and
    guard replaced (delete rrset + add)."""
    specs = [spec("www.example.test.", "A", "10.9.0.1"),
             spec("www.example.test.", "AAAA", "fd00::1"),
             spec("sip.example.test.", "A", "10.9.0.2")]
    changes = plan(specs, {"vip1": 7}, "a")[Z]
    guards = {dns.name.from_text("sip.example.test."): frozenset([guard_rdata("b", 6)])}
    upd = build_update(Z, changes, guards, lambda spec: Guard("a", 7, spec.resource, "c1"), KEY)
    wire = upd.to_wire()
    parsed = dns.message.from_wire(wire, keyring=KEY.dns_key())
    assert parsed.opcode() == dns.opcode.UPDATE and parsed.had_tsig
    prereq = {(r.name.to_text(), r.deleting or r.rdclass, r.rdtype): r for r in parsed.prerequisite}
    www = prereq[("_appliance-owner.www.example.test.", dns.rdataclass.NONE, dns.rdatatype.TXT)]
    assert len(www) == 0                                   # NXRRSET: guard must not exist
    sip = prereq[("_appliance-owner.sip.example.test.", dns.rdataclass.IN, dns.rdatatype.TXT)]
    assert set(sip) == {guard_rdata("b", 6)}               # value-dependent compare
    assert len(parsed.prerequisite) == 2
    adds = {(r.name.to_text(), r.rdtype): set(r) for r in parsed.update if r.deleting is None}
    assert adds[("www.example.test.", dns.rdatatype.A)] == {parse_rdata("A", "10.9.0.1")}
    assert adds[("www.example.test.", dns.rdatatype.AAAA)] == {parse_rdata("AAAA", "fd00::1")}
    assert adds[("_appliance-owner.sip.example.test.", dns.rdatatype.TXT)] == {
        guard_rdata("a", 7, "vip1", "c1")}
    deletes = {(r.name.to_text(), r.rdtype) for r in parsed.update
               if r.deleting == dns.rdataclass.ANY}
    assert ("www.example.test.", dns.rdatatype.A) in deletes
    assert ("_appliance-owner.www.example.test.", dns.rdatatype.TXT) in deletes


@pytest.mark.parametrize("rcode,verb", [("REFUSED", "refused by"), ("NOTAUTH", "refused by"),
                                        ("BADKEY", "refused by"), ("BADSIG", "refused by"),
                                        ("NOTZONE", "refused by"), ("SERVFAIL", "failed at")])
def test_error_messages_name_zone_server_and_key(rcode, verb):
    """The message names zone, server, rcode and key, e.g.
    'update of zone example.test. refused by 127.0.0.1:5353: BADKEY (key appliance-key)'."""
    e = UpdateError("example.test.", "127.0.0.1:5353", rcode, "appliance-key")
    assert str(e) == f"update of zone example.test. {verb} 127.0.0.1:5353: {rcode} (key appliance-key)"
    assert e.rcode == rcode and not e.prerequisite_failed
    assert UpdateError("z.", "s", "YXRRSET", None).prerequisite_failed


def test_signed_answer_is_verified_and_unsigned_tsig_errors_map():
    """A signed answer to our signed UPDATE verifies; an answer with a wrong MAC is rejected."""
    upd = make_update(Z, KEY)
    upd.to_wire()
    resp = dns.message.make_response(upd)
    resp.use_tsig(keyring=KEY.dns_key(), keyname=KEY.keyname)
    assert read_response(resp.to_wire(), upd).rcode() == dns.rcode.NOERROR
    other = parse_key_file('key "appliance-key" { algorithm hmac-sha256; '
                           'secret "c2VjcmV0LXRoYXQtaXMtd3Jvbmc="; };')[0]
    bad = dns.message.make_response(upd)
    bad.use_tsig(keyring=other.dns_key(), keyname=other.keyname)
    from services.dns.message import TransportError
    with pytest.raises(TransportError, match="TSIG"):
        read_response(bad.to_wire(), upd)


def test_unsigned_error_answer_keeps_its_rcode():
    """Review L1: an unsigned NOTAUTH to a signed UPDATE is a failure naming NOTAUTH,
    not a "garbled answer"."""
    import dns.rcode
    import dns.update
    import pytest
    from services.dns.message import DNSError
    upd = make_update(Z, KEY)
    upd.to_wire()
    answer = dns.update.UpdateMessage(Z, id=upd.id)
    answer.flags |= dns.flags.QR
    answer.set_rcode(dns.rcode.NOTAUTH)
    with pytest.raises(DNSError) as e:
        read_response(answer.to_wire(), upd)
    assert e.value.rcode == "NOTAUTH"


def test_badtime_names_clock_skew():
    """Review L1: BADTIME says what to check."""
    e = UpdateError("example.test.", "127.0.0.1:53", "BADTIME", "k")
    assert "clock skew" in str(e) and "NTP" in str(e)


def test_resource_scope_one_guard_per_resource_and_zone():
    """Review L12 (guard_scope = "resource"): two names of vip1 in one zone carry ONE
    guard prerequisite and ONE guard replace at _appliance-guard.vip1.<zone> (the UPDATE
    is atomic); the old per-name guards are deleted on the first write only."""
    from twisted.internet.task import Clock
    from services.dns.guard import resource_guard_name
    from services.dns.updater import Updater
    specs = [spec("www.example.test.", "A", "10.9.0.1"),
             spec("sip.example.test.", "A", "10.9.0.2")]
    sent = []

    class Client:
        def exchange(self, request, zone, key, what="update"):
            from twisted.internet import defer
            sent.append(dns.message.from_wire(request.to_wire(), keyring=KEY.dns_key()))
            return defer.succeed((dns.message.make_response(request), "127.0.0.1:53"))
    up = Updater(Client(), KEY, "a", Clock(), cluster="c1", guard_scope="resource")
    gname = resource_guard_name("vip1", Z)
    assert gname.to_text() == "_appliance-guard.vip1.example.test."
    for epoch in (7, 8):
        result = up.publish(Z, plan(specs, {"vip1": epoch}, "a")[Z], {"vip1": epoch})
        assert len(result.result.applied) == 2
    first, second = sent
    for parsed in (first, second):
        assert [(r.name, r.rdtype) for r in parsed.prerequisite] == [(gname, dns.rdatatype.TXT)]
        adds = [r for r in parsed.update if r.deleting is None and r.rdtype == dns.rdatatype.TXT]
        assert [r.name for r in adds] == [gname]
    assert len(first.prerequisite[0]) == 0                 # nothing known: must be absent
    assert set(second.prerequisite[0]) == {guard_rdata("a", 7, "vip1", "c1")}
    legacy = {r.name.to_text() for r in first.update if r.deleting == dns.rdataclass.ANY
              and r.rdtype == dns.rdatatype.TXT and r.name != gname}
    assert legacy == {"_appliance-owner.www.example.test.", "_appliance-owner.sip.example.test."}
    assert not any(r.name.labels[0] == b"_appliance-owner" for r in second.update)
