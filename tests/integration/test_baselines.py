"""`bonsai prune --method wanda|llm-pruner` end to end: outputs reload (stock transformers for Wanda) and evaluate."""

import json

import pytest
import torch

from bonsai.adapters import get_adapter
from bonsai.cli import main
from bonsai.engine.blocks import block_linears
from bonsai.eval.runner import run_perplexity
from bonsai.models.loading import load_model

pytestmark = pytest.mark.integration


def cli(monkeypatch, *args):
    monkeypatch.setattr("sys.argv", ["bonsai", *args])
    try:
        main()
    except SystemExit as exc:
        assert exc.code in (0, None)


def test_wanda_2_4_cli_dense_checkpoint_loads_anywhere(monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "w24"
    cli(monkeypatch, "prune", "--model", "tiny", "--method", "wanda", "--sparsity-type", "2:4", "--sparsity", "0.5",
        "--calib", "kjv", "--calib-samples", "8", "--seqlen", "64", "--out", str(out))
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "wanda" and report["settings"]["sparsity_type"] == "2:4" and not report["structured"]
    assert report["totals"]["sparsity"] == 0.5 and len(report["layer_sparsity"]) == 6
    config = json.loads((out / "config.json").read_text())
    assert "bonsai_plan" not in config and "auto_map" not in config and not (out / "modeling_bonsai.py").exists()
    model = AutoModelForCausalLM.from_pretrained(out)  # stock class, no remote code
    adapter = get_adapter(model)
    for block in adapter.layers():
        for lin in block_linears(block, adapter.linear_names).values():
            assert ((lin.weight == 0).view(lin.out_features, -1, 4).sum(2) == 2).all()
    parent = run_perplexity("kjv", "tiny", seqlen=128, max_windows=8)["ppl"]
    pruned = run_perplexity("kjv", str(out), seqlen=128, max_windows=8)["ppl"]
    assert parent < pruned < 3 * parent


@pytest.mark.parametrize("extra", [[], ["--global", "--llmp-importance", "element2", "--llmp-aggregation", "max"]])
def test_llm_pruner_cli_reloads_and_evaluates(monkeypatch, tmp_path, random_checkpoints, extra):
    out = tmp_path / "lp"
    src = str(random_checkpoints["mistral"])  # GQA: whole key/value groups are removed
    cli(monkeypatch, "prune", "--model", src, "--method", "llm-pruner", "--sparsity", "0.2", "--calib", "kjv",
        "--llmp-layer-start", "0", "--llmp-layer-end", "3", "--out", str(out), *extra)
    report = json.loads((out / "report.json").read_text())
    assert report["structured"] and report["calibration_windows"] == 10 and report["seqlen"] == 128
    assert abs(report["totals"]["sparsity"] - 0.2) < 0.1
    assert report["settings"]["global_ranking"] == bool(extra)
    model = load_model(str(out), device="cpu")
    adapter = get_adapter(model)
    assert [adapter.attention(i).units for i in range(adapter.num_layers)] == report["attention_units"]
    for i in range(adapter.num_layers):
        att = adapter.attention(i)
        assert att.q.out_features == att.units * att.queries_per_kv * att.head_dim
    assert adapter.block_parameters() == report["totals"]["block_params_after"]
    ids = torch.randint(0, 4000, (1, 32))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    assert run_perplexity("kjv", str(out), seqlen=64, max_windows=2)["ppl"] > 1


@pytest.mark.parametrize("reconstruct", ["bias", "lstsq"])
def test_flap_cli_reaches_target_and_reloads_with_stock_transformers(monkeypatch, tmp_path, random_checkpoints,
                                                                    reconstruct):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "flap"
    src = str(random_checkpoints["llama"])
    cli(monkeypatch, "prune", "--model", src, "--method", "flap", "--sparsity", "0.3", "--calib", "kjv",
        "--calib-samples", "16", "--seqlen", "32", "--reconstruct", reconstruct, "--out", str(out))
    report = json.loads((out / "report.json").read_text())
    t = report["totals"]
    removed = t["block_params_before"] - t["block_params_after"]
    parent = get_adapter(load_model(src, device="cpu"))
    max_unit = max(parent.params_per_unit(k) for k in parent.groups())
    assert 0 <= removed - 0.3 * t["block_params_before"] < max_unit
    assert report["settings"]["reconstruct"] == reconstruct and report["reconstruction"]["mode"] == reconstruct
    mine = load_model(str(out), device="cpu")
    stock = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    ids = torch.randint(0, 4000, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, mine(ids).logits, atol=1e-5, rtol=0)
    if reconstruct == "bias":  # FLAP's compensation gives LLaMA output biases, recorded in the plan
        assert json.loads((out / "config.json").read_text())["bonsai_plan"]["linear_bias"]


@pytest.mark.parametrize("method", ["wanda", "llm-pruner", "besa", "flap"])
def test_baselines_run_on_a_model_with_emptied_layers(monkeypatch, tmp_path, random_checkpoints, method):
    """A parent whose layer 1 has no attention and layer 2 no MLP (an earlier structured prune) goes through
    every baseline, saves and reloads."""
    from bonsai.adapters import ATTENTION, MLP, GroupKey
    from bonsai.models.loading import load_tokenizer
    from bonsai.models.saving import save_pruned

    model = load_model(str(random_checkpoints["llama"]), device="cpu")
    adapter = get_adapter(model)
    adapter.slice(GroupKey(1, ATTENTION), torch.tensor([], dtype=torch.long))
    adapter.slice(GroupKey(2, MLP), torch.tensor([], dtype=torch.long))
    save_pruned(model, load_tokenizer(str(random_checkpoints["llama"])), tmp_path / "parent")
    out = tmp_path / method
    extra = {"wanda": [], "besa": ["--besa-levels", "10"], "llm-pruner": ["--llmp-layer-start", "0"], "flap": []}[method]
    cli(monkeypatch, "prune", "--model", str(tmp_path / "parent"), "--method", method, "--sparsity", "0.3", "--calib",
        "kjv", "--calib-samples", "4", "--seqlen", "32", "--out", str(out), *extra)
    reloaded = load_model(str(out), device="cpu")
    ids = torch.randint(0, 4000, (2, 16))
    with torch.no_grad():
        assert torch.isfinite(reloaded(ids).logits).all()
    reloaded_adapter = get_adapter(reloaded)
    assert reloaded_adapter.group_size(GroupKey(1, ATTENTION)) == 0 and reloaded_adapter.group_size(GroupKey(2, MLP)) == 0


@pytest.mark.parametrize("method,extra", [("flap", []), ("llm-pruner", ["--llmp-layer-start", "0"]),
                                          ("llm-pruner", ["--global"])])
def test_structured_baselines_keep_width_multiples(monkeypatch, tmp_path, method, extra):
    out = tmp_path / method
    cli(monkeypatch, "prune", "--model", "tiny", "--method", method, "--sparsity", "0.3", "--calib", "kjv",
        "--calib-samples", "8", "--seqlen", "64", "--width-multiple", "64", "--out", str(out), *extra)
    report = json.loads((out / "report.json").read_text())
    assert all(w % 64 == 0 for w in report["mlp_units"]) and report["settings"]["width_multiple"] == 64
    assert abs(report["totals"]["sparsity"] - 0.3) < 0.06


@pytest.mark.parametrize("method", ["flap", "llm-pruner"])
def test_structured_baselines_honour_uniform_allocation(monkeypatch, tmp_path, method):
    """--allocation uniform: every layer keeps the same sizes (LLM-Pruner then prunes its first and last layers
    too; FLAP ranks within each layer), and the output is a stock config that transformers loads alone."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / method
    cli(monkeypatch, "prune", "--model", "tiny", "--method", method, "--sparsity", "0.3", "--calib", "kjv",
        "--calib-samples", "8", "--seqlen", "64", "--allocation", "uniform", "--head-multiple", "2", "--out", str(out))
    report = json.loads((out / "report.json").read_text())
    assert len(set(report["mlp_units"])) == 1 and len(set(report["attention_units"])) == 1
    assert abs(report["totals"]["sparsity"] - 0.3) < 0.06
    config = json.loads((out / "config.json").read_text())
    assert "bonsai_plan" not in config and config["intermediate_size"] == report["mlp_units"][0]
    ids = torch.randint(0, 4000, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits,
                                   load_model(str(out), device="cpu", dtype="float32")(ids).logits, atol=1e-5, rtol=0)


def test_llm_pruner_global_and_uniform_refused(monkeypatch, tmp_path):
    monkeypatch.setattr("sys.argv", ["bonsai", "prune", "--model", "tiny", "--method", "llm-pruner", "--global",
                                     "--allocation", "uniform", "--calib", "kjv", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code != 0
