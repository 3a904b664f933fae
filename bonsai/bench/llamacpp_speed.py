"""`bonsai bench` on GGUF files: prompt processing and generation speed in llama.cpp itself.

Both files are loaded once; each repeat measures the model then the baseline (alternating, after a warm-up):
prompt processing = one `eval` of a `prompt`-token prompt from an empty context; generation = `generate`
greedy tokens, one `eval` each. Medians are reported as tokens per second, with the weights' ratio beside.

The measurement runs in a child process with OpenMP's default (active) waiting: bonsai's CLI sets
OMP_WAIT_POLICY=PASSIVE for PyTorch on loaded machines, which llama.cpp's OpenMP threads would inherit and
which halves its generation speed on this CPU (measured: 31 vs 62 tokens/s for the same 370M file), unlike
how llama.cpp is run for serving.
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
    import json
    import subprocess
    import sys

    from bonsai.errors import BonsaiError
    from bonsai.export.llamacpp import _llama_cpp

    _llama_cpp()  # a clear error here when llama-cpp-python is missing
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    args = json.dumps([model, baseline, prompt, generate, repeats, threads])
    done = subprocess.run([sys.executable, "-m", "bonsai.bench.llamacpp_speed", args], capture_output=True, text=True,
                          env=env)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise BonsaiError(f"llama.cpp benchmark failed: {lines[-1] if lines else done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _measure(model: str, baseline: str, prompt: int, generate: int, repeats: int, threads: int | None) -> dict:
    from bonsai.export.llamacpp import gguf_metadata

    n_ctx = prompt + generate + 16
    llms = {"model": _load(model, n_ctx, threads), "baseline": _load(baseline, n_ctx, threads)}
    vocab = min(llm.n_vocab() for llm in llms.values())
    tokens = np.random.default_rng(0).integers(3, vocab, prompt).tolist()
    times = {k: {"prompt": [], "generate": []} for k in llms}
    for _ in range(2):  # warm-up: page the weights in, settle the threads
        for llm in llms.values():
            _time_prompt(llm, tokens)
            _time_generation(llm, tokens, min(16, generate))
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


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(_measure(*json.loads(sys.argv[1]))))
