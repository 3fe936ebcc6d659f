"""DNS messages of the updater: UPDATEs with the epoch guard, queries, and
what a response means (pure: builds and reads wire messages, no I/O).

One UPDATE per zone carries every change of one decision.  For each owner
name it holds:

- a prerequisite on the guard TXT rrset ``_appliance-owner.<name>``: it must
  equal what the updater last read (value-dependent "RRset exists", RFC 2136
  section 2.4.2), or not exist if it read nothing (section 2.4.3) -- a
  compare-and-set on the server;
- the replacement of the record's rrset (delete rrset, add rdatas);
- the replacement of the guard with ``"<node> <epoch>"``.

If the guard changed in between, the server answers NXRRSET/YXRRSET and
applies nothing; the updater re-reads the guard and retries only if its own
epoch is not older (see :mod:`.updater`).
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.tsig
import dns.update

from services.dns.guard import Guard, guard_name, guard_owner, guard_rdata
from services.dns.records import Change, RecordSpec
from services.dns.tsigkey import TSIGKey

#: Answers meaning "this server will not take this update": name zone and key.
REFUSALS = frozenset({"REFUSED", "NOTAUTH", "NOTZONE", "BADKEY", "BADSIG", "BADTIME",
                      "BADTRUNC", "NOTIMP", "FORMERR"})
#: Answers meaning "a prerequisite failed": somebody else wrote in between.
PREREQ_FAILED = frozenset({"NXRRSET", "YXRRSET", "NXDOMAIN", "YXDOMAIN"})

_PEER_ERRORS = (
    (dns.tsig.PeerBadKey, "BADKEY"),
    (dns.tsig.PeerBadSignature, "BADSIG"),
    (dns.tsig.PeerBadTime, "BADTIME"),
    (dns.tsig.PeerBadTruncation, "BADTRUNC"),
)


class DNSError(Exception):
    """A DNS exchange failed; ``rcode`` is the metrics label (e.g. ``BADKEY``, ``timeout``)."""

    rcode = "error"


class UpdateError(DNSError):
    """A server answered an UPDATE (or query) with an error rcode."""

    def __init__(self, zone: str, server: str, rcode: str, key: str | None, what: str = "update"):
        self.zone, self.server, self.rcode, self.key = zone, server, rcode, key
        verb = "refused by" if rcode in REFUSALS else "failed at"
        keypart = f" (key {key})" if key else ""
        hint = (" -- clock skew between this node and the server? (TSIG allows 300 s; "
                "check NTP)") if rcode == "BADTIME" else ""
        super().__init__(f"{what} of zone {zone} {verb} {server}: {rcode}{keypart}{hint}")

    @property
    def prerequisite_failed(self) -> bool:
        return self.rcode in PREREQ_FAILED


class TransportError(DNSError):
    """No usable answer from any server (timeouts, refused connections, garbage)."""

    def __init__(self, message: str, rcode: str = "timeout"):
        self.rcode = rcode
        super().__init__(message)


def build_update(zone: dns.name.Name, changes: Iterable[Change], guards: Mapping[dns.name.Name, frozenset],
                 mine: Callable[[RecordSpec], Guard], key: TSIGKey | None, *,
                 guard_key: Callable[[RecordSpec], dns.name.Name] | None = None,
                 legacy: Iterable[dns.name.Name] = ()) -> dns.update.UpdateMessage:
    """One UPDATE for ``zone`` holding ``changes``.

    ``guards`` maps each guard key (``guard_key(spec)``: the record's name, or
    its resource's guard name with ``guard_scope = "resource"``) to the guard
    rdatas expected (missing or empty: the guard must not exist); ``mine(spec)``
    is the guard this node writes for a record.  ``legacy``: record names whose
    per-name guard ``_appliance-owner.<name>`` is deleted (after a switch to
    resource guards).
    """
    upd = make_update(zone, key)
    guarded: set[dns.name.Name] = set()
    for change in changes:
        spec = change.spec
        name = spec.name
        gkey = guard_key(spec) if guard_key is not None else name
        if gkey not in guarded:
            guarded.add(gkey)
            gname = guard_owner(gkey)
            current = guards.get(gkey) or frozenset()
            if current:
                rds = dns.rdataset.Rdataset(dns.rdataclass.IN, dns.rdatatype.TXT)
                for rd in current:
                    rds.add(rd)
                upd.present(gname, rds)
            else:
                upd.absent(gname, dns.rdatatype.TXT)
            upd.replace(gname, spec.ttl, guard_rdata(mine(spec)))
        if change.rdatas:
            upd.replace(name, spec.ttl, *sorted(change.rdatas, key=lambda r: r.to_text()))
        else:
            upd.delete(name, spec.rdtype)
    for name in legacy:
        upd.delete(guard_name(name), dns.rdatatype.TXT)
    return upd


def make_update(zone: dns.name.Name, key: TSIGKey | None) -> dns.update.UpdateMessage:
    upd = dns.update.UpdateMessage(zone)
    if key is not None:
        upd.use_tsig(keyring=key.dns_key(), keyname=key.keyname)
    return upd


def make_query(name: dns.name.Name, rdtype, key: TSIGKey | None) -> dns.message.Message:
    """A non-recursive query, signed when a key is given."""
    q = dns.message.make_query(name, rdtype)
    q.flags &= ~dns.flags.RD
    if key is not None:
        q.use_tsig(keyring=key.dns_key(), keyname=key.keyname)
    return q


class TruncatedAnswer(DNSError):
    """A UDP answer with TC set that passed verification: ask again over TCP."""

    rcode = "truncated"


def read_response(wire: bytes, request: dns.message.Message, *,
                  udp: bool = False) -> dns.message.Message:
    """Parse and TSIG-verify ``wire`` as the answer to ``request``.

    Raises :class:`DNSError` subclasses: TSIG problems the server reported
    become their RFC 8945 names (``BADKEY``...), everything else that is not
    a proper answer raises TransportError("...", "garbled").  ``udp``: a TC
    answer raises :class:`TruncatedAnswer` -- dnspython's own TC check
    (``raise_on_truncation``), after the signature was verified, so a forged
    unsigned TC answer to a signed request is refused, not obeyed (review L2).
    """
    keyring = request.keyring if request.had_tsig or request.keyring else None
    try:
        response = dns.message.from_wire(wire, keyring=keyring, request_mac=request.mac,
                                         one_rr_per_rrset=False, raise_on_truncation=udp)
    except dns.message.Truncated as e:
        truncated = e.message()
        if keyring is not None and (truncated is None or not truncated.had_tsig):
            raise TransportError("a truncated answer without a valid signature",
                                 "badresponse") from None
        if truncated is None or not request.is_response(truncated):
            raise TransportError("answer does not match the request", "garbled") from None
        raise TruncatedAnswer("truncated") from None
    except dns.tsig.PeerError as e:
        for cls, name in _PEER_ERRORS:
            if isinstance(e, cls):
                raise PeerTSIGError(name) from None
        raise PeerTSIGError("BADSIG") from None
    except (dns.tsig.BadSignature, dns.tsig.BadTime, dns.message.UnknownTSIGKey) as e:
        raise TransportError(f"answer failed TSIG verification: {e}", "badresponse") from None
    except dns.exception.DNSException as e:
        rcode = _unsigned_error(wire, request) if keyring is not None else None
        if rcode is not None:
            # An unsigned error answer to a signed request (RFC 8945 5.3: servers
            # answer some errors unsigned): still a failure, but keep its rcode
            # (review L1) -- NOTAUTH, REFUSED, NOTZONE say what to fix.
            raise _UnsignedError(rcode) from None
        raise TransportError(f"garbled answer: {e}", "garbled") from None
    if not request.is_response(response):
        raise TransportError("answer does not match the request", "garbled")
    return response


class PeerTSIGError(DNSError):
    """The server's TSIG error field was set (it rejected our signature)."""

    def __init__(self, rcode: str):
        self.rcode = rcode
        super().__init__(rcode)


_PeerTSIGError = PeerTSIGError      # the old private name


def _unsigned_error(wire: bytes, request: dns.message.Message) -> str | None:
    """The rcode of an unsigned error answer to ``request`` (None: not one)."""
    try:
        response = dns.message.from_wire(wire, ignore_trailing=True, one_rr_per_rrset=False)
    except dns.exception.DNSException:
        return None
    if response.had_tsig or not request.is_response(response) or response.rcode() == 0:
        return None
    return dns.rcode.to_text(response.rcode())


class _UnsignedError(PeerTSIGError):
    """An error rcode in an answer the server did not sign."""


def rcode_text(response: dns.message.Message) -> str:
    return dns.rcode.to_text(response.rcode())


def check_response(response: dns.message.Message, zone: str, server: str, key: str | None,
                   what: str = "update") -> None:
    """Raise :class:`UpdateError` unless ``response`` is NOERROR (queries: NXDOMAIN is fine)."""
    rcode = rcode_text(response)
    if rcode == "NOERROR" or (what == "query" and rcode == "NXDOMAIN"):
        return
    raise UpdateError(zone, server, rcode, key, what)


class Rdatas(frozenset):
    """A set of rdatas that remembers the rrset's TTL (None: not read from a server)."""

    ttl: int | None = None


def answer_rdatas(response: dns.message.Message, name: dns.name.Name, rdtype) -> frozenset:
    """The rdatas of ``name``/``rdtype`` in the answer section (empty if none), with ``.ttl``."""
    rdtype = dns.rdatatype.RdataType.make(rdtype)
    for rrset in response.answer:
        if rrset.name == name and rrset.rdtype == rdtype:
            out = Rdatas(rrset)
            out.ttl = rrset.ttl
            return out
    return Rdatas()
