"""config.reload of the DN's keys: the config carries a digest of the key files, so a
reload sees new contents at the same paths; the running DN takes the new keys
(EncapService.reconfigure -> DecapNode.update_keys): a removed EN's sessions end and
it cannot come back, a re-keyed EN must use its new key, a new ticket key gives the
ENs new tickets that the other DNs accept."""

import pytest_twisted
from twisted.internet import reactor

from services.encap import wire as W
from services.encap.service import EncapService
from tests.unit.test_encap_config import GOOD, parse
from tests.unit.test_encap_dn_en import ip_packet
from tests.unit.test_encap_en_keys import K1, K2, TICKET, en_client, keyed_net

K3 = bytes([3]) * 32


def up(net):
    net.en.start()
    net.pump()
    net.run(0.3)
    assert net.en.address is not None and net.en.confirmed
    return net


def test_a_removed_en_loses_its_sessions_and_cannot_come_back():
    net = up(keyed_net())
    a = net.en.address
    net.cut.add("dn1")                    # dn2 takes en1 over: a /32 and a table entry
    net.run(0.4)
    assert net.en.primary == "dn2" and (a + "/32") in net.routes["dn2"].routes
    net.cut.discard("dn1")
    net.run(0.1)
    without_en1 = W.KeyRing(ens={"en2": K2}, ticket_key=TICKET)
    for dn in net.dns.values():
        dn.update_keys(without_en1)
    assert all(s.en != "en1" for dn in net.dns.values() for s in dn.sessions.values())
    assert (a + "/32") not in net.routes["dn2"].routes      # given up at once
    assert net.mapping.lookup(a) is None or net.mapping.lookup(a)["dn"] != "dn2"
    net.run(1.0)
    # the EN was told (session_ended) and tried again: refused at HELLO
    assert net.en.links["dn1"].state != "up" and net.en.links["dn2"].state != "up"
    assert net.dns["dn1"].drops["unknown_en"] >= 1 and net.dns["dn2"].drops["unknown_en"] >= 1
    assert net.dns["dn2"].stats["sessions_ended_by_keys"] == 1
    # its data goes nowhere
    before = len(net.tun["dn1"]) + len(net.tun["dn2"])
    net.en.tun_packets([ip_packet(a, "10.210.0.10")])
    net.pump()
    assert len(net.tun["dn1"]) + len(net.tun["dn2"]) == before


def test_a_rekeyed_en_must_use_its_new_key():
    net = up(keyed_net())
    rekeyed = W.KeyRing(ens={"en1": K3, "en2": K2}, ticket_key=TICKET)
    for dn in net.dns.values():
        dn.update_keys(rekeyed)
    net.run(0.5)
    assert net.en.drops.get("bad_mac", 0) >= 1       # the old key no longer works
    assert not any(s.en == "en1" for dn in net.dns.values() for s in dn.sessions.values())
    # en1 restarted with its new key: served again, same address (its lease)
    a = net.en.address
    net.en.stop()
    net.en = en_client(net, "en1", K3)
    up(net)
    assert net.en.address == a


def test_unchanged_keys_keep_the_sessions_and_a_new_ticket_key_renews_the_tickets():
    net = up(keyed_net())
    sessions = {name: set(dn.sessions) for name, dn in net.dns.items()}
    old_ticket = net.en.ticket
    for dn in net.dns.values():
        dn.update_keys(W.KeyRing(ens={"en1": K1, "en2": K2}, ticket_key=TICKET))
    net.run(0.2)
    assert {name: set(dn.sessions) for name, dn in net.dns.items()} == sessions
    assert net.en.ticket == old_ticket
    new_ticket_key = bytes([7]) * 32
    for dn in net.dns.values():
        dn.update_keys(W.KeyRing(ens={"en1": K1, "en2": K2}, ticket_key=new_ticket_key))
    net.run(0.2)
    assert net.en.ticket not in (None, old_ticket)
    assert net.dns["dn2"].drops.get("address_not_yours", 0) == 0
    net.cut.add("dn1")                    # dn2 accepts the EN's claim with the new ticket
    net.run(0.4)
    assert net.en.primary == "dn2" and net.en.confirmed
    assert net.dns["dn2"].drops.get("address_not_yours", 0) == 0


def _cfg(tmp_path):
    text = GOOD.replace('psk_file = "k"', f'en_keys_file = "{tmp_path}/e"\n'
                                          f'ticket_key_file = "{tmp_path}/t"', 1)
    return parse(text).services["encap"].config


def test_the_config_changes_when_the_key_files_do(tmp_path):
    (tmp_path / "e").write_text(f"en1 {K1.hex()}\nen2 {K2.hex()}\n")
    (tmp_path / "t").write_text(TICKET.hex())
    a, b = _cfg(tmp_path), _cfg(tmp_path)
    assert a == b
    (tmp_path / "e").write_text(f"en2 {K2.hex()}\n")
    assert _cfg(tmp_path) != a


@pytest_twisted.ensureDeferred
async def test_reconfigure_takes_new_key_files_without_a_restart(tmp_path):
    (tmp_path / "e").write_text(f"en1 {K1.hex()}\nen2 {K2.hex()}\n")
    (tmp_path / "t").write_text(TICKET.hex())
    cfg = _cfg(tmp_path)
    net = up(keyed_net())
    dn = net.dns["dn1"]
    dn.config = cfg

    class Context:
        node_id = "dn1"
    Context.reactor = reactor
    svc = EncapService(cfg, Context())
    svc.dn = dn
    restarted = []
    svc.stopService = lambda: restarted.append("stop")
    (tmp_path / "e").write_text(f"en2 {K2.hex()}\n")
    new = _cfg(tmp_path)
    await svc.reconfigure(new)
    assert restarted == [] and svc.dn is dn and svc.config == new
    assert dn.keys.key_for("en1") is None and dn.keys.key_for("en2") == K2
    assert not any(s.en == "en1" for s in dn.sessions.values())
    # a key file that does not load fails the reload; the running keys stay
    (tmp_path / "e").write_text("en1 nothex\n")
    broken = _cfg(tmp_path)
    try:
        await svc.reconfigure(broken)
    except ValueError:
        pass
    else:
        raise AssertionError("a broken keys file was taken")
    assert svc.config == new and dn.keys.key_for("en2") == K2
