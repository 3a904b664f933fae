"""The parent's predictions over the training windows, computed once and read back during training.

The teacher runs alone (the student is not loaded yet), window batch by window batch, and each position's
top-k log-probabilities (fp16), token ids (int16 when the vocabulary fits, else int32) and log tail mass
(fp32) go to safetensors shards of `SHARD_WINDOWS` windows. Disk cost per cached token is
k x (2 + 2 or 4) + 4 bytes: for k = 64 and a 32k vocabulary, 260 bytes, i.e. 4.0 GB for 30k x 512 tokens.

A cache folder is named by a hash of the teacher's identity, the exact training tokens and k, so a later
run with the same teacher, data and k reuses it; shards are written atomically, so an interrupted build
continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from safetensors import safe_open

from bonsai.engine.divergence import TopK, teacher_topk
from bonsai.io import DamagedFile, read_json, read_safetensors, write_json_atomic, write_safetensors_atomic
from bonsai.progress import console

SHARD_WINDOWS = 64
CACHE_VERSION = 1


def teacher_identity(name: str) -> dict:
    """What makes two teachers the same: where they come from, their config and their weight files."""
    from bonsai.models.loading import locate_model

    location, _ = locate_model(name)
    path = Path(location)
    ident: dict = {"location": str(path.resolve()) if path.exists() else location}
    if path.is_dir():
        ident["config_sha"] = hashlib.sha256((path / "config.json").read_bytes()).hexdigest()[:16]
        ident["weights"] = sorted((p.name, p.stat().st_size) for p in path.glob("*.safetensors")) or sorted(
            (p.name, p.stat().st_size) for p in path.glob("*.bin"))
    return ident


def cache_key(identity: dict, windows: torch.Tensor, k: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"teacher": identity, "k": k, "shape": list(windows.shape), "v": CACHE_VERSION},
                        sort_keys=True).encode())
    h.update(windows.to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:20]


class TeacherCache:
    """Read access to a finished cache: `get(rows)` returns the TopK of those training windows."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.meta = read_json(self.path / "meta.json")
        self._handles: dict[int, object] = {}

    @property
    def windows(self) -> int:
        return self.meta["windows"]

    @property
    def bytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.path.glob("shard-*.safetensors"))

    def _shard(self, i: int):
        if i not in self._handles:
            self._handles[i] = safe_open(str(self.path / _shard_name(i)), framework="pt")
        return self._handles[i]

    def get(self, rows: list[int]) -> TopK:
        parts = {"logprobs": [], "ids": [], "tail": []}
        for r in rows:
            shard = self._shard(r // SHARD_WINDOWS)
            j = r % SHARD_WINDOWS
            for name in parts:
                parts[name].append(shard.get_slice(name)[j:j + 1])
        return TopK(torch.cat(parts["logprobs"]), torch.cat(parts["ids"]).long(), torch.cat(parts["tail"]))


def _intact(path: Path, windows: int) -> bool:
    """Whether a finished cache reads back whole. Damaged shards (truncated, corrupt, wrong size) are deleted
    with a warning, and the caller rebuilds just those: a cache is only ever a copy of the teacher's output."""
    try:
        meta = read_json(path / "meta.json")
    except DamagedFile:
        (path / "meta.json").unlink()
        return False
    ok = bool(meta.get("complete"))
    for s in range(-(-windows // SHARD_WINDOWS)):
        shard = path / _shard_name(s)
        rows = min(SHARD_WINDOWS, windows - s * SHARD_WINDOWS)
        try:
            tensors = read_safetensors(shard)
            if any(t.shape[0] != rows for t in tensors.values()) or set(tensors) != {"logprobs", "ids", "tail"}:
                raise DamagedFile(shard, "wrong contents")
        except FileNotFoundError:
            ok = False
        except DamagedFile as exc:
            console.print(f"[yellow]{exc}; recomputing that shard of the teacher cache", soft_wrap=True)
            shard.unlink()
            ok = False
    return ok


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def find_or_build(teacher: str, windows: torch.Tensor, k: int, root: Path, batch_size: int, dtype: str,
                  device: str, progress=None, trust_remote_code: bool = False) -> tuple[TeacherCache, dict]:
    """Reuse the cache of (teacher, windows, k) under `root`, building (or finishing) it if needed."""
    identity = teacher_identity(teacher)
    key = cache_key(identity, windows, k)
    path = Path(root) / f"teacher-{key}"
    meta_path = path / "meta.json"
    if meta_path.exists() and _intact(path, windows.shape[0]):
        cache = TeacherCache(path)
        return cache, {"path": str(path), "reused": True, "build_seconds": 0.0, "bytes": cache.bytes_on_disk, "k": k}
    start = time.time()
    _build(teacher, identity, windows, k, path, batch_size, dtype, device, progress, trust_remote_code)
    cache = TeacherCache(path)
    return cache, {"path": str(path), "reused": False, "build_seconds": time.time() - start,
                   "bytes": cache.bytes_on_disk, "k": k}


@torch.no_grad()
def _build(teacher: str, identity: dict, windows: torch.Tensor, k: int, path: Path, batch_size: int, dtype: str,
           device: str, progress, trust_remote_code: bool) -> None:
    from bonsai.models.loading import load_model

    path.mkdir(parents=True, exist_ok=True)
    model = load_model(teacher, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    vocab = model.get_output_embeddings().weight.shape[0]
    k = min(k, vocab)
    id_dtype = torch.int16 if vocab <= torch.iinfo(torch.int16).max else torch.int32
    meta = {"version": CACHE_VERSION, "teacher": identity, "k": k, "vocab": vocab, "windows": int(windows.shape[0]),
            "seqlen": int(windows.shape[1]), "shard_windows": SHARD_WINDOWS, "complete": False}
    write_json_atomic(path / "meta.json", meta)
    device_ = next(model.parameters()).device
    n_shards = -(-windows.shape[0] // SHARD_WINDOWS)
    task = progress.add_task("teacher logits", total=windows.shape[0], info=f"top-{k}") if progress else None
    for s in range(n_shards):
        rows = windows[s * SHARD_WINDOWS:(s + 1) * SHARD_WINDOWS]
        if (path / _shard_name(s)).exists():
            if task is not None:
                progress.advance(task, rows.shape[0])
            continue
        parts = []
        for b in range(0, rows.shape[0], batch_size):
            logits = model(rows[b:b + batch_size].to(device_)).logits
            parts.append(teacher_topk(logits, k).to(torch.device("cpu")))
            if task is not None:
                progress.advance(task, logits.shape[0])
        tensors = {
            "logprobs": torch.cat([p.logprobs for p in parts]).to(torch.float16).contiguous(),
            "ids": torch.cat([p.ids for p in parts]).to(id_dtype).contiguous(),
            "tail": torch.cat([p.tail for p in parts]).float().contiguous(),
        }
        write_safetensors_atomic(path / _shard_name(s), tensors)
    meta["complete"] = True
    write_json_atomic(path / "meta.json", meta)
    del model
    if device_.type == "cuda":
        torch.cuda.empty_cache()
