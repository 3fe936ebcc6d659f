"""The peer link over real TLS sockets on loopback: auth, order, acks, resend, backpressure."""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from appliance.cluster.peerlink import Backpressure, PeerLink
from appliance.net.tls import client_options, make_ca, make_cert, server_options

ADDR = {"a": "127.0.0.1", "b": "127.0.0.2"}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 and on 127.0.0.2 (retried: the kernel only
    promises the first)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.2", port))
            return port
        except OSError:
            continue
    raise RuntimeError("no port free on both 127.0.0.1 and 127.0.0.2")


@pytest.fixture(scope="module")
def pki():
    ca = make_ca("test cluster CA")
    rogue = make_ca("rogue CA")
    certs = {n: make_cert(*ca, n, dns_names=(n,), ips=(ADDR.get(n, ADDR["b"]),)) for n in ("a", "b", "c")}
    certs["b-rogue"] = make_cert(*rogue, "b", dns_names=("b",), ips=(ADDR["b"],))
    return {"ca": ca, "rogue": rogue, "certs": certs}


def link(pki, me, port, *, cert_name=None, ca=None, max_unacked=10000, inc=1):
    cert, key = pki["certs"][cert_name or me]
    ca_pem = (ca or pki["ca"])[0]
    other = "b" if me == "a" else "a"
    pl = PeerLink(reactor, node_id=me, incarnation=inc, peers={other: ADDR[other]}, port=port,
                  interface=ADDR[me], server_options=server_options(cert, key, ca_pem),
                  client_options=lambda peer: client_options(peer, ca_pem, cert, key),
                  max_unacked=max_unacked)
    pl.got = []
    pl.on("test", lambda peer, body: pl.got.append((peer, body)))
    return pl


async def until(pred, timeout=5.0):
    for _ in range(int(timeout / 0.02)):
        if pred():
            return True
        await task.deferLater(reactor, 0.02, lambda: None)
    return False


@pytest.fixture
def links():
    made = []
    yield made
    for pl in made:
        if pl.running:
            pytest_twisted.blockon(pl.stopService())


@pytest_twisted.ensureDeferred
async def test_messages_delivered_in_order_and_acked(pki, links):
    """a sends on a channel; b handles in order; each send's Deferred fires on the ack."""
    port = free_port()
    a, b = link(pki, "a", port), link(pki, "b", port)
    links += [a, b]
    await b.startService()
    await a.startService()
    assert await until(lambda: a.connected("b") and b.connected("a"))
    acks = [a.send("b", "test", {"n": i}) for i in range(50)]
    await defer.gatherResults(acks)
    assert b.got == [("a", {"n": i}) for i in range(50)]
    assert a.backlog("b") == 0
    # The other direction works over the same connection.
    await b.send("a", "test", "hello")
    assert a.got == [("b", "hello")]


@pytest_twisted.ensureDeferred
async def test_queued_while_down_then_resent_in_order(pki, links):
    """Messages sent while the peer is down are delivered, in order, once it is up;
    after the peer restarts mid-stream nothing acked is redelivered."""
    port = free_port()
    a = link(pki, "a", port)
    links.append(a)
    await a.startService()
    pending = [a.send("b", "test", i) for i in range(5)]
    assert a.backlog("b") == 5
    b = link(pki, "b", port)
    links.append(b)
    await b.startService()
    await defer.gatherResults(pending)
    assert [body for _, body in b.got] == [0, 1, 2, 3, 4]
    await b.stopService()
    more = [a.send("b", "test", i) for i in range(5, 8)]
    b2 = link(pki, "b", port)
    links.append(b2)
    await b2.startService()
    await defer.gatherResults(more)
    assert [body for _, body in b2.got] == [5, 6, 7]
    assert a.stats["resent"] >= 3


@pytest_twisted.ensureDeferred
async def test_rogue_ca_refused(pki, links):
    """A peer whose certificate is not from the cluster CA never gets a message."""
    port = free_port()
    a = link(pki, "a", port)
    b = link(pki, "b", port, cert_name="b-rogue")
    links += [a, b]
    await b.startService()
    await a.startService()
    d = a.send("b", "test", "secret")
    assert not await until(lambda: a.connected("b") or b.got, timeout=1.5)
    assert b.got == [] and not d.called
    d.addErrback(lambda f: None)


@pytest_twisted.ensureDeferred
async def test_wrong_node_identity_refused(pki, links):
    """A server presenting node c's (valid) certificate where b is expected is refused."""
    port = free_port()
    a = link(pki, "a", port)
    b = link(pki, "b", port, cert_name="c")
    links += [a, b]
    await b.startService()
    await a.startService()
    d = a.send("b", "test", "x")
    assert not await until(lambda: a.connected("b") or b.got, timeout=1.5)
    assert b.got == []
    d.addErrback(lambda f: None)


@pytest_twisted.ensureDeferred
async def test_backpressure(pki, links):
    """Past max_unacked the send fails at once with Backpressure."""
    a = link(pki, "a", free_port(), max_unacked=3)
    links.append(a)
    await a.startService()
    for i in range(3):
        a.send("b", "test", i).addErrback(lambda f: None)
    with pytest.raises(Backpressure):
        await a.send("b", "test", 3)
    assert a.backlog("b", "test") == 3
