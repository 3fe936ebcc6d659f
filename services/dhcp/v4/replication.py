"""Lazy lease updates to the failover partner: the core's
:class:`~services.dhcp.failover.replication.LeaseOutbox` (``tag="dhcp4"``)."""

from services.dhcp.failover.replication import LeaseOutbox  # noqa: F401

__all__ = ["LeaseOutbox"]
