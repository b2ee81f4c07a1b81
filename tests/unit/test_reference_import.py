"""Importing the authors' released MoVA checkpoint (REFERENCE.md) into our checkpoint format.

The fixture writes a checkpoint in exactly the released layout at tiny shapes: a Llama LLM and
its tokenizer, the MoV-Adapter under the released names (obtained by inverting the mapping by
hand from one of our adapters with random non-zero weights), the BERT as ``text_encoder.bert``,
2D-RoPE tables computed the way the released code computes them, the base CLIP tower, frozen
experts referenced through ``mm_vision_tower``, and a LLaVA/MoVA ``config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from released_layout import (  # tests/released_layout.py
    BLOCKS,
    CHANNELS,
    C,
    D,
    G,
    Parts,
    released_adapter_key,
    released_rope,
)
from safetensors.torch import load_file
from transformers import (
    BertConfig,
    CLIPVisionConfig,
)

import mova.convert.reference_io as reference_io
from mova.adapter import MoVAdapter
from mova.config import AdapterConfig
from mova.convert import ConversionError, ReferenceImportError
from mova.convert.reference import import_reference, template_for
from mova.convert.reference_config import read_released_config
from mova.convert.reference_io import WeightFiles, write_safetensors
from mova.convert.reference_keys import adapter_key, verify_rope
from mova.experts.registry import DEFAULT_POOL
from mova.factory import from_pretrained
from mova.routing import (
    RELEASED_ROUTING_INTRO,
    build_released_routing_prompt,
    render_routing_prompt,
)

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> Parts:
    return Parts(tmp_path_factory.mktemp("released_parts"))


@pytest.fixture(scope="module")
def imported(parts, tmp_path_factory):
    root = tmp_path_factory.mktemp("released_import")
    src = parts.write(root / "src")
    report = import_reference(src, root / "out", expert_preset="tiny")
    return src, root / "out", report


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.rglob("*.safetensors")):
        for key, value in load_file(str(path)).items():
            out[f"{path.relative_to(folder)}:{key}"] = value
    return out


# ---- the import -------------------------------------------------------------------------------
def test_every_key_is_placed_and_reported(parts, imported):
    _, out, report = imported
    state = parts.state()
    groups = report.key_groups
    assert groups["llm"] == len(parts.llm.state_dict())
    assert groups["adapter"] == len(parts.adapter.state_dict())
    assert groups["adapter_rope_verified"] == BLOCKS * (len(DEFAULT_POOL) + 1) * 2
    assert groups["text_encoder"] == len(parts.bert.state_dict())
    assert groups["base_tower"] == len(parts.clip.state_dict())
    assert groups["experts_by_reference"] == 2
    assert report.recomputed_buffers == ["model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert sum(groups.values()) == len(state)
    assert report.experts["dinov2"] == {"reference": parts.expert_dirs[0],
                                        "channels": CHANNELS["dinov2"],
                                        "source_keys_not_copied": 1}
    assert report.base_encoder["from"] == "state_dict"
    assert report.template == "vicuna_v1" and report.routing_prompt == "released"
    assert {"tune_mm_mlp_adapter", "image_aspect_ratio", "mm_use_im_patch_token"} <= set(
        report.ignored_fields)
    assert report.ignored_fields["tune_mm_mlp_adapter"] == {
        "value": False, "why": "training knob (stage-1 adapter tuning)"}
    assert report.mapped_fields["mm_projector_type"] == "mov_adapter"
    assert any("pad" in note for note in report.notes)
    saved = json.loads((out / "import.json").read_text())
    assert saved["key_groups"] == groups and saved["source"] == report.source
    assert "import.json" in json.loads((out / "files.json").read_text())["files"]
    components = json.loads((out / "components.json").read_text())
    assert components["experts"]["sam"]["reference"] == parts.expert_dirs[-1]
    assert not (out / "experts").exists()  # experts are referenced, never copied


def test_imported_parts_reproduce_the_source(parts, imported, noise_image):
    _, out, _ = imported
    model = from_pretrained(out)
    config = model.config
    assert config.adapter.num_heads == 16 and config.adapter.num_blocks == BLOCKS
    assert config.routing.prompt == "released" and config.llm.chat_template == "vicuna_v1"
    assert config.base.image_size == G * 14 and config.base.feature_layer == -2
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(2, G * G, C, generator=gen)
    text = torch.randn(2, 32, generator=gen)
    feats = {n: torch.randn(2, G * G, c, generator=gen) for n, c in CHANNELS.items()}
    mask = torch.tensor([[1, 0, 1, 1, 0, 0, 1], [0, 1, 0, 0, 0, 1, 0]], dtype=torch.bool)
    with torch.no_grad():
        want = parts.adapter(base, text, feats, mask)
        got = model.adapter(base, text, feats, mask)
        torch.testing.assert_close(got.image_tokens, want.image_tokens, atol=1e-6, rtol=0)
        torch.testing.assert_close(got.gate_weights, want.gate_weights, atol=1e-6, rtol=0)
        ids = torch.tensor([[5, 17, 99, 3]])
        torch.testing.assert_close(model.llm(input_ids=ids).logits,
                                   parts.llm(input_ids=ids).logits, atol=1e-6, rtol=0)
        enc = parts.bert_tok(["question 0: what is it?\n\n"], return_tensors="pt")
        torch.testing.assert_close(model.text_encoder(**enc).last_hidden_state,
                                   parts.bert(**enc).last_hidden_state, atol=1e-6, rtol=0)
        pixels = model.processor.base([noise_image(0)])
        ref = parts.clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(model.encode_base(pixels), ref, atol=1e-6, rtol=0)


def test_fuse_debug_exposes_router_logits_and_picks(imported, noise_image):
    model = from_pretrained(imported[1])
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(1, G * G, C, generator=gen)
    text = torch.randn(1, 32, generator=gen)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    feats = model.routed_expert_features(
        model.processor.experts_inputs(["dinov2", "vary"], [noise_image(0)]), mask)
    with torch.no_grad():
        plain = model.fuse(base, text, feats, mask)
        debug = model.fuse(base, text, feats, mask, debug=True)
    assert plain.router_logits is None and plain.top_k is None
    assert torch.equal(plain.image_tokens, debug.image_tokens)
    assert debug.router_logits.shape == (1, BLOCKS, 7) and debug.top_k.shape == (1, BLOCKS, 3)
    for b in range(BLOCKS):
        picks = [int(i) for i in debug.top_k[0, b] if i >= 0]
        assert sorted(picks) == [0, 1] and debug.top_k[0, b, 2] == -1
        assert picks == debug.gate_weights[0, b, :2].argsort(descending=True).tolist()


def test_generate_runs_routed_and_forced(imported, noise_image):
    model = from_pretrained(imported[1])
    question = "What is in the image?"
    # the released wording itself is checked verbatim in test_templates.py
    expected = build_released_routing_prompt(question, model.routing_descriptions())
    assert expected.startswith("<image>\n" + RELEASED_ROUTING_INTRO) and len(
        [line for line in expected.splitlines() if line[:3] in {f"{c}. " for c in "ABCDEFG"}]) == 7
    assert render_routing_prompt("released", question, model.routing_descriptions()) == expected
    routed = model.generate([noise_image(1)], [question], max_new_tokens=3)
    forced = model.generate([noise_image(1)], [question], experts=["dinov2", "sam"],
                            max_new_tokens=3)
    assert isinstance(routed[0].answer, str) and routed[0].routing_reply is not None
    assert forced[0].experts == ["dinov2", "sam"] and len(forced[0].gate_weights) == BLOCKS


def test_base_tower_from_its_folder_when_absent_from_the_state(parts, tmp_path):
    state = {k: v for k, v in parts.state().items()
             if not k.startswith("model.vision_tower.vision_tower_0.")}
    src = parts.write(tmp_path / "src", state=state)
    report = import_reference(src, tmp_path / "out", expert_preset="tiny")
    assert report.base_encoder["from"] == "folder" and report.key_groups["base_tower"] == 0
    model = from_pretrained(tmp_path / "out")
    for name, tensor in parts.clip.state_dict().items():  # resized from the native 56 px
        torch.testing.assert_close(model.base_encoder.model.state_dict()[name], tensor)


def test_sharded_bin_imports_like_safetensors_and_round_trips(parts, imported, tmp_path,
                                                              monkeypatch):
    calls = []
    real_load = torch.load
    monkeypatch.setattr(reference_io.torch, "load",
                        lambda *a, **k: calls.append(k) or real_load(*a, **k))
    src = parts.write(tmp_path / "src", fmt="bin")
    report = import_reference(src, tmp_path / "out", expert_preset="tiny",
                              write_safetensors=tmp_path / "st")
    assert calls and all(k.get("weights_only") is True for k in calls)
    assert report.weights["layout"] == "pytorch_model.bin.index.json"
    reference = _tensors(imported[1])
    got = _tensors(tmp_path / "out")
    assert got.keys() == reference.keys()
    assert all(torch.equal(got[k], reference[k]) for k in reference)
    # the written safetensors hold the source state dict unchanged and import the same
    written = WeightFiles(tmp_path / "st")
    assert written.entry == "model.safetensors.index.json"
    source = parts.state()
    assert written.keys() == sorted(source)
    assert all(torch.equal(v, source[k]) for k, v in written.load(written.keys()).items())
    import_reference(tmp_path / "st", tmp_path / "out2", expert_preset="tiny")
    again = _tensors(tmp_path / "out2")
    assert all(torch.equal(again[k], reference[k]) for k in reference)


def test_write_safetensors_shards_with_an_index(parts, imported, tmp_path):
    weights = WeightFiles(imported[0])
    write_safetensors(weights, tmp_path / "st", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "st" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert (tmp_path / "st" / "config.json").is_file()
    assert (tmp_path / "st" / "tokenizer.json").is_file()
    back = WeightFiles(tmp_path / "st")
    source = weights.load(weights.keys())
    assert all(torch.equal(v, source[k]) for k, v in back.load(back.keys()).items())


_UNPICKLED: list[str] = []


def _mark_unpickled() -> str:
    _UNPICKLED.append("ran")
    return "payload"


class _Payload:
    def __reduce__(self):
        return (_mark_unpickled, ())


def test_a_bin_with_a_non_tensor_object_is_refused_never_unpickled(parts, tmp_path):
    src = parts.write(tmp_path / "src", fmt="bin")
    shard = src / "pytorch_model-00001-of-00002.bin"
    state = torch.load(shard, weights_only=True)
    state["model.norm.weight"] = _Payload()
    torch.save(state, shard)
    with pytest.raises(ReferenceImportError, match="refused to load"):
        import_reference(src, tmp_path / "out", expert_preset="tiny")
    assert _UNPICKLED == []


# ---- errors name what is wrong ------------------------------------------------------------------
def _import_with(parts, tmp_path, state=None, config=None, **kwargs):
    src = parts.write(tmp_path / "src", state=state, config=config)
    return import_reference(src, tmp_path / "out", expert_preset="tiny", **kwargs)


def test_missing_key_is_named(parts, tmp_path):
    state = parts.state()
    del state["model.mm_projector.blocks.1.cross_attn.3.k_proj.weight"]
    with pytest.raises(ReferenceImportError, match=r"lacks 1 .*blocks\.1\.extractors\.pix2struct"
                                                   r"\.attn\.k_proj\.weight"):
        _import_with(parts, tmp_path, state=state)


def test_extra_key_is_named(parts, tmp_path):
    state = parts.state()
    state["model.mm_projector.blocks.0.cross_attn.2.q_bias"] = torch.zeros(C)
    state["model.image_newline"] = torch.zeros(D)
    with pytest.raises(ReferenceImportError, match=r"2 checkpoint key\(s\) cannot be placed: "
                                                   r"model\.image_newline, .*q_bias"):
        _import_with(parts, tmp_path, state=state)


def test_wrong_shape_is_named(parts, tmp_path):
    state = parts.state()
    state["model.mm_projector.mlp.2.weight"] = torch.zeros(D, D + 1)
    with pytest.raises(ReferenceImportError,
                       match=rf"shape mismatch .*mlp\.2\.weight \({D}, {D + 1}\) "
                             rf"-> projector\.2\.weight \({D}, {D}\)"):
        _import_with(parts, tmp_path, state=state)


def test_unknown_config_field_is_named_unless_ignored(parts, tmp_path):
    config = parts.config(mystery_knob=7)
    with pytest.raises(ReferenceImportError, match=r"\['mystery_knob'\].*ignore_fields"):
        _import_with(parts, tmp_path, config=config)
    released = read_released_config(config, ignore_fields=["mystery_knob"])
    assert released.user_ignored == {"mystery_knob": 7}


@pytest.mark.parametrize("field, value, pattern", [
    ("mm_projector_type", "mlp2x_gelu", "mm_projector_type='mlp2x_gelu'"),
    ("mm_vision_select_feature", "cls_patch", "mm_vision_select_feature='cls_patch'"),
    ("mm_use_im_start_end", True, "mm_use_im_start_end=True"),
    ("topk", 2, "topk=2 and topk_experts=3 disagree"),
    ("expert_channels", [24, 24], "expert_channels"),
    ("num_routing_tokens", 5, "num_routing_tokens=5"),
])
def test_config_values_are_checked(parts, field, value, pattern):
    with pytest.raises(ReferenceImportError, match=pattern):
        read_released_config(parts.config(**{field: value}))


def test_missing_required_field_is_named(parts):
    config = parts.config()
    del config["image_feat_size"]
    with pytest.raises(ReferenceImportError, match=r"lacks required field\(s\) \['image_feat_"):
        read_released_config(config)


def test_corrupt_rope_table_is_named(parts, tmp_path):
    state = parts.state()
    key = "model.mm_projector.blocks.1.cross_attn.5.rope.freqs_sin"
    state[key] = state[key].clone()
    state[key][3, 1] += 0.01
    with pytest.raises(ReferenceImportError, match=r"blocks\.1\.cross_attn\.5\.rope\.freqs_sin: "
                                                   r"rope table differs"):
        _import_with(parts, tmp_path, state=state)


def test_a_checkpoint_stored_wholly_in_bf16_imports(parts, tmp_path):
    """A bf16-trained release stores every tensor in bf16, its RoPE buffers included: the
    tables are checked at bf16's precision, and the model imports in bf16."""
    state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
             for k, v in parts.state().items()}
    assert {v.dtype for k, v in state.items() if "rope.freqs" in k} == {torch.bfloat16}
    report = _import_with(parts, tmp_path, state=state)
    assert report.dtype == "bfloat16"
    assert report.key_groups["adapter_rope_verified"] == BLOCKS * (len(DEFAULT_POOL) + 1) * 2
    model = from_pretrained(report.out)
    assert {p.dtype for p in model.adapter.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.llm.parameters()} == {torch.bfloat16}
    key = "model.mm_projector.blocks.0.cross_attn.2.rope.freqs_cos"
    state[key] = state[key].clone()
    state[key][2, 3] += 0.05  # a wrong layout, not rounding: still refused in bf16
    with pytest.raises(ReferenceImportError, match=r"cross_attn\.2\.rope\.freqs_cos: rope table "
                                                   r"differs .* at bfloat16"):
        _import_with(parts, tmp_path / "corrupt", state=state)


