"""VMAC (keepalived's use_vmac) on a fake Netlink: the VIP lives on macvlan
``vrrp.<vrid>`` with 00:00:5e:00:01:<vrid>; config validation."""

from __future__ import annotations

import dataclasses

import pytest

from appliance.config import ConfigError, config_from_string
from tests.unit.test_vip_manager import FakeNetlink, make, result_of, vip


class VmacNetlink(FakeNetlink):
    def __init__(self):
        super().__init__()
        self.links: dict[str, str] = {}

    def ensure_macvlan(self, parent, ifname, mac):
        self.calls.append(("macvlan", parent, ifname, mac))
        created = ifname not in self.links
        self.links[ifname] = mac
        return self._result("macvlan", lambda: created)

    def delete_link(self, ifname):
        self.calls.append(("delete", ifname))
        existed = self.links.pop(ifname, None) is not None
        self.addrs.pop(ifname, None)
        return self._result("delete", lambda: existed)


def vmac_vip(vrid=51):
    return dataclasses.replace(vip(), vmac=vrid)


def make_vmac(**kw):
    mgr, _, clock = make([vmac_vip()], **kw)
    nl = VmacNetlink()
    mgr._netlink = nl
    return mgr, nl, clock


def test_acquire_creates_the_macvlan_adds_there_and_announces_from_it():
    mgr, nl, clock = make_vmac()
    mgr.startService()
    assert ("delete", "vrrp.51") in nl.calls, "a crashed run's macvlan is removed at start"
    nl.calls.clear()
    assert result_of(mgr.acquire("vip-dhcp", "test")) is True
    assert nl.calls[:3] == [("macvlan", "veth0", "vrrp.51", "00:00:5e:00:01:33"),
                            ("add", "vrrp.51", "10.9.0.100/24"),
                            ("announce", "vrrp.51", "10.9.0.100/24")]
    assert "veth0" not in nl.addrs or not nl.addrs["veth0"]
    assert mgr.ifname("vip-dhcp") == "vrrp.51"
    clock.advance(0.2)
    assert {c[1] for c in nl.calls if c[0] == "announce"} == {"vrrp.51"}


def test_release_deletes_the_macvlan_and_refresh_recreates_it():
    mgr, nl, clock = make_vmac(refresh_interval_s=1.0)
    mgr.startService()
    result_of(mgr.acquire("vip-dhcp", "test"))
    nl.links.clear()                   # someone deleted it
    nl.addrs.clear()
    clock.advance(1.0)
    assert nl.links == {"vrrp.51": "00:00:5e:00:01:33"} and mgr.stats["readded"] == 1
    assert result_of(mgr.release("vip-dhcp", "test")) is True
    assert nl.calls[-1] == ("delete", "vrrp.51") and nl.links == {}
    assert mgr.stats["released"] == 1


def test_vrid_mac_is_hex():
    assert make([vmac_vip(255)])[0].vmac_of(vmac_vip(255)) == ("vrrp.255", "00:00:5e:00:01:ff")
    assert make([vip()])[0].vmac_of(vip()) is None


CFG = """
[node]
id = "a"
state_dir = "/tmp/apl-cfg"
"""


def parse(vips):
    return config_from_string(CFG + vips, "etc/test.toml", {})


def test_vmac_config_and_key_path_errors():
    ok = parse('[[vip]]\nname = "v"\naddress = "10.0.0.5/24"\ninterface = "eth0"\n'
               'priority = { a = 100 }\nvmac = 7\n')
    assert ok.vips[0].vmac == 7
    assert parse('[[vip]]\nname = "v"\naddress = "10.0.0.5/24"\ninterface = "eth0"\n'
                 'priority = { a = 100 }\n').vips[0].vmac is None
    for body, path, words in [
        ('vmac = 0\n', "vip[0].vmac", ""),
        ('vmac = 256\n', "vip[0].vmac", ""),
        ('vmac = "51"\n', "vip[0].vmac", ""),
    ]:
        with pytest.raises(ConfigError) as bad:
            parse('[[vip]]\nname = "v"\naddress = "10.0.0.5/24"\ninterface = "eth0"\n'
                  'priority = { a = 100 }\n' + body)
        assert any(f" {path}: " in p and words in p for p in bad.value.problems), bad.value.problems
    with pytest.raises(ConfigError) as bad:
        parse('[[vip]]\nname = "v6"\naddress = "fd00::5/64"\ninterface = "eth0"\n'
              'priority = { a = 100 }\nvmac = 3\n')
    assert any(" vip[0].vmac: " in p and "IPv4" in p for p in bad.value.problems)
    with pytest.raises(ConfigError) as bad:
        parse('[[vip]]\nname = "v"\naddress = "10.0.0.5/24"\ninterface = "eth0"\n'
              'priority = { a = 100 }\nvmac = 9\n'
              '[[vip]]\nname = "w"\naddress = "10.0.0.6/24"\ninterface = "eth0"\n'
              'priority = { a = 100 }\nvmac = 9\n')
    assert any(" vip[1].vmac: " in p and "VRID 9" in p for p in bad.value.problems)
