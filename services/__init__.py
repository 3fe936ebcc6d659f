"""Service implementations (one package per service key of SPEC.md).

Each service depends only on :mod:`appliance`, never on a sibling service.
"""
