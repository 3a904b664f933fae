"""Zero- and few-shot tasks through the pip `lm-eval` package, on a model loaded by bonsai.

`HFLM(pretrained=model, tokenizer=tok)` wraps the in-memory model, so pruned checkpoints (whose shapes
stock `from_pretrained` would not rebuild without remote code) are evaluated without a fork.
"""

from __future__ import annotations

import difflib
import math

from bonsai.errors import BonsaiError

# The paper's Table 3 tasks (LLaMA-1 50%), zero-shot.
PAPER_SUITE: dict[str, int | None] = {"boolq": 0, "hellaswag": 0, "winogrande": 0, "arc_easy": 0, "arc_challenge": 0}
# Table 4 / the Open LLM leaderboard settings.
OPENLLM_SUITE: dict[str, int | None] = {"gsm8k": 5, "arc_challenge": 25, "winogrande": 5, "hellaswag": 10,
                                        "truthfulqa_mc2": 0, "mmlu": 5}
SUITES = {"paper": PAPER_SUITE, "openllm": OPENLLM_SUITE}


def require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise BonsaiError('zero-shot tasks need lm-eval: pip install "bonsai-prune[eval]" (or pip install lm-eval)') from None


def task_manager(include_path: str | None = None):
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path) if include_path else TaskManager()


def check_task_names(names: list[str], manager) -> None:
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see `lm-eval ls tasks` for the list"
            raise BonsaiError(f"unknown task {name!r}{hint}")


def _flatten(task_results: dict) -> dict:
    """lm-eval's 'acc,none' / 'acc_stderr,none' keys -> {'acc': .., 'acc_stderr': ..} (non-numbers dropped)."""
    out = {}
    for key, value in task_results.items():
        if key == "alias" or not isinstance(value, int | float):
            continue
        metric, _, filt = key.partition(",")
        name = metric if filt in ("none", "") else f"{metric}[{filt}]"
        out[name] = None if isinstance(value, float) and not math.isfinite(value) else value
    return out


def run_tasks(model, tokenizer, tasks: dict[str, int | None], manager, batch_size: int = 1,
              limit: int | None = None, seed: int = 1234, add_bos: bool | None = None) -> dict:
    """Evaluate each task with its own few-shot count; returns {task: {metric: value}} plus settings.
    `add_bos`: whether lm-eval starts every request with the BOS token (None: lm-eval's own choice)."""
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    _quiet_lm_eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=add_bos)
    results: dict[str, dict] = {}
    by_shots: dict[int | None, list[str]] = {}
    for name, shots in tasks.items():
        by_shots.setdefault(shots, []).append(name)
    for shots, names in by_shots.items():
        try:
            out = simple_evaluate(model=lm, tasks=names, num_fewshot=shots, limit=limit, task_manager=manager,
                                  log_samples=False, random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=1000)
        except (ConnectionError, OSError, ValueError, FileNotFoundError) as exc:
            from bonsai.runtime import hub_reachable

            where = "; the data is not cached and the Hugging Face Hub cannot be reached" if not hub_reachable() else ""
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BonsaiError(f"cannot run task(s) {', '.join(names)}{where}: {msg}") from None
        for task, values in out["results"].items():
            entry = _flatten(values)
            entry["num_fewshot"] = shots if shots is not None else out.get("n-shot", {}).get(task)
            entry["samples"] = out.get("n-samples", {}).get(task, {}).get("effective")
            results[task] = entry
    return results


def _quiet_lm_eval() -> None:
    """lm-eval logs every step at INFO/WARNING; bonsai prints its own table."""
    import logging

    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass
