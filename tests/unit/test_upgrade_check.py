"""appliancectl upgrade-check (issue 17): the checks of a rolling upgrade's two waits,
from the node's cluster.status and sip.stats answers (this release's and the previous
release's shapes)."""

from __future__ import annotations

import io
import json

import pytest

from appliance.admin import ctl
from appliance.upgrade import checks, render


def status(**kw):
    base = {"node": "b", "maintenance": True,
            "peers": {"a": {"alive": True, "state": "PARTNER-DOWN"}},
            "resources": {"vip1": {"owner": "a", "epoch": 3}},
            "partners": {"a": "NORMAL"},
            "peer_link": {"a": {"connected": True, "backlog": 0, "inbox": 0}},
            "drops": {}}
    base.update(kw)
    return base


def failing(results):
    return [name for name, ok, _ in results if not ok]


def test_safe_to_stop_only_in_maintenance_owning_nothing_owing_nothing():
    """Each unmet condition of the stop phase is named; all met: ready."""
    assert failing(checks("stop", status(), None)) == []
    assert failing(checks("stop", status(maintenance=False), None)) == ["maintenance"]
    assert failing(checks("stop", status(resources={"vip1": {"owner": "b"}}), None)) == \
        ["owns nothing"]
    assert failing(checks("stop", status(peers={"a": {"alive": False}}), None)) == \
        ["peers heard"]
    assert failing(checks("stop", status(peer_link={"a": {"connected": True, "backlog": 4,
                                                          "inbox": 0}}), None)) == \
        ["peer link a"]
    sip = {"replication": {"backlog": {"a": 2}, "full_resync_needed": {}, "peer_bindings": {}}}
    assert failing(checks("stop", status(), sip)) == ["sip replication"]


def test_rejoined_needs_normal_partners_caught_up_sip_and_readable_versions():
    """RECOVER, dhcp4 not yet NORMAL in its own view, a SIP resync in progress or
    heartbeats dropped for their wire version keep --rejoined waiting."""
    sip_ok = {"replication": {"backlog": {"a": 0}, "full_resync_needed": {"a": False},
                              "peer_bindings": {"a": 12}}}
    up = status(maintenance=False, resources={"vip1": {"owner": "b"}})
    assert failing(checks("rejoined", up, sip_ok)) == []
    assert failing(checks("rejoined", status(partners={"a": "RECOVER"}), sip_ok)) == \
        ["partners NORMAL"]
    assert failing(checks("rejoined", status(drops={"bad_version": 3}), sip_ok)) == \
        ["wire versions"]
    unsynced = {"replication": {"backlog": {"a": 0}, "full_resync_needed": {"a": False},
                                "peer_bindings": {"a": None}}}
    assert failing(checks("rejoined", status(), unsynced)) == ["sip replication"]
    dhcp4 = {"scopes": [], "failover": {"peer": "a", "role": "secondary",
                                        "state": "COMMUNICATIONS-INTERRUPTED"}}
    assert failing(checks("rejoined", up, sip_ok, dhcp4)) == ["dhcp4 failover"]
    dhcp4["failover"]["state"] = "NORMAL"
    assert failing(checks("rejoined", up, sip_ok, dhcp4)) == []
    assert failing(checks("rejoined", up, sip_ok, {"scopes": [], "failover": None})) == []
    text = render("rejoined", checks("rejoined", status(partners={"a": "RECOVER"}), sip_ok))
    assert "WAIT  partners NORMAL" in text and text.endswith("not yet: rejoined")


def test_the_previous_release_status_shape_works():
    """33b2f38's cluster.status has no peer-link version: the checks still run."""
    old = status()
    assert "version" not in old["peer_link"]["a"]
    results = checks("stop", old, None)
    assert failing(results) == [] and render("stop", results).endswith("safe to stop this node")
    with pytest.raises(ValueError):
        checks("later", old, None)


def test_ctl_upgrade_check_exit_status_and_no_sip(monkeypatch):
    """The command: exit 0 when ready, 1 when not; a node without SIP (-32601) is fine."""
    answers = {"cluster.status": status()}

    def call(self, method, params=None):
        if method not in answers:
            raise ctl.CtlError(f"{method}: Method not found (-32601)")
        return answers[method]

    monkeypatch.setattr(ctl.Client, "call", call)
    base = ["--url", "http://127.0.0.1:1/rpc", "--token-file", __file__]
    out = io.StringIO()
    assert ctl.main(base + ["upgrade-check"], stdout=out, stderr=io.StringIO()) == 0
    assert "safe to stop this node" in out.getvalue()
    answers["cluster.status"] = status(maintenance=False)
    out = io.StringIO()
    assert ctl.main(base + ["--json", "upgrade-check"], stdout=out, stderr=io.StringIO()) == 1
    got = json.loads(out.getvalue())
    assert got["ready"] is False and got["checks"][0] == {
        "check": "maintenance", "ok": False,
        "detail": "off: run `appliancectl maintenance on` first"}
