"""The MoVA model: base encoder, frozen experts, MoV-Adapter, text encoder and LLM.

Each step is public and callable on its own (serving runs them in different processes):
:meth:`encode_base`, :meth:`encode_text`, :meth:`expert_features`, :meth:`fuse`,
:meth:`routing_tokens`, :meth:`route`, :meth:`answer`; :meth:`forward` is the training step
and :meth:`generate` the two-stage inference (route, then answer). Generation and checkpoint
I/O come from mixins (:mod:`mova.generation`, :mod:`mova.checkpoint`) that never import this
module back.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from PIL import Image
from torch import Tensor, nn

from mova.adapter import AdapterOutput, MoVAdapter
from mova.align import align_to_grid, pool_routing_tokens
from mova.builders import routing_descriptions
from mova.checkpoint import CheckpointMixin
from mova.config import MoVAConfig
from mova.conversation import gate_text, get_template
from mova.device import to_model_inputs
from mova.experts.encoders import BaseEncoder, VisionExpert
from mova.experts.preprocess import ImageProcessor
from mova.experts.registry import ResolvedExpert, resolve_expert
from mova.generation import GenerationMixin
from mova.images import load_image
from mova.outputs import MoVAOutput
from mova.tokenizers import IMAGE_TOKEN

log = logging.getLogger(__name__)

class MoVAModel(GenerationMixin, CheckpointMixin, nn.Module):
    """A complete MoVA model; build with :func:`mova.factory.build_model` or
    :func:`mova.factory.from_pretrained`."""

    def __init__(self, config: MoVAConfig, *, llm: nn.Module, tokenizer, text_encoder: nn.Module,
                 text_tokenizer, base_encoder: BaseEncoder, experts: Mapping[str, VisionExpert],
                 adapter: MoVAdapter) -> None:
        super().__init__()
        self.config = config
        self.llm = llm
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.text_tokenizer = text_tokenizer
        self.base_encoder = base_encoder
        self.experts = nn.ModuleDict(dict(experts))
        self.adapter = adapter
        self.resolved: dict[str, ResolvedExpert] = {
            e.name: resolve_expert(e) for e in config.experts
        }
        if list(self.experts) != config.expert_names:
            raise ValueError(
                f"experts {list(self.experts)} do not match the config's pool "
                f"{config.expert_names}"
            )
        self.template = get_template(config.llm.chat_template)
        self.processor = ImageProcessor(config.base.image_size, self.resolved.values())
        self.image_token_id = self._image_token_id()

    # ---- basic facts ---------------------------------------------------------------------
    @property
    def expert_names(self) -> list[str]:
        return list(self.experts)

    @property
    def device(self) -> torch.device:
        return next(self.adapter.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.adapter.parameters()).dtype

    def _image_token_id(self) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"the LLM tokenizer has no {IMAGE_TOKEN!r} token")
        return int(token_id)

    def routing_descriptions(self) -> list[str]:
        """One description per pool expert, in pool (letter) order (see ``routing.prompt``)."""
        return routing_descriptions(self.config)

    def mask_from_names(self, names: Sequence[Sequence[str]]) -> Tensor:
        """(B, N) 0/1 mask from per-sample expert names; unknown names are errors."""
        pool = self.expert_names
        mask = torch.zeros(len(names), len(pool), dtype=torch.bool)
        for i, sample in enumerate(names):
            for name in sample:
                if name not in pool:
                    raise ValueError(f"unknown expert {name!r} in sample {i}; pool: {pool}")
                mask[i, pool.index(name)] = True
        return mask

    def train(self, mode: bool = True) -> MoVAModel:
        """Like ``nn.Module.train``, but frozen experts always stay in eval mode."""
        super().train(mode)
        self.experts.eval()
        return self

    def apply_trainability(self) -> None:
        """Experts are always frozen; base and text encoder follow their ``trainable`` flags."""
        self.experts.requires_grad_(False)
        self.experts.eval()
        if self.base_encoder is not None:  # a serving replica may load without it
            self.base_encoder.requires_grad_(self.config.base.trainable)
        if self.text_encoder is not None:
            self.text_encoder.requires_grad_(self.config.text_encoder.trainable)

    # ---- preprocessing -------------------------------------------------------------------
    def prepare_images(self, images: Sequence) -> list[Image.Image]:
        return [load_image(im) for im in images]

    def tokenize_gate_text(self, questions: Sequence[Sequence[str]]) -> dict[str, Tensor]:
        texts = [gate_text(q) for q in questions]
        enc = self.text_tokenizer(texts, padding="longest", truncation=True,
                                  max_length=self.config.text_encoder.max_length,
                                  return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    # ---- separable steps -----------------------------------------------------------------
    def encode_base(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, G*G, C) base features."""
        return self.base_encoder(pixel_values.to(self.device, self.dtype))

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The raw last-layer [CLS] vector of the text encoder: (B, T)."""
        out = self.text_encoder(input_ids=input_ids.to(self.device),
                                attention_mask=attention_mask.to(self.device))
        return out.last_hidden_state[:, 0]

    def encode_questions(self, questions: Sequence[Sequence[str]]) -> Tensor:
        return self.encode_text(**self.tokenize_gate_text(questions))

    @torch.no_grad()
    def expert_features(self, name: str, inputs: Tensor) -> Tensor:
        """Native features (B, L_j, C_j) of one frozen expert."""
        if name not in self.experts:
            raise ValueError(f"unknown expert {name!r}; pool: {self.expert_names}")
        expert = self.experts[name]
        param = next(expert.parameters(), None)
        device = param.device if param is not None else self.device
        dtype = param.dtype if param is not None else self.dtype
        return expert(to_model_inputs(inputs, device, dtype))

    def routed_expert_features(self, expert_inputs: Mapping[str, Tensor], mask: Tensor
                               ) -> dict[str, Tensor]:
        """Compute each expert only on the samples routed to it; other rows stay zero."""
        features: dict[str, Tensor] = {}
        for j, name in enumerate(self.expert_names):
            rows = mask[:, j].nonzero().flatten()
            if rows.numel() == 0:
                continue
            if name not in expert_inputs:
                raise ValueError(f"expert {name!r} is routed but its input is missing")
            out = self.expert_features(name, expert_inputs[name][rows.cpu()])
            full = out.new_zeros((mask.shape[0], *out.shape[1:]))
            full[rows.to(out.device)] = out
            features[name] = full
        return features

    def align(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        grid = self.base_encoder.grid_size
        return {k: align_to_grid(v.to(self.device), grid, self.dtype) for k, v in features.items()}

    def fuse(self, base_features: Tensor, text_features: Tensor,
             expert_features: Mapping[str, Tensor] | None, mask: Tensor,
             compute_experts: Sequence[str] = (), debug: bool = False) -> AdapterOutput:
        """MoV-Adapter over base + (native-grid) expert features -> LLM-width image tokens.
        ``debug`` adds each block's raw router logits and top-k picks to the output."""
        aligned = self.align(expert_features or {})
        return self.adapter(base_features, text_features, aligned, mask.to(self.device),
                            compute_experts=compute_experts, debug=debug)

    def routing_tokens(self, base_features: Tensor, text_features: Tensor) -> Tensor:
        """The routing pass: adapter with an all-zero mask, pooled (e.g. 24x24 -> 12x12)."""
        mask = torch.zeros(base_features.shape[0], len(self.experts), dtype=torch.bool,
                           device=self.device)
        out = self.adapter(base_features, text_features, None, mask, return_gates=False)
        return pool_routing_tokens(out.image_tokens, self.config.adapter.routing_pool)

    # ---- LLM input assembly --------------------------------------------------------------
    def embed(self, input_ids: Tensor, image_tokens: Tensor | Sequence[Tensor] | None) -> Tensor:
        """LLM input embeddings with each sample's image-token run replaced by its tokens.

        ``image_tokens`` is (B, L, D), or one (L_i, D) tensor per sample when samples carry
        different numbers of image tokens (routing-instruction rows next to answer rows).
        """
        input_ids = input_ids.to(self.device)
        embeds = self.llm.get_input_embeddings()(input_ids)
        is_image = input_ids == self.image_token_id
        if image_tokens is None:
            if is_image.any():
                raise ValueError("input_ids hold image tokens but no image features were given")
            return embeds
        counts = is_image.sum(1).tolist()
        expected = [int(t.shape[-2]) for t in image_tokens]
        bad = [i for i, (c, e) in enumerate(zip(counts, expected, strict=True)) if c != e]
        if bad:
            raise ValueError(f"samples {bad} have {[counts[i] for i in bad]} image tokens; "
                             f"expected {[expected[i] for i in bad]}")
        flat = torch.cat([t.reshape(-1, embeds.shape[-1]) for t in image_tokens])
        embeds = embeds.clone()
        embeds[is_image] = flat.to(embeds.dtype)
        return embeds

    # ---- training ------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor,
                gate_input_ids: Tensor, gate_attention_mask: Tensor, expert_mask: Tensor,
                labels: Tensor | None = None,
                expert_features: Mapping[str, Tensor] | None = None,
                expert_inputs: Mapping[str, Tensor] | None = None,
                routing_rows: Tensor | None = None,
                sync_experts: Sequence[str] = ()) -> MoVAOutput:
        """Training/teacher-forced step. Expert features are either given (native grids, e.g.
        from the feature cache) or computed from ``expert_inputs``; only routed experts are
        needed. ``routing_rows`` (B,) marks routing-instruction samples: their image is the
        routing pass (all-zero mask, pooled), as at inference. ``sync_experts`` are experts
        whose adapter branch runs even when no local sample routes them (with zero features and
        weight): data-parallel training passes the union routed over all ranks, so every rank
        runs the same graph and gradient reductions line up."""
        mask = expert_mask.to(self.device).bool()
        if routing_rows is not None:
            routing_rows = routing_rows.to(self.device).bool()
            mask = mask & ~routing_rows[:, None]
        routed = [n for j, n in enumerate(self.expert_names) if bool(mask[:, j].any())]
        feats: dict[str, Tensor] = {}
        to_compute = torch.zeros_like(mask)
        for j, name in enumerate(self.expert_names):
            if name not in routed:
                continue
            if expert_features is not None and name in expert_features:
                feats[name] = expert_features[name]
            elif expert_inputs is not None and name in expert_inputs:
                to_compute[:, j] = mask[:, j]
            else:
                raise ValueError(f"expert {name!r} is routed in this batch but neither its "
                                 "features nor its inputs were given")
        if bool(to_compute.any()):
            feats.update(self.routed_expert_features(expert_inputs or {}, to_compute))
        batch = mask.shape[0]
        for name in sync_experts:
            if name not in feats:
                size = self.resolved[name]
                feats[name] = torch.zeros(batch, size.size.out_grid ** 2, size.channels,
                                          device=self.device, dtype=self.dtype)
        base = self.encode_base(pixel_values)
        text = self.encode_text(gate_input_ids, gate_attention_mask)
        fused = self.fuse(base, text, feats, mask, compute_experts=sync_experts)
        image_tokens: Tensor | list[Tensor] = fused.image_tokens
        if routing_rows is not None and bool(routing_rows.any()):
            pooled = pool_routing_tokens(fused.image_tokens, self.config.adapter.routing_pool)
            image_tokens = [pooled[i] if bool(r) else fused.image_tokens[i]
                            for i, r in enumerate(routing_rows)]
        embeds = self.embed(input_ids, image_tokens)
        out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask.to(self.device),
                       labels=None if labels is None else labels.to(self.device))
        return MoVAOutput(loss=out.loss, logits=out.logits, gate_weights=fused.gate_weights)
