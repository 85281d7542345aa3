"""Models built on ODE blocks: CNFs (vectors and images), time-series models, an image
classifier; and deep discrete networks (a fully connected net, a small CNN) for comparisons."""

from .cde import NeuralCDE
from .cnf import CNF, CNFDynamics, bits_per_dim, standard_normal_logprob
from .discrete import DeepMLP, SmallCNN
from .fields import time_conv, time_mlp
from .image import ODEImageClassifier
from .image_cnf import ImageCNF
from .latent import LatentODE
from .timeseries import ODERNN

__all__ = [
    "CNF",
    "CNFDynamics",
    "ODERNN",
    "NeuralCDE",
    "LatentODE",
    "ODEImageClassifier",
    "ImageCNF",
    "DeepMLP",
    "SmallCNN",
    "time_conv",
    "time_mlp",
    "standard_normal_logprob",
    "bits_per_dim",
]
