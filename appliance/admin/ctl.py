"""``appliancectl``: the admin client (JSON-RPC 2.0 over HTTP(S), stdlib only, no reactor).

::

    appliancectl [--config PATH | --url URL --token-file F] [--json] [--timeout S]
                 [--ca F --cert F --key F] COMMAND ...

With ``--config`` (default ``etc/appliance.toml`` when it exists in the current
directory) the URL, token file and client CA come from the node's ``[admin]``
section.  Global options may also follow the command (``appliancectl status --json``).

Exit status: 0 ok; 1 the node answered with an error; 2 usage error (bad
arguments, bad JSON, unreadable config or token file); 3 the node could not be
reached, refused the TLS handshake or the token.  Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import ssl
import sys
from typing import Any, Callable, Sequence, TextIO
from urllib.parse import unquote, urlsplit

__all__ = ["main", "CtlError", "Client", "format_table", "render", "render_status",
           "describe_error", "fmt_duration", "EXIT_OK", "EXIT_RPC_ERROR", "EXIT_USAGE",
           "EXIT_UNREACHABLE"]

PROG = "appliancectl"
DEFAULT_CONFIG = "etc/appliance.toml"
EXIT_OK = 0
EXIT_RPC_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


class CtlError(Exception):
    """A one-line failure and the exit status it maps to."""

    def __init__(self, message: str, exit_code: int = EXIT_RPC_ERROR):
        super().__init__(_one_line(message))
        self.exit_code = exit_code


def _one_line(text: str) -> str:
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:] if text else text


# ----------------------------------------------------------------------
# the HTTP client
# ----------------------------------------------------------------------
class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def describe_error(method: str, error: Any) -> str:
    """One line for a JSON-RPC error object.

    Application errors (-32099..-32000) show ``data.reason``; the others show
    the message, the reason if any, and the code.
    """
    if not isinstance(error, dict):
        return f"{method}: malformed error {error!r}"
    code = error.get("code")
    message = str(error.get("message") or "error")
    data = error.get("data")
    reason = data.get("reason") if isinstance(data, dict) else None
    if reason and isinstance(code, int) and -32099 <= code <= -32000:
        return _one_line(f"{method}: {reason}")
    if reason and str(reason) not in message:
        return _one_line(f"{method}: {message}: {reason} ({code})")
    return _one_line(f"{method}: {message} ({code})")


class Client:
    """Synchronous JSON-RPC client for one admin URL."""

    def __init__(self, url: str, token: str, *, timeout: float = 10.0, ca: str | None = None,
                 cert: str | None = None, key: str | None = None):
        self.url = url
        self.token = token
        self.timeout = timeout
        parts = urlsplit(url)
        self.scheme = parts.scheme
        if self.scheme not in ("http", "https", "http+unix"):
            raise CtlError(f"unsupported URL {url!r} (use http://, https:// or http+unix://)",
                           EXIT_USAGE)
        if not parts.hostname and self.scheme != "http+unix":
            raise CtlError(f"URL {url!r} has no host", EXIT_USAGE)
        self._parts = parts
        self.path = parts.path or "/rpc"
        if parts.query:
            self.path += "?" + parts.query
        self._context = None
        if self.scheme == "https":
            self._context = self._tls_context(ca, cert, key)
        elif cert or key:
            raise CtlError("--cert/--key need an https:// URL", EXIT_USAGE)

    @staticmethod
    def _tls_context(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
        try:
            context = ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
        except (OSError, ssl.SSLError) as e:
            raise CtlError(f"cannot load CA file {ca}: {_lower_first(getattr(e, 'strerror', None) or str(e))}",
                           EXIT_USAGE) from None
        if key and not cert:
            raise CtlError("--key needs --cert", EXIT_USAGE)
        if cert:
            try:
                context.load_cert_chain(cert, key)
            except (OSError, ssl.SSLError) as e:
                raise CtlError(f"cannot load client certificate {cert}: "
                               f"{_lower_first(getattr(e, 'strerror', None) or str(e))}",
                               EXIT_USAGE) from None
        return context

    def _connection(self) -> http.client.HTTPConnection:
        p = self._parts
        if self.scheme == "http+unix":
            return _UnixHTTPConnection(unquote(p.netloc), self.timeout)
        if self.scheme == "https":
            return http.client.HTTPSConnection(p.hostname, p.port or 443, timeout=self.timeout,
                                               context=self._context)
        return http.client.HTTPConnection(p.hostname, p.port or 80, timeout=self.timeout)

    def post(self, body: bytes) -> tuple[int, bytes]:
        """POST ``body``; return ``(status, response body)`` or raise CtlError."""
        conn = self._connection()
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json",
                   "Accept": "application/json"}
        try:
            conn.request("POST", self.path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        except ssl.SSLCertVerificationError as e:
            raise CtlError(f"TLS error with {self.url}: cannot verify the server certificate: "
                           f"{e.verify_message or e.reason} (use --ca)", EXIT_UNREACHABLE) from None
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError, BrokenPipeError,
                http.client.RemoteDisconnected):
            hint = (" (the node may require a client certificate: --cert/--key)"
                    if self.scheme == "https" else "")
            raise CtlError(f"{self.url} closed the connection{hint}", EXIT_UNREACHABLE) from None
        except ssl.SSLError as e:
            reason = e.reason.lower().replace("_", " ") if e.reason else str(e)
            hint = ""
            if "certificate" in reason or "unknown ca" in reason:
                hint = " (the node wants a client certificate it trusts: --cert/--key)"
            raise CtlError(f"TLS error with {self.url}: {reason}{hint}",
                           EXIT_UNREACHABLE) from None
        except ConnectionRefusedError:
            raise CtlError(f"cannot connect to {self.url}: connection refused",
                           EXIT_UNREACHABLE) from None
        except (socket.timeout, TimeoutError):
            raise CtlError(f"no answer from {self.url} within {self.timeout:g} s",
                           EXIT_UNREACHABLE) from None
        except socket.gaierror as e:
            raise CtlError(f"cannot connect to {self.url}: {e.strerror or e}",
                           EXIT_UNREACHABLE) from None
        except OSError as e:
            why = _lower_first(e.strerror) if e.strerror else str(e)
            raise CtlError(f"cannot connect to {self.url}: {why}", EXIT_UNREACHABLE) from None
        except http.client.HTTPException as e:
            raise CtlError(f"bad HTTP answer from {self.url}: {type(e).__name__} {e}",
                           EXIT_UNREACHABLE) from None
        finally:
            conn.close()

    def call(self, method: str, params: Any = None) -> Any:
        """Call ``method``; return its result or raise CtlError."""
        request: dict[str, Any] = {"jsonrpc": "2.0", "id": 1, "method": method}
        if params is not None:
            request["params"] = params
        status, body = self.post(json.dumps(request).encode())
        if status == 401:
            raise CtlError("unauthorized (check --token-file)", EXIT_UNREACHABLE)
        if status == 413:
            raise CtlError(f"{method}: request too large for the node", EXIT_RPC_ERROR)
        try:
            response = json.loads(body) if body else None
        except ValueError:
            response = None
        if not isinstance(response, dict):
            if status != 200:
                raise CtlError(f"HTTP {status} from {self.url}", EXIT_UNREACHABLE)
            raise CtlError(f"{self.url} did not answer with a JSON-RPC response", EXIT_UNREACHABLE)
        if "error" in response:
            raise CtlError(describe_error(method, response["error"]), EXIT_RPC_ERROR)
        if "result" not in response:
            raise CtlError(f"{self.url} answered without a result", EXIT_UNREACHABLE)
        return response["result"]


# ----------------------------------------------------------------------
# formatting
# ----------------------------------------------------------------------
def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        text = f"{value:.3f}".rstrip("0").rstrip(".")
        return text or "0"
    if isinstance(value, (list, tuple)):
        return ",".join(_cell(v) for v in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return " ".join(str(value).split()) if "\n" in str(value) else str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _columns(rows: Sequence[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(str(key), None)
    return list(seen)


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None,
                 headers: Sequence[str] | None = None) -> str:
    """Aligned columns; headers upper-case; numeric columns right-aligned.

    Columns default to the union of the rows' keys, in order of first appearance.
    """
    cols = list(columns) if columns is not None else _columns(rows)
    heads = list(headers) if headers is not None else [c.upper() for c in cols]
    cells = [[_cell(row.get(c)) for c in cols] for row in rows]
    numeric = [bool(rows) and all(row.get(c) is None or _is_number(row.get(c)) for row in rows)
               and any(_is_number(row.get(c)) for row in rows) for c in cols]
    widths = [max([len(h)] + [len(line[i]) for line in cells]) for i, h in enumerate(heads)]
    out = []
    for line in [heads] + cells:
        parts = [v.rjust(w) if num and line is not heads else v.ljust(w)
                 for v, w, num in zip(line, widths, numeric)]
        out.append("  ".join(parts).rstrip())
    return "\n".join(out)


def fmt_duration(seconds: Any) -> str:
    """``93784`` -> ``1d 02h 03m``; ``3723`` -> ``1h 02m 03s``; ``12.5`` -> ``12.5s``."""
    if not _is_number(seconds):
        return _cell(seconds)
    s = float(seconds)
    if s < 60:
        return f"{s:.1f}s"
    total = int(s)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{minutes}m {secs:02d}s"


def _kv_block(pairs: list[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in pairs) + 1
    return "\n".join(f"{(k + ':').ljust(width)} {v}" for k, v in pairs)


def _singular(name: str) -> str:
    if name.endswith("ies"):
        return name[:-3] + "y"
    if name.endswith("s") and not name.endswith("ss"):
        return name[:-1]
    return name


def _flatten(prefix: str, value: dict, out: list[tuple[str, Any]]) -> None:
    for k, v in value.items():
        if isinstance(v, dict) and v and all(not isinstance(x, (dict, list)) for x in v.values()):
            _flatten(f"{prefix}{k}.", v, out)
        else:
            out.append((f"{prefix}{k}", _cell(v)))


def render(result: Any, name: str = "items") -> str:
    """Human text for any result: scalars as ``key: value``, lists and maps of objects as tables."""
    if isinstance(result, list):
        if not result:
            return f"(no {name})"
        if all(isinstance(item, dict) for item in result):
            return format_table(result)
        return "\n".join(_cell(item) for item in result)
    if not isinstance(result, dict):
        return _cell(result)
    scalars: list[tuple[str, Any]] = []
    sections: list[str] = []
    for key, value in result.items():
        key = str(key)
        if isinstance(value, list) and (not value or all(isinstance(v, dict) for v in value)):
            sections.append(render(value, key) if not value else
                            f"{key} ({len(value)}):\n{format_table(value)}")
        elif isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            column = _singular(key)
            rows = [{column: k, **{c: x for c, x in v.items() if c != column}}
                    for k, v in value.items()]
            sections.append(f"{key}:\n{format_table(rows)}")
        elif isinstance(value, dict) and value:
            _flatten(f"{key}.", value, scalars)
        else:
            scalars.append((key, _cell(value)))
    blocks = ([_kv_block(scalars)] if scalars else []) + sections
    return "\n\n".join(blocks) if blocks else "(empty)"


def render_status(status: Any) -> str:
    """``system.status``: header block, then a SERVICE/STATE/ROLE table."""
    if not isinstance(status, dict):
        return render(status)
    store = status.get("store") if isinstance(status.get("store"), dict) else {}
    healthy = store.get("healthy")
    store_text = str(store.get("backend", "-"))
    error = store.get("error")
    if healthy is not None:
        store_text += " (healthy)" if healthy else (
            f" (UNHEALTHY: {_cell(error)})" if error else " (UNHEALTHY)")
    extra: dict[str, Any] = {}
    durability: dict[str, Any] = {}
    for k, v in store.items():
        if k in ("backend", "healthy", "stats", "error"):
            continue
        if k == "durability" and isinstance(v, dict):     # its own line
            durability = {sub: value for sub, value in v.items()
                          if not (sub in store and store[sub] == value)}
        elif isinstance(v, dict):
            extra.update({f"{k}.{sub}": value for sub, value in v.items()
                          if not (sub in store and store[sub] == value)})
        else:
            extra[k] = v
    if extra:
        store_text += "  " + " ".join(f"{k}={_cell(v)}" for k, v in extra.items())
    lines = [("node", _cell(status.get("node"))),
             ("version", _cell(status.get("version"))),
             ("uptime", fmt_duration(status.get("uptime_s"))),
             ("store", store_text)]
    if durability:
        survives = durability.pop("survives", None)
        text = " ".join(f"{k}={_cell(v)}" for k, v in durability.items())
        if survives:
            text = f"survives {survives}" + (f" ({text})" if text else "")
        lines.append(("durable", text))
    if isinstance(store.get("stats"), dict) and store["stats"]:     # counters: writes=.. commits=..
        lines.append(("counters", " ".join(f"{k}={_cell(v)}" for k, v in store["stats"].items())))
    header = _kv_block(lines)
    services = status.get("services") if isinstance(status.get("services"), dict) else {}
    if not services:
        return header + "\n\n(no services enabled)"
    rows = []
    for key, info in services.items():
        info = info if isinstance(info, dict) else {"state": info}
        rows.append({"service": key, "state": info.get("state"), "role": info.get("role"),
                     "reason": info.get("reason")})
    columns = ["service", "state", "role"]
    if any(r["reason"] for r in rows):
        columns.append("reason")
    return header + "\n\n" + format_table(rows, columns)


def _relative(when: Any, now: float) -> Any:
    if not _is_number(when):
        return when
    delta = float(when) - now
    return f"in {fmt_duration(delta)}" if delta >= 0 else f"{fmt_duration(-delta)} ago"


def render_leases(result: Any) -> str:
    """``dhcp4.leases``: one row per lease, times relative to now."""
    if not isinstance(result, dict) or not isinstance(result.get("leases"), list):
        return render(result)
    import time as _time
    now = _time.time()
    if any(isinstance(le, dict) and "duid" in le for le in result["leases"]):
        rows = [{"address": le.get("address") or le.get("prefix"), "type": le.get("type"),
                 "subnet": le.get("subnet"), "duid": le.get("duid"), "iaid": le.get("iaid"),
                 "state": le.get("state"), "expires": _relative(le.get("expires"), now),
                 "last_seen": _relative(le.get("cltt"), now), "owner": le.get("owner"),
                 "hostname": le.get("hostname") or None}
                for le in result["leases"] if isinstance(le, dict)]     # dhcp6.leases
    else:
        rows = None
    rows = rows if rows is not None else [
            {"address": le.get("address"), "subnet": le.get("subnet"),
             "hwaddr": le.get("hwaddr"),
             "client_id": le.get("client_id") or None, "state": le.get("state"),
             "expires": _relative(le.get("expires"), now),
             "last_seen": _relative(le.get("cltt"), now), "owner": le.get("owner"),
             "hostname": le.get("hostname") or None}
            for le in result["leases"]]
    if not rows:
        return "(no leases)"
    text = format_table(rows)
    if result.get("cursor"):
        text += f"\n\n(more: --cursor {result['cursor']})"
    return text


def render_bindings(result: Any) -> str:
    """``sip.bindings``: one row per contact, expiry relative to now, best q first."""
    if not isinstance(result, dict) or not isinstance(result.get("bindings"), list):
        return render(result)
    import time as _time
    now = _time.time()
    rows = [{"aor": b.get("aor"), "contact": b.get("contact"),
             "expires": _relative(b.get("expires"), now),
             "q": b.get("q"), "call_id": b.get("call_id"), "cseq": b.get("cseq"),
             "path": ",".join(b.get("path") or []) or None, "received": b.get("received")}
            for b in result["bindings"] if isinstance(b, dict)]
    if not rows:
        return "(no bindings)"
    return format_table(rows)


def render_shards(result: Any) -> str:
    """``sip.shards``: one row per shard (owner, backup, bindings, backlog per backup)."""
    if not isinstance(result, dict) or not isinstance(result.get("shards"), list):
        return render(result)
    rows = [{"shard": r.get("shard"), "resource": r.get("resource"), "owner": r.get("owner"),
             "backup": r.get("backup"), "here": r.get("role"), "bindings": r.get("bindings"),
             "backlog": ",".join(f"{p}={n}" for p, n in sorted((r.get("backlog") or {}).items()))
             or None}
            for r in result["shards"] if isinstance(r, dict)]
    return format_table(rows) if rows else "(no shards)"


def render_cluster(status: Any) -> str:
    """``cluster.status``: header, warnings, PEER table (with heartbeat loss and
    jitter from sequence gaps), RESOURCE table, drop counters."""
    if not isinstance(status, dict) or "peers" not in status:
        return render(status)
    health = status.get("health") or []
    hb = status.get("heartbeat") or {}
    beat = f"{_cell(status.get('heartbeat_interval_ms'))} ms"
    if hb:
        beat += (f" ({_cell(hb.get('beats_per_interval'))} beats/interval, suspect after "
                 f"{_cell(hb.get('deadline_ms'))} ms)")
    quorum = status.get("quorum") or {}
    rows_q = []
    if quorum.get("role") == "witness":
        rows_q = [("role", "witness"), ("vote", _cell(quorum.get("vote")))]
    elif quorum.get("witness"):
        rows_q = [("quorum", f"{_cell(quorum.get('has'))} (witness {quorum['witness']} backs "
                             f"{quorum.get('witness_vote') or 'nobody'})")]
    elif quorum and not quorum.get("has", True):
        rows_q = [("quorum", "no")]
    header = _kv_block([("node", _cell(status.get("node"))), *rows_q,
                        ("heartbeat", beat),
                        ("maintenance", _cell(status.get("maintenance"))),
                        ("health", ",".join(health) if health else "ok")])
    blocks = [header]
    warnings = status.get("warnings") or []
    if warnings:
        blocks.append("\n".join(f"WARNING: {w}" for w in warnings))
    peers = status.get("peers") or {}
    if peers:
        rows = []
        for pid, p in peers.items():
            note = p.get("warning") or ""
            mismatch = p.get("config_mismatch") or {}
            if mismatch:
                note = (note + "; " if note else "") + "config differs: " + "; ".join(
                    f"{res} ({', '.join(keys)})" for res, keys in mismatch.items())
            paths = p.get("paths") or {}
            if paths:   # several heartbeat paths: each one's loss and silence
                note = (note + "; " if note else "") + "paths: " + ", ".join(
                    f"{addr} " + ("never heard" if x.get("last_seen_ms") is None else
                                  f"loss {(x.get('loss') or 0) * 100:.1f}%, "
                                  f"last {x['last_seen_ms']} ms ago")
                    for addr, x in paths.items())
            extra = []
            if p.get("partner_link") == "down":
                extra.append("peer link down")
            if p.get("unanswered_clients"):
                extra.append(f"{p['unanswered_clients']} of its clients unanswered")
            if p.get("partner_confirmed_by"):
                extra.append(f"partner-down confirmed by {p['partner_confirmed_by']}")
            if extra:
                note = "; ".join(([note] if note else []) + extra)
            loss = p.get("loss")
            rows.append({"peer": pid, "alive": p.get("alive"), "last_seen_ms": p.get("last_seen_ms"),
                         "state": (f"{p.get('state')} (confirmed)" if p.get("partner_confirmed")
                                   else p.get("state")),
                         "health": p.get("health") or ["ok"],
                         "loss": None if loss is None else f"{loss * 100:.1f}%",
                         "jitter_ms": p.get("jitter_ms"), "suspected": p.get("suspected"),
                         "skew_s": p.get("skew_s"), "note": note or None})
        columns = ["peer", "alive", "last_seen_ms", "state", "health", "loss", "jitter_ms",
                   "suspected", "skew_s", "note"]
        columns = [c for c in columns if c in ("peer", "alive", "last_seen_ms", "state", "health",
                                               "skew_s", "note")
                   or any(r.get(c) is not None for r in rows)]
        blocks.append(format_table(rows, columns))
    else:
        blocks.append("(single node: no peers)")
    resources = status.get("resources") or {}
    if resources:
        rows = [{"resource": name, "owner": r.get("owner"), "epoch": r.get("epoch"),
                 "role": r.get("role"), "kind": r.get("kind"),
                 "since": fmt_duration(r.get("since_s")) if r.get("since_s") is not None else None,
                 "reason": "; ".join(x for x in (r.get("reason"),
                                                 f"VIP: {r['vip_error']}" if r.get("vip_error")
                                                 else None) if x) or None}
                for name, r in resources.items()]
        blocks.append(format_table(rows))
    else:
        blocks.append("(no resources)")
    drops = {k: v for k, v in (status.get("drops") or {}).items() if v}
    if drops:
        blocks.append("heartbeats dropped: " + ", ".join(f"{k}={v}" for k, v in sorted(drops.items())))
    return "\n\n".join(blocks)


# ----------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise CtlError(f"{message} (see {PROG} --help)", EXIT_USAGE)


def _add_global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    def default(value):
        return argparse.SUPPRESS if suppress else value
    parser.add_argument("--config", metavar="PATH", default=default(None),
                        help=f"node config to read the admin URL and token from "
                             f"(default: {DEFAULT_CONFIG} if it exists)")
    parser.add_argument("--url", default=default(None),
                        help="admin URL, e.g. http://127.0.0.1:8740/rpc")
    parser.add_argument("--token-file", metavar="F", default=default(None),
                        help="file holding the bearer token")
    parser.add_argument("--json", action="store_true", default=default(False),
                        help="print the raw result as JSON")
    parser.add_argument("--timeout", type=float, metavar="S", default=default(10.0),
                        help="seconds to wait for the node (default 10)")
    parser.add_argument("--ca", metavar="F", default=default(None),
                        help="CA file to verify an https node (default: the config's admin.server_ca)")
    parser.add_argument("--cert", metavar="F", default=default(None),
                        help="client certificate (PEM) for mutual TLS")
    parser.add_argument("--key", metavar="F", default=default(None),
                        help="client key (PEM), if not inside --cert")


def _params(**kwargs: Any) -> dict[str, Any] | None:
    out = {k: v for k, v in kwargs.items() if v is not None}
    return out or None


def _call_params(args) -> Any:
    text = args.params
    if text is None:
        return None
    if text == "-":
        text = sys.stdin.read()
    try:
        params = json.loads(text)
    except ValueError as e:
        raise CtlError(f"call: invalid JSON params: {e}", EXIT_USAGE) from None
    if not isinstance(params, (dict, list)):
        raise CtlError("call: params must be a JSON object or array", EXIT_USAGE)
    return params


# name -> (help, method(args), params(args), renderer)
_Command = tuple[str, Callable[[Any], str], Callable[[Any], Any], Callable[[Any], str]]
COMMANDS: dict[str, _Command] = {
    "status": ("node, store and service states", lambda a: "system.status",
               lambda a: None, render_status),
    "cluster": ("peers and resource ownership", lambda a: "cluster.status",
                lambda a: None, render_cluster),
    "leases": ("DHCP leases", lambda a: "dhcp6.leases" if a.v6 else "dhcp4.leases",
               lambda a: _params(subnet=a.subnet, state=a.state, limit=a.limit, cursor=a.cursor,
                                 type=getattr(a, "type", None)),
               render_leases),
    "bindings": ("SIP registrations", lambda a: "sip.bindings",
                 lambda a: _params(aor=a.aor), render_bindings),
    "shards": ("SIP shards: owner, backup, bindings, backlog", lambda a: "sip.shards",
               lambda a: None, render_shards),
    "records": ("DNS records: desired vs published", lambda a: "dns.records",
                lambda a: None, render),
    "sessions": ("encapsulation sessions", lambda a: "encap.sessions", lambda a: None, render),
    "promote": ("take a resource now", lambda a: "cluster.promote",
                lambda a: {"resource": a.resource}, render),
    "demote": ("hand a resource to a peer", lambda a: "cluster.demote",
               lambda a: {"resource": a.resource}, render),
    "maintenance": ("hand everything to the partner (on) or resume (off)",
                    lambda a: "cluster.maintenance", lambda a: {"on": a.state == "on"}, render),
    "partner-down": ("declare a dead peer down (operator partner-down)",
                     lambda a: "cluster.partner_down", lambda a: {"peer": a.peer}, render),
    "methods": ("list the node's RPC methods", lambda a: "system.methods",
                lambda a: None, render),
    "call": ("call any method: call METHOD [JSON-PARAMS | -]", lambda a: a.method,
             _call_params, render),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (global options are accepted before or after the command)."""
    parser = _Parser(prog=PROG, description="Admin client for an appliance node (JSON-RPC).",
                     epilog="exit status: 0 ok, 1 the node returned an error, 2 usage error, "
                            "3 node unreachable or unauthorized. On the box itself (no "
                            "JSON-RPC): cluster init|join|invite, backup FILE, "
                            "restore FILE --dir DIR (each with --help)")
    _add_global_options(parser, suppress=False)
    common = _Parser(add_help=False)
    _add_global_options(common, suppress=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    subs = {name: sub.add_parser(name, help=spec[0], parents=[common])
            for name, spec in COMMANDS.items()}
    p = subs["leases"]
    p.add_argument("-6", "--v6", dest="v6", action="store_true",
                   help="DHCPv6 leases (dhcp6.leases): addresses and delegated prefixes")
    p.add_argument("--type", choices=["na", "pd"],
                   help="with -6: only addresses (na) or delegated prefixes (pd)")
    p.add_argument("--subnet")
    p.add_argument("--state")
    p.add_argument("--limit", type=int)
    p.add_argument("--cursor")
    subs["bindings"].add_argument("--aor", help="only this address of record")
    subs["promote"].add_argument("resource", metavar="RES")
    subs["demote"].add_argument("resource", metavar="RES")
    subs["maintenance"].add_argument("state", choices=["on", "off"])
    subs["partner-down"].add_argument("peer", metavar="PEER")
    up = sub.add_parser("upgrade-check", parents=[common],
                        help="rolling upgrade: safe to stop this node? (--rejoined: back?)")
    up.add_argument("--rejoined", action="store_true",
                    help="after the restart: partners NORMAL, peer link and SIP caught up")
    up.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                    help="re-check every second until ready or SECONDS pass")
    subs["call"].add_argument("method", metavar="METHOD")
    subs["call"].add_argument("params", metavar="JSON", nargs="?",
                              help="params: a JSON object or array, or - for stdin")
    return parser


