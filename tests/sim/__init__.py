"""Deterministic fault simulator for the cluster manager (see world.py)."""
