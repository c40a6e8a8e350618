"""Deterministic simulation of a failoverd cluster around the real protocol core."""
