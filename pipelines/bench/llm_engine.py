"""`mova bench llm-engine`: the Serve LLM deployment's two engines side by side on real weights.

The same MoVA-shaped requests (a shared ~250-token instruction, a run of image rows given as
embeddings, a question; greedy) decoded by:

- **loop**: our torch :class:`mova.decoding.BatchDecoder`, one request at a time;
- **torch batch**: the same decoder with every request in one continuous batch (what the torch
  engine of the LLM deployment does at best, all requests arriving together);
- **vLLM**: :class:`pipelines.serve.vllm_engine.VLLMEngine` (the ``llm.engine: vllm`` of the
  Serve app) with every request in flight at once, as mixed prompts, in fp32 and in bf16.

Answers are compared with the loop's (fp32 greedy should agree token for token; bf16 may not).
This measures the engine swap alone, in one process, on the real SmolLM2-135M; the whole app
is ``mova bench serve --real``.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mova.decoding import BatchDecoder, DecodeParams, left_pad
from pipelines.bench.harness import machine_info, markdown_table
from pipelines.common.llm_engine import VLLMRecipe
from pipelines.model.real_assets import default_cache_dir, prepare_real_assets
from pipelines.serve.engine import Prompt
from pipelines.serve.vllm_engine import VLLMEngine

log = logging.getLogger(__name__)

KEY = "bench:llm-engine:real:cpu"
INSTRUCTION = (
    "You are the router of a vision-language assistant. Each expert sees the image in its own "
    "way: a detector finds objects, a segmenter outlines regions, a chart reader extracts "
    "values, a document reader transcribes text, a medical encoder reads scans, and a general "
    "encoder describes scenes. Read the question and the image, decide which experts help, and "
    "answer briefly and precisely. ") * 3
QUESTIONS = ["What colour is the shape?", "Is there a circle?", "How many objects are there?",
             "What shape is in the image?", "Is the shape large or small?",
             "Where is the shape?", "What is the background colour?", "Is it a rectangle?"]


@dataclass
class EngineRun:
    label: str
    seconds: float
    ttft_ms: list[float] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    start_s: float = 0.0

    def row(self, loop: EngineRun, batch: EngineRun) -> list[Any]:
        n = len(self.answers)
        same = sum(a == b for a, b in zip(self.answers, loop.answers, strict=True))
        ttft = f"{statistics.median(self.ttft_ms):.0f}" if self.ttft_ms else "-"
        return [self.label, n, f"{n / self.seconds:.2f}", f"{loop.seconds / self.seconds:.2f}x",
                f"{batch.seconds / self.seconds:.2f}x", ttft,
                f"{self.start_s:.0f}" if self.start_s else "-", f"{same}/{n}"]


def _marker(tokenizer: Any) -> int:
    """A token id the prompts never hold otherwise: it marks the image rows (as MoVA's added
    image token does)."""
    used = {tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id,
            *tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])}
    return next(i for i in tokenizer.all_special_ids if i not in used)


def _prompts(tokenizer: Any, count: int, image_rows: int) -> list[list[int]]:
    """Chat prompts: the shared instruction, the image run, then a question of their own."""
    out = []
    for i in range(count):
        question = f"{QUESTIONS[i % len(QUESTIONS)]} (request {i})"
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{INSTRUCTION}\nImage: @@IMAGE@@\n{question}"}],
            add_generation_prompt=True, tokenize=False)
        before, after = text.split("@@IMAGE@@")
        out.append(tokenizer.encode(before, add_special_tokens=False)
                   + [_marker(tokenizer)] * image_rows
                   + tokenizer.encode(after, add_special_tokens=False))
    return out


def _image_rows(model: Any, count: int, rows: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    table = model.get_input_embeddings().weight
    return [table[torch.randint(0, table.shape[0], (rows,), generator=gen)].detach().clone()
            for _ in range(count)]


def _torch_run(label: str, model: Any, tokenizer: Any, prompts: list[list[int]],
               images: list[torch.Tensor], marker: int, eos: list[int], max_new: int,
               batch: bool) -> EngineRun:
    groups = [list(range(len(prompts)))] if batch else [[i] for i in range(len(prompts))]
    answers: dict[int, str] = {}
    start = time.perf_counter()
    for group in groups:
        ids, mask = left_pad([prompts[i] for i in group], tokenizer.pad_token_id or 0)
        with torch.inference_mode():
            embeds = model.get_input_embeddings()(ids).clone()
            embeds[ids == marker] = torch.cat([images[i] for i in group])
            decoder = BatchDecoder(model, tokenizer, eos, max_context=2048)
            decoder.add(embeds, mask, [DecodeParams(max_new_tokens=max_new)] * len(group),
                        keys=group)
            answers.update((e.row, e.text) for e in decoder.run() if e.done)
    return EngineRun(label, time.perf_counter() - start,
                     answers=[answers[i] for i in range(len(prompts))])


async def _vllm_run(label: str, folder: str, tokenizer: Any, prompts: list[list[int]],
                    images: list[torch.Tensor], marker: int, eos: list[int], max_new: int,
                    settings: VLLMRecipe) -> EngineRun:
    start = time.perf_counter()
    engine = VLLMEngine(folder, tokenizer, eos, marker, max_rows=len(prompts), settings=settings)
    started = time.perf_counter() - start
    params = DecodeParams(max_new_tokens=max_new)

    async def one(i: int) -> tuple[str, float]:
        begin, first = time.perf_counter(), None
        async for event in engine.stream(Prompt(prompts[i], images[i]), params,
                                         time.time() + 600):
            first = first or time.perf_counter()
            if event.get("error"):
                raise RuntimeError(f"vLLM request {i} failed: {event['error']}")
        return event["text"], (first - begin) * 1e3

    try:
        await one(0)  # warm-up: the first request pays one-off set-up
        begin = time.perf_counter()
        done = await asyncio.gather(*(one(i) for i in range(len(prompts))))
        seconds = time.perf_counter() - begin
    finally:
        engine.shutdown()
    return EngineRun(label, seconds, ttft_ms=[t for _, t in done],
                     answers=[a for a, _ in done], start_s=started)


def bench_llm_engine(*, requests: int = 16, image_rows: int = 64, max_new_tokens: int = 16,
                     quick: bool = False) -> dict[str, Any]:
    """Run the four decodes above; returns rows and settings for :func:`render`."""
    if quick:
        requests, max_new_tokens = 4, 8
    assets = prepare_real_assets(default_cache_dir())
    folder = str(assets.llm)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    marker = _marker(tokenizer)
    eos = sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")})
    prompts = _prompts(tokenizer, requests, image_rows)
    images = _image_rows(model, requests, image_rows)
    args = (tokenizer, prompts, images, marker, eos, max_new_tokens)
    loop = _torch_run("loop (torch, batch 1)", model, *args, batch=False)
    log.info("loop: %.1f s", loop.seconds)
    batch = _torch_run("torch, one continuous batch", model, *args, batch=True)
    log.info("torch batch: %.1f s", batch.seconds)
    del model
    runs = [loop, batch]
    for dtype, cached in (("float32", True), ("float32", False), ("bfloat16", True)):
        label = f"vLLM {dtype}" + ("" if cached else ", no prefix cache")
        settings = VLLMRecipe(dtype=dtype, max_model_len=1024, block_size=32,
                              prefix_caching=cached)
        runs.append(asyncio.run(_vllm_run(label, folder, *args, settings=settings)))
        log.info("%s: %.1f s", runs[-1].label, runs[-1].seconds)
    return {"machine": machine_info(torch.device("cpu")),
            "settings": {"requests": requests, "image_rows": image_rows,
                         "prompt_tokens": statistics.mean(len(p) for p in prompts),
                         "max_new_tokens": max_new_tokens, "quick": quick},
            "runs": [{"label": r.label, "seconds": r.seconds, "ttft_ms": r.ttft_ms,
                      "answers": r.answers, "start_s": r.start_s} for r in runs],
            "table": [r.row(loop, batch) for r in runs]}


def render(result: dict[str, Any]) -> str:
    s, m = result["settings"], result["machine"]
    head = ["engine", "requests", "req/s", "vs loop", "vs torch batch", "TTFT p50 ms",
            "engine start s", "answers equal to the loop's"]
    return "\n".join([
        "## `mova bench llm-engine`: the Serve LLM engines on SmolLM2-135M, cpu", "",
        f"Reproduce: `mova bench llm-engine` (~5 min; {s['requests']} requests)", "",
        "Machine: " + "; ".join(f"{k}: {v}" for k, v in m.items()), "",
        f"{s['requests']} MoVA-shaped requests, all in flight at once (the loop takes them one "
        f"by one): {s['prompt_tokens']:.0f} prompt tokens each (a shared instruction, "
        f"{s['image_rows']} image rows given as embeddings, a question), greedy, at most "
        f"{s['max_new_tokens']} answer tokens. vLLM is `pipelines/serve/vllm_engine.py` in "
        "eager mode (the recipe default on CPU), prefix caching on (32-token blocks: the "
        "shared instruction is computed once) unless the row says otherwise; its throughput "
        "excludes one warm-up request. TTFT is measured from sending a request to its first "
        "text. The torch rows have no prefix cache.", "",
        markdown_table(head, result["table"])])
