"""appliancectl bindings: sip.bindings as a table with relative expiry."""

from __future__ import annotations

import time

from appliance.admin import ctl


def test_render_bindings_table():
    """One row per contact; expiry shown relative to now; an empty list says so."""
    text = ctl.render_bindings({"bindings": [
        {"aor": "sip:a@example.test", "contact": "sip:a@10.0.0.1", "expires": time.time() + 125,
         "q": 0.5, "call_id": "c1", "cseq": 3, "path": ["<sip:edge;lr>"],
         "received": "udp:10.0.0.1:5060"}]})
    header, row = text.splitlines()
    assert header.split() == ["AOR", "CONTACT", "EXPIRES", "Q", "CALL_ID", "CSEQ", "PATH",
                              "RECEIVED"]
    assert "sip:a@10.0.0.1" in row and "in 2m" in row and "<sip:edge;lr>" in row
    assert ctl.render_bindings({"bindings": []}) == "(no bindings)"
    assert ctl.COMMANDS["bindings"][3] is ctl.render_bindings
