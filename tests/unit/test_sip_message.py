"""SIP parser/serializer: folding, compact forms, multiple Via, malformed input (hypothesis)."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from services.sip import message as M

REG = (b"REGISTER sip:example.test SIP/2.0\r\n"
       b"v: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK1;rport, SIP/2.0/TCP proxy.test\r\n"
       b"f: \"Alice, A.\" <sip:alice@example.test>;tag=1\r\n"
       b"t: sip:alice@example.test\r\n"
       b"i: abc@host\r\n"
       b"CSeq: 7 REGISTER\r\n"
       b"Max-Forwards: 70\r\n"
       b"m: <sip:alice@127.0.0.1:5061>;expires=60,\r\n"
       b"\t<sip:alice@10.0.0.1;transport=tcp>;q=0.5\r\n"
       b"l: 0\r\n\r\n")


def test_compact_forms_folding_and_lists():
    """Compact names become long ones, a folded line joins, list headers split on commas
    outside quotes and angle brackets; From's quoted comma is left alone."""
    m = M.parse(REG)
    assert m.method == "REGISTER" and m.uri == "sip:example.test"
    assert [v.sent_by for v in m.vias] == ["127.0.0.1:5061", "proxy.test"]
    assert m.top_via.branch == "z9hG4bK1" and m.top_via.transport == "UDP"
    assert m.get_all("Contact") == ["<sip:alice@127.0.0.1:5061>;expires=60",
                                    "<sip:alice@10.0.0.1;transport=tcp>;q=0.5"]
    assert m.get("From") == "\"Alice, A.\" <sip:alice@example.test>;tag=1"
    assert m.cseq == (7, "REGISTER") and m.call_id == "abc@host"


def test_round_trip():
    """Serializing and parsing again gives the same message."""
    m = M.parse(REG)
    again = M.parse(m.to_bytes())
    assert again.headers == m.headers and again.body == m.body


def test_name_addr_and_aor():
    """Name-addr and addr-spec forms; the AOR drops params and lower-cases the host."""
    na = M.parse_name_addr('"Bob" <sip:bob@Example.TEST:5060;transport=udp>;tag=x;expires=5')
    assert (na.display, na.uri, na.tag, na.params["expires"]) == (
        '"Bob"', "sip:bob@Example.TEST:5060;transport=udp", "x", "5")
    spec = M.parse_name_addr("sip:carol@example.test;tag=9")
    assert spec.uri == "sip:carol@example.test" and spec.tag == "9"
    assert M.canonical_aor("sip:b%6Fb@Example.TEST;user=phone") == "sip:bob@example.test"
    assert M.parse_name_addr("*").star


def test_body_cut_to_content_length_and_short_body_refused():
    """A datagram body longer than Content-Length is cut; a shorter one is a 400."""
    base = REG.replace(b"l: 0\r\n", b"Content-Length: 4\r\n")
    assert M.parse(base + b"abcdEXTRA").body == b"abcd"
    try:
        M.parse(base + b"ab")
    except M.Malformed as e:
        assert e.reason == "body shorter than Content-Length" and e.request is not None
    else:
        raise AssertionError("short body accepted")


def test_malformed_answerable_or_not():
    """Missing Call-ID: no 400 possible (a drop); bad CSeq with the rest: a 400 with the reason."""
    no_callid = REG.replace(b"i: abc@host\r\n", b"")
    try:
        M.parse(no_callid)
    except M.Malformed as e:
        assert e.reason == "missing Call-ID" and e.request is None
    bad_cseq = REG.replace(b"CSeq: 7 REGISTER", b"CSeq: 7 INVITE")
    try:
        M.parse(bad_cseq)
    except M.Malformed as e:
        assert e.reason == "CSeq method does not match the request" and e.request is not None
    for junk in (b"", b"\r\n", b"HELLO\r\n\r\n", b"SIP/3.0 200 OK\r\n\r\n",
                 b"REGISTER sip:x SIP/3.0\r\n\r\n", b"\xff\xfe\r\n\r\n"):
        try:
            M.parse(junk)
        except M.Malformed:
            pass
        else:
            raise AssertionError(junk)


def test_stream_needs_content_length():
    """On a stream a message without Content-Length cannot be framed."""
    try:
        M.parse(REG.replace(b"l: 0\r\n", b""), stream=True)
    except M.Malformed as e:
        assert e.reason == "missing Content-Length"


_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-.", min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_crash(data):
    """Any bytes: a Message or Malformed, nothing else."""
    try:
        M.parse(data)
    except M.Malformed:
        pass


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(REG)), st.binary(max_size=20), st.booleans())
def test_mutated_register_never_crashes(at, insert, stream):
    """A REGISTER with bytes spliced in anywhere parses or is Malformed; a 400 is only
    offered when its headers can be copied into a response."""
    data = REG[:at] + insert + REG[at:]
    try:
        M.parse(data, stream=stream)
    except M.Malformed as e:
        if e.request is not None:
            M.response_for(e.request, 400, e.reason).to_bytes()


@settings(max_examples=200, deadline=None)
@given(user=_token, host=_token, tag=_token, callid=_token, cseq=st.integers(0, 2 ** 31 - 1),
       n_via=st.integers(1, 4), body=st.binary(max_size=50), compact=st.booleans())
def test_generated_requests_round_trip(user, host, tag, callid, cseq, n_via, body, compact):
    """Generated well-formed requests parse, and serialize to something that parses the same."""
    v, f, t, i = ("v", "f", "t", "i") if compact else ("Via", "From", "To", "Call-ID")
    vias = ", ".join(f"SIP/2.0/UDP {host}:{5060 + k};branch=z9hG4bK{k}{tag}" for k in range(n_via))
    raw = (f"OPTIONS sip:{user}@{host} SIP/2.0\r\n{v}: {vias}\r\n"
           f"{f}: <sip:{user}@{host}>;tag={tag}\r\n{t}: <sip:{user}@{host}>\r\n"
           f"{i}: {callid}\r\nCSeq: {cseq} OPTIONS\r\nContent-Length: {len(body)}\r\n\r\n"
           ).encode() + body
    m = M.parse(raw)
    assert len(m.vias) == n_via and m.body == body and m.cseq == (cseq, "OPTIONS")
    again = M.parse(m.to_bytes(), stream=True)
    assert again.headers == m.headers and again.body == body
