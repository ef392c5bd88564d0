"""cdcore: recurrent networks with recurrent weights on the Stiefel manifold.

* :mod:`cdcore.stiefel` -- pure, batched Stiefel functions (feasibility, projection,
  tangent projection, Cayley retraction).
* :mod:`cdcore.dissolving` -- the constraint-dissolving map A and penalty (CDOpt).
* :func:`dissolve`, :func:`quad_penalty`, :func:`feasibility`, :func:`dissolved_weights`
  -- attach and measure, for any model.
* :class:`StiefelLSTM`, :class:`StiefelGRU`, :class:`StiefelRNN` -- ``nn.LSTM`` / ``nn.GRU``
  / ``nn.RNN`` with dissolved recurrent weights, fused kernels (:mod:`cdcore.rnn`).
* :mod:`cdcore.optim` -- ``CayleyAdam``, ``CayleyRMSprop`` and ``CayleySGD`` (Riemannian, Cayley retraction).
"""

from . import dissolving, optim, stiefel
from .constrain import (
    DissolvedOwner,
    DissolvedWeight,
    dissolve,
    dissolved_weights,
    feasibility,
    quad_penalty,
    weight_feasibility,
)
from .rnn import StiefelGRU, StiefelLSTM, StiefelRNN

__all__ = [
    "DissolvedOwner",
    "DissolvedWeight",
    "StiefelGRU",
    "StiefelLSTM",
    "StiefelRNN",
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
