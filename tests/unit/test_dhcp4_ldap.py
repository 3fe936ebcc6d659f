"""LDAP reservations: config, parsing entries, applying them to the lease store,
the cached last good set, and backoff while the directory is down (Clock, fake fetch)."""

from __future__ import annotations

from ipaddress import IPv4Address

from twisted.internet import defer

from services.dhcp.v4.ldap_reservations import (CACHE_KEY, LdapReservations, LdapUnavailable,
                                                parse_entries)
from tests.support.sync import inline, memory_store, ok
from tests.unit.test_dhcp4_config import base, parse
from tests.unit.test_dhcp4_leases import config as lease_config
from tests.unit.test_dhcp4_leases import mac

from services.dhcp.v4.config import LdapSettings
from services.dhcp.v4.leases import LeaseStore

SETTINGS = LdapSettings(("ldap://127.0.0.1:1389",), "ou=hosts,dc=example,dc=net",
                        refresh_interval_s=300, timeout_s=1)


def test_config_ldap_table_and_mistakes(tmp_path):
    """[services.dhcp4.ldap] parses; bad URLs, filters and a bind_dn without a
    password file are reported with their key paths."""
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    cfg, problems = parse(base(ldap={"servers": ["ldap://10.0.0.5:389", "ldaps://ldap2/"],
                                     "base_dn": "ou=hosts,dc=example,dc=net",
                                     "bind_dn": "cn=dhcp,dc=example,dc=net",
                                     "password_file": str(pw), "refresh_interval_s": 60}))
    assert problems == []
    assert cfg.ldap.servers == ("ldap://10.0.0.5:389", "ldaps://ldap2/")
    assert cfg.ldap.password() == "secret" and cfg.ldap.refresh_interval_s == 60
    _, problems = parse(base(ldap={"servers": ["http://x"], "base_dn": "dc=x",
                                   "filter": "objectClass=*", "bind_dn": "cn=a"}))
    text = "\n".join(problems)
    assert "services.dhcp4.ldap.servers[0]" in text
    assert "services.dhcp4.ldap.filter" in text
    assert "services.dhcp4.ldap.password_file" in text


def test_parse_entries_keeps_good_reports_bad():
    good, bad = parse_entries([
        {"dn": "cn=a", "mac": "52:54:00:00:00:01", "ip": "10.9.0.50"},
        {"dn": "cn=b", "mac": "52-54-00-00-00-02", "ip": "10.9.0.51"},
        {"dn": "cn=c", "mac": "not-a-mac", "ip": "10.9.0.52"},
        {"dn": "cn=d", "mac": "52:54:00:00:00:04", "ip": None},
    ])
    assert good == [("52:54:00:00:00:01", IPv4Address("10.9.0.50")),
                    ("52:54:00:00:00:02", IPv4Address("10.9.0.51"))]
    assert len(bad) == 2 and bad[0].startswith("cn=c")


def test_external_reservations_apply_and_replace(tmp_path):
    """LDAP reservations take their address out of the pool and give it to their
    client; replaced sets free the old ones; conflicts and strangers are reported."""
    store, clock = memory_store(tmp_path)
    cfg = lease_config(reservations=[{"hwaddr": mac(9), "address": "10.9.0.19"}])
    ls = LeaseStore(store, cfg, "a", clock.seconds)
    ok(ls.load())
    free0 = ls.free_count(1)
    unplaced = ls.set_external_reservations([
        (mac(1), IPv4Address("10.9.0.12")),
        (mac(2), IPv4Address("10.9.0.19")),       # the config reserves it for mac(9)
        (mac(3), IPv4Address("192.0.2.1")),       # no such subnet
    ])
    assert len(unplaced) == 2 and ls.reservation_count == 2
    assert ls.free_count(1) == free0 - 1
    assert ok(ls.offer(1, mac(1))).address == "10.9.0.12"
    assert ok(ls.offer(1, mac(4))).address != "10.9.0.12"
    assert ls.set_external_reservations([]) == []
    assert ls.reservation_count == 1 and ls.free_count(1) == free0 - 2   # .12 still offered
    assert ok(ls.offer(1, mac(9))).address == "10.9.0.19"                # config one stays


