"""Host networking helpers: netlink (pyroute2 in a dedicated thread),
gratuitous ARP / unsolicited neighbour advertisement frames, and TLS
certificates and contexts (:mod:`appliance.net.tls`) for the admin API and the
cluster peer link."""
