"""The appliance's own service plugins: one object per service key of SPEC.md.

Services register here as they are built (dhcp4, dhcp6, sip, dns, encap,
esr).  Each plugin object is an :class:`appliance.plugin.IServicePlugin`.
"""
