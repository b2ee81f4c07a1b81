"""Checkpoints: bit-identical round trip, experts by reference, clear errors, real-format parts."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mova.builders import ensure_image_token
from mova.checkpoint import CheckpointError, state_fingerprint
from mova.factory import build_model, build_tiny_mova, from_pretrained, tiny_config
from mova.tokenizers import IMAGE_TOKEN, build_tiny_bert_tokenizer, build_tiny_llm_tokenizer


@pytest.fixture(scope="module")
def model():
    m = build_tiny_mova(seed=0)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in m.adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m.eval()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    return model.save_pretrained(tmp_path_factory.mktemp("ckpt") / "mova")


def _outputs(noise_image, m):
    images = [noise_image(0), noise_image(1)]
    with torch.no_grad():
        base = m.encode_base(m.processor.base(images))
        text = m.encode_questions([["a?"], ["b?"]])
        mask = m.mask_from_names([["dinov2", "vary"], ["sam"]])
        feats = m.routed_expert_features(m.processor.experts_inputs(m.expert_names, images), mask)
        tokens = m.fuse(base, text, feats, mask).image_tokens
        logits = m.llm(inputs_embeds=tokens).logits
    return tokens, logits


def test_round_trip_is_bit_identical(model, saved, noise_image):
    loaded = from_pretrained(saved)
    assert loaded.config.to_dict() == model.config.to_dict()
    ref_state, new_state = model.state_dict(), loaded.state_dict()
    assert ref_state.keys() == new_state.keys()
    for key in ref_state:
        assert torch.equal(ref_state[key], new_state[key]), key
    for a, b in zip(_outputs(noise_image, model), _outputs(noise_image, loaded), strict=True):
        assert torch.equal(a, b)
    q = ["What is it?"]
    assert (model.generate([noise_image(3)], q, experts=[["sam"]], max_new_tokens=5)[0].answer
            == loaded.generate([noise_image(3)], q, experts=[["sam"]], max_new_tokens=5)[0].answer)
    assert loaded.tokenizer.get_vocab() == model.tokenizer.get_vocab()
    assert loaded.text_tokenizer.get_vocab() == model.text_tokenizer.get_vocab()


def test_checkpoint_holds_no_pickle(saved):
    suffixes = {p.suffix for p in saved.rglob("*") if p.is_file()}
    assert suffixes <= {".json", ".safetensors", ".txt", ".jinja"}, suffixes
    assert (saved / "experts" / "codetr" / "mova_head.safetensors").is_file()
    assert (saved / "experts" / "vary" / "mova_head.safetensors").is_file()


def test_experts_by_reference(model, saved, tmp_path, noise_image):
    refs = tmp_path / "expert_weights"
    shutil.copytree(saved / "experts", refs)
    config = tiny_config()
    for e in config.experts:
        e.pretrained = str(refs / e.name)
    by_ref = build_model(config, seed=0)
    by_ref.load_state_dict(model.state_dict())
    path = by_ref.save_pretrained(tmp_path / "by_ref", experts="reference")
    assert not (path / "experts").exists()
    loaded = from_pretrained(path)
    for a, b in zip(_outputs(noise_image, by_ref), _outputs(noise_image, loaded), strict=True):
        assert torch.equal(a, b)
    # A referenced expert that changed on disk is refused.
    weights = refs / "sam" / "model.safetensors"
    state = load_file(str(weights))
    key = next(iter(state))
    state[key] = state[key] + 1
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match="'sam'.*fingerprint"):
        from_pretrained(path)


def test_bf16_model_with_referenced_experts_reloads(model, saved, tmp_path):
    """A bf16 model fingerprints its experts in bf16; the fp32 folders it references must
    still match once loaded in the checkpoint's dtype."""
    refs = tmp_path / "expert_weights"
    shutil.copytree(saved / "experts", refs)
    config = tiny_config()
    config.dtype = "bfloat16"
    for e in config.experts:
        e.pretrained = str(refs / e.name)
    by_ref = build_model(config, seed=0)
    by_ref.load_state_dict(model.state_dict())
    path = by_ref.save_pretrained(tmp_path / "by_ref_bf16", experts="reference")
    loaded = from_pretrained(path)
    for name, expert in loaded.experts.items():
        assert next(expert.parameters()).dtype == torch.bfloat16, name
        assert state_fingerprint(expert) == state_fingerprint(by_ref.experts[name]), name


def test_reference_needs_pretrained_ids(model, tmp_path):
    with pytest.raises(ValueError, match="no 'pretrained' id"):
        model.save_pretrained(tmp_path / "x", experts="reference")
    assert not (tmp_path / "x").exists()
    assert not list(tmp_path.iterdir()), "a failed save left files behind"