def test_expert_channel_mismatch_names_the_expert(parts, tmp_path):
    channels = [CHANNELS[n] for n in DEFAULT_POOL]
    channels[2] += 1
    with pytest.raises(ReferenceImportError, match=r"expert 'codetr': expert_channels\[2\]=17"):
        _import_with(parts, tmp_path, config=parts.config(expert_channels=channels))


def test_unloadable_expert_names_it_and_the_override(parts, tmp_path):
    with pytest.raises(ReferenceImportError, match=r"expert 'deplot'.*--expert deplot=PATH"):
        _import_with(parts, tmp_path, expert_paths={"deplot": str(tmp_path / "nowhere")})
    with pytest.raises(ReferenceImportError, match="unknown expert"):
        _import_with(parts, tmp_path / "again", expert_paths={"clip": "x"})


def test_error_is_a_conversion_error():
    assert issubclass(ReferenceImportError, ConversionError)


def test_output_folder_is_not_overwritten_silently(parts, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ReferenceImportError, match="not empty"):
        _import_with(parts, tmp_path)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


# ---- pure pieces --------------------------------------------------------------------------------
def test_rope_of_the_released_model_matches_ours_at_full_size():
    cos, sin = released_rope(64, 48)
    verify_rope({"a.rope.freqs_cos": cos, "a.rope.freqs_sin": sin}, head_dim=64, grid=48)
    for dtype in (torch.bfloat16, torch.float16):  # tables saved in half precision
        verify_rope({"a.rope.freqs_cos": cos.to(dtype), "a.rope.freqs_sin": sin.to(dtype)},
                    head_dim=64, grid=48)
    with pytest.raises(ReferenceImportError, match=r"freqs_sin: rope table differs .* at float16"):
        verify_rope({"a.rope.freqs_sin": (sin + 0.01).to(torch.float16)}, head_dim=64, grid=48)
    with pytest.raises(ReferenceImportError, match=r"a\.rope\.freqs_cos: rope table of shape"):
        verify_rope({"a.rope.freqs_cos": cos[:, :32]}, head_dim=64, grid=48)


