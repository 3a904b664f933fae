"""`bonsai bench` on GGUF files: prompt processing and generation speed in llama.cpp itself.

Both files are loaded once; each repeat measures the model then the baseline (alternating, after a warm-up):
prompt processing = one `eval` of a `prompt`-token prompt from an empty context; generation = `generate`
greedy tokens, one `eval` each. Medians are reported as tokens per second, with the weights' ratio beside.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np


def _load(path: str, n_ctx: int, threads: int | None):
    from bonsai.export.llamacpp import _llama_cpp

    llama_cpp = _llama_cpp()
    threads = threads or max(1, min(os.cpu_count() or 1, 8))
    return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512), logits_all=False,
                           n_threads=threads, n_threads_batch=threads, verbose=False, seed=0)


def _time_prompt(llm, tokens: list[int]) -> float:
    llm.reset()
    start = time.perf_counter()
    llm.eval(tokens)
    return time.perf_counter() - start


def _time_generation(llm, tokens: list[int], n: int) -> float:
    llm.reset()
    llm.eval(tokens[:8])
    start = time.perf_counter()
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([nxt])
    return time.perf_counter() - start


def run_gguf_bench(model: str, baseline: str, prompt: int = 256, generate: int = 64, repeats: int = 5,
                   threads: int | None = None) -> dict:
    from bonsai.export.llamacpp import gguf_metadata

    n_ctx = prompt + generate + 16
    llms = {"model": _load(model, n_ctx, threads), "baseline": _load(baseline, n_ctx, threads)}
    vocab = min(llm.n_vocab() for llm in llms.values())
    tokens = np.random.default_rng(0).integers(3, vocab, prompt).tolist()
    times = {k: {"prompt": [], "generate": []} for k in llms}
    for llm in llms.values():  # warm-up
        _time_prompt(llm, tokens)
        _time_generation(llm, tokens, min(4, generate))
    for _ in range(repeats):
        for name, llm in llms.items():
            times[name]["prompt"].append(_time_prompt(llm, tokens))
            if generate:
                times[name]["generate"].append(_time_generation(llm, tokens, generate))
    result = {"engine": "llama.cpp", "prompt_tokens": prompt, "generate_tokens": generate, "repeats": repeats,
              "models": {}}
    for name, path in (("model", model), ("baseline", baseline)):
        _, params = gguf_metadata(path)
        p = statistics.median(times[name]["prompt"])
        entry = {"name": path, "params": params, "prompt_tokens_per_second": prompt / p}
        if generate:
            entry["generate_tokens_per_second"] = generate / statistics.median(times[name]["generate"])
        result["models"][name] = entry
    m, b = result["models"]["model"], result["models"]["baseline"]
    result["param_ratio"] = b["params"] / m["params"]  # parent / pruned: the speedup that size alone allows
    result["speedup"] = {"prompt": m["prompt_tokens_per_second"] / b["prompt_tokens_per_second"]}
    if generate:
        result["speedup"]["generate"] = m["generate_tokens_per_second"] / b["generate_tokens_per_second"]
    return result
