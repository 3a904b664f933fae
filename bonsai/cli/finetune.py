"""`bonsai finetune`: recovery of a pruned model by LoRA and distillation from cached parent logits."""

from __future__ import annotations

from pathlib import Path

import typer

from bonsai.cli.app import locked, quiet_transformers, app
from bonsai.data.windows import BOS_HELP
from bonsai.errors import BonsaiError




@app.command("finetune")
def finetune_cmd(
    model: str | None = typer.Option(None, "--model", "-m", help="The pruned model (folder from `bonsai prune`)."),
    teacher: str | None = typer.Option(None, help="The parent model, for distillation (needed unless --distill-weight 0)."),
    data: str | None = typer.Option(None, help="Training text: wikitext2, c4, kjv, austen or a local .txt/.jsonl file."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for the finetuned model and report.json."),
    config: str | None = typer.Option(None, help="YAML preset: a shipped finetune-NAME preset (llama-2-7b, tiny) or a path."),
    lora_rank: int | None = typer.Option(None, "--lora-rank", help="LoRA rank (default 128)."),
    lora_alpha: float | None = typer.Option(None, "--lora-alpha", help="LoRA alpha (default 4 x rank)."),
    lora_dropout: float | None = typer.Option(None, "--lora-dropout", help="LoRA dropout (default 0.05)."),
    lr: float | None = typer.Option(None, help="Learning rate (default 1e-4), linear decay."),
    warmup_steps: int | None = typer.Option(None, "--warmup-steps", help="Linear warm-up steps (default 0)."),
    distill_weight: float | None = typer.Option(None, "--distill-weight", help="Weight of the KL term (default 0.01; 0: off)."),
    kl_direction: str | None = typer.Option(None, "--kl-direction", help="forward: KL(parent||student) (default); reverse."),
    top_k: int | None = typer.Option(None, "--top-k", help="Teacher log-probabilities cached per token (default 64)."),
    seqlen: int | None = typer.Option(None, help="Training window length (default 512)."),
    bos: str | None = typer.Option(None, help=BOS_HELP),
    samples: int | None = typer.Option(None, help="Training windows (default: all of the train split; c4: 30000)."),
    epochs: int | None = typer.Option(None, help="Passes over the training windows (default 1)."),
    steps: int | None = typer.Option(None, help="Optimizer steps (overrides --epochs)."),
    batch_size: int | None = typer.Option(None, "--batch-size", "-b", help="Windows per micro-batch (default 1)."),
    grad_accum: int | None = typer.Option(None, "--grad-accum", help="Micro-batches per optimizer step (default 1)."),
    eval_every: int | None = typer.Option(None, "--eval-every", help="Held-out perplexity every N steps (default: 5 times)."),
    eval_windows: int | None = typer.Option(None, "--eval-windows", help="Held-out windows (default 32)."),
    checkpoint_every: int | None = typer.Option(None, "--checkpoint-every", help="Checkpoint every N steps (default 200)."),
    log_every: int | None = typer.Option(None, "--log-every", help="Record the mean losses every N steps (default 10)."),
    full: bool = typer.Option(False, "--full", help="Train all weights instead of LoRA (the paper's Phi-2 recipe)."),
    no_merge: bool = typer.Option(False, "--no-merge", help="Keep LoRA separate (DIR/adapter beside unmerged weights)."),
    seed: int | None = typer.Option(None, help="Random seed (default 0)."),
    dtype: str | None = typer.Option(None, help="auto|float32|bfloat16|float16 (auto: fp32 on CPU, half on GPU)."),
    device: str | None = typer.Option(None, help="auto|cpu|cuda|cuda:N."),
    cache_dir: str | None = typer.Option(None, "--cache-dir", help="Teacher-logit caches (default: beside DIR)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in DIR (what rerunning the "
                                                         "same command does anyway)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the checkpoints (off by default)."),
) -> None:
    """Recover a pruned model: LoRA on every block linear + distillation from cached parent logits, merged back."""
    quiet_transformers()
    from bonsai.finetune.config import build_finetune_config
    from bonsai.finetune.trainer import FinetuneRun

    overrides = dict(model=model, teacher=teacher, data=data, lora_rank=lora_rank, lora_alpha=lora_alpha,
                     lora_dropout=lora_dropout, lr=lr, warmup_steps=warmup_steps, distill_weight=distill_weight,
                     kl_direction=kl_direction, top_k=top_k, seqlen=seqlen, bos=bos, samples=samples, epochs=epochs,
                     steps=steps, batch_size=batch_size, grad_accum=grad_accum, eval_every=eval_every,
                     eval_windows=eval_windows, checkpoint_every=checkpoint_every, log_every=log_every, seed=seed, dtype=dtype,
                     device=device, cache_dir=cache_dir, full=full or None, merge=False if no_merge else None)
    if model is None and config is None:
        raise BonsaiError("--model is required (or a --config that names one)")
    cfg = build_finetune_config(config, overrides)
    with locked(out):
        report = FinetuneRun(cfg, out, force=force, resume=resume, trust_remote_code=trust_remote_code).run()
    _print_finetune(report, out)


def _print_finetune(report: dict, out: Path) -> None:
    from bonsai.progress import out_console as console

    console.print(f"finetuned {report['model']} -> {out} ({report['mode']}, {report['trainable_params']:,} trainable "
                  f"parameters, {report['total_steps']} steps, {report['tokens_seen']:,} tokens)")
    console.print(f"held-out ppl ({report['data']['held_out']}): {report['ppl_before']:.3f} -> {report['ppl_after']:.3f}; "
                  f"{report['wall_seconds']:.0f}s, peak memory {report['peak_memory_bytes'] / 2**20:.0f} MiB")
