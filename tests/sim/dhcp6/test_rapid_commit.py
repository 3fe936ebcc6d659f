"""A rapid-commit SOLICIT heard by both partners (a real client multicasts it to
ff02::1:2): both commit a binding for the same DUID and IAID, the client takes the first
REPLY and never hears of the other binding.  Found by the pair simulator with lost
replies (seed 37 of ``SIM_DHCP6_BOTH_COMMIT=1 python -m tests.sim.dhcp6 --seeds 200
--duration 60``, 95 of 200 seeds failed): the merge of the partner's binding for the same
client expired the binding the client took (LeaseStore.apply_remote supersede) and gave
its address to the next client.  The fix: DHCPv6 families keep both bindings
(``Family.one_lease_per_client``)."""

from __future__ import annotations

from twisted.internet.task import Clock

from services.dhcp.failover import pools as P
from services.dhcp.v6 import codec as C
from tests.sim.dhcp6.pair import Wire, ask, msg, node
from tests.sim.dhcp6.world import T0


def _addresses(rep):
    return [C.ntop(a.address) for ia in rep.ia_na for a in ia.addresses if a.valid > 0]


def test_the_binding_the_client_took_survives_its_partners_second_commit(tmp_path):
    clock = Clock()
    clock.advance(T0)
    wire = Wire()
    a = node(tmp_path, clock, wire, "a", "b", "primary", P.NORMAL)
    b = node(tmp_path, clock, wire, "b", "a", "secondary", P.NORMAL)
    try:
        wire.pump()
        solicit = msg(C.SOLICIT, 1, na=[(1, ())], rapid_commit=True)
        taken = ask(a, solicit)                # the first REPLY: the client takes it
        clock.advance(0.01)
        other = ask(b, solicit)                # b heard the multicast too and committed
        mine, theirs = _addresses(taken), _addresses(other)
        assert mine and theirs and mine != theirs
        for _ in range(10):
            wire.pump()
            clock.advance(0.5)
        # the client uses ``mine`` for its valid lifetime: nobody else may get it
        given = []
        for client in range(2, 40):
            for svc in (a, b):
                rep = ask(svc, msg(C.SOLICIT, client, na=[(1, ())], rapid_commit=True))
                given += _addresses(rep) if rep is not None else []
            wire.pump()
        assert mine[0] not in given, f"{mine[0]} (client 1's, from a) given again"
    finally:
        for svc in (a, b):
            svc.failover.outbox = None
            svc.stopService()
            svc.context.store.stopService()