def _read_token(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            token = fh.read().strip()
    except OSError as e:
        hint = " (the node creates it when it starts)" if isinstance(e, FileNotFoundError) else ""
        raise CtlError(f"cannot read token file {path}: "
                       f"{_lower_first(e.strerror) if e.strerror else e}{hint}",
                       EXIT_USAGE) from None
    if not token:
        raise CtlError(f"token file {path} is empty", EXIT_USAGE)
    return token


def _load_admin_section(path: str):
    """``[admin]`` of the node config (and node.state_dir for the token path) only:
    the rest (service tables, their key files) is the node's business."""
    from appliance.config import ConfigError, load_admin_section
    try:
        return load_admin_section(path)
    except ConfigError as e:
        raise CtlError(str(e), EXIT_USAGE) from None


def resolve_target(args) -> tuple[str, str, str | None]:
    """``(url, token_file, ca)`` from --url/--token-file/--config and the defaults."""
    from appliance.admin.listen import EndpointError, admin_url
    admin = None
    config = args.config
    if config is None and (args.url is None or args.token_file is None) \
            and os.path.exists(DEFAULT_CONFIG):
        config = DEFAULT_CONFIG
    if config is not None:
        admin = _load_admin_section(config)
    if args.url is not None:
        url = args.url
    elif admin is not None:
        try:
            url = admin_url(admin.listen)
        except EndpointError as e:
            raise CtlError(f"{config}: admin.listen: {e}", EXIT_USAGE) from None
    else:
        raise CtlError(f"no node to talk to: {DEFAULT_CONFIG} not found here; "
                       "use --config PATH or --url URL --token-file F", EXIT_USAGE)
    if args.token_file is not None:
        token_file = args.token_file
    elif admin is not None:
        token_file = admin.token_file
    else:
        raise CtlError("--url needs --token-file (or --config)", EXIT_USAGE)
    # The node's certificate is verified with admin.server_ca (admin.client_ca is
    # the CA of *client* certificates: a different role).
    ca = args.ca if args.ca is not None else getattr(admin, "server_ca", None)
    return url, token_file, ca


def run(argv: Sequence[str] | None, stdout: TextIO, stderr: TextIO) -> int:
    # cluster init|join|invite, backup, restore run on the box itself (issue 17)
    from appliance.bootstrap import local_command
    local = local_command(sys.argv[1:] if argv is None else argv, stdout, stderr)
    if local is not None:
        return local
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    if not args.timeout > 0:
        raise CtlError("--timeout must be positive", EXIT_USAGE)
    if args.command == "upgrade-check":
        url, token_file, ca = resolve_target(args)
        client = Client(url, _read_token(token_file), timeout=args.timeout, ca=ca,
                        cert=args.cert, key=args.key)
        return _upgrade_check(client, args, stdout)
    _help, method_of, params_of, renderer = COMMANDS[args.command]
    method = method_of(args)
    params = params_of(args)
    url, token_file, ca = resolve_target(args)
    client = Client(url, _read_token(token_file), timeout=args.timeout, ca=ca,
                    cert=args.cert, key=args.key)
    result = client.call(method, params)
    if args.json:
        stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        stdout.write(renderer(result) + "\n")
    return EXIT_OK


def _upgrade_check(client: Client, args, stdout: TextIO) -> int:
    """``upgrade-check [--rejoined] [--wait S]``: exit 0 when ready, 1 when not
    (after ``--wait`` seconds of re-checking); see appliance/upgrade.py."""
    import time

    from appliance.upgrade import checks, render
    phase = "rejoined" if args.rejoined else "stop"
    deadline = time.monotonic() + max(args.wait, 0.0)
    while True:
        cluster = client.call("cluster.status")
        answers = {}
        for method in ("sip.stats", "dhcp4.scopes"):
            try:
                answers[method] = client.call(method)
            except CtlError as e:
                if "(-32601)" not in str(e):     # only "no such method" means no service
                    raise
                answers[method] = None
        results = checks(phase, cluster, answers["sip.stats"], answers["dhcp4.scopes"])
        ready = all(ok for _, ok, _ in results)
        if ready or time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    if args.json:
        stdout.write(json.dumps({"phase": phase, "ready": ready,
                                 "checks": [{"check": n, "ok": ok, "detail": d}
                                            for n, ok, d in results]}, indent=2) + "\n")
    else:
        stdout.write(render(phase, results) + "\n")
    return EXIT_OK if ready else EXIT_RPC_ERROR


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None,
         stderr: TextIO | None = None) -> int:
    """Entry point of ``appliancectl``; returns the exit status."""
    stdout = stdout if stdout is not None else sys.stdout
    stderr = stderr if stderr is not None else sys.stderr
    try:
        return run(argv, stdout, stderr)
    except CtlError as e:
        stderr.write(f"{PROG}: {e}\n")
        return e.exit_code
    except SystemExit as e:     # --help / --version from argparse
        return e.code if isinstance(e.code, int) else EXIT_OK
    except KeyboardInterrupt:
        stderr.write(f"{PROG}: interrupted\n")
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except Exception as e:  # a bug here: still one line, never a traceback
        stderr.write(f"{PROG}: unexpected error: {type(e).__name__}: {_one_line(str(e))}\n")
        return EXIT_RPC_ERROR


if __name__ == "__main__":
    sys.exit(main())
