"""Converters from other weight formats into the models MoVA builds on.

Each converter rebuilds a ``transformers`` model from a foreign file and checks it against the
source: :mod:`mova.convert.gguf` (a llama GGUF file -> ``LlamaForCausalLM``),
:mod:`mova.convert.onnx_dinov2` (an ONNX graph holding a DINOv2 backbone -> ``Dinov2Model``),
:mod:`mova.convert.reference` (the authors' released MoVA checkpoint -> a MoVA checkpoint).
"""


class ConversionError(RuntimeError):
    """A converted model does not fit or does not reproduce the source it was converted from."""


class ReferenceImportError(ConversionError):
    """A released MoVA checkpoint that cannot be imported; the message names the keys or
    config fields at fault."""