def test_adapter_key_mapping_round_trips_every_key():
    adapter = MoVAdapter(AdapterConfig(num_heads=16, num_blocks=2), hidden_size=C, grid_size=G,
                         expert_channels=CHANNELS, text_hidden_size=32, llm_hidden_size=D)
    for key in adapter.state_dict():
        assert adapter_key(released_adapter_key(key), DEFAULT_POOL) == key
    assert adapter_key("blocks.0.cross_attn.7.q_proj.weight", DEFAULT_POOL) is None
    assert adapter_key("downsample.1.b1.conv1.conv.weight", DEFAULT_POOL) is None


def test_template_follows_the_llm_tokenizer():
    class Vocab:
        def __init__(self, *tokens):
            self.tokens = {t: i for i, t in enumerate(tokens)}

        def get_vocab(self):
            return self.tokens

    assert template_for(Vocab("<|eot_id|>", "<|start_header_id|>")) == "mova_llama3"
    assert template_for(Vocab("</s>", "<s>")) == "vicuna_v1"


def test_template_override_is_checked(parts, tmp_path):
    with pytest.raises(ReferenceImportError, match="template='alpaca'"):
        import_reference(tmp_path, tmp_path / "out", template="alpaca")


def test_only_a_hub_id_is_downloaded(tmp_path, monkeypatch):
    from mova.convert import reference
    from mova.convert.reference import resolve_source

    calls = []
    monkeypatch.setattr(reference, "snapshot_download",
                        lambda repo: calls.append(repo) or str(tmp_path))
    assert resolve_source(tmp_path) == tmp_path and calls == []
    assert resolve_source("zongzhuofan/llama3-mova-8b") == tmp_path
    assert calls == ["zongzhuofan/llama3-mova-8b"]


