"""Host networking helpers: netlink (pyroute2 in a dedicated thread) and
gratuitous ARP / unsolicited neighbour advertisement frames."""
