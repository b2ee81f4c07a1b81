"""Conversation tokenisation, label masks, batching and the tiny local tokenizers."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from mova.conversation import (
    IGNORE_INDEX,
    TEMPLATES,
    collate,
    gate_text,
    get_template,
    render_prompt,
    tokenize_conversation,
    user_questions,
    validate_turns,
)
from mova.tokenizers import IMAGE_TOKEN, build_tiny_bert_tokenizer, build_tiny_llm_tokenizer

REPO = Path(__file__).resolve().parents[2]
N_IMG = 7


@pytest.fixture(scope="module")
def tok():
    return build_tiny_llm_tokenizer()


@pytest.fixture(scope="module")
def bert():
    return build_tiny_bert_tokenizer()


def two_round() -> list[dict]:
    return [
        {"from": "human", "value": "<image>\nWhat colour is the cube?"},
        {"from": "gpt", "value": "Red."},
        {"from": "user", "value": "How many spheres are there?"},
        {"from": "assistant", "value": "There are 3 spheres."},
    ]


def supervised_text(tokenizer, out: dict) -> str:
    return tokenizer.decode([t for t in out["labels"] if t != IGNORE_INDEX])


def image_positions(tokenizer, ids: list[int]) -> list[int]:
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    return [i for i, t in enumerate(ids) if t == image_id]


# ---------------------------------------------------------------- labels and templates


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_labels_cover_exactly_the_replies_and_suffix(tok, name):
    template = get_template(name)
    out = tokenize_conversation(two_round(), tok, template, N_IMG)
    assert len(out["input_ids"]) == len(out["labels"])
    suffix = template.assistant_suffix
    assert supervised_text(tok, out) == "Red." + suffix + "There are 3 spheres." + suffix
    # every supervised label is the input token at the same position
    for i, label in enumerate(out["labels"]):
        assert label in (IGNORE_INDEX, out["input_ids"][i])


def test_supervised_spans_sit_right_after_each_assistant_prefix(tok):
    template = get_template("chatml")
    out = tokenize_conversation(two_round(), tok, template, N_IMG)
    prefix = tok(template.assistant_prefix, add_special_tokens=False)["input_ids"]
    ids, labels = out["input_ids"], out["labels"]
    starts = [i for i in range(1, len(labels))
              if labels[i] != IGNORE_INDEX and labels[i - 1] == IGNORE_INDEX]
    assert len(starts) == 2
    for s in starts:
        assert ids[s - len(prefix):s] == prefix
        assert all(lab == IGNORE_INDEX for lab in labels[s - len(prefix):s])
    assert labels[-1] != IGNORE_INDEX  # the final suffix is learned, so the model stops


def test_rendered_text_chatml_exact(tok):
    turns = [{"from": "system", "value": "Be brief."}] + two_round()[:2]
    text = render_prompt(turns, get_template("chatml"))
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat colour is the cube?<|im_end|>\n"
        "<|im_start|>assistant\nRed.<|im_end|>\n"
    )


def test_vicuna_layout_matches_llava(tok):
    text = render_prompt(two_round(), get_template("vicuna_v1"), for_generation=False)
    system = get_template("vicuna_v1").system
    assert text == (
        f"{system} USER: <image>\nWhat colour is the cube? ASSISTANT: Red.</s>"
        "USER: How many spheres are there? ASSISTANT: There are 3 spheres.</s>"
    )


def test_llama3_layout():
    prompt = render_prompt([{"from": "human", "value": "Hi"}], get_template("llama3"),
                           has_image=False, for_generation=True)
    assert prompt.endswith(
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


@pytest.mark.parametrize("gen", [False, True])
def test_jinja_chat_template_matches_chatml_preset(tok, gen):
    turns = two_round()[:3] if gen else two_round()
    messages = [{"role": {"human": "user", "user": "user"}.get(t["from"], "assistant"),
                 "content": t["value"]} for t in turns]
    expected = render_prompt(turns, get_template("chatml"), for_generation=gen)
    got = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert got == expected
    with_sys = [{"role": "system", "content": "S"}] + messages
    turns_sys = [{"from": "system", "value": "S"}] + turns
    assert tok.apply_chat_template(with_sys, tokenize=False, add_generation_prompt=gen) == (
        render_prompt(turns_sys, get_template("chatml"), for_generation=gen)
    )


def test_get_template_unknown_lists_names():
    with pytest.raises(ValueError, match="chatml.*llama3.*vicuna_v1"):
        get_template("alpaca")


# ---------------------------------------------------------------- image placeholder


def test_image_expanded_once_at_placeholder(tok):
    out = tokenize_conversation(two_round(), tok, get_template("chatml"), N_IMG)
    pos = image_positions(tok, out["input_ids"])
    assert len(pos) == N_IMG and pos == list(range(pos[0], pos[0] + N_IMG))
    user_prefix = tok("<|im_start|>user\n", add_special_tokens=False)["input_ids"]
    assert out["input_ids"][pos[0] - len(user_prefix):pos[0]] == user_prefix
    assert tok.decode(out["input_ids"][pos[-1] + 1:pos[-1] + 2]) == "\n"
    assert all(out["labels"][p] == IGNORE_INDEX for p in pos)


def test_image_token_prepended_to_first_human_turn(tok):
    turns = [{"from": "human", "value": "What is this?"}, {"from": "gpt", "value": "A dog."}]
    explicit = [{"from": "human", "value": "<image>\nWhat is this?"}, turns[1]]
    t = get_template("chatml")
    assert tokenize_conversation(turns, tok, t, N_IMG) == tokenize_conversation(
        explicit, tok, t, N_IMG
    )
    assert turns[0]["value"] == "What is this?"  # input not mutated


def test_image_in_later_turn_is_kept_there(tok):
    turns = two_round()
    turns[0] = {"from": "human", "value": "Hello"}
    turns[2] = {"from": "human", "value": "Look: <image> count the spheres"}
    out = tokenize_conversation(turns, tok, get_template("chatml"), N_IMG)
    pos = image_positions(tok, out["input_ids"])
    assert len(pos) == N_IMG
    assert supervised_text(tok, {"labels": out["labels"][:pos[0]]}) == "Red.<|im_end|>\n"


def test_no_image(tok):
    turns = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    out = tokenize_conversation(turns, tok, get_template("chatml"), 0, has_image=False)
    assert image_positions(tok, out["input_ids"]) == []
    with pytest.raises(ValueError, match="has_image=False"):
        tokenize_conversation(two_round(), tok, get_template("chatml"), N_IMG, has_image=False)


def test_image_token_errors(tok):
    t = get_template("chatml")
    twice = two_round()
    twice[2] = {"from": "human", "value": "<image> again"}
    with pytest.raises(ValueError, match="found 2"):
        tokenize_conversation(twice, tok, t, N_IMG)
    in_reply = two_round()
    in_reply[0] = {"from": "human", "value": "Hi"}
    in_reply[1] = {"from": "gpt", "value": "<image>"}
    with pytest.raises(ValueError, match="turn 1.*human turn"):
        tokenize_conversation(in_reply, tok, t, N_IMG)
    with pytest.raises(ValueError, match="not in the tokenizer"):
        tokenize_conversation(two_round(), tok, t, N_IMG, image_token="<img_missing>")
    with pytest.raises(ValueError, match="num_image_tokens"):
        tokenize_conversation(two_round(), tok, t, 0)


# ---------------------------------------------------------------- generation


def test_for_generation_ends_with_assistant_prefix(tok):
    t = get_template("chatml")
    turns = two_round()[:3]
    out = tokenize_conversation(turns, tok, t, N_IMG, for_generation=True)
    prefix = tok(t.assistant_prefix, add_special_tokens=False)["input_ids"]
    assert out["input_ids"][-len(prefix):] == prefix
    assert all(label == IGNORE_INDEX for label in out["labels"])
    # the prompt is a token-exact prefix of the training sequence
    full = tokenize_conversation(two_round(), tok, t, N_IMG)
    assert full["input_ids"][:len(out["input_ids"])] == out["input_ids"]
    with pytest.raises(ValueError, match="turn 3.*human"):
        tokenize_conversation(two_round(), tok, t, N_IMG, for_generation=True)


def test_bos_prepended_when_template_asks_and_tokenizer_has_one(tok):
    t = get_template("vicuna_v1")
    plain = tokenize_conversation(two_round(), tok, t, N_IMG)  # tiny tokenizer: no BOS
    tok_bos = build_tiny_llm_tokenizer()
    tok_bos.bos_token = "<|im_start|>"
    with_bos = tokenize_conversation(two_round(), tok_bos, t, N_IMG)
    assert with_bos["input_ids"] == [tok_bos.bos_token_id] + plain["input_ids"]
    assert with_bos["labels"] == [IGNORE_INDEX] + plain["labels"]


# ---------------------------------------------------------------- truncation


def test_truncation_right_and_never_inside_image_run(tok):
    t = get_template("chatml")
    full = tokenize_conversation(two_round(), tok, t, N_IMG)
    end = image_positions(tok, full["input_ids"])[-1] + 1
    cut = tokenize_conversation(two_round(), tok, t, N_IMG, max_length=end + 2)
    assert cut["input_ids"] == full["input_ids"][:end + 2]
    assert cut["labels"] == full["labels"][:end + 2]
    exact = tokenize_conversation(two_round(), tok, t, N_IMG, max_length=end)
    assert len(image_positions(tok, exact["input_ids"])) == N_IMG
    for bad in (end - 1, end - N_IMG, 1):
        with pytest.raises(ValueError, match="image run"):
            tokenize_conversation(two_round(), tok, t, N_IMG, max_length=bad)
    long_enough = tokenize_conversation(two_round(), tok, t, N_IMG, max_length=10_000)
    assert long_enough == full


def test_generation_prompt_too_long_raises(tok):
    with pytest.raises(ValueError, match="assistant prefix"):
        tokenize_conversation(two_round()[:1], tok, get_template("chatml"), N_IMG,
                              max_length=N_IMG + 8, for_generation=True)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "turns, kwargs, pattern",
    [
        ([], {}, "non-empty"),
        ("hello", {}, "non-empty"),
        ([{"from": "bot", "value": "x"}], {}, "turn 0: unknown role 'bot'"),
        ([{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}], {}, "turn 0.*str.*int"),
        ([{"from": "human"}], {}, "turn 0.*'from' and 'value'"),
        (["hi"], {}, "turn 0.*dict"),
        ([{"from": "gpt", "value": "x"}], {}, "turn 0: expected role 'human'"),
        ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], {},
         "turn 1: expected role 'gpt'"),
        ([{"from": "human", "value": "a"}, {"from": "system", "value": "b"}], {},
         "turn 1.*system is allowed only as turn 0"),
        ([{"from": "system", "value": "s"}], {}, "only a system turn"),
        ([{"from": "human", "value": "a"}], {}, "turn 0: last turn must be 'gpt'"),
        ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}],
         {"for_generation": True}, "turn 1: for_generation"),
    ],
)
def test_validation_errors(turns, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        validate_turns(turns, **kwargs)


def test_validation_normalises_aliases():
    turns = [{"from": "system", "value": "s"}, {"from": "user", "value": "q", "extra": 1},
             {"from": "assistant", "value": "a"}]
    assert validate_turns(turns) == [{"from": "system", "value": "s"},
                                     {"from": "human", "value": "q"},
                                     {"from": "gpt", "value": "a"}]
    assert validate_turns(turns[:2], for_generation=True)[-1]["from"] == "human"


# ---------------------------------------------------------------- collate


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_padding(side):
    a = {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}
    b = {"input_ids": [9], "labels": [9]}
    batch = collate([a, b], pad_id=0, padding_side=side)
    assert all(v.dtype == torch.long and v.shape == (2, 3) for v in batch.values())
    if side == "right":
        assert batch["input_ids"].tolist() == [[5, 6, 7], [9, 0, 0]]
        assert batch["labels"].tolist() == [[-100, 6, 7], [9, -100, -100]]
        assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    else:
        assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 9]]
        assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, 9]]
        assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_collate_errors():
    with pytest.raises(ValueError, match="padding_side"):
        collate([{"input_ids": [1], "labels": [1]}], 0, padding_side="middle")
    with pytest.raises(ValueError, match="empty"):
        collate([], 0)
    with pytest.raises(ValueError, match=r"samples\[0\].*2 tokens.*1"):
        collate([{"input_ids": [1, 2], "labels": [1]}], 0)


# ---------------------------------------------------------------- gate text


def test_gate_text_exact_for_two_questions():
    turns = two_round()
    questions = user_questions(turns)
    assert questions == ["<image>\nWhat colour is the cube?", "How many spheres are there?"]
    assert gate_text(questions) == (
        "question 0: what colour is the cube?\n\nquestion 1: how many spheres are there?\n\n"
    )
    assert gate_text(["Is it  <image>  RED?"]) == "question 0: is it red?\n\n"
    assert gate_text([]) == ""


def test_gate_text_through_bert(bert):
    enc = bert(gate_text(["What colour is the Cube?"]))
    tokens = bert.convert_ids_to_tokens(enc["input_ids"])
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    assert "[UNK]" not in tokens
    assert bert.pad_token_id == 0


# ---------------------------------------------------------------- tokenizers


def _fingerprint(t) -> str:
    return hashlib.sha256(json.dumps(t.get_vocab(), sort_keys=True).encode()).hexdigest()


def test_llm_tokenizer_specials_and_size(tok):
    assert len(tok) == 2048
    for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN):
        ids = tok(f"a{s}b", add_special_tokens=False)["input_ids"]
        assert tok.convert_tokens_to_ids(s) in ids and len(ids) == 3
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.bos_token is None


def test_tokenizers_deterministic_in_process(tok, bert):
    for _ in range(3):
        assert _fingerprint(build_tiny_llm_tokenizer()) == _fingerprint(tok)
        assert _fingerprint(build_tiny_bert_tokenizer()) == _fingerprint(bert)
    extra = ["zyzzyva quokka zyzzyva quokka"]
    assert _fingerprint(build_tiny_llm_tokenizer(extra)) != _fingerprint(tok)
    assert _fingerprint(build_tiny_bert_tokenizer(extra)) != _fingerprint(bert)


def test_tokenizers_deterministic_across_processes(tok, bert):
    code = (
        "import hashlib, json\n"
        "from mova.tokenizers import build_tiny_bert_tokenizer, build_tiny_llm_tokenizer\n"
        "for build in (build_tiny_llm_tokenizer, build_tiny_bert_tokenizer):\n"
        "    vocab = json.dumps(build().get_vocab(), sort_keys=True).encode()\n"
        "    print(hashlib.sha256(vocab).hexdigest())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=60, check=True)
    assert res.stdout.split() == [_fingerprint(tok), _fingerprint(bert)]


def test_tokenizers_build_fast():
    start = time.perf_counter()
    build_tiny_llm_tokenizer()
    build_tiny_bert_tokenizer()
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize(
    "text",
    ["Hello, world!", "  leading and trailing  ", "tabs\tand\nnewlines\r\n",
     "naïve café — “quotes” ½ ∑ ∞", "日本語のテキスト", "emoji 🤖🧠👩‍🔬 and flags 🇫🇷",
     "Ελληνικά русский العربية עברית", "\x00\x01 control", "<image> inside <|im_end|> text"],
)
def test_any_unicode_round_trips(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id is None or tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_save_and_reload_round_trip(tok, bert, tmp_path):
    texts = ["<image>\nWhat colour is the cube? 日本 🤖", "question 0: is it café?\n\n"]
    tok.save_pretrained(tmp_path / "llm")
    bert.save_pretrained(tmp_path / "bert")
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "llm")
    bert2 = AutoTokenizer.from_pretrained(tmp_path / "bert")
    for text in texts:
        assert tok2(text)["input_ids"] == tok(text)["input_ids"]
        assert bert2(text)["input_ids"] == bert(text)["input_ids"]
    assert tok2.chat_template == tok.chat_template
    assert (tok2.eos_token, tok2.pad_token) == (tok.eos_token, tok.pad_token)
    assert bert2.pad_token_id == 0 and bert2.cls_token == "[CLS]"
    t = get_template("chatml")
    assert tokenize_conversation(two_round(), tok2, t, N_IMG) == tokenize_conversation(
        two_round(), tok, t, N_IMG
    )
