"""A MoVA checkpoint written in exactly the authors' released layout, at tiny shapes (shared by
the importer's unit tests and the integration test that serves an imported checkpoint).

A Llama LLM and its tokenizer, the MoV-Adapter under the released names (the mapping inverted
by hand from one of our adapters with random non-zero weights), the BERT as
``text_encoder.bert``, 2D-RoPE tables computed the way the released code computes them, the base
CLIP tower, frozen experts referenced through ``mm_vision_tower``, and a LLaVA/MoVA
``config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from mova.adapter import MoVAdapter
from mova.config import AdapterConfig, ExpertConfig
from mova.experts.encoders import resize_clip_positions
from mova.experts.registry import DEFAULT_POOL, resolve_expert
from mova.factory import build_tiny_mova
from mova.tokenizers import build_tiny_bert_tokenizer, build_tiny_llm_tokenizer

C, G, BLOCKS, D = 64, 8, 2, 64  # D: the LLM width (2 heads of 32: vLLM's CPU attention
# takes head sizes from 32)
CHANNELS = {n: resolve_expert(ExpertConfig(name=n, preset="tiny")).channels for n in DEFAULT_POOL}


# ---- writing a checkpoint in the released layout --------------------------------------------
_STAGE_LEAVES = {"conv1.weight": "conv1.conv.weight", "conv2.weight": "conv2.conv.weight",
                 "conv3.weight": "conv3.conv.weight", "norm1": "conv1.bn", "norm2": "conv2.bn",
                 "norm3": "conv3.bn", "se.reduce": "se.fc1", "se.expand": "se.fc2"}
_ATTN_LEAVES = {"norm": "inner_attn_ln", "out_proj": "proj"}


def released_adapter_key(ours: str) -> str:
    """Our adapter key -> the released name (REFERENCE.md's table, inverted by hand)."""
    if ours == "pos_embed.weight":
        return "pos_embed"
    if ours.startswith("projector."):
        return "mlp." + ours[len("projector."):]
    if ours.startswith("downsampler."):
        _, stage, rest = ours.split(".", 2)
        head, _, leaf = rest.rpartition(".")
        new = _STAGE_LEAVES.get(rest) or f"{_STAGE_LEAVES[head]}.{leaf}"
        return f"downsample.{'0' if stage == 'stage1' else '2'}.b1.{new}"
    _, b, rest = ours.split(".", 2)
    if rest.startswith("extractors."):
        _, name, sub = rest.split(".", 2)
        j = DEFAULT_POOL.index(name)
        if sub.startswith(("norm_x.", "norm_f.")):
            return f"blocks.{b}.norm{1 if sub.startswith('norm_x') else 2}.{j}.{sub[7:]}"
        layer, leaf = sub[len("attn."):].split(".")
        return f"blocks.{b}.cross_attn.{j}.{_ATTN_LEAVES.get(layer, layer)}.{leaf}"
    for old, new in (("self_attn.norm.", "self_attn.inner_attn_ln."),
                     ("self_attn.out_proj.", "self_attn.proj."), ("mlp.norm.", "mlp.ffn_ln."),
                     ("gate.fc1.", "gate.0."), ("gate.fc2.", "gate.2.")):
        rest = rest.replace(old, new)
    return f"blocks.{b}.{rest}"


def released_rope(head_dim: int, grid: int, theta: float = 10000.0):
    """The released ``VisionRotaryEmbeddingFast(dim=head_dim // 2, pt_seq_len=grid)`` tables."""
    dim = head_dim // 2
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    t = torch.arange(grid) / grid * grid
    freqs = torch.einsum("..., f -> ... f", t, freqs).repeat_interleave(2, dim=-1)
    freqs = torch.cat([freqs[:, None, :].expand(grid, grid, -1),
                       freqs[None, :, :].expand(grid, grid, -1)], dim=-1)
    return freqs.cos().reshape(grid * grid, -1), freqs.sin().reshape(grid * grid, -1)


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Non-zero weights everywhere (LayerNorm weights near 1), so no zero init hides a bug."""
    gen = torch.Generator().manual_seed(seed)
    norms = {id(m.weight) for m in model.modules() if isinstance(m, nn.LayerNorm)}
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            p.copy_(noise + (1.0 if id(p) in norms else 0.0))
    return model


def llama_fields(vocab: int, eos: int) -> dict:
    """A Llama config the way transformers 4.3x wrote it (MoVA's model_type)."""
    return {
        "architectures": ["MovaLlamaForCausalLM"], "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": None, "eos_token_id": eos,
        "hidden_act": "silu", "hidden_size": D, "initializer_range": 0.02,
        "intermediate_size": 96, "max_position_embeddings": 512, "model_type": "mova_llama",
        "num_attention_heads": 2, "num_hidden_layers": 2, "num_key_value_heads": 1,
        "pretraining_tp": 1, "rms_norm_eps": 1e-5, "rope_scaling": None, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "float32",
        "transformers_version": "4.37.2", "use_cache": True, "vocab_size": vocab,
    }


class Parts:
    """The reference modules the released checkpoint is written from."""

    def __init__(self, root: Path) -> None:
        torch.manual_seed(0)
        self.root = root
        tiny = build_tiny_mova(seed=0)
        tiny.save_pretrained(root / "tiny", experts="copy")
        self.expert_dirs = [str(root / "tiny" / "experts" / n) for n in DEFAULT_POOL]
        native = CLIPVisionModel(CLIPVisionConfig(
            image_size=56, patch_size=14, hidden_size=C, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=128))
        native.save_pretrained(root / "clip")
        self.clip = resize_clip_positions(native, G * 14).eval()
        self.bert_tok = build_tiny_bert_tokenizer()
        self.bert = BertModel(BertConfig(
            vocab_size=len(self.bert_tok), hidden_size=32, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=64), add_pooling_layer=False).eval()
        self.bert.save_pretrained(root / "bert")
        self.bert_tok.save_pretrained(root / "bert")
        self.tok = build_tiny_llm_tokenizer()
        self.llama = llama_fields(len(self.tok), self.tok.eos_token_id)
        cfg = {k: v for k, v in self.llama.items() if k not in ("model_type", "architectures")}
        self.llm = LlamaForCausalLM(LlamaConfig.from_dict(cfg)).eval()
        self.adapter = randomize(MoVAdapter(
            AdapterConfig(num_heads=16, num_blocks=BLOCKS, top_k=3, routing_pool=2),
            hidden_size=C, grid_size=G, expert_channels=CHANNELS, text_hidden_size=32,
            llm_hidden_size=D), seed=1).eval()

    def state(self) -> dict[str, torch.Tensor]:
        state = dict(self.llm.state_dict())
        for key, value in self.adapter.state_dict().items():
            state["model.mm_projector." + released_adapter_key(key)] = value
        cos, sin = released_rope(C // 16, G)
        for b in range(BLOCKS):
            for owner in [f"cross_attn.{j}" for j in range(len(DEFAULT_POOL))] + ["self_attn"]:
                state[f"model.mm_projector.blocks.{b}.{owner}.rope.freqs_cos"] = cos
                state[f"model.mm_projector.blocks.{b}.{owner}.rope.freqs_sin"] = sin
        for key, value in self.bert.state_dict().items():
            state["model.mm_projector.text_encoder.bert." + key] = value
        for key, value in self.clip.state_dict().items():
            name = key if key.startswith("vision_model.") else "vision_model." + key
            state["model.vision_tower.vision_tower_0." + name] = value
        # frozen experts as the released trainer saved them: placed by reference, not copied
        state["model.vision_tower.vision_tower_1.embeddings.cls_token"] = torch.zeros(1, 1, 24)
        state["model.vision_tower.vision_tower_7.neck.0.weight"] = torch.zeros(16, 24, 1, 1)
        state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(6)  # old transformers
        return {k: v.detach().clone().contiguous() for k, v in state.items()}

    def config(self, **extra) -> dict:
        return {**self.llama,
                "mm_projector_type": "mov_adapter", "mm_hidden_size": C, "image_feat_size": G,
                "expert_channels": [CHANNELS[n] for n in DEFAULT_POOL],
                "num_projector_layers": BLOCKS, "topk_experts": 3, "topk": 3,
                "num_routing_tokens": (G // 4) ** 2,
                "mm_projector_text_encoder": str(self.root / "bert"),
                "mm_projector_freeze_text_encoder": False,
                "mm_vision_tower": [str(self.root / "clip"), *self.expert_dirs],
                "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
                "ft_vision_tower": True, "ft_vision_tower_last_n_layer": -1,
                "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
                "image_aspect_ratio": "pad", "tune_mm_mlp_adapter": False,
                "freeze_mm_mlp_adapter": False, "mm_projector_lr": None,
                "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right",
                "mm_patch_merge_type": "flat", "use_mm_proj": True, **extra}

    def write(self, folder: Path, state: dict | None = None, config: dict | None = None,
              fmt: str = "safetensors") -> Path:
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(config or self.config(), indent=2))
        self.tok.save_pretrained(folder)
        state = self.state() if state is None else state
        if fmt == "safetensors":
            save_file(state, str(folder / "model.safetensors"))
        else:  # sharded .bin with an index, as the released trainer wrote them
            keys = sorted(state)
            shards = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
            weight_map = {}
            for i, part in enumerate(shards, start=1):
                name = f"pytorch_model-{i:05d}-of-00002.bin"
                torch.save({k: state[k] for k in part}, folder / name)
                weight_map.update({k: name for k in part})
            (folder / "pytorch_model.bin.index.json").write_text(
                json.dumps({"metadata": {}, "weight_map": weight_map}))
        return folder