@pytest.mark.parametrize("victim, message", [
    ("adapter.safetensors", "incomplete: missing adapter.safetensors"),
    ("config.json", "incomplete: missing config.json"),
    ("components.json", "incomplete: missing components.json"),
    ("llm", "incomplete: missing llm/"),
    ("experts/deplot", "incomplete: missing experts/deplot/"),
    ("files.json", "no files.json .*incomplete"),
])
def test_missing_parts_are_named(saved, tmp_path, victim, message):
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    target = broken / victim
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(CheckpointError, match=message):
        from_pretrained(broken)


def test_wrong_architecture_and_format(saved, tmp_path):
    broken = tmp_path / "arch"
    shutil.copytree(saved, broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["adapter"]["num_blocks"] = 1
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not fit the adapter"):
        from_pretrained(broken)
    comp = json.loads((saved / "components.json").read_text())
    comp["version"] = 99
    other = tmp_path / "fmt"
    shutil.copytree(saved, other)
    (other / "components.json").write_text(json.dumps(comp))
    with pytest.raises(CheckpointError, match="not a mova-checkpoint v1"):
        from_pretrained(other)
    with pytest.raises(CheckpointError, match="not found"):
        from_pretrained(tmp_path / "nowhere")


def test_llm_and_text_encoder_from_local_transformers_checkpoints(tmp_path, noise_image):
    tok = build_tiny_llm_tokenizer()
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       intermediate_size=96, tie_word_embeddings=True))
    llm.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    from transformers import BertConfig, BertModel

    bert_tok = build_tiny_bert_tokenizer()
    bert = BertModel(BertConfig(vocab_size=len(bert_tok), hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=48),
                     add_pooling_layer=False)
    bert.save_pretrained(tmp_path / "bert")
    bert_tok.save_pretrained(tmp_path / "bert")
    config = tiny_config()
    config.llm.pretrained = str(tmp_path / "llm")
    config.text_encoder.pretrained = str(tmp_path / "bert")
    model = build_model(config)
    for key, value in llm.state_dict().items():
        assert torch.equal(model.llm.state_dict()[key], value), key
    for key, value in bert.state_dict().items():
        assert torch.equal(model.text_encoder.state_dict()[key], value), key
    result = model.generate([noise_image(4)], ["Hi?"], experts=[[]], max_new_tokens=3)[0]
    assert result.num_generated_tokens <= 3
    config.llm.hidden_size = 128
    with pytest.raises(ValueError, match="llm.hidden_size=128"):
        build_model(config)


def test_image_token_added_to_a_tokenizer_without_one():
    vocab = {"[UNK]": 0, "</s>": 1, "hello": 2, "world": 3}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="</s>")
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=4, hidden_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1,
                                       intermediate_size=32))
    ensure_image_token(tok, llm)
    assert IMAGE_TOKEN in tok.get_vocab()
    assert tok.pad_token == "</s>"
    assert llm.get_input_embeddings().num_embeddings == len(tok) == 5
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) == 4


def test_parts_in_skip_are_never_read(tmp_path):
    """What a serving replica loads: only the parts it runs (the adapter and tokenizers
    always); skipped weights are not even opened."""
    from torch import nn

    from mova.factory import build_tiny_mova, from_pretrained

    model = build_tiny_mova(seed=0, experts=["sam"])
    path = model.save_pretrained(tmp_path / "m")
    for part in ("llm", "base_encoder"):
        shutil.copytree(path, tmp_path / f"no-{part}")
        (tmp_path / f"no-{part}" / part / "model.safetensors").write_bytes(b"must not be read")
    with pytest.raises(SafetensorError):
        from_pretrained(tmp_path / "no-llm")  # the whole model needs the LLM's weights
    adapter_replica = from_pretrained(tmp_path / "no-llm", skip=["llm", "experts"])
    assert adapter_replica.llm is None and isinstance(adapter_replica.experts["sam"], nn.Identity)
    assert adapter_replica.base_encoder is not None and adapter_replica.text_encoder is not None
    assert adapter_replica.expert_names == ["sam"] and adapter_replica.tokenizer is not None
    llm_replica = from_pretrained(tmp_path / "no-base_encoder",
                                  skip=["base_encoder", "text_encoder", "experts"])
    assert llm_replica.base_encoder is None and llm_replica.text_encoder is None
    for name, weight in model.llm.state_dict().items():
        assert torch.equal(llm_replica.llm.state_dict()[name], weight), name
    with pytest.raises(ValueError, match="skip=\\['vision'\\]"):
        from_pretrained(path, skip=["vision"])
