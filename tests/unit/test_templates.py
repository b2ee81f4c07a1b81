"""The released model's prompts, to the character: both answer templates (``vicuna_v1``,
``mova_llama3``), the released routing prompt, and the gate text (REFERENCE.md)."""

from __future__ import annotations

import pytest

from mova.builders import routing_descriptions
from mova.config import ExpertConfig, MoVAConfig, RoutingConfig
from mova.conversation import (
    IGNORE_INDEX,
    gate_text,
    get_template,
    render_prompt,
    tokenize_conversation,
)
from mova.routing import (
    RELEASED_ROUTING_INTRO,
    build_released_routing_prompt,
    build_routing_prompt,
    render_routing_prompt,
)
from mova.tokenizers import build_tiny_llm_tokenizer

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The "
                 "assistant gives helpful, detailed, and polite answers to the user's questions.")
LLAMA3_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand "
                 "the visual content that the user provides, and assist the user with a variety "
                 "of tasks using natural language.")
RELEASED_ROUTING = (  # REFERENCE.md, verbatim
    "You are a helpful assistant router. Based on the visual content, questions, and model pool "
    "the user provides, you need to consider the expertise of these models to select the most 3 "
    "suitable models to help you answer the questions. Answer with the model's letter from the "
    "given choices directly. If no models are selected, just answer 'none'.\n"
    "Model pool:\n"
    "A. This model can effectively extract the accurate spatial and semantic information from "
    "natural images.\n"
    "B. This model can handle images with text accurately and efficiently but fails to process "
    "natural images.\n"
    "C. This model is a state-of-the-art object detector that can identify objects in images.\n"
    "D. This model shows remarkable skill in text recognition, attaining top-tier text analysis "
    "outcomes across diverse areas\n"
    "E. This model is a specialized model designed to achieve state-of-the-art plot and chart "
    "understanding performance.\n"
    "F. This model is a foundation model designed for biomedical vision-language processing.\n"
    "G. This model is a leading image segmentation framework and achieves strong zero-shot "
    "segmentation performance.\n"
    "\n"
    "Question:\n"
)


def released_prompt(style: str, system: str, roles: tuple[str, str], sep: str, sep2: str | None,
                    messages: list[tuple[str, str | None]]) -> str:
    """LLaVA's ``Conversation.get_prompt`` for the TWO and MPT separator styles, as released."""
    if style == "TWO":
        seps = [sep, sep2]
        ret = system + seps[0]
        for i, (role, message) in enumerate(messages):
            ret += role + ": " + message + seps[i % 2] if message else role + ":"
        return ret
    ret = system + sep
    for role, message in messages:
        ret += role + message + sep if message else role
    return ret


VICUNA = ("TWO", VICUNA_SYSTEM, ("USER", "ASSISTANT"), " ", "</s>")
MOVA_LLAMA3 = ("MPT", "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
               + LLAMA3_SYSTEM, ("<|start_header_id|>user<|end_header_id|>\n\n",
                                 "<|start_header_id|>assistant<|end_header_id|>\n\n"),
               "<|eot_id|>", None)


