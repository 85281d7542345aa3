"""Offline data: procedural 2-D toys (no downloads anywhere)."""

from .toys import TOYS, toy_2d

__all__ = ["TOYS", "toy_2d"]
