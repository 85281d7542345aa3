"""Models built on ODE blocks."""

from .cnf import CNF, CNFDynamics, bits_per_dim, standard_normal_logprob
from .fields import time_mlp

__all__ = ["CNF", "CNFDynamics", "time_mlp", "standard_normal_logprob", "bits_per_dim"]
