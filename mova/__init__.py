"""MoVA: a multimodal LLM with a base vision encoder, routed vision experts and the MoV-Adapter.

This package is the pure model library (PyTorch + transformers); it never imports Ray.
"""

from mova.config import MoVAConfig
from mova.factory import build_model, from_pretrained
from mova.modeling import MoVAModel
from mova.outputs import GenerationResult, RoutingResult

__version__ = "0.1.0"

__all__ = [
    "GenerationResult", "MoVAConfig", "MoVAModel", "RoutingResult", "__version__", "build_model",
    "from_pretrained",
]
