"""Errors shared across layers (no imports of any layer).

:class:`OperatorError` is what a core layer (the cluster, ...) raises when it
refuses an operator request; the admin layer's JSON-RPC dispatcher turns it
into an application error (``code``, ``data.reason`` = the message), so the
core needs no admin import to be reported properly.
"""

from __future__ import annotations


class OperatorError(Exception):
    """An operator request refused; ``code`` is its JSON-RPC application
    error code (-32099..-32000)."""

    def __init__(self, message: str, code: int = -32000):
        super().__init__(message)
        self.code = code
