"""Run ``sipp`` (Debian package ``sip-tester``) scenarios against a node, on loopback.

Scenarios are written here as XML strings; :func:`run_sipp` writes one to a temp
dir, runs ``sipp`` to completion and returns a :class:`SippResult` (exit code,
successful/failed call counts from ``-trace_stat``-free stdout parsing, the
error log).  Users are unique per call: ``u[call_number]`` plus a prefix.

Used by tests/integration/test_sip_sipp.py and bench/sip.py (which must not
import pytest: nothing here does).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

HEADERS = """Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: <sip:{user}@{domain}>;tag=[pid]T[call_number]
To: <sip:{user}@{domain}>
Call-ID: [call_id]
Max-Forwards: 70"""


def _register(user: str, domain: str, cseq: int, contact: str | None, expires: str | None,
              expect: str, extra: str = "") -> str:
    lines = [f"REGISTER sip:{domain} SIP/2.0", HEADERS.format(user=user, domain=domain),
             f"CSeq: {cseq} REGISTER"]
    if contact is not None:
        lines.append(f"Contact: {contact}")
    if expires is not None:
        lines.append(f"Expires: {expires}")
    if extra:
        lines.append(extra)
    lines.append("Content-Length: 0")
    body = "\n".join(lines) + "\n\n"
    return (f'  <send retrans="500"><![CDATA[\n{body}]]></send>\n'
            f'  <recv response="{expect}"/>\n')


def _invite(user: str, domain: str, cseq: int, expect: str, contact_check: str | None = None) -> str:
    lines = [f"INVITE sip:{user}@{domain} SIP/2.0", HEADERS.format(user="caller", domain=domain),
             f"CSeq: {cseq} INVITE", "Contact: <sip:caller@[local_ip]:[local_port]>",
             "Content-Length: 0"]
    lines[1] = lines[1].replace(f"To: <sip:caller@{domain}>", f"To: <sip:{user}@{domain}>")
    body = "\n".join(lines) + "\n\n"
    action = ""
    if contact_check:
        action = (f'<action><ereg regexp="{contact_check}" search_in="hdr" header="Contact:" '
                  f'check_it="true" assign_to="dummy"/></action>')
    ack = "\n".join([f"ACK sip:{user}@{domain} SIP/2.0",
                     "[last_Via:]", "[last_From:]", "[last_To:]", "[last_Call-ID:]",
                     f"CSeq: {cseq} ACK", "Max-Forwards: 70", "Content-Length: 0"]) + "\n\n"
    return (f'  <send retrans="500"><![CDATA[\n{body}]]></send>\n'
            f'  <recv response="{expect}">{action}</recv>\n'
            f'  <send><![CDATA[\n{ack}]]></send>\n')


def scenario(name: str, steps: list[str]) -> str:
    text = "".join(steps)
    if 'assign_to="dummy"' in text:
        text += '  <Reference variables="dummy"/>\n'
    return ('<?xml version="1.0" encoding="ISO-8859-1" ?>\n'
            f'<scenario name="{name}">\n' + text + "</scenario>\n")


def register_only(domain: str = "example.test", prefix: str = "u", expires: int = 3600) -> str:
    """One REGISTER per call for a unique user, expecting 200."""
    user = f"{prefix}[call_number]"
    return scenario("register", [_register(user, domain, 1, f"<sip:{user}@[local_ip]:[local_port]>",
                                           str(expires), "200")])


def lifecycle(domain: str = "example.test", prefix: str = "life") -> str:
    """Per call (unique user): register, refresh, 423 for a too short expiry, INVITE -> 302
    with our contact (ACKed), wildcard unregister, INVITE -> 480, unknown user -> 404,
    REGISTER of an unsupported extension -> 420."""
    user = f"{prefix}[call_number]"
    contact = f"<sip:{user}@[local_ip]:[local_port]>"
    return scenario("lifecycle", [
        _register(user, domain, 1, contact, "3600", "200"),
        _register(user, domain, 2, contact, "1800", "200"),
        _register(user, domain, 3, contact, "5", "423"),
        _invite(user, domain, 1, "302", contact_check=f"sip:{prefix}[0-9]+@"),
        _register(user, domain, 4, "*", "0", "200"),
        _invite(user, domain, 2, "480"),
        _invite(f"nobody{prefix}[call_number]", domain, 3, "404"),
        _register(user, domain, 5, contact, "3600", "420", extra="Require: frobnicate"),
    ])


@dataclass
class SippResult:
    returncode: int
    successful: int
    failed: int
    stdout: str
    errors: str
    elapsed_s: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.failed == 0


_COUNT = re.compile(r"^\s*(Successful call|Failed call)\s+\|\s+\S+\s+\|\s+(\d+)", re.MULTILINE)


def sipp_binary() -> str | None:
    return shutil.which("sipp")


def run_sipp(workdir: Path, xml: str, target: str, *, calls: int, rate: float = 100,
             transport: str = "u1", limit: int = 200, timeout_s: float = 60,
             local_port: int | None = None, extra: tuple[str, ...] = ()) -> SippResult:
    """Run ``xml`` against ``target`` ("127.0.0.1:15060") for ``calls`` calls."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    sf = workdir / f"scenario-{int(time.time() * 1000)}.xml"
    sf.write_text(xml)
    cmd = [sipp_binary() or "sipp", target, "-sf", str(sf), "-m", str(calls), "-r", str(rate),
           "-l", str(limit), "-t", transport, "-i", "127.0.0.1", "-nostdin", "-trace_err",
           "-timeout", f"{int(timeout_s)}s", "-timeout_error", "-max_recv_loops", "1000",
           "-aa"]
    if local_port is not None:
        cmd += ["-p", str(local_port)]
    cmd += list(extra)
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True,
                          timeout=timeout_s + 30)
    elapsed = time.monotonic() - started
    counts = {}
    for what, n in _COUNT.findall(proc.stdout):
        counts[what] = int(n)          # the last screen wins
    errors = "".join(p.read_text(errors="replace")[-4000:] for p in workdir.glob(f"{sf.stem}*errors.log"))
    return SippResult(proc.returncode, counts.get("Successful call", 0),
                      counts.get("Failed call", 0), proc.stdout[-3000:] + proc.stderr[-2000:],
                      errors, elapsed)


