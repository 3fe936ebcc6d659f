"""Per-EN keys: the handshake binds an EN id to its own key, and a DN accepts an EN's
claim to an address only with the ticket the address's home DN gave that EN.

Attacks, each refused and counted by the DN: an EN with a valid key for another id
(``bad_mac``), an id without a key (``unknown_en``), and an authenticated EN
claiming another EN's address at a secondary, with no ticket or with the other EN's
ticket (``address_not_yours``).  The single-PSK lab mode keeps working."""

import ipaddress

import pytest

from appliance.config import ConfigError
from services.encap import wire as W
from services.encap.dn import DecapNode
from services.encap.en import DNEntry, ENClient, ENConfig
from tests.unit.test_encap_config import GOOD, parse
from tests.unit.test_encap_dn_en import Net, StubMapping

K1, K2, TICKET = bytes([1]) * 32, bytes([2]) * 32, bytes([9]) * 32


def ring():
    return W.KeyRing(ens={"en1": K1, "en2": K2}, ticket_key=TICKET)


def keyed_net(en_id="en1", en_key=K1):
    """Net (tests/unit/test_encap_dn_en.py) whose DNs use per-EN keys."""
    net = Net()
    net.mapping = StubMapping()
    keys = ring()
    for name in ("dn1", "dn2"):
        dn = DecapNode(net.clock, net.cfg, name, keys,
                       send=lambda data, addr, name=name: net.queue.append((name, "en", data)),
                       tun_write=lambda ps, name=name: net.tun[name].extend(ps) or len(ps),
                       mapping=net.mapping, routes=net.routes[name])
        net.mapping.watch(dn.mapping_changed)
        net.dns[name] = dn
    net.en = en_client(net, en_id, en_key)
    return net


def en_client(net, en_id, key):
    return ENClient(net.clock, ENConfig(en_id, "k", (DNEntry("dn1", "10.99.0.1"),
                                                     DNEntry("dn2", "10.99.0.2")),
                                        keepalive_ms=50, dead_after=4),
                    key, send=lambda dn, data: net.queue.append(("en", dn, data)),
                    tun_write=lambda ps: net.tun["en"].extend(ps) or len(ps))


def test_an_en_with_its_own_key_gets_an_address_and_a_ticket_and_fails_over():
    """en1 with its key: address and ticket from dn1, dn2 accepts it as secondary and
    takes it over when dn1 goes silent."""
    net = keyed_net()
    net.en.start()
    net.pump()
    net.run(0.2)
    a = net.en.address
    assert a is not None and net.en.ticket == ring().ticket("en1", a, "dn1")
    assert not any("address_not_yours" in dn.drops for dn in net.dns.values())
    net.cut.add("dn1")
    net.run(0.4)
    assert net.en.primary == "dn2" and net.en.confirmed
    assert net.mapping.lookup(a)["dn"] == "dn2"


def test_a_valid_key_for_another_id_is_refused_and_counted():
    """An EN holding en1's key says it is en2: the DN's CHALLENGE (under en2's key) does
    not verify at the EN, and a CONFIRM made with en1's key is a counted bad_mac at the
    DN: no session for en2."""
    net = keyed_net(en_id="en2", en_key=K1)
    net.en.start()
    net.pump()
    net.run(0.3)
    assert net.en.address is None
    assert all(not dn.sessions for dn in net.dns.values())
    dn = net.dns["dn1"]
    # the attacker ignores the CHALLENGE's MAC and answers with what its key gives
    sent = []
    dn.send = lambda data, addr: sent.append(data)
    ini = W.Initiator(K1, "en2")
    dn.datagram(ini.hello(), ("10.99.0.66", 4000))
    ch = W.decode(sent[-1])
    script = W.transcript(ini.nonce, ch.nonce, "en2", ch.ident, ini.index, ch.sender)
    dn.datagram(W.Confirm(ch.sender, W.handshake_mac(K1, b"I", script)).encode(),
                ("10.99.0.66", 4000))
    assert dn.drops.get("bad_mac", 0) >= 1 and not dn.sessions


def test_a_forged_id_is_refused_at_hello_and_counted():
    """An id without a key in the keys file gets no CHALLENGE at all."""
    net = keyed_net()
    dn = net.dns["dn1"]
    sent = []
    dn.send = lambda data, addr: sent.append(data)
    dn.datagram(W.Initiator(K1, "mallory").hello(), ("10.99.0.66", 4000))
    assert sent == [] and dn.drops["unknown_en"] == 1 and not dn.responder.pending


def _session(net, dn_name, en_id, key):
    """A real session of ``en_id`` at ``dn_name``; returns (session, send(msg))."""
    dn = net.dns[dn_name]
    sent = []
    dn.send = lambda data, addr: sent.append(data)
    ini = W.Initiator(key, en_id)
    dn.datagram(ini.hello(), ("10.99.0.77", 5000))
    confirm, keys, _ = ini.challenged(W.decode(sent[-1]))
    dn.datagram(confirm, ("10.99.0.77", 5000))
    s = next(x for x in dn.sessions.values() if x.en == en_id)

    def send(msg):
        dn.datagram(keys.seal(W.control_plain(msg)), ("10.99.0.77", 5000))
    return s, send, sent, keys


