"""Errors the cluster core raises for operator actions; ``cluster/admin.py``
maps them to JSON-RPC application errors (the core imports no admin code)."""

from __future__ import annotations


class ClusterError(Exception):
    """An operator request the cluster refuses; ``code`` is the RPC error code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code
