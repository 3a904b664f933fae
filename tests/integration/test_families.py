"""The 2025-era families (Qwen3, Gemma 1/2/3, Granite, OLMo-2, Phi-3) end to end: `bonsai prune` and the baselines on
tiny random checkpoints, reloaded with bonsai's loader and with stock transformers."""

from __future__ import annotations

import pytest
import torch
from helpers import BOS_FAMILIES, MLP_ONLY, assert_within_one_unit, bos_adding, tiny_model

from bonsai.adapters import ATTENTION, MLP, GroupKey, get_adapter
from bonsai.methods.one_shot import OneShotRun
from bonsai.errors import BonsaiError
from bonsai.models.loading import load_model
from bonsai.models.saving import save_pruned
from bonsai.methods.settings import PruneConfig
from bonsai.methods.bonsai.runner import PruneRun

pytestmark = pytest.mark.integration

NEW_FAMILIES = ["qwen3", "gemma", "gemma2", "gemma3", "granite", "olmo2", "phi3"]
FAST = dict(calib="kjv", seqlen=32, calib_samples=4, batch_size=8, reconstruct_samples=4)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("families")
    adding = bos_adding(tiny_tokenizer)  # Gemma's tokenizers start every text with BOS: the runs must too
    return {fam: save_pruned(tiny_model(fam, "sdpa", vocab_size=len(tiny_tokenizer)),
                             adding if fam in BOS_FAMILIES else tiny_tokenizer, root / fam)
            for fam in NEW_FAMILIES}


def starts_as_run(family: str, run, report: dict) -> None:
    """Every calibration and refit window starts with BOS exactly for the families whose tokenizer adds one."""
    bos = run.tokenizer.bos_token_id if family in BOS_FAMILIES else None
    assert report["bos"]["mode"] == "auto" and report["bos"]["token_id"] == bos
    assert run.bos == bos
    if bos is not None:
        from bonsai.data import calibration_windows

        windows = calibration_windows(run.tokenizer, "kjv", 4, 32, bos=run.bos)
        assert (windows[:, 0] == bos).all() and not (windows[:, 1:] == bos).any()


def units(family: str) -> str:
    return "mlp" if family in MLP_ONLY else "attention,mlp"


def reloads_equal(out, model) -> None:
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 4000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        torch.testing.assert_close(load_model(str(out), device="cpu")(ids).logits, ref, atol=1e-5, rtol=0)
        stock = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
        torch.testing.assert_close(stock(ids).logits, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_bonsai_prunes_the_family_to_target_and_reloads(family, checkpoints, tmp_path):
    cfg = PruneConfig(model=str(checkpoints[family]), sparsity=0.25, p_iter=0.15, samples=8, units=units(family),
                      **FAST).validate()
    run = PruneRun(cfg, tmp_path / "out")
    report = run.run()
    assert_within_one_unit(report, 0.25, report["totals"]["max_unit_params"])
    starts_as_run(family, run, report)
    if run.bos is not None:
        assert (run._windows(0)[:, 0] == run.bos).all() and (run._recon_windows(0)[:, 0] == run.bos).all()
    reloads_equal(tmp_path / "out", run.model)
    per_layer = {k: get_adapter(run.model).group_size(k) for k in get_adapter(run.model).groups()}
    assert len(set(per_layer.values())) > 1  # different sizes per layer went through the plan


@pytest.mark.parametrize("family", NEW_FAMILIES)
@pytest.mark.parametrize("method", ["flap", pytest.param("llm-pruner", marks=pytest.mark.slow),
                                    pytest.param("wanda", marks=pytest.mark.slow)])
def test_baselines_run_on_the_family(family, method, checkpoints, tmp_path):
    extra = {"llm-pruner": dict(llmp_layer_start=0)}.get(method, {})
    cfg = PruneConfig(model=str(checkpoints[family]), sparsity=0.3, method=method, units=units(family), **FAST,
                      **extra).validate()
    run = OneShotRun(cfg, tmp_path / "out")
    report = run.run()
    if method == "wanda":  # unstructured: the block linears' weights set to zero, per row of each
        assert report["totals"]["sparsity"] == pytest.approx(0.3, abs=0.01)
    else:
        adapter = get_adapter(run.model)
        assert_within_one_unit(report, 0.3, max(adapter.params_per_unit(k) for k in adapter.groups()))
        assert report["totals"]["target_reached"]
    starts_as_run(family, run, report)
    reloads_equal(tmp_path / "out", run.model)


def test_olmo2_attention_is_refused_in_one_line(checkpoints, tmp_path):
    for cls in (PruneRun, OneShotRun):
        cfg = PruneConfig(model=str(checkpoints["olmo2"]), sparsity=0.2, method="bonsai" if cls is PruneRun else "flap",
                          **FAST).validate()
        with pytest.raises(BonsaiError, match="OLMo-2 .* --units mlp"):
            cls(cfg, tmp_path / "out").run()
        assert not (tmp_path / "out").exists()


def test_empty_attention_layer_in_gemma2_keeps_the_post_norm_path(tmp_path):
    """Gemma-2 normalises the attention output before the residual: a layer with no heads left must add
    exactly nothing (norm of zeros), in the masked model and after slicing and reloading."""
    model = tiny_model("gemma2", "eager")
    adapter = get_adapter(model)
    adapter.slice(GroupKey(1, ATTENTION), torch.tensor([], dtype=torch.long))
    adapter.slice(GroupKey(0, MLP), torch.arange(0, 48, 2))
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        ref = model(ids).logits
    out = save_pruned(model, None, tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(load_model(str(out), device="cpu")(ids).logits, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["qwen3", "granite", "phi3", "gemma2", "gemma3", "olmo2"])
def test_uniform_prune_exports_to_llama_cpp(family, checkpoints, tmp_path, tiny_tokenizer):
    """`bonsai prune --allocation uniform` then the GGUF writer: llama.cpp runs the family's own architecture and
    its logits equal those of the saved model reloaded by bonsai (the export tests' tolerance)."""
    pytest.importorskip("llama_cpp")
    import numpy as np

    from bonsai.export.gguf import write_gguf
    from helpers import gguf_logits

    cfg = PruneConfig(model=str(checkpoints[family]), sparsity=0.3, p_iter=0.15, allocation="uniform", units=units(family),
                      **FAST).validate()
    run = PruneRun(cfg, tmp_path / "out").run()
    assert run["totals"]["target_reached"] and abs(run["totals"]["sparsity"] - 0.3) < 0.05  # never a coarse overshoot
    model = load_model(str(tmp_path / "out"), dtype="float32", device="cpu")
    report = write_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", "f32")
    assert report["architecture"] == family
    ids = torch.randint(3, len(tiny_tokenizer), (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expect = model(ids).logits[0].numpy()
    got = gguf_logits(tmp_path / "m.gguf", n_ctx=64, tokens=ids[0].tolist())
    # llama.cpp keeps its KV cache in f16: 1e-3 of the largest logit, or 1e-3 where the logits are all below 1
    assert np.abs(got - expect).max() <= 1e-3 * max(np.abs(expect).max(), 1.0)
