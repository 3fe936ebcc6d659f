"""Server addresses of the dns service as written in its config (pure: no I/O).

Shared by the config parser and the client, so that reading a config does not
import the network client (review section 9).
"""

from __future__ import annotations


def parse_server(text: str) -> tuple[str, int]:
    """``"host:port"`` (or ``"host"``: port 53; ``[v6]:port``) -> ``(host, port)``."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else "53"
    elif text.count(":") == 1:
        host, port = text.split(":")
    elif ":" in text:
        host, port = text, "53"
    else:
        host, port = text, "53"
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not host:port")
    return host, int(port)


def show_server(server: tuple[str, int]) -> str:
    host, port = server
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