def test_source_that_is_no_folder_or_hub_id(tmp_path):
    with pytest.raises(ReferenceImportError, match="neither a folder nor a hub id"):
        import_reference(str(tmp_path / "missing" / "x" / "y"), tmp_path / "out")



# ---- the CLI ------------------------------------------------------------------------------------
def test_cli_imports_and_reports(parts, tmp_path, capsys):
    from pipelines.cli import main

    src = parts.write(tmp_path / "src", config=parts.config(mystery_knob=1))
    argv = ["model", "import-reference", str(src), "--out", str(tmp_path / "out"),
            "--expert-preset", "tiny", "--expert", f"sam={parts.expert_dirs[-1]}",
            "--template", "mova_llama3"]
    assert main(argv) == 1
    assert "mystery_knob" in capsys.readouterr().err
    assert main([*argv, "--ignore-field", "mystery_knob"]) == 0
    out = capsys.readouterr().out
    assert "expert sam        by reference" in out and "answer template mova_llama3" in out
    assert f"MoVA checkpoint written to {tmp_path / 'out'}" in out
    report = json.loads((tmp_path / "out" / "import.json").read_text())
    assert report["user_ignored_fields"] == {"mystery_knob": 1}
    assert from_pretrained(tmp_path / "out").config.llm.chat_template == "mova_llama3"
    assert main([*argv[:5], "--expert", "sam"]) == 1  # NAME=PATH is required


