import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest
import torch

# Under pytest-xdist (`-n auto`, in the default options) the cores are shared between workers: each worker and the
# subprocesses its tests start get cores / workers threads, so that in-process and subprocess results use the same count.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, (os.cpu_count() or 1) // _workers))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
torch.set_num_threads(THREADS)

from bonsai.models.aliases import TINY_MODEL_DIR


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_MODEL_DIR)


@pytest.fixture(scope="session")
def random_checkpoints(tmp_path_factory, tiny_tokenizer):
    """Random tiny LLaMA / Mistral (GQA) / Phi checkpoints with the shipped tokenizer, saved to disk."""
    from helpers import tiny_model

    from bonsai.models.saving import save_pruned

    root = tmp_path_factory.mktemp("random")
    paths = {}
    for fam in ("llama", "mistral", "phi"):
        model = tiny_model(fam, "sdpa", vocab_size=len(tiny_tokenizer))
        paths[fam] = save_pruned(model, tiny_tokenizer, root / fam)
    return paths
