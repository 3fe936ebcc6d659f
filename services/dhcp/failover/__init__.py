"""The DHCP failover core shared by ``dhcp4`` and ``dhcp6``.

``family``      lease families: key namespace, address <-> int, peer-link channel
``leases``      Lease records, FreeSet, LeaseStore (lifecycle, guards, MCLT,
                pending-free, held addresses, merge, reclaim, export)
``pools``       split ranges, segments, allocation roles, who answers
``replication`` LeaseOutbox: lazy, batched, acknowledged updates to the partner
``partner``     the partner relationship of a DHCP service (states, caught-up
                barrier, hello/capabilities, recovery sync, merge of updates)

The v4 modules of the same names re-export what they take from here.
"""
