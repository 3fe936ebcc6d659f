"""Registrar rules of RFC 3261 §10.3 on plain data (services.sip.registrar.decide)."""

from __future__ import annotations

from services.sip import message as M
from services.sip.registrar import Binding, Limits, decide

AOR = "sip:alice@example.test"
NOW = 1_000_000.0
LIMITS = Limits(default_expires=3600, min_expires=60, max_expires=7200, max_contacts=3)


def register(*contacts, expires=None, call_id="c1", cseq=1, extra=()):
    lines = ["REGISTER sip:example.test SIP/2.0",
             "Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bKx",
             f"From: <{AOR}>;tag=1", f"To: <{AOR}>", f"Call-ID: {call_id}",
             f"CSeq: {cseq} REGISTER"]
    lines += [f"Contact: {c}" for c in contacts]
    if expires is not None:
        lines.append(f"Expires: {expires}")
    lines += list(extra)
    return M.parse(("\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n").encode())


def run(existing, msg, now=NOW):
    return decide(AOR, existing, msg, now, LIMITS, "udp:127.0.0.1:5061")


def test_add_refresh_remove():
    """A contact is added with the default expiry, refreshed with a higher CSeq, removed
    with expires=0; the 200 lists current contacts with their remaining time."""
    d = run({}, register("<sip:a@10.0.0.1>"))
    assert d.code == 200 and [b.uri for b in d.added] == ["sip:a@10.0.0.1"]
    assert d.bindings["sip:a@10.0.0.1"].expires == NOW + 3600
    assert d.headers[0] == ("Contact", "<sip:a@10.0.0.1>;expires=3600")
    d2 = run(d.bindings, register("<sip:a@10.0.0.1>", expires=120, cseq=2), NOW + 10)
    assert d2.bindings["sip:a@10.0.0.1"].expires == NOW + 130
    d3 = run(d2.bindings, register("<sip:a@10.0.0.1>;expires=0", cseq=3))
    assert d3.code == 200 and d3.bindings == {} and [b.uri for b in d3.removed] == ["sip:a@10.0.0.1"]


def test_expires_param_wins_over_header_and_max_caps():
    """The contact's expires parameter beats the Expires header; max_expires caps."""
    d = run({}, register("<sip:a@h1>;expires=100", "<sip:a@h2>", expires=99999))
    assert d.bindings["sip:a@h1"].expires == NOW + 100
    assert d.bindings["sip:a@h2"].expires == NOW + 7200


def test_min_expires_423():
    """A non-zero expiry below min_expires fails the whole request with 423 + Min-Expires."""
    d = run({}, register("<sip:a@h1>", "<sip:a@h2>;expires=30"))
    assert d.code == 423 and ("Min-Expires", "60") in d.headers and d.bindings is None


def test_wildcard():
    """'*' needs Expires: 0 and to be alone; it removes every binding."""
    d = run({}, register("<sip:a@h1>", "<sip:a@h2>"))
    assert run(d.bindings, register("*", cseq=2)).code == 400
    assert run(d.bindings, register("*", "<sip:a@h3>", expires=0, cseq=2)).code == 400
    w = run(d.bindings, register("*", expires=0, cseq=2))
    assert w.code == 200 and w.bindings == {} and len(w.removed) == 2


def test_call_id_cseq_ordering():
    """Same Call-ID and a CSeq not higher aborts the request (nothing applied); another
    Call-ID replaces the binding whatever its CSeq."""
    d = run({}, register("<sip:a@h1>", cseq=5))
    stale = run(d.bindings, register("<sip:a@h1>;expires=0", cseq=5))
    assert stale.code == 500 and stale.bindings is None
    other = run(d.bindings, register("<sip:a@h1>", call_id="c2", cseq=1, expires=300))
    assert other.code == 200 and other.bindings["sip:a@h1"].call_id == "c2"
    star = run(d.bindings, register("*", expires=0, cseq=4))
    assert star.code == 500


def test_q_values_and_bad_q():
    """q is kept and orders the 200's contacts; a q outside 0..1 is a 400."""
    d = run({}, register("<sip:a@h1>;q=0.1", "<sip:a@h2>;q=0.9"))
    assert [v for n, v in d.headers if n == "Contact"][0].startswith("<sip:a@h2>;q=0.9")
    assert run({}, register("<sip:a@h1>;q=1.5")).code == 400
    assert run({}, register("<sip:a@h1>;q=abc")).code == 400


def test_max_contacts():
    """More than max_contacts bindings after the update: 503, nothing applied."""
    d = run({}, register("<sip:a@h1>", "<sip:a@h2>", "<sip:a@h3>"))
    assert d.code == 200
    over = run(d.bindings, register("<sip:a@h4>", call_id="c9"))
    assert over.code == 503 and over.bindings is None
    # removing one and adding one in the same request fits
    swap = run(d.bindings, register("<sip:a@h1>;expires=0", "<sip:a@h4>", cseq=2))
    assert swap.code == 200 and sorted(swap.bindings) == ["sip:a@h2", "sip:a@h3", "sip:a@h4"]


def test_path_stored_and_echoed():
    """Path values are stored with the binding and echoed when the UA supports path."""
    msg = register("<sip:a@h1>", extra=("Path: <sip:edge1.test;lr>", "Supported: path"))
    d = run({}, msg)
    assert d.bindings["sip:a@h1"].path == ("<sip:edge1.test;lr>",)
    assert ("Path", "<sip:edge1.test;lr>") in d.headers


def test_query_changes_nothing():
    """A REGISTER without Contact is a query: 200 with the bindings, no write."""
    d = run({}, register("<sip:a@h1>"))
    q = run(d.bindings, register(cseq=2))
    assert q.code == 200 and q.bindings is None and not q.changes
    assert [n for n, _ in q.headers] == ["Contact"]


def test_bad_expires_header():
    """A non-numeric Expires header is a 400."""
    assert run({}, register("<sip:a@h1>", expires="soon")).code == 400


# -- the stored/replicated JSON of a binding --------------------------------------------
from hypothesis import given, settings, strategies as st  # noqa: E402
import json as _json  # noqa: E402

_text = st.text(max_size=20)


@settings(max_examples=300, deadline=None)
@given(uri=_text, expires=st.floats(allow_nan=False, allow_infinity=False) | st.integers(0, 2**40),
       q=st.none() | st.sampled_from([0.0, 0.5, 1.0, 0.123]), call_id=_text,
       cseq=st.integers(0, 2**31 - 1), path=st.lists(_text, max_size=3), received=_text,
       params=_text)
def test_binding_to_json_is_the_compact_json_of_its_record(uri, expires, q, call_id, cseq, path,
                                                            received, params):
    b = Binding("sip:a@example.test", uri, expires, q, call_id, cseq, tuple(path), received,
                params)
    text = b.to_json()
    assert text == _json.dumps(b.to_record(), separators=(",", ":"))
    assert Binding.from_record(b.aor, _json.loads(text)) == \
        Binding.from_record(b.aor, b.to_record())
