"""Converters from other weight formats into the models MoVA builds on.

Each converter rebuilds a ``transformers`` model from a foreign file and checks it against the
source: :mod:`mova.convert.gguf` (a llama GGUF file -> ``LlamaForCausalLM``),
:mod:`mova.convert.onnx_dinov2` (an ONNX graph holding a DINOv2 backbone -> ``Dinov2Model``).
"""


class ConversionError(RuntimeError):
    """A converted model does not fit or does not reproduce the source it was converted from."""
