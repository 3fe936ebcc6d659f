"""[services.encap] parsing: a good table, and each mistake reported with its key path;
the EN's config file; the EN fails over at once on an ICMP port-unreachable."""

import pytest

from appliance.config import ConfigError, config_from_string
from services.encap.en import ENConfigError, load_config
from services.encap.plugin import encap_plugin

HEAD = """
[node]
id = "dn1"
state_dir = "/tmp/x"
[admin]
listen = "tcp:8740:interface=127.0.0.1"
token_file = "/tmp/x/t"
"""

GOOD = HEAD + """
[services.encap]
psk_file = "k"
esr_gateway = "10.99.0.254"
[[services.encap.nodes]]
id = "dn1"
subnet = "10.200.0.0/24"
secondaries = ["dn2"]
[[services.encap.nodes]]
id = "dn2"
subnet = "10.200.1.0/24"
secondaries = ["dn1"]
"""


def parse(text):
    return config_from_string(text, "etc/t.toml", plugins={"encap": encap_plugin})


def test_good_table():
    """Defaults filled in; the node list as written."""
    cfg = parse(GOOD).services["encap"].config
    assert cfg.port == 7400 and cfg.tun == "encap0" and cfg.slice_prefixlen == 26
    assert [n.id for n in cfg.nodes] == ["dn1", "dn2"] and cfg.esr_gateway == "10.99.0.254"


@pytest.mark.parametrize("change, message", [
    (('secondaries = ["dn2"]', 'secondaries = ["dn3"]'), 'secondary "dn3" is not another DN'),
    (('subnet = "10.200.1.0/24"', 'subnet = "10.200.0.0/23"'), "overlap"),
    (('id = "dn1"\nsubnet', 'id = "dnX"\nsubnet'), 'this node ("dn1") is not in the list'),
    (('psk_file = "k"', 'psk_file = "k"\ntun = "a very long name!"'), "is not an interface name"),
    (('psk_file = "k"', 'psk_file = "k"\nslice_prefixlen = 33'), "slice_prefixlen"),
    (('psk_file = "k"', 'psk_file = "k"\nbogus = 1'), "unknown key"),
])
def test_mistakes_are_reported_with_their_key_path(change, message):
    """Each mistake names services.encap... and says what is wrong."""
    with pytest.raises(ConfigError) as e:
        parse(GOOD.replace(*change, 1))
    text = str(e.value)
    assert "etc/t.toml: services.encap" in text and message in text, text


def test_too_many_secondaries_for_the_slices():
    """Four /26 slices cannot back five secondaries."""
    text = GOOD.replace('psk_file = "k"', 'psk_file = "k"\nslice_prefixlen = 25')
    text = text.replace('secondaries = ["dn2"]', 'secondaries = ["dn2", "dn2", "dn2"]', 1)
    with pytest.raises(ConfigError) as e:
        parse(text)
    assert "only 2 /25 slice(s)" in str(e.value)


def test_en_config(tmp_path):
    """The EN's file: good one loads; bad ones list every problem with the file name."""
    good = tmp_path / "en.toml"
    good.write_text('[en]\nid = "en1"\npsk_file = "k"\nroutes = ["10.210.0.0/24"]\n'
                    '[[en.dns]]\nid = "dn1"\naddress = "10.99.0.1"\n')
    cfg = load_config(str(good))
    assert cfg.dns[0].port == 7400 and cfg.routes == ("10.210.0.0/24",)
    bad = tmp_path / "bad.toml"
    bad.write_text('[en]\nid = ""\nroutes = ["x"]\nextra = 1\n')
    with pytest.raises(ENConfigError) as e:
        load_config(str(bad))
    text = str(e.value)
    for part in ("en.id", "en.psk_file", "en.dns", "en.routes[0]", "en.extra: unknown key"):
        assert part in text, text


def test_icmp_unreachable_fails_over_at_once():
    """An ICMP port-unreachable from the primary moves the EN without waiting for keepalives."""
    from tests.unit.test_encap_dn_en import started
    net = started()
    assert net.en.primary == "dn1"
    net.en.refused("dn1")
    assert net.en.primary == "dn2" and net.en.stats["icmp_unreachable"] == 1
    net.pump()
    assert net.en.confirmed
