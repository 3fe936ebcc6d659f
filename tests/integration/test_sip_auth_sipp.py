"""Digest authentication in a running node, driven by real ``sipp`` (MD5, qop=auth):
challenge then success, wrong password (401 again, nothing stored), stale nonce
(401 stale=true after the nonce lifetime, then success)."""

from __future__ import annotations

import pytest

from services.sip.auth import ha1
from tests.support import sipp
from tests.support.node_process import NodeProcess, free_port
from tests.support.require import require_binary

pytestmark = pytest.mark.integration
REALM = "example.test"
USERS = [(f"user{i}", f"pw{i}") for i in range(20)]


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    require_binary("sipp")
    tmp = tmp_path_factory.mktemp("sipauth")
    ha1_file = tmp / "users.ha1"
    ha1_file.write_text("".join(f"{u}:{REALM}:{ha1('MD5', u, REALM, p)}\n" for u, p in USERS))
    port = free_port()
    n = NodeProcess(tmp, f"""
[services.sip]
listen_address = "127.0.0.1"
port = {port}
domains = ["{REALM}"]

[services.sip.auth]
realm = "{REALM}"
ha1_file = "{ha1_file}"
algorithms = ["MD5"]          # sipp 3.6 answers MD5 only
nonce_ttl_s = 1
""").start()
    n.sip_port = port
    try:
        yield n
    finally:
        n.terminate()


def run(node, tmp_path, xml, users, calls_per_user):
    """One sipp run per user (sipp 3.6 cannot take digest users from an injection file)."""
    results = []
    for i, (user, password) in enumerate(users):
        results.append(sipp.run_sipp(tmp_path / str(i), xml, f"127.0.0.1:{node.sip_port}",
                                     calls=calls_per_user, rate=20,
                                     extra=sipp.user_args(user, password)))
    return results


def all_ok(results, calls):
    return all(r.ok and r.successful == calls for r in results), [
        (r.stdout[-1500:], r.errors[-1500:]) for r in results if not r.ok]


def stats(node):
    return node.rpc("sip.stats")["result"]


def test_challenge_then_success(node, tmp_path):
    """Each user is challenged once and registers with its password; bindings exist."""
    ok, why = all_ok(run(node, tmp_path, sipp.auth_success(), USERS[:4], 3), 3)
    assert ok, (why, node.output()[-2000:])
    rows = node.rpc("sip.bindings", {"aor": "sip:user3@example.test"})["result"]["bindings"]
    assert len(rows) == 1
    assert stats(node)["auth"]["ok"] >= 12


def test_wrong_password_is_challenged_again_and_not_stored(node, tmp_path):
    """A wrong password gets a new 401; the user has no binding."""
    before = stats(node)["auth"].get("wrong_password", 0)
    ok, why = all_ok(run(node, tmp_path, sipp.auth_wrong_password(), USERS[10:12], 2), 2)
    assert ok, why
    assert stats(node)["auth"]["wrong_password"] == before + 4
    rows = node.rpc("sip.bindings", {"aor": "sip:user11@example.test"})["result"]["bindings"]
    assert rows == []


def test_stale_nonce(node, tmp_path):
    """After the nonce lifetime the old nonce gets 401 stale=true; the new one works."""
    ok, why = all_ok(run(node, tmp_path, sipp.auth_stale(wait_ms=1500), USERS[15:16], 2), 2)
    assert ok, why
    assert stats(node)["auth"]["stale"] >= 2
