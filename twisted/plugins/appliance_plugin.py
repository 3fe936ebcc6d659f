"""twistd dropin: ``twistd appliance`` (all logic lives in appliance.tap)."""

from twisted.application.service import ServiceMaker

Appliance = ServiceMaker(
    "appliance",
    "appliance.tap",
    "High-availability appliance node (DHCP, SIP, DNS, encap services).",
    "appliance",
)
