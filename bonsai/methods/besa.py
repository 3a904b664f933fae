"""BESA (Xu et al., 2024): blockwise reconstruction with learned per-layer (or per-row) sparsity.

For each transformer block in turn, on calibration hidden states of the *dense* model:
- every weight row is ranked by an importance metric (Wanda's |W_ij|*||X_j||, as in BESA);
- each linear (or each row: `--besa-granularity row`) has logits beta over D candidate sparsities
  p_d = d/D; pi = softmax(beta) gives the expected sparsity alpha = sum_d pi_d p_d and a soft mask,
  P(keep the weight of rank r) = sum_{d: p_d*C <= r} pi_d, while the forward pass uses the hard mask
  "prune the alpha*C lowest-ranked weights of each row"; the straight-through estimator
  (hard + soft - soft.detach()) passes the gradient to beta;
- the loss is the MSE between the masked and the dense block outputs plus
  penalty * (expected block sparsity - target)^2, the expected sparsity weighting each linear by its size;
- after learning, the allocation is rescaled so the block's sparsity equals the target, and the weights
  are zeroed (optionally fake-quantised jointly: `--besa-wbits`, learnable clipping per row).
Only one block and its calibration activations are in memory; the dense outputs feed the next block.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

from bonsai.methods.registry import option, register_method
from bonsai.methods.wanda import parse_sparsity_type, wanda_scores
from bonsai.engine.blocks import BlockInputs, block_linears, block_outputs, capture_block_inputs, run_block
from bonsai.engine.statistics import InputNorms
from bonsai.engine import faults
from bonsai.errors import BonsaiError
from bonsai.io import DamagedFile, read_json, read_safetensors, write_json_atomic, write_safetensors_atomic
from bonsai.progress import console



@dataclass
class LayerSparsity:
    """Learnable sparsity of one linear: logits (D,) per layer or (rows, D) per row, and the row ranks."""

    logits: torch.nn.Parameter
    ranks: torch.Tensor  # (rows, cols) rank of each weight in its row, 0 = least important
    levels: torch.Tensor  # (D,) candidate sparsities d/D
    clip: torch.nn.Parameter | None = None  # per-row learnable clipping (joint quantisation)

    @property
    def cols(self) -> int:
        return self.ranks.shape[1]

    def expected(self) -> torch.Tensor:
        """alpha per layer () or per row (rows,)."""
        return torch.softmax(self.logits, -1) @ self.levels

    def soft_keep(self) -> torch.Tensor:
        """P(keep) of every weight under pi: sum of pi_d over the levels that keep its rank."""
        cum = torch.softmax(self.logits, -1).cumsum(-1)  # cum[d] = P(level <= d)
        count = torch.clamp(torch.div(self.ranks * len(self.levels), self.cols, rounding_mode="floor"),
                            max=len(self.levels) - 1)  # levels d with d/D*C <= r: d <= floor(r*D/C)
        if cum.dim() == 1:
            return cum[count]
        return cum.gather(1, count)

    def hard_keep(self, alpha: torch.Tensor) -> torch.Tensor:
        threshold = (alpha * self.cols).round()
        threshold = threshold[:, None] if threshold.dim() == 1 else threshold
        return (self.ranks >= threshold).to(self.logits.dtype)

    def mask(self) -> torch.Tensor:
        soft = self.soft_keep()
        return self.hard_keep(self.expected().detach()) + (soft - soft.detach())  # exactly the hard mask in value


def fake_quantise(w: torch.Tensor, bits: int, clip: torch.Tensor) -> torch.Tensor:
    """Asymmetric per-row min-max quantisation with learnable clipping (sigmoid) and a straight-through round."""
    c = torch.sigmoid(clip)[:, None]
    hi, lo = w.amax(1, keepdim=True) * c, w.amin(1, keepdim=True) * c
    levels = 2 ** bits - 1
    scale = ((hi - lo) / levels).clamp(min=1e-8)
    zero = (-lo / scale).round().detach()
    q = w / scale
    q = q + (q.round() - q).detach()
    return (torch.clamp(q + zero, 0, levels) - zero) * scale


def init_logits(target: float, levels: torch.Tensor, rows: int | None) -> torch.nn.Parameter:
    """Start near the target so that the first forward is a uniform (Wanda-like) allocation."""
    base = -((levels - target) / 0.05) ** 2
    base = base - base.max()
    return torch.nn.Parameter(base.clone() if rows is None else base.repeat(rows, 1))


def _masked_params(linears: dict, state: dict[str, LayerSparsity], bits: int | None, hard_alpha: dict | None = None):
    params = {}
    for name, lin in linears.items():
        s = state[name]
        m = s.mask() if hard_alpha is None else s.hard_keep(hard_alpha[name])
        w = lin.weight
        if bits is not None:
            w = fake_quantise(w.float(), bits, s.clip).to(w.dtype)
        params[f"{name}.weight"] = w * m.to(w.dtype)
    return params


def _block_mse(block, inputs: BlockInputs, targets: list[torch.Tensor], params: dict) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for h, kw, y in zip(inputs.hidden, inputs.kwargs_for(block), targets, strict=True):
            out = functional_call(block, params, (h,), kw) if params else run_block(block, h, kw)
            out = out[0] if isinstance(out, tuple) else out
            total += F.mse_loss(out.float(), y.float(), reduction="sum").item()
            count += y.numel()
    return total / count


def rescale_to_target(alphas: dict[str, torch.Tensor], sizes: dict[str, int], target: float) -> dict[str, torch.Tensor]:
    """Multiply the learned sparsities by one factor (bisection, with clipping to [0, 0.99]) so that the
    size-weighted sparsity of the block equals the target."""
    total = sum(sizes.values())

    def overall(c: float) -> float:
        return sum((alphas[n] * c).clamp(0, 0.99).mean().item() * sizes[n] for n in alphas) / total

    lo, hi = 0.0, 1.0
    while overall(hi) < target and hi < 1e6:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if overall(mid) < target else (lo, mid)
    return {n: (a * hi).clamp(0, 0.99) for n, a in alphas.items()}


@dataclass
class BesaSettings:
    PANEL = "BESA (--method besa)"

    besa_granularity: str = option("row", "besa: row (default) | layer.")
    besa_levels: int = option(100, "besa: candidate sparsity levels D (100).")
    besa_epochs: int = option(1, "besa: epochs per block (1).")
    besa_lr: float = option(5e-2, "besa: learning rate of the sparsity logits (0.05).")
    besa_penalty: float = option(5.0, "besa: weight of the sparsity penalty (5).")
    besa_wbits: int | None = option(None, "besa: joint fake-quantisation to N bits.")

    def check(self) -> None:
        if self.method != "besa":
            return
        parse_sparsity_type(self.sparsity_type, self.sparsity)
        if self.sparsity_type != "unstructured":
            raise BonsaiError("BESA learns unstructured per-layer sparsities; --sparsity-type must be unstructured")
        if self.besa_granularity not in ("layer", "row"):
            raise BonsaiError(f"--besa-granularity must be layer or row (got {self.besa_granularity!r})")
        if self.besa_levels < 2 or self.besa_epochs < 1 or self.besa_lr <= 0 or self.besa_penalty < 0:
            raise BonsaiError("--besa-levels >= 2, --besa-epochs >= 1, --besa-lr > 0 and --besa-penalty >= 0 are required")
        if self.besa_wbits is not None and not 2 <= self.besa_wbits <= 8:
            raise BonsaiError(f"--besa-wbits must be between 2 and 8 (got {self.besa_wbits})")



def prune_besa(run, windows: torch.Tensor, progress=None) -> dict:
    """Prune every block of `run.model` in place; returns the report details (resumable per block: a damaged
    block checkpoint is discarded with the ones after it, and those blocks are learned again)."""
    cfg, adapter, model = run.cfg, run.adapter, run.model
    state_dir = run.state_dir
    layers = adapter.layers()
    state_file = state_dir / "besa-run.json"
    saved = {"fingerprint": cfg.fingerprint(), "blocks": []}
    if run.resuming:
        saved = read_json(state_file, hint="pass --force to start the run over")  # its settings: `OneShotRun`
        saved["blocks"] = saved["blocks"][:_intact_blocks(state_dir, len(saved["blocks"]))]
    state_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(state_file, saved)
    run.elapsed_before = sum(b["seconds"] for b in saved["blocks"])
    inputs = capture_block_inputs(model, layers, windows, cfg.batch_size)
    levels = torch.arange(cfg.besa_levels, dtype=torch.float32) / cfg.besa_levels
    task = progress.add_task("besa blocks", total=len(layers), completed=len(saved["blocks"]),
                             info=f"{cfg.besa_granularity}") if progress else None
    for i, block in enumerate(layers):
        done = i < len(saved["blocks"])
        norms = None if done else InputNorms(block_linears(block, adapter.linear_names))
        targets = block_outputs(block, inputs)  # dense outputs: the reconstruction target and the next input
        if norms is not None:
            norms.remove()  # the same dense pass gave the ranking statistics
        if done:  # done by an earlier process: restore its pruned weights
            weights = read_safetensors(state_dir / f"besa-block-{i}.safetensors")
            with torch.no_grad():
                for name, lin in block_linears(block, adapter.linear_names).items():
                    lin.weight.copy_(weights[name].to(lin.weight.device, lin.weight.dtype))
        else:
            start = time.time()
            result = _learn_block(block, adapter, inputs, targets, norms.norms(), levels, cfg, progress)
            result["seconds"] = time.time() - start
            linears = block_linears(block, adapter.linear_names)
            write_safetensors_atomic(state_dir / f"besa-block-{i}.safetensors",
                                     {n: lin.weight.detach().cpu().contiguous() for n, lin in linears.items()})
            saved["blocks"].append(result)
            write_json_atomic(state_file, saved)
            faults.crash_after(faults.AFTER_BLOCKS, len(saved["blocks"]))
        inputs.hidden = targets
        if task is not None and not done:  # the task started at the blocks already done
            progress.advance(task)
    blocks = saved["blocks"]
    return {
        "layer_sparsity": [b["sparsity"] for b in blocks],
        "linear_sparsity": [b["linear_sparsity"] for b in blocks],
        "reconstruction": [{"block": j, "mse_uniform": b["mse_uniform"], "mse_learned": b["mse_learned"],
                            "loss_first_epoch": b["loss_first_epoch"], "loss_last_epoch": b["loss_last_epoch"]}
                           for j, b in enumerate(blocks)],
    }


def _learn_block(block, adapter, inputs: BlockInputs, targets, input_norms: dict[str, torch.Tensor], levels, cfg,
                 progress) -> dict:
    linears = block_linears(block, adapter.linear_names)
    device = next(block.parameters()).device
    levels = levels.to(device)
    state: dict[str, LayerSparsity] = {}
    for name, lin in linears.items():
        score = wanda_scores(lin.weight, input_norms[name])
        ranks = score.argsort(1).argsort(1)  # rank of each weight within its row
        rows = lin.out_features if cfg.besa_granularity == "row" else None
        clip = torch.nn.Parameter(torch.full((lin.out_features,), 4.0, device=device)) if cfg.besa_wbits else None
        state[name] = LayerSparsity(init_logits(cfg.sparsity, levels, rows).to(device), ranks, levels, clip)
    for p in block.parameters():
        p.requires_grad_(False)
    sizes = {n: lin.weight.numel() for n, lin in linears.items()}
    total = sum(sizes.values())
    params = [s.logits for s in state.values()] + [s.clip for s in state.values() if s.clip is not None]
    # the logits live in a tiny space; Adam normalises the gradient scale, as in BESA
    opt = torch.optim.Adam(params, lr=cfg.besa_lr)
    uniform = {n: torch.tensor(cfg.sparsity, device=device) for n in linears}
    mse_uniform = _block_mse(block, inputs, targets, _masked_params(linears, state, None, uniform))
    scale = sum(y.float().pow(2).mean().item() for y in targets) / len(targets)  # normalise the MSE per block
    epoch_losses = []
    task = progress.add_task("  learning sparsities", total=cfg.besa_epochs * len(inputs.hidden), info="") \
        if progress else None
    for _ in range(cfg.besa_epochs):
        running = 0.0
        for h, kw, y in zip(inputs.hidden, inputs.kwargs_for(block), targets, strict=True):
            out = functional_call(block, _masked_params(linears, state, cfg.besa_wbits), (h,), kw)
            out = out[0] if isinstance(out, tuple) else out
            rec = F.mse_loss(out.float(), y.float()) / max(scale, 1e-12)
            expected = sum(state[n].expected().mean() * sizes[n] for n in linears) / total
            loss = rec + cfg.besa_penalty * (expected - cfg.sparsity) ** 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += rec.item()
            if task is not None:
                progress.update(task, advance=1, info=f"rec {rec.item():.4f} sparsity {expected.item():.3f}")
        epoch_losses.append(running / len(inputs.hidden))
    if task is not None:
        progress.remove_task(task)
    with torch.no_grad():
        alphas = rescale_to_target({n: s.expected().detach() for n, s in state.items()}, sizes, cfg.sparsity)
        final = _masked_params(linears, state, cfg.besa_wbits, alphas)
        mse_learned = _block_mse(block, inputs, targets, final)
        for name, lin in linears.items():
            lin.weight.copy_(final[f"{name}.weight"])
    linear_sparsity = {n: float((lin.weight == 0).float().mean()) for n, lin in linears.items()}
    return {
        "sparsity": sum(linear_sparsity[n] * sizes[n] for n in linears) / total,
        "linear_sparsity": linear_sparsity,
        "mse_uniform": mse_uniform,
        "mse_learned": mse_learned,
        "loss_first_epoch": epoch_losses[0],
        "loss_last_epoch": epoch_losses[-1],
    }


def _intact_blocks(state_dir: Path, recorded: int) -> int:
    """How many of the recorded block checkpoints read back intact, counting from the first."""
    for i in range(recorded):
        path = state_dir / f"besa-block-{i}.safetensors"
        try:
            read_safetensors(path)
        except (DamagedFile, FileNotFoundError) as exc:
            console.print(f"[yellow]discarding BESA block checkpoints from {path} on "
                          f"({exc if isinstance(exc, DamagedFile) else 'missing'}); those blocks are learned again",
                          soft_wrap=True)
            return i
    return recorded


def prune_step(run, windows, block_before: int, progress) -> dict:
    """`--method besa`: per-layer sparsities learned block by block (resumable per block)."""
    return prune_besa(run, windows, progress)


# calibration: the paper's (128 x 2048 of C4)
register_method("besa", "bonsai.methods.one_shot:OneShotRun",
                "BESA (Xu et al., 2024): per-layer sparsities learned block by block; backward passes, one block",
                step=prune_step, structured=False,
                calibration={"calib": "c4", "calib_samples": 128})(BesaSettings)