def test_an_en_cannot_claim_another_ens_address_at_a_secondary():
    """en2, authenticated with its own key, tells dn2 it holds en1's address (as a
    secondary info, then as a primary info that would make dn2 take the address over):
    without a ticket, with en1's ticket, or with a ticket of another address -- refused
    with error address_not_yours and counted; dn2 neither routes nor claims it.  en1's
    own claim with its ticket is accepted."""
    net = keyed_net()
    net.cut.add("dn2")                  # en1 talks to dn1 only, for now
    net.en.start()
    net.pump()
    net.run(0.2)
    a = net.en.address
    t1 = net.en.ticket
    other = str(ipaddress.ip_address(a) + 1)
    dn2 = net.dns["dn2"]
    s, send, sent, keys = _session(net, "dn2", "en2", K2)
    before_routes = dict(net.routes["dn2"].routes)
    for ticket in (None, t1, ring().ticket("en2", other, "dn1")):
        for role in ("secondary", "primary"):
            msg = {"t": "info", "en": "en2", "role": role, "dns": ["dn1", "dn2"],
                   "address": a, "primary": "dn1"}
            if ticket is not None:
                msg["ticket"] = ticket
            send(msg)
            net.clock.advance(0)
    assert dn2.drops["address_not_yours"] == 6 and s.drops["address_not_yours"] == 6
    errors = [W.parse_inner(keys.open(W.decode(d)))[1] for d in sent
              if d[:1] == bytes([W.T_RECORD])]
    assert [e["reason"] for e in errors if e.get("t") == "error"] == ["address_not_yours"] * 6
    assert s.address is None and dn2.by_address.get(ipaddress.ip_address(a).packed) is not s
    assert net.routes["dn2"].routes == before_routes
    assert net.mapping.lookup(a) is None or net.mapping.lookup(a)["dn"] != "dn2"
    # the rightful EN, with its ticket: accepted
    dn2.send = lambda data, addr: net.queue.append(("dn2", "en", data))
    net.cut.discard("dn2")
    net.run(0.5)
    s1 = next(x for x in dn2.sessions.values() if x.en == "en1")
    assert s1.address == a and s1.role == "secondary"
    assert dn2.drops["address_not_yours"] == 6


def test_single_psk_mode_still_works_without_tickets():
    """One key for every EN (the lab mode): no tickets, any id with the key is served."""
    net = Net()
    net.en.start()
    net.pump()
    net.run(0.2)
    assert net.en.address is not None and net.en.ticket is None
    assert "address_not_yours" not in net.dns["dn2"].drops


def test_en_keys_file_and_directory(tmp_path):
    """``en-id hex-key`` lines with comments, or one file per EN; mistakes name the
    file and line."""
    f = tmp_path / "en.keys"
    f.write_text(f"# ENs\nen1 {K1.hex()}\n\nen2   {K2.hex()}  # the second\n")
    assert W.load_en_keys(str(f)) == {"en1": K1, "en2": K2}
    d = tmp_path / "keys.d"
    d.mkdir()
    (d / "en1").write_text(K1.hex() + "\n")
    (d / ".hidden").write_text("x")
    assert W.load_en_keys(str(d)) == {"en1": K1}
    for text, message in ((f"en1 {K1.hex()}\nen1 {K2.hex()}\n", ":2: en1 appears twice"),
                          ("en1 abcd\n", ":1: the key of en1 has fewer than 32 bytes"),
                          ("en1\n", ":1: expected 'en-id hex-key'"),
                          (f"en1 {'zz' * 32}\n", ":1: the key of en1 is not hex")):
        f.write_text(text)
        with pytest.raises(ValueError, match=message):
            W.load_en_keys(str(f))


def test_keyring_local_keys_never_shadow_an_en():
    """The watchdog probe's in-process key: random, stable, never an EN's id."""
    keys = ring()
    k = keys.local("fd-dn1")
    assert keys.local("fd-dn1") == k and keys.key_for("fd-dn1") == k and len(k) == 32
    with pytest.raises(ValueError):
        keys.local("en1")
    assert W.KeyRing(psk=K1).local("fd-dn1") == K1


@pytest.mark.parametrize("change, message", [
    (('psk_file = "k"', 'en_keys_file = "e"'), "ticket_key_file: missing"),
    (('psk_file = "k"', 'psk_file = "k"\nen_keys_file = "e"\nticket_key_file = "t"'),
     "exclude each other"),
    (('psk_file = "k"', 'psk_file = "k"\nticket_key_file = "t"'), "only with en_keys_file"),
    (('psk_file = "k"', 'port = 7400'), "needs psk_file"),
])
def test_key_config_mistakes(change, message):
    with pytest.raises(ConfigError) as e:
        parse(GOOD.replace(*change, 1))
    assert message in str(e.value), str(e.value)


def test_per_en_key_config(tmp_path):
    """en_keys_file + ticket_key_file parse and load into a per-EN KeyRing."""
    from services.encap.config import load_keys
    (tmp_path / "e").write_text(f"en1 {K1.hex()}\n")
    (tmp_path / "t").write_text(TICKET.hex())
    cfg = parse(GOOD.replace('psk_file = "k"', f'en_keys_file = "{tmp_path}/e"\n'
                                               f'ticket_key_file = "{tmp_path}/t"', 1)
                ).services["encap"].config
    keys = load_keys(cfg)
    assert keys.per_en and keys.key_for("en1") == K1 and keys.key_for("en2") is None
    assert keys.ticket("en1", "10.200.0.2", "dn1") == ring().ticket("en1", "10.200.0.2", "dn1")
