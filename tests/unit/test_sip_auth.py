"""Digest authentication (RFC 8760 algorithms, qop=auth, nonce expiry, nonce-count
replay, stale=true) on a Clock, and the registrar asking for it."""

from __future__ import annotations

import hashlib

import pytest
from twisted.internet.task import Clock

from services.sip.auth import ALGORITHMS, DigestAuth, HA1File, HA1FileError, ha1, parse_auth_params

REALM = "example.test"


def make(algorithms=("SHA-512-256", "SHA-256", "MD5"), ttl=300):
    clock = Clock()
    clock.advance(1_000_000)
    lines = [f"alice:{REALM}:{a}:{ha1(a, 'alice', REALM, 'secret')}" for a in ALGORITHMS]
    lines.append(f"bob:{REALM}:{ha1('MD5', 'bob', REALM, 'pw')}")       # htdigest form
    creds = HA1File.parse("\n".join(lines))
    return DigestAuth(REALM, creds, algorithms=algorithms, nonce_ttl_s=ttl,
                      now=clock.seconds), clock


def answer(challenge_value, user, password, *, method="REGISTER", uri="sip:example.test",
           nc="00000001", cnonce="c0ffee", algorithm=None, nonce=None):
    _, p = parse_auth_params(challenge_value)
    algorithm = algorithm or p["algorithm"]
    nonce = nonce or p["nonce"]
    h = ALGORITHMS[algorithm]
    a1 = ha1(algorithm, user, p["realm"], password)
    a2 = h(f"{method}:{uri}".encode())
    resp = h(f"{a1}:{nonce}:{nc}:{cnonce}:auth:{a2}".encode())
    return (f'Digest username="{user}", realm="{p["realm"]}", nonce="{nonce}", uri="{uri}", '
            f'response="{resp}", algorithm={algorithm}, qop=auth, nc={nc}, cnonce="{cnonce}"')


def test_challenge_lists_algorithms_in_order():
    """No credentials: 401 with one WWW-Authenticate per algorithm, preferred first, qop auth."""
    auth, _ = make()
    v = auth.check("REGISTER", [], "alice")
    assert v.code == 401 and v.result == "challenged"
    algs = [parse_auth_params(value)[1]["algorithm"] for _, value in v.headers]
    assert algs == ["SHA-512-256", "SHA-256", "MD5"]
    assert all(parse_auth_params(value)[1]["qop"] == "auth" for _, value in v.headers)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_each_algorithm_authenticates(index):
    """MD5, SHA-256 and SHA-512-256 responses computed by a client are accepted."""
    auth, _ = make()
    challenge = auth.check("REGISTER", [], "alice").headers[index][1]
    v = auth.check("REGISTER", [answer(challenge, "alice", "secret")], "alice")
    assert (v.code, v.result, v.user) == (0, "ok", "alice")


def test_wrong_password_unknown_user_and_user_mismatch():
    """Wrong password and unknown user: a new 401; credentials of another user: 403."""
    auth, _ = make()
    challenge = auth.check("REGISTER", [], "alice").headers[2][1]
    assert auth.check("REGISTER", [answer(challenge, "alice", "nope")], "alice").result == \
        "wrong_password"
    assert auth.check("REGISTER", [answer(challenge, "carol", "x")], "carol").result == \
        "unknown_user"
    v = auth.check("REGISTER", [answer(challenge, "bob", "pw")], "alice")
    assert (v.code, v.result) == (403, "user_mismatch")
    assert auth.check("REGISTER", [answer(challenge, "bob", "pw")], "bob").code == 0


def test_nonce_expiry_and_foreign_nonce_are_stale():
    """A nonce older than nonce_ttl_s, or one this process did not make: 401 stale=true."""
    auth, clock = make(ttl=60)
    challenge = auth.check("REGISTER", [], "alice").headers[1][1]
    clock.advance(61)
    v = auth.check("REGISTER", [answer(challenge, "alice", "secret")], "alice")
    assert v.result == "stale" and all("stale=true" in value for _, value in v.headers)
    other, _ = make()
    foreign = other.check("REGISTER", [], "alice").headers[1][1]
    assert auth.check("REGISTER", [answer(foreign, "alice", "secret")], "alice").result == "stale"


def test_nonce_count_replay():
    """The same nonce-count again is a replay (stale=true); a higher one is accepted."""
    auth, _ = make()
    challenge = auth.check("REGISTER", [], "alice").headers[1][1]
    first = answer(challenge, "alice", "secret", nc="00000001")
    assert auth.check("REGISTER", [first], "alice").code == 0
    again = auth.check("REGISTER", [first], "alice")
    assert (again.code, again.result) == (401, "replay")
    assert auth.check("REGISTER", [answer(challenge, "alice", "secret", nc="00000002")],
                      "alice").code == 0


def test_missing_qop_and_malformed():
    """A response without qop gets a new challenge; an unparseable header is a 400."""
    auth, _ = make()
    challenge = auth.check("REGISTER", [], "alice").headers[2][1]
    no_qop = answer(challenge, "alice", "secret").replace(", qop=auth", "")
    assert auth.check("REGISTER", [no_qop], "alice").code == 401
    assert auth.check("REGISTER", ['Digest username="alice'], "alice").code == 400


def test_ha1_file_errors():
    """Bad lines name the line: field count, unknown algorithm, wrong digest length."""
    for text in ("alice:realm", "alice:r:SHA-1:" + "0" * 40, "alice:r:" + "0" * 31):
        with pytest.raises(HA1FileError):
            HA1File.parse(text)
    f = HA1File.parse("# comment\nalice:r:" + hashlib.md5(b"alice:r:pw").hexdigest())
    assert f.lookup("alice", "r", "MD5") == ha1("MD5", "alice", "r", "pw")


def test_registrar_challenges_then_accepts(tmp_path):
    """With auth configured a REGISTER without credentials gets 401; with them, 200."""
    from dataclasses import replace

    from services.sip import message as M
    from services.sip.config import AuthConfig
    from tests.unit.test_sip_service import Peer, make as make_service, req, settle

    svc, clock, thread, store, rpc = make_service(tmp_path)
    creds = HA1File.parse(f"alice:{REALM}:MD5:{ha1('MD5', 'alice', REALM, 'secret')}")
    svc.config = replace(svc.config, auth=AuthConfig(REALM, "x", creds, ("MD5",), 300, False))
    svc.auth = DigestAuth(REALM, creds, algorithms=("MD5",), now=clock.seconds)
    peer = Peer()
    svc.received(req("REGISTER", "sip:example.test", contacts=["<sip:alice@h>"]), peer.src, False)
    [challenge] = peer.responses()
    assert challenge.code == 401
    creds_header = answer(challenge.get("WWW-Authenticate"), "alice", "secret")
    svc.received(req("REGISTER", "sip:example.test", branch="z9hG4bK2", cseq=2,
                     contacts=["<sip:alice@h>"], extra=[f"Authorization: {creds_header}"]),
                 peer.src, False)
    settle(clock, thread)
    assert peer.responses()[-1].code == 200 and svc.auth.results == {"challenged": 1, "ok": 1}
    assert isinstance(peer.responses()[-1], M.Message)
