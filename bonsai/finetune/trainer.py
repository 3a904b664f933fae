"""`bonsai finetune`: recover a pruned model with LoRA (or full finetuning) plus distillation.

Order of work, chosen so that parent and student are never in memory together:
1. training / held-out windows; 2. the teacher alone fills (or reuses) the top-k logit cache;
3. the student is loaded, wrapped with LoRA and trained through accelerate, checkpointing every N steps;
4. LoRA is merged back (`merge_and_unload`) and the model saved as an ordinary pruned checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import pickle
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bonsai.engine.divergence import topk_kl
from bonsai.engine import faults
from bonsai.engine.run_folder import RunFolder, open_run_folder
from bonsai.errors import BonsaiError
from bonsai.eval.perplexity import window_nll
from bonsai.finetune.config import LEGACY_SETTINGS, FinetuneConfig
from bonsai.io import DamagedFile, disk_errors, read_json, read_safetensors, write_json_atomic, write_safetensors_atomic
from bonsai.models.checks import check_finite
from bonsai.progress import console, make_progress
from bonsai.runtime import peak_memory

STATE_DIR = ".bonsai-finetune"
MAX_GRAD_NORM = 1.0


def lora_targets(model, adapter) -> list[str]:
    """Full names of every non-empty block linear the adapter lists (LoRA on a 0-row layer is meaningless)."""
    from bonsai.engine.blocks import block_linears

    prefix = {id(m): n for n, m in model.named_modules()}[id(adapter.layers())]
    return [f"{prefix}.{i}.{name}" for i, block in enumerate(adapter.layers())
            for name in block_linears(block, adapter.linear_names)]


def check_same_vocabulary(student: str, teacher: str, trust_remote_code: bool = False) -> None:
    """The cached teacher log-probabilities index the student's vocabulary, so the two must agree exactly."""
    from bonsai.models.loading import load_config, load_tokenizer

    s_cfg, t_cfg = load_config(student, trust_remote_code)[0], load_config(teacher, trust_remote_code)[0]
    s_v, t_v = getattr(s_cfg, "vocab_size", None), getattr(t_cfg, "vocab_size", None)
    if s_v != t_v:
        raise BonsaiError(f"teacher {teacher} has a vocabulary of {t_v} tokens but the student {student} has {s_v}; "
                          "distillation needs the parent the student was pruned from")
    if load_tokenizer(student, trust_remote_code).get_vocab() != load_tokenizer(teacher, trust_remote_code).get_vocab():
        raise BonsaiError(f"the tokenizers of teacher {teacher} and student {student} differ; "
                          "distillation needs the parent the student was pruned from")


