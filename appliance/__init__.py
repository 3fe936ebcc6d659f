"""appliance: a Twisted high-availability node for network infrastructure services."""

__version__ = "0.1.0"
