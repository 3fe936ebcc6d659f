"""The ``encap`` service: reliable encapsulation endpoints (the data plane).

``wire`` (codec, handshake, sealed records), ``tun`` (TUN devices read in the
reactor), ``session`` (session tables shared by both ends), ``dn`` (the
decapsulation node), ``en`` (the ``appliance-en`` client), ``fd`` (the DN
watchdog), ``config``/``plugin``/``service`` (the appliance wiring).
``mapping`` (EN-DN table) and ``routes`` (route injection) are the control
plane.  Format: ``PROTOCOL.md``.
"""