def _watcher(tmp_path, fetch):
    store, clock = memory_store(tmp_path)
    cfg = lease_config()
    ls = LeaseStore(store, cfg, "a", clock.seconds)
    ok(ls.load())
    w = LdapReservations(clock, SETTINGS, ls.set_external_reservations, store=store,
                         fetch=fetch, run_in_thread=inline)
    return w, ls, store, clock


def test_refresh_applies_caches_and_survives_outage(tmp_path):
    """A refresh applies the directory's set and caches it; when every server is
    down the set in use stays, the error is counted and retried with backoff; a
    restart while LDAP is down uses the cached set."""
    answers = [("ldap://127.0.0.1:1389", [{"dn": "cn=a", "mac": mac(1), "ip": "10.9.0.15"}])]

    def fetch(settings, password):
        if not answers:
            raise LdapUnavailable("ldap://127.0.0.1:1389: LDAPSocketOpenError: refused")
        return answers.pop(0)

    w, ls, store, clock = _watcher(tmp_path, fetch)
    ok(w.start())
    clock.advance(0)
    assert ls.reservation_count == 1 and w.stats["source"] == "ldap"
    assert ok(store.get(CACHE_KEY)) is not None
    clock.advance(300)                                   # next refresh: directory down
    assert w.stats["errors"] == 1 and ls.reservation_count == 1
    assert w._call.getTime() == clock.seconds() + 5      # backoff 5 s, then 10 s...
    clock.advance(5)
    assert w.stats["errors"] == 2 and w._call.getTime() == clock.seconds() + 10
    w.stop()
    assert not clock.getDelayedCalls()

    # a new process while LDAP is still down: the cached set is used
    cfg = lease_config()
    ls2 = LeaseStore(store, cfg, "a", clock.seconds)
    ok(ls2.load())
    w2 = LdapReservations(clock, SETTINGS, ls2.set_external_reservations, store=store,
                          fetch=fetch, run_in_thread=inline)
    ok(w2.start())
    assert w2.stats["source"] == "cache" and ls2.reservation_count == 1
    clock.advance(0)
    assert w2.stats["errors"] == 1 and ls2.reservation_count == 1
    assert ok(ls2.offer(1, mac(1))).address == "10.9.0.15"
    w2.stop()


def test_unreadable_password_file_is_an_error_not_a_crash(tmp_path):
    settings = LdapSettings(("ldap://127.0.0.1:1389",), "dc=x", bind_dn="cn=a",
                            password_file=str(tmp_path / "missing"))
    store, clock = memory_store(tmp_path)
    w = LdapReservations(clock, settings, lambda pairs: [], store=None,
                         fetch=lambda *a: defer.fail(AssertionError("not called")),
                         run_in_thread=inline)
    failures = []
    w.refresh().addErrback(failures.append)
    assert failures and "password_file" in w.stats["last_error"]
    w.stop()


def test_apply_that_raises_is_logged_counted_and_retried(tmp_path):
    """A bug while applying a fetched set does not stop the refreshes silently."""
    calls = []

    def apply(pairs):
        calls.append(pairs)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return []

    store, clock = memory_store(tmp_path)
    w = LdapReservations(clock, SETTINGS, apply, store=None,
                         fetch=lambda s, p: ("ldap://x", [{"dn": "cn=a", "mac": mac(1),
                                                            "ip": "10.9.0.15"}]),
                         run_in_thread=inline)
    ok(w.start())
    clock.advance(0)
    assert w.stats["errors"] == 1 and "boom" in w.stats["last_error"]
    clock.advance(LdapReservations.MIN_RETRY_S)
    assert len(calls) == 2 and w.stats["source"] == "ldap"
    w.stop()