def test_full_size_shapes_follow_reference_table(parts):
    """At the released sizes (C = 1024, G = 48, D = 4096), our adapter's tensors have exactly
    the shapes REFERENCE.md lists for the released names."""
    from mova.builders import build_adapter
    from mova.convert.reference import _mova_config

    full = [1536, 512, 256, 1536, 768, 768, 256]
    config = parts.config(mm_hidden_size=1024, image_feat_size=48, expert_channels=full,
                          num_routing_tokens=144, hidden_size=4096, intermediate_size=14336,
                          num_attention_heads=32, num_key_value_heads=8,
                          max_position_embeddings=8192, num_hidden_layers=32)
    released = read_released_config(config)
    clip = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=1024,
                            num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    bert = BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                      intermediate_size=4096)
    refs = dict(zip(DEFAULT_POOL, parts.expert_dirs, strict=True))
    mova_config = _mova_config(released, clip, bert, refs, "mova_llama3", "full", "bfloat16")
    assert mova_config.num_image_tokens == 576 and mova_config.num_routing_tokens == 144
    with torch.device("meta"):
        adapter = build_adapter(mova_config)
    shapes = {released_adapter_key(k): tuple(v.shape) for k, v in adapter.state_dict().items()}
    H = int(1024 * 8 / 3)  # noqa: N806
    expected = {
        "pos_embed": (1, 48 * 48, 1024),
        "blocks.1.cross_attn.0.q_proj.weight": (1024, 1024),
        **{f"blocks.1.cross_attn.{j}.k_proj.weight": (1024, c) for j, c in enumerate(full)},
        **{f"blocks.0.norm2.{j}.weight": (c,) for j, c in enumerate(full)},
        "blocks.0.cross_attn.6.inner_attn_ln.bias": (1024,),
        "blocks.0.cross_attn.6.proj.weight": (1024, 1024),
        "blocks.0.self_attn.v_proj.weight": (1024, 1024),
        "blocks.0.norm3.weight": (1024,), "blocks.0.norm4.bias": (1024,),
        "blocks.0.mlp.w1.weight": (H, 1024), "blocks.0.mlp.w2.bias": (H,),
        "blocks.0.mlp.ffn_ln.weight": (H,), "blocks.0.mlp.w3.weight": (1024, H),
        "blocks.0.gate.0.weight": (1024, 1024 + 1024), "blocks.0.gate.2.weight": (7, 1024),
        "downsample.0.b1.conv1.conv.weight": (1024, 1024, 1, 1),
        "downsample.2.b1.conv2.conv.weight": (1024, 1, 3, 3),
        "downsample.0.b1.se.fc1.weight": (256, 1024, 1, 1),
        "downsample.2.b1.se.fc2.weight": (1024, 256, 1, 1),
        "downsample.2.b1.conv3.bn.weight": (1024,),
        "mlp.0.weight": (4096, 1024), "mlp.2.weight": (4096, 4096),
    }
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    assert adapter.rotary.cos.shape == (48 * 48, 64)
