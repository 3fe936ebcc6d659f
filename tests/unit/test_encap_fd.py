"""The DN watchdog: reactor lag, TUN errors and a silent data path make the DN
unhealthy after fail_after rounds; it restarts the DN with a doubling backoff
and flags the DN's slice resources unable in the cluster's health."""

from types import SimpleNamespace

from twisted.internet.task import Clock

from services.encap.config import WatchdogConfig
from services.encap.fd import Watchdog


def fake_service(node_id="dn1"):
    tun = SimpleNamespace(fd=5, stats={"rx_errors": 0, "tx_errors": 0}, last_error=None,
                          broken=None)
    health = SimpleNamespace(unable={})
    cluster = SimpleNamespace(health=health, changes=0)
    cluster.changed = lambda: setattr(cluster, "changes", cluster.changes + 1)
    return SimpleNamespace(tun=tun, udp=None, context=SimpleNamespace(cluster=cluster,
                                                                       node_id=node_id),
                           _resources=["encap:dn1:10.200.0.0/26", "encap:dn2:10.200.1.0/26"])


def make(clock, svc, restarts):
    cfg = WatchdogConfig(interval_s=0.5, max_lag_s=1.0, fail_after=3, restart_backoff_s=1.0,
                         restart_backoff_max_s=4.0)
    wd = Watchdog(clock, svc, cfg, restart=lambda: restarts.append(clock.seconds()), probe=False)
    wd.start()
    return wd


def test_tun_errors_make_the_dn_unhealthy_then_restart_with_backoff():
    """New TUN errors three rounds in a row: unhealthy, unable:<own slices>, restarts
    after a backoff of 1 s, then 2 s, 4 s, 4 s (capped)."""
    clock, svc, restarts = Clock(), fake_service(), []
    wd = make(clock, svc, restarts)
    for _ in range(2):
        svc.tun.stats["tx_errors"] += 1
        clock.advance(0.5)
    assert wd.healthy                       # the first round only sets the baseline
    for _ in range(2):
        svc.tun.stats["tx_errors"] += 1
        clock.advance(0.5)
    assert not wd.healthy and "tun_errors" in wd.reasons[0]
    assert list(svc.context.cluster.health.unable) == ["encap:dn1:10.200.0.0/26"]
    clock.advance(1.0)
    assert len(restarts) == 1
    gaps = []
    for _ in range(3):
        wd.healthy = True                   # it came back, and breaks again
        t0 = clock.seconds()
        for _ in range(3):
            svc.tun.stats["rx_errors"] += 1
            clock.advance(0.5)
        n = len(restarts)
        while len(restarts) == n:
            clock.advance(0.5)
        gaps.append(restarts[-1] - t0)
    assert gaps == [1.5 + 2.0, 1.5 + 4.0, 1.5 + 4.0]   # three strikes, then 2 s, 4 s, 4 s
    assert wd.backoff == 4.0                # capped


def test_reactor_lag_counts_and_recovery_clears_the_flag():
    """A timer firing seconds late is a strike; healthy rounds clear unable flags."""
    clock, svc, restarts = Clock(), fake_service(), []
    wd = make(clock, svc, restarts)
    for _ in range(3):
        clock.advance(3.0)                  # each round 2.5 s late
    assert not wd.healthy and wd.reasons[0].startswith("reactor_lag")
    clock.advance(1.0)
    assert restarts
    for _ in range(2):
        clock.advance(0.5)
    assert wd.healthy and svc.context.cluster.health.unable == {}


def test_healthy_dn_is_left_alone():
    """No findings: no restart, no flags."""
    clock, svc, restarts = Clock(), fake_service(), []
    wd = make(clock, svc, restarts)
    for _ in range(20):
        clock.advance(0.5)
    assert wd.healthy and not restarts and svc.context.cluster.changes == 0


def test_a_broken_tun_is_a_strike_every_round_until_restarted():
    """One fatal TUN error (device gone) keeps the DN unhealthy without more traffic."""
    clock, svc, restarts = Clock(), fake_service(), []
    wd = make(clock, svc, restarts)
    svc.tun.broken = "write: File descriptor in bad state"
    for _ in range(3):
        clock.advance(0.5)
    assert not wd.healthy and wd.reasons == ["tun_broken (write: File descriptor in bad state)"]
    clock.advance(1.0)
    assert len(restarts) == 1
