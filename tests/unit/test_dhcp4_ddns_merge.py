"""A DDNS-only change of a lease record reaches the partner (issue 12, session 6).

The DDNS glue records what it published on the bound record (``LeaseStore.set_ddns``):
same client, cltt, state and expiry, only ``ddns`` differs.  The partner merges by
client-last-transaction time, so such an update was "stale" there (or, being kept
synced, never sent): the partner did not know the published name and, left alone
after a failover, could not remove it at expiry.  ``dv`` counts DDNS-only changes and
is the merge's last tie-break; a bound record's change is owed to the partner.
"""

from __future__ import annotations

import pytest

from services.dhcp.v4 import leases as L
from services.dhcp.v4 import pools as P
from services.dhcp.v4.leases import DDNSState, Lease
from tests.sim.dhcp4.pair import Pair, dora, macs_of
from tests.support.sync import ok


@pytest.fixture
def pair():
    p = Pair(mclt_s=30, lease_time_s=600)
    yield p
    p.close()


def test_a_ddns_only_change_of_a_bound_record_reaches_the_partner(pair):
    p = pair
    x, = macs_of(P.PRIMARY, 1)
    address, _ = dora(p.a, x)
    p.sync()
    bound = ok(p.a.leases.get(address))
    assert bound.synced and ok(p.b.leases.get(address)).ddns is None
    published = DDNSState("x.example.", address, 0, True)
    written = ok(p.a.leases.set_ddns(bound, published))
    assert written is not None and written.ddns == published
    p.sync()
    theirs = ok(p.b.leases.get(address))
    assert theirs.ddns == published, "the partner never learnt what DDNS published"
    assert theirs.client_key == bound.client_key and theirs.expires == bound.expires
    assert ok(p.a.leases.get(address)).synced          # its "stored" came back


def test_the_merge_takes_a_ddns_only_update_and_is_the_same_on_both_sides(pair):
    p = pair
    x, = macs_of(P.PRIMARY, 1)
    address, _ = dora(p.a, x)
    p.sync()
    rec = ok(p.b.leases.get(address))
    update = Lease.from_wire({**rec.to_wire(), "ddns": DDNSState("x.example.", address, 0,
                                                                   True).to_dict(),
                              "dv": rec.dv + 1})
    assert ok(p.b.leases.apply_remote(update)) == L.APPLIED
    assert ok(p.b.leases.get(address)).ddns is not None
    # the copy without it is older on either side: never undoes it
    assert ok(p.b.leases.apply_remote(Lease.from_wire(rec.to_wire()))) == L.STALE
    assert L.LeaseStore._newer(update, rec) and not L.LeaseStore._newer(rec, update)


def test_a_ddns_change_on_an_expired_record_does_not_make_it_pending_free_again(pair):
    p = pair
    x, = macs_of(P.PRIMARY, 1)
    address, _ = dora(p.a, x)
    p.sync()
    ok(p.a.leases.set_ddns(ok(p.a.leases.get(address)), DDNSState("x.example.", address, 0,
                                                                   True)))
    p.sync()
    ok(p.a.leases.release(address))
    p.sync()
    assert p.a.leases.pending_free == 0
    p.link_up = False                                   # partner unreachable
    released = ok(p.a.leases.get(address))
    ok(p.a.leases.set_ddns(released, None))             # the name was removed
    assert p.a.leases.pending_free == 0
    assert ok(p.a.leases.get(address)).synced
