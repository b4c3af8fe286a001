"""Contracts shared by the operator and the runtime: one definition of each seam."""
