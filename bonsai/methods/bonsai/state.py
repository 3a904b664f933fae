"""Checkpointed state of a prune run inside its output folder (JSON + safetensors; no pickle).

`state.json` holds the settings fingerprint, the units kept so far (indices into the *original*
model's units, so a resumed run rebuilds the model by one exact slicing), the per-iteration history,
and the iteration in progress. `iteration.safetensors` holds that iteration's priors, candidates,
sampled masks and the utilities evaluated so far.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bonsai.io import DamagedFile, read_json, read_safetensors, write_json_atomic, write_safetensors_atomic
from bonsai.progress import console

STATE_DIR = ".bonsai"
RESTART_HINT = "pass --force to start the run over"


@dataclass
class RunState:
    fingerprint: dict
    kept: dict[str, list[int]]
    history: list[dict] = field(default_factory=list)
    completed_iterations: int = 0
    finished: bool = False
    started: float = 0.0
    elapsed_before: float = 0.0
    refit: str | None = None  # file in the state folder holding the refit output projections, if any
    # windows of the refit and the compensation statistics, fixed when the run starts (its default has changed
    # between versions: a resumed run keeps the count it started with); None in runs checkpointed before
    refit_windows: int | None = None

    def to_dict(self) -> dict:
        return self.__dict__.copy()


@dataclass
class IterationState:
    iteration: int
    prior: dict[str, np.ndarray]
    candidates: dict[str, np.ndarray]
    masks: np.ndarray
    utility: np.ndarray
    done: np.ndarray
    base_loss: float
    nr_sum: np.ndarray
    nr_count: np.ndarray
    unit_error: dict[str, np.ndarray] = field(default_factory=dict)  # compensated errors (sensitivity selection)
    #: adaptive sampling, one row per finished round: sub-models, CV tau, share of the decision changed, stopped
    rounds: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    #: the allocation search, one row per evaluated allocation: window set (0 the sub-models', 1 the verification's),
    #: utility, then the removal count of every group with candidates
    search: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))

    def tensors(self) -> dict[str, torch.Tensor]:
        t = {
            "masks": torch.from_numpy(np.ascontiguousarray(self.masks)),
            "utility": torch.from_numpy(self.utility.astype(np.float64)),
            "done": torch.from_numpy(self.done.astype(np.uint8)),
            "nr_sum": torch.from_numpy(self.nr_sum.astype(np.float64)),
            "nr_count": torch.from_numpy(self.nr_count.astype(np.float64)),
            "base_loss": torch.tensor([self.base_loss], dtype=torch.float64),
            "iteration": torch.tensor([self.iteration], dtype=torch.int64),
            "rounds": torch.from_numpy(np.asarray(self.rounds, dtype=np.float64).reshape(-1, 4)),
            "search": torch.from_numpy(np.ascontiguousarray(self.search, dtype=np.float64)),
        }
        for k, v in self.prior.items():
            t[f"prior/{k}"] = torch.from_numpy(np.asarray(v, dtype=np.float64))
        for k, v in self.candidates.items():
            t[f"cand/{k}"] = torch.from_numpy(np.asarray(v, dtype=np.int64))
        for k, v in self.unit_error.items():
            t[f"err/{k}"] = torch.from_numpy(np.array(v, dtype=np.float64))  # a copy: it may be the prior itself
        return t

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> IterationState:
        return cls(
            iteration=int(t["iteration"][0]),
            prior={k[6:]: v.numpy() for k, v in t.items() if k.startswith("prior/")},
            candidates={k[5:]: v.numpy() for k, v in t.items() if k.startswith("cand/")},
            masks=t["masks"].numpy(), utility=t["utility"].numpy(), done=t["done"].numpy().astype(bool),
            base_loss=float(t["base_loss"][0]), nr_sum=t["nr_sum"].numpy(), nr_count=t["nr_count"].numpy(),
            unit_error={k[4:]: v.numpy() for k, v in t.items() if k.startswith("err/")},
            rounds=t["rounds"].numpy() if "rounds" in t else np.zeros((0, 4)),
            search=t["search"].numpy() if "search" in t else np.zeros((0, 2)),
        )


class StateStore:
    def __init__(self, out_dir: Path):
        self.dir = Path(out_dir) / STATE_DIR

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    @property
    def iteration_file(self) -> Path:
        return self.dir / "iteration.safetensors"

    def save_weights(self, tensors: dict[str, torch.Tensor], name: str) -> None:
        """Refit output projections, written before state.json names them (so a crash between the two
        leaves the previous iteration's state and file intact)."""
        write_safetensors_atomic(self.dir / name, tensors)

    def load_weights(self, name: str) -> dict[str, torch.Tensor]:
        """The refit projections a resumed run rebuilds the model from: without them the run cannot go on."""
        try:
            return read_safetensors(self.dir / name, hint=RESTART_HINT)
        except FileNotFoundError:
            raise DamagedFile(self.dir / name, "missing", RESTART_HINT) from None

    def prune_weights(self, keep: str | None) -> None:
        """Delete every refit-weights file but `keep`."""
        for path in self.dir.glob("weights-*.safetensors"):
            if path.name != keep:
                path.unlink()

    def exists(self) -> bool:
        return self.state_file.exists()

    def load(self) -> RunState:
        """The run's state; a damaged file is refused (what it recorded cannot be recomputed)."""
        data = read_json(self.state_file, hint=RESTART_HINT)
        try:
            state = RunState(**data)
            assert isinstance(state.fingerprint, dict) and isinstance(state.kept, dict)
        except (TypeError, AssertionError):
            raise DamagedFile(self.state_file, "not a bonsai run state", RESTART_HINT) from None
        return state

    def save(self, state: RunState) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.state_file, state.to_dict())

    def save_iteration(self, it: IterationState) -> None:
        write_safetensors_atomic(self.iteration_file, it.tensors())

    def load_iteration(self, iteration: int) -> IterationState | None:
        """The iteration in progress, or None to start it afresh. A damaged file only holds sub-model
        utilities that can be evaluated again, so it is discarded (with a warning), not fatal."""
        if not self.iteration_file.exists():
            return None
        try:
            it = IterationState.from_tensors(read_safetensors(self.iteration_file))
        except (DamagedFile, KeyError, IndexError, ValueError) as exc:
            console.print(f"[yellow]discarding {self.iteration_file} ({exc if isinstance(exc, DamagedFile) else 'incomplete'});"
                          " its sub-models are evaluated again", soft_wrap=True)
            self.iteration_file.unlink(missing_ok=True)
            return None
        return it if it.iteration == iteration else None

    def clear_iteration(self) -> None:
        if self.iteration_file.exists():
            self.iteration_file.unlink()
