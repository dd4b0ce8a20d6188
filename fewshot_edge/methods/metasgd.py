"""Meta-SGD (Li et al. 2017): MAML whose inner-loop step sizes are meta-learned with the initialisation.

Every backbone parameter has a step size of its own shape (one per element, shared by the inner
steps, as in the paper). The head's step sizes take ANIL's per-parameter layout: for each step, one
per embedding dimension for the weight, shared by every class, and one for the bias. A per-element
size of the weight (C, D) would tie a step size to a class index, which means nothing when classes
are numbered per episode and the device's class count differs; sharing it over the classes keeps the
head way-agnostic. The bundle carries the head's sizes for the numpy ``finetune`` mode (its schedule
``lr_weight`` (steps, D) and ``lr_bias`` (steps,)).
"""

from __future__ import annotations

from .base import register_method
from .maml import MAML


@register_method
class MetaSGD(MAML):
    """MAML with learned per-parameter inner step sizes (backbone: per element; head: per dimension and step)."""

    name = "metasgd"
    learned_step_sizes = True
