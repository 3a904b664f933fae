"""`bonsai prune --method wanda|llm-pruner|besa|flap`: same data, saving, report and CLI as Bonsai.

These are single-pass methods (minutes for Wanda, LLM-Pruner and FLAP); BESA checkpoints after every block.
The structured ones (LLM-Pruner, FLAP) remove units through `bonsai.engine.reconstruction.remove_units`, so they
get the same `--reconstruct` refit as Bonsai.
"""

from __future__ import annotations

import shutil
from dataclasses import fields
import time
from pathlib import Path

import numpy as np
import torch

from bonsai.adapters import get_adapter
from bonsai.engine.run_folder import open_run_folder
from bonsai.errors import BonsaiError
from bonsai.io import read_json, write_json_atomic
from bonsai.models.checks import count_nonzero
from bonsai.progress import console, make_progress
from bonsai.methods.settings import PruneConfig
from bonsai.runtime import peak_memory


def linear_zero_fraction(adapter) -> tuple[int, int]:
    """(zeros, weights) over the block linears the adapter lists."""
    from bonsai.engine.blocks import block_linears

    zeros = total = 0
    for block in adapter.layers():
        for lin in block_linears(block, adapter.linear_names).values():
            zeros += lin.weight.numel() - count_nonzero(lin.weight)
            total += lin.weight.numel()
    return zeros, total


