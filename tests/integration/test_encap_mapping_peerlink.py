"""MappingTable on embedded stores, replicated over the real peer link (mutual
TLS on loopback): the path the table takes to the ESR node when the store is
not shared.  Claims made before the link is up arrive with the full sync at
link-up; later claims and releases arrive one by one; a node that was away
(its link down while the table changed) catches up at reconnect."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from appliance.store.embedded import EmbeddedStore
from services.encap.mapping import MappingTable
from tests.integration.test_peerlink import free_port, link, pki, until  # noqa: F401

pytestmark = pytest.mark.integration


@pytest_twisted.ensureDeferred
async def test_table_reaches_the_peer_over_the_peer_link(pki, tmp_path):  # noqa: F811
    port = free_port()
    la, lb = link(pki, "a", port), link(pki, "b", port)
    sa = EmbeddedStore(reactor, state_dir=tmp_path / "a")
    sb = EmbeddedStore(reactor, state_dir=tmp_path / "b")
    await sa.startService()
    await sb.startService()
    ta = MappingTable(reactor, sa, "a", link=la)
    tb = MappingTable(reactor, sb, "b", link=lb)
    assert ta.replicating and ta.peers == ("b",)
    seen = []
    tb.watch(lambda t, e: seen.append((t, e and e["dn"])))
    try:
        await ta.start()
        await tb.start()
        await ta.claim("10.200.0.64/26", "a", "before the link")
        await lb.startService()
        await la.startService()
        assert await until(lambda: tb.lookup("10.200.0.64/26") is not None)
        assert tb.lookup("10.200.0.64/26") == ta.lookup("10.200.0.64/26")

        await ta.claim("10.200.0.5", "a", "host")
        assert await until(lambda: tb.lookup("10.200.0.5") is not None)
        assert await ta.release("10.200.0.5", "a") is True
        assert await until(lambda: tb.lookup("10.200.0.5") is None)
        assert seen == [("10.200.0.64/26", "a"), ("10.200.0.5", "a"), ("10.200.0.5", None)]

        # b goes away (its table and link stop); a changes the table; b restarts (a new
        # table on the same store, a new link incarnation) and catches up at link-up
        tb.stop()
        await lb.stopService()
        await ta.claim("10.200.0.64/26", "a2", "moved while b was away")
        await ta.claim("10.200.0.6", "a", "new while b was away")
        lb2 = link(pki, "b", port, inc=2)
        tb2 = MappingTable(reactor, sb, "b", link=lb2)
        await tb2.start()
        assert tb2.lookup("10.200.0.6") is None
        await lb2.startService()
        assert await until(lambda: tb2.entries() == ta.entries(), timeout=10)
        assert tb2.lookup("10.200.0.64/26")["dn"] == "a2"
        assert tb2.lookup("10.200.0.64/26")["epoch"] == 2
        tb2.stop()
        await lb2.stopService()
    finally:
        ta.stop()
        tb.stop()
        for pl in (la, lb):
            if pl.running:
                await pl.stopService()
        await defer.maybeDeferred(sa.stopService)
        await defer.maybeDeferred(sb.stopService)
