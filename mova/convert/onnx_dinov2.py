"""An ONNX graph holding a DINOv2 backbone (named ``backbone.*`` initialisers) -> a
``Dinov2Model`` with the same weights, and a check of the rebuilt model against onnxruntime."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Dinov2Config, Dinov2Model

from mova.convert import ConversionError

TOLERANCE = 1e-3

_ONNX_PREFIX = "backbone."
# transformers 4 module names (as exported in the graph) -> transformers 5 names.
_DINOV2_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)


def _to_model_key(key: str, model_keys: set[str]) -> str:
    """The installed transformers' name of a graph tensor (names differ across versions)."""
    if key in model_keys:
        return key
    for old, new in _DINOV2_RENAMES:
        key = key.replace(old, new)
    return key


def dinov2_state_from_onnx(graph: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Backbone weights (graph names without ``backbone.``) and ``Dinov2Config`` values read
    from an ONNX graph's initialisers.

    Named initialisers ``backbone.X`` are the model's tensors; each unnamed MatMul weight is
    the Linear whose bias the following Add adds (weight = transpose); the position
    embeddings are the unnamed CLS position (1, 1, C) and patch grid (1, N, C) initialisers,
    concatenated.
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.initializer}
    named = {n: numpy_helper.to_array(i) for n, i in inits.items() if n.startswith(_ONNX_PREFIX)}
    if f"{_ONNX_PREFIX}embeddings.cls_token" not in named:
        raise ConversionError("the ONNX graph has no backbone.embeddings.cls_token initialiser")
    hidden = int(named[f"{_ONNX_PREFIX}embeddings.cls_token"].shape[-1])
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    linear = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits or node.input[1] in named:
            continue
        biases = [i for add in consumers.get(node.output[0], []) if add.op_type == "Add"
                  for i in add.input if i in named and i.endswith(".bias")]
        if len(biases) != 1:
            raise ConversionError(f"cannot tell which Linear the ONNX MatMul {node.name} is")
        weight = numpy_helper.to_array(inits[node.input[1]]).T
        linear[biases[0][: -len("bias")] + "weight"] = np.ascontiguousarray(weight)
    unnamed = [n for n in inits if not n.startswith(_ONNX_PREFIX) and n not in
               {i for node in graph.node if node.op_type == "MatMul" for i in node.input}]
    shapes = {n: tuple(inits[n].dims) for n in unnamed}
    cls_pos = [n for n, s in shapes.items() if s == (1, 1, hidden)]
    grid_pos = [n for n, s in shapes.items() if len(s) == 3 and s[0] == 1 and s[2] == hidden
                and s[1] > 1 and math.isqrt(s[1]) ** 2 == s[1]]
    if len(cls_pos) != 1 or len(grid_pos) != 1:
        raise ConversionError(f"cannot find the position embeddings in the ONNX graph "
                              f"(candidates {cls_pos} and {grid_pos})")
    positions = np.concatenate([numpy_helper.to_array(inits[cls_pos[0]]),
                                numpy_helper.to_array(inits[grid_pos[0]])], axis=1)
    patch = named[f"{_ONNX_PREFIX}embeddings.patch_embeddings.projection.weight"].shape[-1]
    layers = {int(m.group(1)) for n in named if (m := re.search(r"encoder\.layer\.(\d+)\.", n))}
    fc1 = named[f"{_ONNX_PREFIX}encoder.layer.0.mlp.fc1.bias"].shape[0]
    config = {
        "hidden_size": hidden,
        "num_hidden_layers": len(layers),
        "num_attention_heads": hidden // 64,  # every DINOv2 size has 64-wide heads
        "patch_size": int(patch),
        "image_size": int(patch * math.isqrt(positions.shape[1] - 1)),
        "mlp_ratio": fc1 // hidden,
    }
    arrays = {**named, **linear, _ONNX_PREFIX + "embeddings.position_embeddings": positions}
    state = {name[len(_ONNX_PREFIX):]: torch.from_numpy(np.array(array, dtype=np.float32))
             for name, array in arrays.items()}
    return state, config


