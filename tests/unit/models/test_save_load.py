"""Pruned checkpoints: safetensors, plan in config.json, stock loading with remote code, bonsai loading without."""

import json

import pytest
import torch
from helpers import FAMILIES, MLP_ONLY, tiny_model

from bonsai.adapters import ATTENTION, MLP, GroupKey, get_adapter
from bonsai.errors import BonsaiError
from bonsai.models.loading import load_model
from bonsai.models.saving import save_pruned

pytestmark = pytest.mark.unit


def prune_some(model):
    adapter = get_adapter(model)
    if ATTENTION not in adapter.unprunable:
        adapter.slice(GroupKey(0, ATTENTION), torch.tensor([1]))
        adapter.slice(GroupKey(1, ATTENTION), torch.tensor([], dtype=torch.long))  # all heads gone
    adapter.slice(GroupKey(2, MLP), torch.arange(0, 48, 3))
    adapter.slice(GroupKey(0, MLP), torch.tensor([], dtype=torch.long))  # all channels gone
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = prune_some(tiny_model(family, "sdpa"))
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        ref = model(ids).logits
    out = save_pruned(model, None, tmp_path / "m")
    files = {p.name for p in out.iterdir()}
    assert "model.safetensors" in files and "modeling_bonsai.py" in files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    plan = json.loads((out / "config.json").read_text())["bonsai_plan"]
    assert plan["layers"][1]["attention_units"] == (0 if family not in MLP_ONLY else 4)
    assert plan["layers"][2]["mlp_units"] == 16

    mine = load_model(str(out), device="cpu")
    placed = load_model(str(out), device_map="cpu")  # accelerate placement path
    stock = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    with torch.no_grad():
        torch.testing.assert_close(mine(ids).logits, ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(placed(ids).logits, ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(stock(ids).logits, ref, atol=1e-6, rtol=0)
    # generation through the empty attention layer keeps the cache consistent
    assert mine.generate(ids[:1], max_new_tokens=3, min_new_tokens=3, do_sample=False).shape == (1, 13)


def test_bonsai_loader_never_enables_remote_code(tmp_path, monkeypatch):
    import transformers

    calls = []
    original = transformers.AutoConfig.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(kwargs.get("trust_remote_code", False))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", classmethod(spy))
    out = save_pruned(prune_some(tiny_model("llama", "sdpa")), None, tmp_path / "m")
    load_model(str(out), device="cpu")
    assert calls and not any(calls)


def test_save_is_atomic(tmp_path, monkeypatch):
    model = prune_some(tiny_model("llama", "sdpa"))
    target = tmp_path / "m"

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", boom)
    with pytest.raises(RuntimeError):
        save_pruned(model, None, target)
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_missing_and_unsupported(tmp_path):
    with pytest.raises(BonsaiError, match="model path not found"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({"model_type": "not-a-model"}))
    with pytest.raises(BonsaiError, match="cannot read the model config"):
        load_model(str(tmp_path / "cfg"))


def test_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BonsaiError, match="not in the local Hugging Face cache"):
        load_model("meta-llama/Llama-2-7b-hf")
