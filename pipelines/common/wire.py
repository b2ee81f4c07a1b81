"""Wire types shared by the server and its clients: the ``mova`` field of a chat response.

The Serve ingress writes it; ``mova eval endpoint=``, the demo and ``mova bench serve`` read it
back from a response with :meth:`MoVAInfo.from_response`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class MoVAInfo(BaseModel):
    """The response's ``mova`` field: the routing decision, the gate weights and where the
    time went. The ingress writes it; ``mova eval endpoint=``, the demo and the serve
    benchmark read it back with :meth:`from_response`."""

    model_config = ConfigDict(extra="forbid")
    experts: list[str] = Field(description="the experts fused for this request, pool order")
    forced: bool = Field(description="true when the request forced the experts")
    routing_reply: str | None = Field(default=None,
                                      description="the LLM's raw routing reply (None if forced)")
    pool: list[str] = Field(description="the model's expert pool, in routing-letter order")
    gate_weights: list[list[float]] = Field(
        default_factory=list, description="per adapter block, one soft-gate weight per expert")
    vision_ms: float = Field(description="server time from the first model call to the fused "
                                         "image tokens")
    vision_steps_ms: dict[str, float] = Field(default_factory=dict,
                                              description="encode, route, experts, fuse")
    timings_ms: dict[str, float] | None = Field(
        default=None, description="non-streamed replies: prepare, vision, answer, total")
    router_logits: list[list[float]] | None = Field(
        default=None, description="with mova.debug: per adapter block, the raw router logit "
                                  "of each pool expert (before the routing mask)")
    top_k: list[list[int]] | None = Field(
        default=None, description="with mova.debug: per adapter block, the pool indices of its "
                                  "top-k picks, best first (-1: a pick with no weight)")

    @classmethod
    def from_response(cls, body: Any) -> MoVAInfo | None:
        """The ``mova`` field of a response body (a dict, or an ``openai`` client object whose
        extra fields hold it); None when the server sent none."""
        if not isinstance(body, dict):
            body = getattr(body, "model_extra", None) or {}
        data = body.get("mova")
        return None if data is None else cls.model_validate(data)