def build_dinov2_from_onnx(onnx_path: Path) -> tuple[Any, Any]:
    """(Dinov2Model with the ONNX graph's backbone weights, the loaded ONNX model)."""
    import onnx

    proto = onnx.load(str(onnx_path))
    state, values = dinov2_state_from_onnx(proto.graph)
    model = Dinov2Model(Dinov2Config(**values, layer_norm_eps=1e-6, hidden_act="gelu"))
    model_keys = set(model.state_dict())
    renamed = {_to_model_key(name, model_keys): tensor for name, tensor in state.items()}
    unknown = sorted(set(renamed) - model_keys)
    # The mask token only replaces masked patches in DINOv2's self-supervised training; the
    # graph does not use it, so it stays zero.
    missing = sorted(model_keys - set(renamed) - {"embeddings.mask_token"})
    if unknown or missing:
        raise ConversionError(f"{onnx_path}: initialisers do not fit Dinov2Model "
                              f"(unmatched {unknown}, missing {missing})")
    renamed["embeddings.mask_token"] = torch.zeros_like(model.embeddings.mask_token)
    model.load_state_dict(renamed, strict=True)
    return model.eval(), proto


def _backbone_outputs(graph: Any) -> tuple[list[str], str]:
    """Names of the ONNX tensors that are each layer's residual output and the final norm."""
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    layer_out: dict[int, str] = {}
    final = None
    for node in graph.node:
        for name in node.input:
            match = re.fullmatch(r"backbone\.encoder\.layer\.(\d+)\.layer_scale2\.lambda1", name)
            if node.op_type == "Mul" and match:
                adds = [n for n in consumers[node.output[0]] if n.op_type == "Add"]
                layer_out[int(match.group(1))] = adds[0].output[0]
        if node.op_type == "Add" and "backbone.layernorm.bias" in node.input:
            final = node.output[0]
    if final is None or sorted(layer_out) != list(range(len(layer_out))):
        raise ConversionError("cannot find the backbone's layer outputs in the ONNX graph")
    return [layer_out[i] for i in range(len(layer_out))], final


def compare_dinov2_with_onnx(model: Any, proto: Any, *, seed: int = 0) -> dict[str, Any]:
    """Run the ONNX graph (onnxruntime) and ``model`` on one random normalised image and return
    the largest absolute differences of every layer's hidden state and of the final layer norm
    (``last_hidden_state``), plus the size of the compared values."""
    import onnx
    import onnxruntime as ort

    graph = proto.graph
    layer_names, final_name = _backbone_outputs(graph)
    extended = onnx.ModelProto()
    extended.CopyFrom(proto)
    for name in [*layer_names, final_name]:
        extended.graph.output.append(onnx.helper.make_tensor_value_info(
            name, onnx.TensorProto.FLOAT, None))
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    size = dims[2] if len(dims) == 4 and dims[2] else 224
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(extended.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(1, 3, size, size, generator=generator)
    onnx_out = session.run([*layer_names, final_name],
                           {graph.input[0].name: pixels.numpy()})
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True)
    layer_diffs = [float(np.abs(out.hidden_states[i + 1].numpy() - ref).max())
                   for i, ref in enumerate(onnx_out[:-1])]
    final_diff = float(np.abs(out.last_hidden_state.numpy() - onnx_out[-1]).max())
    return {
        "image_size": size,
        "last_hidden_state_max_abs_diff": final_diff,
        "last_hidden_state_max_abs": float(np.abs(onnx_out[-1]).max()),
        "layers_max_abs_diff": layer_diffs,
        "layers_max_abs": [float(np.abs(ref).max()) for ref in onnx_out[:-1]],
    }


def check_dinov2_match(result: dict[str, Any], tolerance: float = TOLERANCE) -> None:
    """Raise unless the final output matches within ``tolerance`` (absolute) and so does every
    layer's hidden state, scaled by its largest value where that exceeds 1 (the residual
    stream grows with depth, and float32 rounding with it)."""
    bad = []
    if not result["last_hidden_state_max_abs_diff"] <= tolerance:
        bad.append(f"last_hidden_state differs by {result['last_hidden_state_max_abs_diff']:.3g}")
    for i, (diff, scale) in enumerate(zip(result["layers_max_abs_diff"],
                                          result["layers_max_abs"], strict=True)):
        if not diff <= tolerance * max(1.0, scale):
            bad.append(f"layer {i} differs by {diff:.3g} (values up to {scale:.3g})")
    if bad:
        raise ConversionError("the DINOv2 rebuilt from the ONNX graph does not match "
                              "onnxruntime: " + "; ".join(bad))
