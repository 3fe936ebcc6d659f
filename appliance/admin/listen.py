"""Twisted server endpoint strings: the one parser of the codebase (pure, binds nothing).

Everything here goes through Twisted's own code: :func:`split_endpoint` is
Twisted's strports lexer (``\\`` escapes ``:`` and ``=``), and
:func:`server_endpoint_problem` builds the endpoint with
``serverFromString(MemoryReactor(), description)``, exactly as the runtime
does but on a reactor that never binds.  So ``--check`` accepts what the node
accepts (``tcp6:8740:interface=\\:\\:1``) and refuses what it would refuse
(``ssl:8740`` with no readable key).

Used by the config (``admin.listen``, ``cluster.peer_link``), the admin
service (to build a mutual-TLS listener from an ``ssl:`` string), the peer
link, and ``appliancectl`` (to turn the node's ``admin.listen`` into a URL).
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import quote

from twisted.internet import endpoints

# in a neutral module (the cluster's peer link uses it too); re-exported here
from appliance.net.endpoints import EndpointError, split_endpoint

__all__ = ["split_endpoint", "server_endpoint_problem", "admin_url", "EndpointError"]

#: Options of Twisted's ``ssl:`` parser that only concern the TLS material.
_SSL_ONLY = ("privateKey", "certKey", "sslmethod", "extraCertChain", "dhParameters")
_PORTED = ("tcp", "tcp6", "ssl")


def _twisted_reason(exc: BaseException) -> str:
    """Twisted's parser errors in the config's words."""
    text = str(exc)
    if isinstance(exc, TypeError):
        m = re.search(r"unexpected keyword argument '([^']+)'", text)
        if m:
            return f"unknown option {m.group(1)!r}"
        m = re.search(r"missing \d+ required positional argument[s]?: (.+)$", text)
        if m:
            return "missing " + m.group(1).replace("'", "")
        if "positional argument" in text:
            return "too many positional values"
    if isinstance(exc, OSError) and exc.filename:
        return f"cannot read {exc.filename}: {exc.strerror or exc}"
    if isinstance(exc, ValueError) and text.startswith("invalid literal for int()"):
        return "a number was expected: " + text.split(":", 1)[-1].strip()
    return text or type(exc).__name__


def server_endpoint_problem(description: str, *, tls_in_string: bool = True) -> str | None:
    """Why ``description`` is not a server endpoint the runtime can build, or None.

    The endpoint is built by Twisted's ``serverFromString`` on a
    ``MemoryReactor`` (nothing binds).  For ``ssl:`` that reads the key and
    certificate files, as the runtime does.  ``tls_in_string=False`` is for
    listeners whose TLS material comes from elsewhere (``cluster.peer_link``
    with ``[cluster.tls]``): the ``ssl:`` string is then checked as TCP.
    ``systemd:`` is checked for shape only (its sockets exist only under systemd).
    """
    from twisted.internet.testing import MemoryReactor
    try:
        kind, args, kwargs = split_endpoint(description)
    except (EndpointError, ValueError) as e:
        return str(e)
    if kind in _PORTED:
        value = kwargs.get("port", args[0] if args else None)
        if value is None or value == "":
            return "missing port"
        try:
            port = int(value)
        except ValueError:
            return f"port {value!r} is not a number 0..65535"
        if not 0 <= port <= 65535:
            return f"port {port} is not a number 0..65535"
        interface = kwargs.get("interface", args[1] if len(args) > 1 else None)
        if interface:
            try:
                address = ipaddress.ip_address(interface)
            except ValueError:
                return f"interface {interface!r} is not an IP address"
            if kind == "tcp6" and address.version != 6:
                return f"interface {interface!r} is not an IPv6 address (tcp6)"
    if kind == "systemd":
        if args:
            return f"unexpected value {args[0]!r} (use domain=INET and index=N or name=N)"
        if "domain" not in kwargs or not ({"index", "name"} & set(kwargs)):
            return "needs domain= and index= (or name=)"
        unknown = set(kwargs) - {"domain", "index", "name"}
        if unknown:
            return f"unknown option {sorted(unknown)[0]!r}"
        return None
    if kind == "ssl" and tls_in_string and "privateKey" not in kwargs:
        return "an ssl: listener needs privateKey=KEY.pem (and certKey=CERT.pem)"
    if kind == "ssl" and not tls_in_string:
        kwargs = {k: v for k, v in kwargs.items() if k not in _SSL_ONLY}
        rebuilt = ":".join(["tcp", *(_escape(a) for a in args),
                            *(f"{_escape(k)}={_escape(v)}" for k, v in kwargs.items())])
        description = rebuilt
    try:
        endpoints.serverFromString(MemoryReactor(), description)
    except Exception as e:      # Twisted raises ValueError/TypeError/OSError/ImportError...
        return _twisted_reason(e)
    return None


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def _port(description: str, args: list[str], kwargs: dict[str, str]) -> int:
    value = kwargs.get("port", args[0] if args else None)
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise EndpointError(f"{description!r}: no port number") from None
    if not 0 < port < 65536:
        raise EndpointError(f"{description!r}: port {port} cannot be connected to")
    return port


def _client_host(interface: str | None, ipv6: bool) -> str:
    """The address a local client should dial for a listener bound to ``interface``."""
    if not interface:
        return "::1" if ipv6 else "127.0.0.1"
    try:
        addr = ipaddress.ip_address(interface)
    except ValueError:
        return interface    # a host name
    if addr.is_unspecified:
        return "::1" if addr.version == 6 else "127.0.0.1"
    return str(addr)


def admin_url(listen: str, path: str = "/rpc") -> str:
    """The URL of ``path`` on an admin listener described by ``listen``.

    ``tcp:8740:interface=10.0.0.1`` -> ``http://10.0.0.1:8740/rpc``; no
    interface, ``0.0.0.0`` or ``::`` -> loopback; ``ssl:`` -> ``https://``;
    ``unix:/run/a.sock`` -> ``http+unix://%2Frun%2Fa.sock/rpc`` (understood by
    appliancectl).  Raises :class:`EndpointError` for other kinds.
    """
    kind, args, kwargs = split_endpoint(listen)
    if kind == "unix":
        address = kwargs.get("address", args[0] if args else None)
        if not address:
            raise EndpointError(f"{listen!r}: no socket path")
        return f"http+unix://{quote(address, safe='')}{path}"
    if kind not in ("tcp", "tcp6", "ssl"):
        raise EndpointError(f"cannot derive an admin URL from {listen!r} "
                            f"(endpoint type {kind!r}); use --url")
    port = _port(listen, args, kwargs)
    host = _client_host(kwargs.get("interface"), kind == "tcp6")
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if kind == "ssl" else "http"
    return f"{scheme}://{host}:{port}{path}"