def turns(*values: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def oracle(spec, *values: str | None) -> str:
    style, system, roles, sep, sep2 = spec
    return released_prompt(style, system, roles, sep, sep2,
                           [(roles[i % 2], v) for i, v in enumerate(values)])


# ---- vicuna_v1 ----------------------------------------------------------------------------------
def test_vicuna_generation_prompt_exact():
    got = render_prompt(turns("<image>\nWhat is this?"), get_template("vicuna_v1"),
                        for_generation=True)
    assert got == (VICUNA_SYSTEM + " USER: <image>\nWhat is this? ASSISTANT:")
    assert got == oracle(VICUNA, "<image>\nWhat is this?", None)


def test_vicuna_training_and_history_exact():
    t = get_template("vicuna_v1")
    got = render_prompt(turns("<image>\nWhat is this?", "A cat."), t)
    assert got == VICUNA_SYSTEM + " USER: <image>\nWhat is this? ASSISTANT: A cat.</s>"
    assert got == oracle(VICUNA, "<image>\nWhat is this?", "A cat.")
    history = render_prompt(turns("<image>\nWhat is this?", "A cat.", "What colour?"), t,
                            for_generation=True)
    assert history == (VICUNA_SYSTEM + " USER: <image>\nWhat is this? ASSISTANT: A cat.</s>"
                       "USER: What colour? ASSISTANT:")
    assert history == oracle(VICUNA, "<image>\nWhat is this?", "A cat.", "What colour?", None)


def test_vicuna_answer_lead_is_not_supervised():
    tok = build_tiny_llm_tokenizer()
    t = get_template("vicuna_v1")
    out = tokenize_conversation(turns("<image>\nWhat is this?", "A cat."), tok, t, 3)
    supervised = tok.decode([x for x in out["labels"] if x != IGNORE_INDEX])
    assert supervised == "A cat.</s>"
    prompt = tokenize_conversation(turns("<image>\nWhat is this?"), tok, t, 3,
                                   for_generation=True)["input_ids"]
    assert out["input_ids"][:len(prompt)] == prompt  # the prompt is a token-exact prefix
    assert tok.decode(prompt).endswith("ASSISTANT:")


# ---- mova_llama3 --------------------------------------------------------------------------------
def test_mova_llama3_generation_prompt_exact():
    got = render_prompt(turns("<image>\nWhat is this?"), get_template("mova_llama3"),
                        for_generation=True)
    assert got == ("<|start_header_id|>system<|end_header_id|>\n\n" + LLAMA3_SYSTEM
                   + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is "
                   "this?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    # the released text starts with <|begin_of_text|>, which our template adds as the BOS id
    assert "<|begin_of_text|>" + got == oracle(MOVA_LLAMA3, "<image>\nWhat is this?", None)
    assert get_template("mova_llama3").add_bos


def test_mova_llama3_training_exact():
    got = render_prompt(turns("<image>\nWhat is this?", "A cat.", "Sure?", "Yes."),
                        get_template("mova_llama3"))
    assert "<|begin_of_text|>" + got == oracle(MOVA_LLAMA3, "<image>\nWhat is this?", "A cat.",
                                               "Sure?", "Yes.")
    assert got.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nYes.<|eot_id|>")


def test_other_templates_render_as_before():
    two = turns("<image>\nQ?", "A.")
    assert render_prompt(two, get_template("chatml")) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<image>\nQ?<|im_end|>\n<|im_start|>assistant\nA.<|im_end|>\n")
    assert render_prompt(two, get_template("llama3")) == render_prompt(
        two, get_template("mova_llama3"))
    assert get_template("chatml").answer_lead == get_template("llama3").answer_lead == ""


# ---- the released routing prompt ---------------------------------------------------------------
def test_released_routing_prompt_exact():
    config = MoVAConfig(routing=RoutingConfig(prompt="released")).validate()
    descriptions = routing_descriptions(config)
    got = build_released_routing_prompt("What is the title of the chart?", descriptions)
    assert got == "<image>\n" + RELEASED_ROUTING + "What is the title of the chart?"
    assert RELEASED_ROUTING.startswith(RELEASED_ROUTING_INTRO + "\n")
    assert render_routing_prompt("released", "<image>\nWhat is the title of the chart?",
                                 descriptions) == got


def test_released_routing_prompt_inside_the_template():
    prompt = build_released_routing_prompt("How many cats?", routing_descriptions(
        MoVAConfig(routing=RoutingConfig(prompt="released")).validate()))
    got = render_prompt([{"from": "human", "value": prompt}], get_template("vicuna_v1"),
                        for_generation=True)
    assert got == oracle(VICUNA, "<image>\n" + RELEASED_ROUTING + "How many cats?", None)


def test_released_descriptions_follow_the_pool_order():
    config = MoVAConfig(experts=[ExpertConfig(name="sam"), ExpertConfig(name="dinov2")],
                        routing=RoutingConfig(prompt="released", max_experts=2)).validate()
    got = build_released_routing_prompt("Where is the dog?", routing_descriptions(config))
    assert got.splitlines()[3:6] == [
        "A. This model is a leading image segmentation framework and achieves strong zero-shot "
        "segmentation performance.",
        "B. This model can effectively extract the accurate spatial and semantic information "
        "from natural images.",
        "",
    ]


def test_our_routing_prompt_stays_the_default():
    config = MoVAConfig().validate()
    assert config.routing.prompt == "mova"
    descriptions = routing_descriptions(config)
    assert render_routing_prompt("mova", "Q?", descriptions) == build_routing_prompt(
        "Q?", descriptions)
    with pytest.raises(ValueError, match="routing.prompt='other'"):
        MoVAConfig(routing=RoutingConfig(prompt="other")).validate()
    with pytest.raises(ValueError, match="style 'other'"):
        render_routing_prompt("other", "Q?", descriptions)


def test_released_prompt_round_trips_through_config(tmp_path):
    config = MoVAConfig(routing=RoutingConfig(prompt="released")).validate()
    config.to_json(tmp_path / "c.json")
    assert MoVAConfig.load(tmp_path / "c.json").routing.prompt == "released"


# ---- gate text ----------------------------------------------------------------------------------
def released_gate_text(questions: list[str]) -> str:
    """The released rule: drop ``<image>\\n``, lowercase, ``question {j}: {q}\\n\\n`` joined."""
    text = ""
    for j, q in enumerate(questions):
        q = q.replace("<image>\n", "").lower()
        text += "question <i>: <q>\n\n".replace("<i>", str(j)).replace("<q>", q)
    return text


@pytest.mark.parametrize("questions", [
    ["<image>\nWhat colour is the Cube?"],
    ["<image>\nWhat is this?", "And the TITLE of the chart?", "Is it 3.5%?"],
    ["Describe the image.\nAnswer briefly."],
    ["<image>\nA question with ümlauts and UPPER case?"],
])
def test_gate_text_matches_the_released_rule(questions):
    assert gate_text(questions) == released_gate_text(questions)


def test_gate_text_exact():
    assert gate_text(["<image>\nWhat colour is the Cube?", "How MANY?"]) == (
        "question 0: what colour is the cube?\n\nquestion 1: how many?\n\n")