class FinetuneRun:
    def __init__(self, cfg: FinetuneConfig, out_dir: str | Path, force: bool = False, resume: bool = False,
                 trust_remote_code: bool = False):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.state_dir = self.out / STATE_DIR
        self.trust_remote_code = trust_remote_code
        self.finished_report: dict | None = None
        self.folder = self._open_folder(force)  # `resume`: kept for scripts; rerunning the command resumes anyway
        self.resuming = self.folder.resuming

    # ---- output folder ------------------------------------------------------------------------
    def _open_folder(self, force: bool) -> RunFolder:
        """The output folder's rule (`bonsai.engine.run_folder`): an unfinished run resumes from its checkpoint, a
        finished one is reported again (`finished_report`)."""
        run_file, report = self.state_dir / "run.json", self.out / "report.json"

        def stored() -> dict | None:
            finished = read_json(report) if report.exists() else {}
            if finished.get("kind") == "finetune":  # finished (its report is written last)
                self.finished_report = finished
                settings = self.finished_report.get("settings") or self.cfg.fingerprint()
                return {k: v for k, v in settings.items() if k in self.cfg.fingerprint()}
            if run_file.exists():
                return read_json(run_file, hint="pass --force to start over")["fingerprint"]
            return None

        return open_run_folder(self.out, force, self.cfg.fingerprint(), stored, legacy=LEGACY_SETTINGS,
                               what="finetune run")

    # ---- the run ------------------------------------------------------------------------------
    def run(self) -> dict:
        if self.finished_report is not None:
            console.print(f"{self.out} already holds the finished run; nothing to do")
            return self.finished_report
        from bonsai.finetune.data import finetune_windows
        from bonsai.models.loading import load_tokenizer
        from bonsai.runtime import resolve_device

        cfg = self.cfg
        t_start = self.t_process = time.time()
        device = resolve_device(cfg.device)
        self._check_architecture()
        tokenizer = load_tokenizer(cfg.model, self.trust_remote_code)
        distill = cfg.distill_weight > 0
        if distill:
            check_same_vocabulary(cfg.model, cfg.teacher, self.trust_remote_code)
        from bonsai.data import resolve_bos

        train, held, where = finetune_windows(tokenizer, cfg.data, cfg.seqlen, cfg.samples, cfg.eval_windows, cfg.seed,
                                              bos=resolve_bos(tokenizer, cfg.bos))
        self.folder.clear_replaced()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.state_dir / "run.json", {"fingerprint": cfg.fingerprint()})
        with make_progress() as progress:
            cache, cache_info = None, None
            if distill:
                from bonsai.finetune.teacher_cache import find_or_build

                root = Path(cfg.cache_dir) if cfg.cache_dir else self.out.parent / ".bonsai-teacher-cache"
                cache, cache_info = find_or_build(cfg.teacher, train, cfg.top_k, root, cfg.batch_size, cfg.dtype,
                                                  cfg.device, progress, self.trust_remote_code)
                verb = "reusing" if cache_info["reused"] else "built"
                console.print(f"{verb} teacher cache {cache_info['path']} ({cache_info['bytes'] / 2**20:.1f} MiB, "
                              f"top-{cache.meta['k']} of {cache.meta['vocab']})")
            report = self._train(train, held, where, cache, cache_info, tokenizer, device, progress)
        report["wall_seconds"] = time.time() - t_start + report.pop("_elapsed_before")
        return self._finish(report)

    def _check_architecture(self) -> None:
        """Fail before the (possibly long) teacher pass when the student is not a family bonsai knows."""
        from bonsai.adapters import adapter_class
        from bonsai.models.loading import load_config

        adapter_class(getattr(load_config(self.cfg.model, self.trust_remote_code)[0], "model_type", None))

    def _load_student(self, device: torch.device):
        from bonsai.adapters import get_adapter
        from bonsai.models.loading import checkpoint_dtype, load_config, load_model
        from bonsai.runtime import resolve_dtype

        cfg = self.cfg
        ckpt_dtype = checkpoint_dtype(load_config(cfg.model, self.trust_remote_code)[0])
        dtype = resolve_dtype(cfg.dtype, device, ckpt_dtype)
        if cfg.full and device.type == "cuda":
            dtype = torch.float32  # full finetuning keeps fp32 master weights; autocast does the half precision
        model = load_model(cfg.model, dtype=dtype, device=str(device), trust_remote_code=self.trust_remote_code)
        check_finite(model, cfg.model)
        adapter = get_adapter(model)
        return model, adapter, ckpt_dtype or dtype, dtype

    def _train(self, train, held, where, cache, cache_info, tokenizer, device, progress) -> dict:
        from accelerate import Accelerator
        from transformers import get_linear_schedule_with_warmup

        from bonsai.data import bos_record

        cfg = self.cfg
        model, adapter, save_dtype, dtype = self._load_student(device)
        if cache is not None and cache.meta["vocab"] != model.get_output_embeddings().weight.shape[0]:
            raise BonsaiError(f"the teacher cache has {cache.meta['vocab']} logits per token but the student has "
                              f"{model.get_output_embeddings().weight.shape[0]}")
        torch.manual_seed(cfg.seed)
        if cfg.full:
            for p in model.parameters():
                p.requires_grad_(True)
        else:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.alpha, lora_dropout=cfg.lora_dropout,
                              target_modules=lora_targets(model, adapter), bias="none", task_type="CAUSAL_LM")
            model = get_peft_model(model, lora)
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        n_trainable = sum(p.numel() for _, p in trainable)
        mixed = "no"
        if device.type == "cuda":
            mixed = "fp16" if dtype == torch.float16 else "bf16"
        accelerator = Accelerator(mixed_precision=mixed, cpu=device.type == "cpu")
        optimizer = torch.optim.AdamW([p for _, p in trainable], lr=cfg.lr, weight_decay=cfg.weight_decay)
        n_batches = math.ceil(train.shape[0] / cfg.batch_size)
        total_steps = cfg.steps or math.ceil(cfg.epochs * n_batches / cfg.grad_accum)
        scheduler = get_linear_schedule_with_warmup(optimizer, cfg.warmup_steps, total_steps)
        model, optimizer = accelerator.prepare(model, optimizer)
        dev = accelerator.device

        state = {"step": 0, "losses": [], "evals": [], "tokens_seen": 0, "elapsed": 0.0}
        if self.resuming and (self.state_dir / "checkpoint").exists():
            state = self._load_checkpoint(accelerator.unwrap_model(model), optimizer, scheduler)
            console.print(f"resuming {self.out} at step {state['step']}/{total_steps}")
        if state["step"] == 0:
            state["ppl_before"] = self._held_out_ppl(model, held)
            state["evals"].append({"step": 0, "ppl": state["ppl_before"]})
        prior_elapsed = state["elapsed"]
        eval_every = cfg.eval_every or max(1, total_steps // 5)
        orders: dict[int, np.ndarray] = {}

        def rows_of(micro: int) -> list[int]:
            epoch, i = divmod(micro, n_batches)
            if epoch not in orders:
                orders[epoch] = np.random.default_rng([cfg.seed, epoch]).permutation(train.shape[0])
            return orders[epoch][i * cfg.batch_size:(i + 1) * cfg.batch_size].tolist()

        task = progress.add_task("finetune steps", total=total_steps, completed=state["step"], info="")
        model.train()
        window_loss = {"loss": 0.0, "task": 0.0, "kl": 0.0, "n": 0}
        for step in range(state["step"], total_steps):
            for a in range(cfg.grad_accum):
                rows = rows_of(step * cfg.grad_accum + a)
                batch = train[rows].to(dev)
                sync = contextlib.nullcontext() if a == cfg.grad_accum - 1 else accelerator.no_sync(model)
                with sync:
                    logits = model(input_ids=batch).logits
                    task_loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                batch[:, 1:].reshape(-1))
                    kl = torch.zeros((), device=logits.device)
                    if cache is not None:
                        kl = topk_kl(logits, cache.get(rows).to(logits.device), cfg.kl_direction).mean()
                    loss = task_loss + cfg.distill_weight * kl
                    accelerator.backward(loss / cfg.grad_accum)
                window_loss["loss"] += loss.item()
                window_loss["task"] += task_loss.item()
                window_loss["kl"] += kl.item()
                window_loss["n"] += 1
                state["tokens_seen"] += int(batch.numel())
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_([p for _, p in trainable], MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            if done % cfg.log_every == 0 or done == total_steps:
                n = window_loss.pop("n")
                entry = {"step": done, **{k: v / n for k, v in window_loss.items()}, "lr": scheduler.get_last_lr()[0]}
                state["losses"].append(entry)
                window_loss = {"loss": 0.0, "task": 0.0, "kl": 0.0, "n": 0}
                progress.update(task, info=f"loss {entry['loss']:.3f} kl {entry['kl']:.3f}")
            if done % eval_every == 0 and done != total_steps:
                ppl = self._held_out_ppl(model, held)
                state["evals"].append({"step": done, "ppl": ppl})
                console.print(f"step {done}/{total_steps}: held-out ppl {ppl:.3f} ({where})")
            progress.update(task, completed=done)
            if done % cfg.checkpoint_every == 0 and done != total_steps:
                state["step"] = done
                state["elapsed"] = prior_elapsed + time.time() - self.t_process
                self._save_checkpoint(accelerator.unwrap_model(model), optimizer, scheduler, state)
                faults.crash_after(faults.AFTER_STEPS, done)
        progress.remove_task(task)
        state["step"] = total_steps
        model = accelerator.unwrap_model(model)
        model.eval()
        self.final_model, self.tokenizer, self.save_dtype = model, tokenizer, save_dtype
        return {
            "kind": "finetune",
            "model": cfg.model,
            "teacher": cfg.teacher,
            "settings": cfg.to_dict(),
            "mode": "full" if cfg.full else "lora",
            "bos": bos_record(tokenizer, cfg.bos),
            "data": {"source": cfg.data, "train_windows": int(train.shape[0]), "seqlen": cfg.seqlen,
                     "held_out": where, "held_out_windows": int(held.shape[0])},
            "teacher_cache": cache_info,
            "kl": None if cache is None else "top-k + tail mass (coarsened to k+1 outcomes), " + cfg.kl_direction,
            "trainable_params": n_trainable,
            "total_steps": total_steps,
            "losses": state["losses"],
            "evals": state["evals"],
            "ppl_before": state["ppl_before"],
            "tokens_seen": state["tokens_seen"],
            "peak_memory_bytes": peak_memory(device),
            "_elapsed_before": prior_elapsed,
            "_held": held,
        }

    @torch.no_grad()
    def _held_out_ppl(self, model, held: torch.Tensor) -> float:
        was_training = model.training
        model.eval()
        ppl = window_nll(model, held, self.cfg.batch_size).ppl
        model.train(was_training)
        return ppl

    # ---- checkpoints ----------------------------------------------------------------------------
    def _save_checkpoint(self, model, optimizer, scheduler, state: dict) -> None:
        from bonsai.models.saving import atomic_replace

        tmp = self.state_dir / "checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        weights = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}
        write_safetensors_atomic(tmp / "trainable.safetensors", weights)
        extra = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            extra["cuda_rng"] = torch.cuda.get_rng_state_all()
        with disk_errors(tmp / "optimizer.pt"):
            torch.save(extra, tmp / "optimizer.pt")
        write_json_atomic(tmp / "state.json", state)
        atomic_replace(tmp, self.state_dir / "checkpoint")

    def _load_checkpoint(self, model, optimizer, scheduler) -> dict:
        ckpt = self.state_dir / "checkpoint"
        hint = f"delete {ckpt} to train again from step 0 (the teacher cache is kept) or pass --force"
        try:
            weights = read_safetensors(ckpt / "trainable.safetensors", hint=hint)
            extra = torch.load(ckpt / "optimizer.pt", weights_only=True)
            state = read_json(ckpt / "state.json", hint=hint)
        except FileNotFoundError as exc:
            raise DamagedFile(exc.filename or ckpt, "missing", hint) from None
        except (RuntimeError, EOFError, ValueError, OSError, pickle.UnpicklingError) as exc:
            raise DamagedFile(ckpt / "optimizer.pt", " ".join(str(exc).split())[:120] or type(exc).__name__, hint) from None
        params = dict(model.named_parameters())
        missing = set(weights) ^ {n for n, p in params.items() if p.requires_grad}
        if missing:
            raise BonsaiError(f"the checkpoint in {ckpt} does not match this model ({len(missing)} parameters differ)")
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        optimizer.load_state_dict(extra["optimizer"])
        scheduler.load_state_dict(extra["scheduler"])
        torch.set_rng_state(extra["rng"])
        if "cuda_rng" in extra and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(extra["cuda_rng"])
        return state

    # ---- output ----------------------------------------------------------------------------------
    def _finish(self, report: dict) -> dict:
        from bonsai.models.saving import save_pruned

        held = report.pop("_held")
        model = self.final_model
        staging = self.state_dir / "final"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        extra: dict[str, Path] = {}
        if not self.cfg.full:
            if self.cfg.merge:
                model = model.merge_and_unload()
            else:
                model.save_pretrained(staging / "adapter")
                extra["adapter"] = staging / "adapter"
                report["ppl_after"] = self._held_out_ppl(model, held)
                model = model.unload()
        if self.cfg.merge or self.cfg.full:
            report["ppl_after"] = self._held_out_ppl(model, held)
        report["merged"] = bool(self.cfg.merge and not self.cfg.full)
        model.to(self.save_dtype)
        write_json_atomic(staging / "report.json", report)
        extra["report.json"] = staging / "report.json"
        save_pruned(model, self.tokenizer, self.out, overwrite=True, extra_files=extra)
        return report