def _register_auth(domain: str, cseq: int, expect: str, *, password: str | None = None,
                   auth: bool = True, check_stale: bool = False) -> str:
    # sipp 3.6 does not expand [field0] inside [authentication ...]: the user is
    # ``-s USER`` ([service]) and its password ``-ap`` (run_sipp(..., user=, password=))
    user = "[service]"
    lines = [f"REGISTER sip:{domain} SIP/2.0", HEADERS.format(user=user, domain=domain),
             f"CSeq: {cseq} REGISTER", f"Contact: <sip:{user}@[local_ip]:[local_port]>",
             "Expires: 3600"]
    if auth:
        lines.append("[authentication]" if password is None else
                     f"[authentication password={password}]")
    lines.append("Content-Length: 0")
    body = "\n".join(lines) + "\n\n"
    recv_auth = ' auth="true"' if expect == "401" else ""
    action = ""
    if check_stale:
        action = ('<action><ereg regexp="stale=true" search_in="hdr" header="WWW-Authenticate:" '
                  'check_it="true" assign_to="dummy"/></action>')
    return (f'  <send retrans="500"><![CDATA[\n{body}]]></send>\n'
            f'  <recv response="{expect}"{recv_auth}>{action}</recv>\n')


def auth_success(domain: str = "example.test") -> str:
    """REGISTER -> 401 challenge -> REGISTER with digest (MD5, qop=auth) -> 200, as the
    user given to run_sipp (``-s``/``-au``/``-ap``)."""
    return scenario("auth-ok", [_register_auth(domain, 1, "401", auth=False),
                                _register_auth(domain, 2, "200")])


def auth_wrong_password(domain: str = "example.test") -> str:
    """REGISTER -> 401 -> REGISTER with a wrong password -> 401 again."""
    return scenario("auth-wrong", [_register_auth(domain, 1, "401", auth=False),
                                   _register_auth(domain, 2, "401", password="wrong")])


def auth_stale(domain: str = "example.test", wait_ms: int = 2500) -> str:
    """REGISTER -> 401; wait past the nonce lifetime; the answer to the old nonce is
    401 with stale=true; answering the new nonce -> 200."""
    return scenario("auth-stale", [
        _register_auth(domain, 1, "401", auth=False),
        f'  <pause milliseconds="{wait_ms}"/>\n',
        _register_auth(domain, 2, "401", check_stale=True),
        _register_auth(domain, 3, "200"),
    ])


def user_args(user: str, password: str) -> tuple[str, ...]:
    """sipp options making every call act as ``user`` with ``password`` (digest)."""
    return ("-s", user, "-au", user, "-ap", password)
