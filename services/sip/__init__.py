"""The ``sip`` service: SIP registrar, location service and redirect server (RFC 3261 §10)."""