class OneShotRun:
    def __init__(self, cfg: PruneConfig, out_dir: str | Path, force: bool = False, model=None, tokenizer=None):
        from bonsai.eval.runner import default_seqlen
        from bonsai.models.loading import load_model, load_tokenizer
        from bonsai.runtime import resolve_device

        self.cfg = cfg
        self.spec = cfg.spec
        self.out = Path(out_dir)
        self.state_dir = self.out / ".bonsai"
        # only BESA checkpoints (block by block); the others write their result once, at the end
        self.folder = open_run_folder(self.out, force, cfg.fingerprint(), self._stored_settings,
                                      what=f"{cfg.method} run")
        self.resuming = self.folder.resuming
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
        from bonsai.data.windows import prepare_text

        prepare_text(self.tokenizer, cfg.calib)  # before the model: the tokenizer's peak stays below the model's
        self.model = model if model is not None else load_model(cfg.model, dtype=cfg.dtype,
                                                                 device=str(resolve_device(cfg.device)),
                                                                 device_map=cfg.device_map)
        if model is None:
            from bonsai.models.checks import check_finite

            check_finite(self.model, cfg.model)
        self.adapter = get_adapter(self.model)
        if self.spec.checks_units:  # unstructured methods remove weights, not units
            self.adapter.check_kinds(cfg.unit_kinds)
        self.device = next(self.model.parameters()).device
        self.seqlen = default_seqlen(self.model.config, cfg.seqlen)
        from bonsai.data import resolve_bos

        self.bos = resolve_bos(self.tokenizer, cfg.bos)

    def _stored_settings(self) -> dict | None:
        """The settings of the run the folder holds (None: no run to resume). A one-shot method that checkpoints
        (BESA, block by block) keeps them in `.bonsai/METHOD-run.json`; the others write their result once."""
        state = self.state_dir / f"{self.cfg.method}-run.json"
        if not state.exists():
            return None
        return read_json(state, hint="pass --force to start the run over")["fingerprint"]

    def run(self) -> dict:
        from bonsai.data import bos_record, calibration_windows

        cfg = self.cfg
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.time()
        windows = calibration_windows(self.tokenizer, cfg.calib, cfg.calib_samples, self.seqlen, seed=cfg.seed, bos=self.bos)
        self.folder.clear_replaced()
        block_before = self.adapter.block_parameters()
        total_before = sum(p.numel() for p in self.model.parameters())
        structured = self.spec.structured
        with make_progress() as progress:
            details = self.spec.step(self, windows, block_before, progress)
        zeros, linear_weights = linear_zero_fraction(self.adapter)
        block_after = self.adapter.block_parameters()
        reached = None
        if structured:
            # the rules above reach the target within one unit (a group emptied by the refit keeps a bias, a few
            # parameters); say so if they did not
            short = cfg.sparsity * block_before - (block_before - block_after)
            reached = short < min(self.adapter.params_per_unit(k) for k in self.adapter.groups())
            if not reached:
                console.print(f"[yellow]{cfg.method}: {short:,.0f} block parameters short of --sparsity {cfg.sparsity} "
                              f"(block sparsity {1 - block_after / block_before:.4f})")
        total_after = sum(p.numel() for p in self.model.parameters())
        report = {
            "model": cfg.model,
            "method": cfg.method,
            "settings": report_settings(cfg),
            "seqlen": self.seqlen,
            "bos": bos_record(self.tokenizer, cfg.bos),
            "calibration_windows": int(windows.shape[0]),
            "structured": structured,
            "totals": {
                "target_sparsity": cfg.sparsity,
                # structured: block parameters removed; unstructured: block-linear weights set to zero
                "sparsity": 1 - block_after / block_before if structured else zeros / linear_weights,
                "linear_weight_sparsity": zeros / linear_weights,
                "target_reached": reached,
                "block_params_before": block_before,
                "block_params_after": block_after,
                "params_before": total_before,
                "params_after": total_after,
                "nonzero_params_after": sum(count_nonzero(p) for p in self.model.parameters()),
                "wall_seconds": time.time() - start + getattr(self, "elapsed_before", 0.0),
                "peak_memory_bytes": peak_memory(self.device),
            },
            **details,
        }
        self._save(report, structured)
        return report

    # ---- methods -------------------------------------------------------------------------------
    def uniform_drops(self, scores: dict, target: float) -> dict:
        """The same ratio in every group, brought to the target (`uniform_removals`); says what moved between kinds."""
        from bonsai.methods.llm_pruner import uniform_removals

        notes: list[str] = []
        drops = uniform_removals(scores, self.adapter, target, multiple=self.multiple,
                                 same_per_kind=self.cfg.allocation == "uniform", notes=notes)
        for note in notes:
            console.print(f"[yellow]{self.cfg.method}: {note}")
        self._notes = notes
        return drops

    def check_uniform(self, keys) -> None:
        """--allocation uniform needs one size per kind to start from (else the output is no stock config)."""
        for kind in {k.kind for k in keys}:
            if len({self.adapter.group_size(k) for k in keys if k.kind == kind}) > 1:
                raise BonsaiError(f"--allocation uniform needs every layer to have the same {kind} size; this model's "
                                  "layers differ (prune the parent, or use --allocation global)")

    def multiples(self) -> bool:
        return self.cfg.width_multiple > 1 or self.cfg.head_multiple > 1

    def multiple(self, key) -> int:
        return self.cfg.head_multiple if key.kind == "attention" else self.cfg.width_multiple

    def global_in_multiples(self, importance: dict, target: float) -> dict:
        """One global ranking (lowest importance first) in whole steps: every group keeps a multiple of N units."""
        from bonsai.engine.selection import GroupOrder, select_in_multiples

        orders = {}
        for key, score in importance.items():
            if len(score) == 0:
                continue
            order = np.argsort(score, kind="stable")
            orders[key] = GroupOrder(units=order, scores=np.asarray(score)[order], unit_params=self.adapter.params_per_unit(key),
                                     size=len(score), multiple=self.multiple(key), allowed=len(score))
        return dict(zip(orders, select_in_multiples(list(orders.values()), target), strict=True))

    def remove(self, drops: dict, progress) -> dict:
        """Remove the dropped units of every group through the shared reconstruction (--reconstruct)."""
        from bonsai.adapters import GroupKey
        from bonsai.data import calibration_windows
        from bonsai.engine.reconstruction import refit_windows, remove_units, widest_projection

        cfg, adapter = self.cfg, self.adapter
        keep = {}
        for key, dropped in drops.items():
            removed = set(np.asarray(dropped).tolist())
            keep[key] = [u for u in range(adapter.group_size(key)) if u not in removed]
        windows = None
        if cfg.reconstruct != "none":
            n = refit_windows(cfg.reconstruct_samples, cfg.calib_samples,
                              widest_projection(adapter, adapter.groups(cfg.unit_kinds)), self.seqlen)
            windows = calibration_windows(self.tokenizer, cfg.calib, n, self.seqlen, seed=cfg.seed * 100003 + 50021,
                                          bos=self.bos)
        removal = remove_units(self.model, adapter, keep, windows, cfg.reconstruct, cfg.reconstruct_damp,
                               cfg.batch_size, progress, on_warning=lambda m: console.print(f"[yellow]{m}"),
                               target=cfg.refit_target, kinds=cfg.unit_kinds)
        return {
            "attention_units": [adapter.group_size(GroupKey(i, "attention")) for i in range(adapter.num_layers)],
            "mlp_units": [adapter.group_size(GroupKey(i, "mlp")) for i in range(adapter.num_layers)],
            "kept_units": {str(k): v for k, v in keep.items()},
            "reconstruction": {"mode": cfg.reconstruct, "target": cfg.refit_target, "layers": removal.groups,
                               "added_biases": removal.added_biases, "warnings": removal.warnings},
            "allocation_notes": getattr(self, "_notes", []),
        }

    # ---- output ----------------------------------------------------------------------------------
    def _save(self, report: dict, structured: bool) -> None:
        from bonsai.models.saving import save_pruned

        staging = self.out.with_name(f".{self.out.name}.report")
        staging.mkdir(parents=True, exist_ok=True)
        write_json_atomic(staging / "report.json", report)
        extra = {"report.json": staging / "report.json"}
        if "layer_sparsity" in report:
            try:
                from bonsai.methods.plots import plot_layer_sparsity

                plot_layer_sparsity(report, staging / "report.png")
                extra["report.png"] = staging / "report.png"
            except Exception as exc:  # a plot must never lose a finished run
                console.print(f"[yellow]could not draw report.png: {exc}")
        try:
            save_pruned(self.model, self.tokenizer, self.out, overwrite=True, extra_files=extra, structured=structured)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


# the shared settings a one-shot method's report lists (the structured ones also their units, refit and shapes)
SHARED_REPORTED = ("model", "sparsity", "method", "calib", "calib_samples", "seqlen", "bos", "batch_size", "seed",
                   "dtype", "device", "device_map")
STRUCTURED_REPORTED = ("units", "reconstruct", "reconstruct_damp", "reconstruct_samples", "width_multiple",
                       "head_multiple", "allocation")


def report_settings(cfg) -> dict:
    """report.json's "settings": the shared settings that applied, then the method's own."""
    keys = [*SHARED_REPORTED, *(STRUCTURED_REPORTED if cfg.spec.structured else ()),
            *(f.name for f in fields(cfg.spec.settings))]
    return {k: getattr(cfg, k) for k in keys}
