"""LDAP credentials on a Clock with a fake directory: TTL cache, one search per user at a
time, failover order, the last good answer while the directory is down, 503 otherwise."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from services.sip.auth import DigestAuth, ha1
from services.sip.ldap_credentials import DirectoryUnavailable, LdapCredentials, LdapSettings

REALM = "example.test"


class FakeDirectory:
    """fetch(settings, user, start) run 'in a thread' that completes on release()."""

    def __init__(self):
        self.passwords = {"alice": "secret"}
        self.calls = []
        self.pending = []
        self.down = False

    def __call__(self, f, settings, user, start):
        self.calls.append((user, start))
        d = defer.Deferred()
        self.pending.append((d, user))
        return d

    def release(self):
        while self.pending:
            d, user = self.pending.pop(0)
            if self.down:
                d.errback(DirectoryUnavailable("ldap://a: refused; ldap://b: timeout"))
            else:
                d.callback(("ldap://a", self.passwords.get(user)))


def make(**kw):
    clock = Clock()
    clock.advance(1000)
    directory = FakeDirectory()
    settings = LdapSettings(("ldap://a", "ldap://b"), "dc=example,dc=net", **kw)
    return LdapCredentials(clock, settings, in_thread=directory), directory, clock


def result(d):
    out = []
    d.addBoth(out.append)
    return out[0] if out else None


def test_cache_and_one_search_per_user():
    """Two lookups while one search runs share it; within the TTL no new search."""
    creds, directory, clock = make(cache_ttl_s=60)
    d1 = creds.lookup("alice", REALM, "MD5")
    d2 = creds.lookup("alice", REALM, "SHA-256")
    assert len(directory.calls) == 1
    directory.release()
    assert result(d1) == ha1("MD5", "alice", REALM, "secret")
    assert result(d2) == ha1("SHA-256", "alice", REALM, "secret")
    clock.advance(30)
    assert result(creds.lookup("alice", REALM, "MD5")) is not None and len(directory.calls) == 1
    clock.advance(31)
    creds.lookup("alice", REALM, "MD5")
    assert len(directory.calls) == 2
    directory.release()
    assert result(creds.lookup("nobody", REALM, "MD5")) is None      # pending
    directory.release()
    assert creds.cache["nobody"][1] is None


def test_stale_answer_while_directory_down_then_503():
    """Directory down: the last good answer is used (counted); a user never seen fails."""
    creds, directory, clock = make(cache_ttl_s=0, stale_max_s=3600)
    d = creds.lookup("alice", REALM, "MD5")
    directory.release()
    assert result(d) is not None
    directory.down = True
    d = creds.lookup("alice", REALM, "MD5")
    directory.release()
    assert result(d) == ha1("MD5", "alice", REALM, "secret") and creds.stats["stale_served"] == 1
    d = creds.lookup("bob", REALM, "MD5")
    directory.release()
    failure = result(d)
    assert failure.check(DirectoryUnavailable)
    clock.advance(3601)
    d = creds.lookup("alice", REALM, "MD5")
    directory.release()
    assert result(d).check(DirectoryUnavailable)


def test_round_robin_starts_at_the_next_server():
    """round_robin rotates the first server tried; first always starts at 0."""
    creds, directory, _ = make(strategy="round_robin", cache_ttl_s=0)
    for user in ("a", "b", "c"):
        creds.lookup(user, REALM, "MD5")
    assert [s for _, s in directory.calls] == [0, 1, 0]


def test_digest_with_directory_verdict_is_deferred():
    """DigestAuth with LDAP credentials answers through a Deferred: ok with the right
    password, an error when the directory cannot answer."""
    from tests.unit.test_sip_auth import answer
    creds, directory, clock = make()
    auth = DigestAuth(REALM, creds, algorithms=("MD5",), now=clock.seconds)
    challenge = auth.check("REGISTER", [], "alice").headers[0][1]
    d = auth.check("REGISTER", [answer(challenge, "alice", "secret")], "alice")
    directory.release()
    assert result(d).result == "ok"
    directory.down = True
    d = auth.check("REGISTER", [answer(challenge, "bob", "x", nc="00000002")], "bob")
    directory.release()
    assert result(d).check(DirectoryUnavailable)


def test_config_needs_one_credential_source(tmp_path):
    """[services.sip.auth] takes ha1_file or ldap, not both, not neither; ldap keys checked."""
    from appliance.config import ParseContext, Problems, Table
    from services.sip.config import parse

    def problems(auth):
        p = Problems("t.toml")
        parse(Table({"port": 5060, "auth": auth}, "services.sip", p),
              ParseContext("t.toml", "a", (), ()))
        return p.items

    assert any("exactly one of ha1_file and ldap" in x for x in problems({"realm": "r"}))
    ok = problems({"realm": "r", "ldap": {"servers": ["ldap://127.0.0.1:1"], "base_dn": "dc=x"}})
    assert ok == []
    bad = problems({"realm": "r", "ldap": {"servers": ["http://x"], "base_dn": "dc=x",
                                           "filter": "(uid=x)", "strategy": "random"}})
    assert len(bad) == 3
