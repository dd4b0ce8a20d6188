"""fewshot-edge: few-shot learning from meta-training to on-device enrollment.

This module imports nothing heavy, so ``import fewshot_edge.runtime`` works on a device
without torch. The training half lives in submodules that import torch themselves.
"""

__version__ = "0.1.0"
