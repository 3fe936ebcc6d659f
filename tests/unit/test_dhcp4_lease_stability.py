"""Lease stability after PARTNER-DOWN / RECOVER (issue 12, simulator seed 7609).

Seed 7609: b ran a confirmed PARTNER-DOWN and offered one of a's addresses to client
Q; a recovered and went NORMAL, offered the same (to it free) address to client P;
b, NORMAL by now, bound its old offer to Q.  When b's record reached a, a kept its
own in-memory offer to P, and Q's rebind at a was NAKed ("offered to another
client") while Q's lease ran.  Two rules now:

* a partner's binding that reaches us ends our offer of that address to another
  client (an offer promises nothing; the binding is a lease);
* an offer made in PARTNER-DOWN on the partner's address is no licence to bind it
  once we left PARTNER-DOWN (the partner may give the address itself now): the
  REQUEST is refused and the pending offer is not made again.
"""

from __future__ import annotations

import pytest

from services.dhcp.v4 import codec as C
from services.dhcp.v4 import leases as L
from services.dhcp.v4 import pools as P
from tests.sim.dhcp4.pair import (SERVER_IDS, Pair, discover, dora, macs_of, request)
from tests.support.sync import ok

M = L.MAX_SKEW_S


@pytest.fixture
def pair():
    made = []

    def make(**kw):
        p = Pair(**kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def test_the_partners_binding_ends_our_offer_so_its_client_can_rebind(pair):
    p = pair(mclt_s=10, lease_time_s=60, mode="load-balancing")
    P_, = macs_of(P.PRIMARY, 1)
    Q, = macs_of(P.SECONDARY, 1, start=500)
    offer = p.a.handle(discover(P_))
    assert offer is not None and offer.message_type == C.OFFER
    x = str(offer.yiaddr)
    # meanwhile b (it ran PARTNER-DOWN on a's addresses) binds x to Q; its record
    # reaches a
    p.link_up = False
    p.b.set_state(P.COMM_INTERRUPTED)
    ok(p.b.leases.bind(1, x, Q, lease_time_s=60, roles=None))
    p.link_up = True
    p.sync()
    assert ok(p.a.leases.get(x)).client_key == "hw:" + Q.hex(":")
    # Q rebinds (broadcast, ciaddr = x); a answers: never a NAK while Q's lease runs
    p.clock.advance(10)                 # (a's offer to P would run 30 s)
    reply = p.a.handle(request(Q, ciaddr=x, secs=30))
    assert reply is None or reply.message_type == C.ACK, \
        "a NAKed the rebind of the partner's client: its own offer to P stood in the way"
    # and P's REQUEST for the offer is refused (x is Q's), never ACKed
    ack = p.a.handle(request(P_, requested=x, server=SERVER_IDS["a"]))
    assert ack is None or ack.message_type != C.ACK


def test_an_offer_made_in_partner_down_is_not_bound_after_it(pair):
    """b offers a's address to Q in a confirmed PARTNER-DOWN; the partner returns
    before Q's REQUEST.  b must not bind it: a, caught up and NORMAL, may give the
    address itself before b's update arrives (one address, two clients)."""
    p = pair(mclt_s=4, lease_time_s=60, pool=("10.9.0.10", "10.9.0.13"))
    # b's own segment (.12, .13) is in use
    for i, hw_ in enumerate(macs_of(P.SECONDARY, 2, start=300)):
        assert dora(p.b, hw_) is not None
    p.sync()
    p.a.crash()
    p.b.set_state(P.COMM_INTERRUPTED)
    p.b.set_state(P.PARTNER_DOWN, confirmed=True)
    p.clock.advance(4 + M + 1)
    Q, = macs_of(P.SECONDARY, 1, start=600)
    offer = p.b.handle(discover(Q))
    assert offer is not None and offer.message_type == C.OFFER
    x = str(offer.yiaddr)
    assert p.b.leases.segment_role(x) == P.PRIMARY          # a's address
    # a comes back (disk kept), both NORMAL and caught up
    p.a.start(state=P.STARTUP)
    p.a.set_state(P.NORMAL)
    p.b.set_state(P.NORMAL)
    p.sync()
    assert p.a.view.state == P.NORMAL and p.b.view.state == P.NORMAL
    ack = p.b.handle(request(Q, requested=x, server=SERVER_IDS["b"]))
    assert ack is None or ack.message_type != C.ACK, \
        "b bound a's address on an offer made in PARTNER-DOWN after it left PARTNER-DOWN"
    # its next DISCOVER does not get the old offer again
    again = p.b.handle(discover(Q))
    assert again is None or p.b.leases.segment_role(str(again.yiaddr)) == P.SECONDARY
