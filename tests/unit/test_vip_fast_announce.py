"""A takeover's first gratuitous ARP leaves in the same netlink job as the
address add (Netlink.add_and_announce): no reactor round trip between the
two (measured with strace on a takeover in namespaces: ~1 ms of the
deadline-to-GARP path, more on a busy box)."""

from __future__ import annotations

from twisted.internet import defer

from appliance.net.netlink import NetlinkError
from tests.unit.test_vip_manager import FakeNetlink, make, result_of


class JobNetlink(FakeNetlink):
    """Counts worker jobs; has add_and_announce like the real Netlink."""

    def __init__(self, announce_error=None):
        super().__init__()
        self.announce_error = announce_error

    def add_and_announce(self, ifname, iface):
        self.calls.append(("add+announce", ifname, str(iface)))
        lst = self.addrs.setdefault(ifname, [])
        added = iface not in lst
        if added:
            lst.append(iface)
        return defer.succeed((added, self.announce_error or 2))


def test_acquire_is_one_job_up_to_the_first_announcement():
    mgr, _, clock = make(announce_count=3, announce_interval_s=0.05)
    nl = mgr._netlink = JobNetlink()
    mgr.startService()
    nl.calls.clear()
    assert result_of(mgr.acquire("vip-dhcp", "takeover")) is True
    assert nl.calls == [("add+announce", "veth0", "10.9.0.100/24")]
    assert mgr.stats["announcements"] == 1
    clock.advance(0.05)
    clock.advance(0.05)
    assert nl.calls[1:] == [("announce", "veth0", "10.9.0.100/24")] * 2   # 3 in all
    assert mgr.stats["announcements"] == 3 and mgr.stats["errors"] == 0


def test_a_failed_first_announcement_is_logged_and_sent_again_at_once():
    mgr, _, clock = make(announce_count=2)
    nl = mgr._netlink = JobNetlink(NetlinkError("announce 10.9.0.100 on veth0: Network is down"))
    mgr.startService()
    nl.calls.clear()
    assert result_of(mgr.acquire("vip-dhcp", "takeover")) is True, "the add itself worked"
    assert nl.calls[1] == ("announce", "veth0", "10.9.0.100/24")
    assert mgr.stats["errors"] == 1 and mgr.held() == {"vip-dhcp"}
