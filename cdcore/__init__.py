"""cdcore: LSTMs with recurrent weights on the Stiefel manifold.

* :mod:`cdcore.stiefel` -- pure, batched Stiefel functions (feasibility, projection,
  tangent projection, Cayley retraction).
* :mod:`cdcore.dissolving` -- the constraint-dissolving map A and penalty (CDOpt).
* :func:`dissolve`, :func:`quad_penalty`, :func:`feasibility` -- attach and measure.
* :class:`StiefelLSTM` -- ``nn.LSTM`` with dissolved recurrent weights, fused kernels.
* :mod:`cdcore.optim` -- ``CayleyAdam`` and ``CayleySGD`` (Riemannian, Cayley retraction).
"""

from . import dissolving, optim, stiefel
from .constrain import dissolve, dissolved_weights, feasibility, quad_penalty, weight_feasibility
from .lstm import StiefelLSTM

__all__ = [
    "StiefelLSTM",
    "dissolve",
    "dissolved_weights",
    "dissolving",
    "feasibility",
    "optim",
    "quad_penalty",
    "stiefel",
    "weight_feasibility",
]

__version__ = "0.1.0"
