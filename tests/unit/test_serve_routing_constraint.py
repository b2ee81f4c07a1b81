"""The routing-reply constraint (mova/routing_constraint.py) that serving decodes routing with:
its language, and the property that greedy decoding within it equals the free greedy reply
whenever that reply is well formed (and always parses otherwise)."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from mova.decoding import BatchDecoder, DecodeParams
from mova.factory import build_tiny_mova
from mova.routing import parse_routing
from mova.routing_constraint import (
    RoutingConstraint,
    constrained_routing_params,
    use_constrained_routing,
)

pytestmark = pytest.mark.usefixtures("one_thread")
REAL_LLM = Path.home() / ".cache" / "mova" / "real" / "llm"


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_mova(seed=0)


CASES = [
    ("", True, False), ("  ", True, False), ("A", True, True), ("a", True, True),
    ("A,", True, False), ("A, C", True, True), ("A C", True, True), ("A,C.", True, True),
    ("A, B, C", True, True), ("A, B, C,", False, False), ("A, A", False, False),
    ("none", True, True), ("None.", True, True), ("NONE", True, True), ("no", True, False),
    ("AB", False, False), ("A1", False, False), ("H", False, False), ("x", False, False),
    ("A .", True, True), ("\nA", True, True), ("none, A", False, False),
    ("A. ", False, False), ("none ", False, False), ("   A", False, False),
]


@pytest.mark.parametrize("text, viable, complete", CASES)
def test_the_language_is_what_the_strict_parser_accepts(tiny, text, viable, complete):
    c = RoutingConstraint(tiny.tokenizer, tiny.eos_ids(), num_experts=7, max_experts=3)
    assert (c.viable(text), c.complete(text)) == (viable, complete)
    if complete:  # every complete reply parses to what it says
        letters = [ch.upper() for ch in text if ch.isalpha()]
        expected = [] if "".join(letters).lower() == "none" else \
            ["ABCDEFG".index(ch) for ch in letters]
        assert parse_routing(text, 7, 3) == expected


@pytest.mark.parametrize("num_experts, max_experts", [(7, 3), (3, 1), (4, 4)])
def test_the_regex_spells_the_same_language(tiny, num_experts, max_experts):
    """vLLM constrains routing by ``RoutingConstraint.regex``: it accepts exactly the complete
    replies (checked on the cases above and on 30,000 random strings over the grammar's
    characters, about a tenth of them complete)."""
    c = RoutingConstraint(tiny.tokenizer, tiny.eos_ids(), num_experts, max_experts)
    rx = re.compile(c.regex)
    alphabet = "ABCDabcdHx nNoOeE,.\n\t"
    rng = random.Random(num_experts)
    texts = [t for t, _, _ in CASES] + [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 9))) for _ in range(30_000)]
    wrong = [t for t in texts if bool(rx.fullmatch(t)) != c.complete(t)]
    assert not wrong, wrong[:10]
    assert sum(c.complete(t) for t in texts) > 300


class Steered(nn.Module):
    """A causal LM whose logits are pushed towards a scripted reply (by ``strength``): the
    script is what a free greedy decode would then write, unless the model's own preferences
    win somewhere. One row at a time."""

    def __init__(self, llm: nn.Module, script: list[int], strength: float) -> None:
        super().__init__()
        self.llm, self.script, self.strength, self.step = llm, script, strength, 0

    def get_input_embeddings(self):
        return self.llm.get_input_embeddings()

    def forward(self, **kwargs):
        out = self.llm(**kwargs)
        if self.step < len(self.script):
            out.logits[:, -1, self.script[self.step]] += self.strength
        self.step += 1
        return out


def _decode(llm, tokenizer, eos, prompt, script, strength, constraint):
    steered = Steered(llm, script, strength)
    decoder = BatchDecoder(steered, tokenizer, eos, max_context=4096)
    embeds = llm.get_input_embeddings()(torch.tensor([prompt]))
    decoder.add(embeds, torch.ones(1, len(prompt), dtype=torch.long),
                [DecodeParams(max_new_tokens=16, constraint=constraint)], keys=[0])
    return decoder.run()[0]


def _tokenizers(tiny):
    yield "tiny", tiny.tokenizer, tiny.llm, tiny.eos_ids()
    if (REAL_LLM / "tokenizer.json").is_file() or (REAL_LLM / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(REAL_LLM)
        torch.manual_seed(0)
        llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32,
                                           intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1))
        yield "smollm2", tok, llm.eval(), [tok.eos_token_id]


def test_greedy_within_the_constraint_equals_the_free_reply_when_well_formed(tiny):
    rng = random.Random(0)
    targets = ["A", "C, F", "B D", "none", "None.", "a, g", "E, A, B", " G", "D,B.",
               "The answer is A", "A B C D", "none of them", "AB"]
    for name, tok, llm, eos in _tokenizers(tiny):
        c = RoutingConstraint(tok, eos, num_experts=7, max_experts=3)
        checked = well_formed = 0
        for i in range(60):
            target = targets[i % len(targets)]
            script = tok.encode(target, add_special_tokens=False) + [eos[0]]
            prompt = [rng.randrange(3, min(len(tok), 200)) for _ in range(6)]
            strength = rng.choice([2.0, 6.0, 30.0])
            free = _decode(llm, tok, eos, prompt, script, strength, None)
            held = _decode(llm, tok, eos, prompt, script, strength, c)
            assert c.complete(held.text) or held.completion_tokens == 16, (name, held.text)
            assert c.viable(held.text), (name, held.text)
            if free.finish_reason == "stop" and c.complete(free.text):
                well_formed += 1
                assert held.text == free.text, (name, target, free.text, held.text)
            checked += 1
        assert well_formed >= 10, (name, well_formed, checked)


def test_the_constrained_routing_decode_stops_early_and_always_parses(tiny):
    """On a random tiny model the free routing reply is junk that runs to the token limit;
    the constrained one ends in a few steps and names pool letters or none."""
    questions = ["How many squares?", "Which bar is highest?", "What does the sign say?"]
    from PIL import Image

    images = [Image.new("RGB", (64, 64), (i * 60, 100, 200 - i * 50)) for i in range(3)]
    with torch.no_grad():
        base = tiny.encode_base(tiny.processor.base(images))
        text = tiny.encode_questions([[q] for q in questions])
        tokens = tiny.routing_tokens(base, text)
        rows = tiny.routing_prompt_ids(questions, tokens.shape[1])
        free = tiny.decode(rows, tokens, tiny.routing_params())
        held = tiny.decode(rows, tokens, constrained_routing_params(tiny))
    c = constrained_routing_params(tiny).constraint
    for (_, _, f_n), (h_text, _, h_n) in zip(free, held, strict=True):
        assert c.complete(h_text) and h_n <= 10, (h_text, h_n)
        assert h_n <= f_n and (f_n < 16 or h_n < f_n)
    routed = use_constrained_routing(build_tiny_mova(seed=0))
    out = routed.generate(images[:1], questions[:1], max_new_tokens=2)[0]
    assert c.complete(out.routing_reply)
