"""The ``esr`` service: the edge service router's route agent (SPEC.md).

It follows the EN-DN mapping table (:mod:`services.encap.mapping`) and keeps
one kernel route per mapped EN address or slice pointing at the DN that
holds it (:mod:`services.esr.service`).
"""
