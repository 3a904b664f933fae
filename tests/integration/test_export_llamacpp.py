"""GGUF exports checked against llama.cpp itself (llama-cpp-python): logits, tokenisation, perplexity.

Tolerances: llama.cpp computes in float32 with its own kernels and summation order, so on these small random
models f32 logits agree with transformers' float32 to about 3e-4 of their scale (llama.cpp keeps
its KV cache in f16 by default); we allow 1e-3 of the
largest logit. Perplexity of a trained model: within 1% at f16 (half-precision weights), within 2% at q8_0
(8-bit blocks of 32 with one scale each).
"""

import json

import numpy as np
import pytest
import torch
from helpers import tiny_model

from bonsai.adapters import ATTENTION, MLP, GroupKey, get_adapter
from bonsai.engine.reconstruction import remove_units
from bonsai.export.gguf import write_gguf

pytestmark = pytest.mark.integration
llama_cpp = pytest.importorskip("llama_cpp")

from bonsai.export.llamacpp import GGUFModel, gguf_perplexity  # noqa: E402
from helpers import gguf_logits  # noqa: E402

TEXT = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
        "and darkness was upon the face of the deep.\n\n  Numbers 1234 and 56, symbols: $%& (x) -- 'quoted' \"twice\"!")


def _pruned(family, tokenizer, refit: bool):
    """A tiny random model with different units per layer: layer 1 without attention, layer 2 without MLP."""
    model = tiny_model(family, "eager", num_hidden_layers=4, vocab_size=len(tokenizer)).float()
    adapter = get_adapter(model)
    keep = {GroupKey(0, MLP): torch.arange(0, 48, 2), GroupKey(1, ATTENTION): torch.tensor([], dtype=torch.long),
            GroupKey(2, MLP): torch.tensor([], dtype=torch.long), GroupKey(3, ATTENTION): torch.tensor([0])}
    windows = torch.randint(0, len(tokenizer), (4, 24), generator=torch.Generator().manual_seed(0))
    remove_units(model, adapter, keep, windows, "lstsq" if refit else "none", batch_size=4)
    return model


@pytest.mark.parametrize("family", ["llama", "llama-gqa", "mistral", "qwen2", "phi"])
@pytest.mark.parametrize("refit", [False, True])
def test_llama_cpp_logits_equal_transformers(family, refit, tmp_path, tiny_tokenizer):
    model = _pruned(family, tiny_tokenizer, refit)
    report = write_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", "f32")
    assert report["architecture"] == ("phi2" if family == "phi" else "deci")
    ids = torch.randint(3, len(tiny_tokenizer), (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expect = model(ids).logits[0].numpy()
    got = gguf_logits(tmp_path / "m.gguf", n_ctx=64, tokens=ids[0].tolist())
    assert got.shape == expect.shape
    assert np.abs(got - expect).max() <= 1e-3 * np.abs(expect).max()


def test_layer_removed_and_layer_zero_without_heads(tmp_path, tiny_tokenizer):
    model = tiny_model("llama-gqa", "eager", num_hidden_layers=4, vocab_size=len(tiny_tokenizer))
    adapter = get_adapter(model)
    adapter.slice(GroupKey(0, ATTENTION), torch.tensor([], dtype=torch.long))
    adapter.slice(GroupKey(2, ATTENTION), torch.tensor([], dtype=torch.long))
    adapter.slice(GroupKey(2, MLP), torch.tensor([], dtype=torch.long))
    report = write_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", "f32")
    assert report["removed_layers"] == [2] and any("layer 0" in p for p in report["padded"])
    ids = torch.randint(3, len(tiny_tokenizer), (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expect = model(ids).logits[0].numpy()
    got = gguf_logits(tmp_path / "m.gguf", n_ctx=64, tokens=ids[0].tolist())
    assert np.abs(got - expect).max() <= 1e-3 * np.abs(expect).max()


def test_unpruned_model_is_plain_llama(tmp_path, tiny_tokenizer):
    from bonsai.models.loading import load_model

    model = load_model("tiny", dtype="float32", device="cpu")
    report = write_gguf(model, tiny_tokenizer, tmp_path / "t.gguf", "f32")
    assert report["architecture"] == "llama"
    ids = tiny_tokenizer(TEXT, add_special_tokens=False)["input_ids"][:48]
    with torch.no_grad():
        expect = model(torch.tensor([ids])).logits[0].numpy()
    got = gguf_logits(tmp_path / "t.gguf", n_ctx=64, tokens=ids)
    assert np.abs(got - expect).max() <= 1e-3 * np.abs(expect).max()


def test_tokenisation_matches_transformers(tmp_path, tiny_tokenizer):
    model = tiny_model("llama", vocab_size=len(tiny_tokenizer))
    write_gguf(model, tiny_tokenizer, tmp_path / "t.gguf", "f32")
    from bonsai.data.sources import load_text

    sample = TEXT + load_text("austen", "test").text[:3000]
    with GGUFModel(tmp_path / "t.gguf", n_ctx=64) as gm:
        assert gm.tokenize(sample) == tiny_tokenizer(sample, add_special_tokens=False)["input_ids"]
    assert gm.llm is None  # freed on leaving the block, not whenever the garbage collector runs
    gm.close()


@pytest.mark.parametrize("dtype,bound", [("f16", 0.01), ("q8_0", 0.02)])
def test_perplexity_through_llama_cpp(dtype, bound, tmp_path, tiny_tokenizer):
    """A pruned trained model: llama.cpp's perplexity (same windows and protocol) within `bound` of transformers'."""
    from bonsai.eval.runner import run_perplexity
    from bonsai.models.loading import load_model
    from bonsai.models.saving import save_pruned

    model = load_model("tiny", dtype="float32", device="cpu")
    adapter = get_adapter(model)
    keep = {k: torch.arange(adapter.group_size(k) // (4 if k.layer % 2 else 3), adapter.group_size(k))
            for k in adapter.groups()}
    remove_units(model, adapter, keep, None, "none")
    save_pruned(model, tiny_tokenizer, tmp_path / "hf")
    write_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", dtype)
    hf = run_perplexity("kjv", str(tmp_path / "hf"), seqlen=128, max_windows=24, device="cpu")
    cpp = gguf_perplexity("kjv", str(tmp_path / "m.gguf"), seqlen=128, max_windows=24)
    assert cpp["tokens"] == hf["tokens"]
    assert abs(cpp["ppl"] / hf["ppl"] - 1) < bound


def test_eval_and_export_cli(monkeypatch, tmp_path):
    from bonsai.cli import main

    def cli(*args):
        monkeypatch.setattr("sys.argv", ["bonsai", *args])
        try:
            main()
        except SystemExit as exc:
            assert exc.code in (0, None)

    cli("export", "tiny", "--out", str(tmp_path / "t.gguf"), "--dtype", "f16", "--json", str(tmp_path / "r.json"))
    assert json.loads((tmp_path / "r.json").read_text())["architecture"] == "llama"
    cli("eval", "kjv", "--model", str(tmp_path / "t.gguf"), "--seqlen", "64", "--max-windows", "4",
        "--json", str(tmp_path / "e.json"))
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["engine"] == "llama.cpp" and result["windows"] == 4 and result["ppl"] > 1


def test_bench_on_gguf_reports_both_speeds_and_the_parameter_ratio(tmp_path, tiny_tokenizer):
    from bonsai.bench.llamacpp_speed import run_gguf_bench
    from bonsai.export.llamacpp import gguf_metadata

    parent = tiny_model("llama", vocab_size=len(tiny_tokenizer))
    write_gguf(parent, tiny_tokenizer, tmp_path / "p.gguf", "f16")
    pruned = _pruned("llama", tiny_tokenizer, refit=False)
    write_gguf(pruned, tiny_tokenizer, tmp_path / "m.gguf", "f16")
    r = run_gguf_bench(str(tmp_path / "m.gguf"), str(tmp_path / "p.gguf"), prompt=16, generate=4, repeats=1)
    assert r["param_ratio"] == pytest.approx(gguf_metadata(str(tmp_path / "p.gguf"))[1]
                                             / gguf_metadata(str(tmp_path / "m.gguf"))[1])
    for side in ("model", "baseline"):
        assert r["models"][side]["prompt_tokens_per_second"] > 0 and r["models"][side]["generate_tokens_per_second"] > 0
    assert set(r["speedup"]) == {"prompt", "generate"}


@pytest.mark.slow
def test_real_model_export_matches_llama_cpp():
    """SmolLM2-135M (scripts/get_smollm2.py): its 49k BPE vocabulary tokenises the same in llama.cpp, and the
    f32 logits agree. Slow: skipped unless the model has been fetched."""
    from pathlib import Path

    from bonsai.data.sources import load_text
    from bonsai.models.loading import load_model, load_tokenizer

    folder = Path(__file__).resolve().parents[2] / "runs" / "models" / "smollm2-135m"
    if not (folder / "config.json").exists():
        pytest.skip("run scripts/get_smollm2.py first")
    tok = load_tokenizer(str(folder))
    model = load_model(str(folder), dtype="float32", device="cpu")
    out = Path(__file__).parent / ".smollm2-test.gguf"
    try:
        write_gguf(model, tok, out, "f32")
        sample = load_text("austen", "test").text[:20000] + TEXT
        with GGUFModel(out, n_ctx=128) as gm:
            assert gm.tokenize(sample) == tok(sample, add_special_tokens=False)["input_ids"]
            ids = tok(sample, add_special_tokens=False)["input_ids"][:96]
            with torch.no_grad():
                expect = model(torch.tensor([ids])).logits[0].numpy()
            assert np.abs(gm.logits(ids) - expect).max() <= 1e-3 * np.abs(expect).max()
    finally:
        out.unlink(missing_ok=True)


def test_k_quants_cover_every_matrix_when_widths_are_multiples_of_256(tmp_path, tiny_tokenizer):
    """q4_k_m through llama.cpp's quantiser: with hidden size, head widths and MLP widths multiples of 256 every
    block matrix takes a K-quant type; the file runs in llama.cpp close to its f16 export."""
    model = tiny_model("llama", "eager", vocab_size=len(tiny_tokenizer), hidden_size=256, intermediate_size=1024,
                       num_attention_heads=4, num_key_value_heads=4)
    adapter = get_adapter(model)
    adapter.slice(GroupKey(1, MLP), torch.arange(512))  # per-layer widths, each a multiple of 256
    report = write_gguf(model, tiny_tokenizer, tmp_path / "k.gguf", "q4_k_m")
    blocks = {n: t for n, t in report["tensor_types"].items() if n.startswith("blk.") and t != "f32"}
    assert blocks and all(t.endswith("_k") for t in blocks.values()) and report["k_quant_fallback"] == []
    assert any(n.endswith("ffn_down.weight") for n in blocks)
    write_gguf(model, tiny_tokenizer, tmp_path / "h.gguf", "f16")
    ids = torch.randint(3, len(tiny_tokenizer), (24,), generator=torch.Generator().manual_seed(3)).tolist()
    k = gguf_logits(tmp_path / "k.gguf", n_ctx=64, tokens=ids)
    h = gguf_logits(tmp_path / "h.gguf", n_ctx=64, tokens=ids)
    assert np.isfinite(k).all() and np.corrcoef(k.ravel(), h.ravel())[0, 1] > 0.98


def test_k_quants_refuse_widths_they_cannot_block(tmp_path, tiny_tokenizer):
    from bonsai.errors import BonsaiError

    model = tiny_model("llama", vocab_size=len(tiny_tokenizer), hidden_size=256, intermediate_size=300,
                       num_attention_heads=4, num_key_value_heads=4)
    with pytest.raises(BonsaiError, match="--width-multiple 256"):
        write_gguf(model, tiny_tokenizer, tmp_path / "k.gguf", "q4_k_m")
    assert not list(tmp_path.iterdir())
    report = write_gguf(model, tiny_tokenizer, tmp_path / "k.gguf", "q4_k_m", allow_fallback=True)
    assert any(n.endswith("ffn_down.weight") for n in report["k_quant_fallback"])


def _uniform(family, tokenizer, units: int | None, channels: int):
    """A tiny random model pruned to the same sizes in every layer (different units kept in each), refit."""
    model = tiny_model(family, "eager", num_hidden_layers=3, vocab_size=len(tokenizer)).float()
    adapter = get_adapter(model)
    gen = torch.Generator().manual_seed(4)
    keep = {}
    for key in adapter.groups():
        n = units if key.kind == ATTENTION else channels
        if n is not None:
            keep[key] = torch.randperm(adapter.group_size(key), generator=gen)[:n].sort().values
    windows = torch.randint(0, len(tokenizer), (4, 24), generator=torch.Generator().manual_seed(0))
    remove_units(model, adapter, keep, windows, "lstsq", batch_size=4)
    return model


@pytest.mark.parametrize("family,units", [("qwen3", 1), ("olmo2", None), ("phi3", 1), ("granite", 1), ("gemma", 1),
                                           ("gemma2", 1), ("gemma3", 1)])
@pytest.mark.parametrize("tied", [False, True])
def test_uniform_families_run_as_their_own_llama_cpp_architecture(family, units, tied, tmp_path, tiny_tokenizer):
    """Qwen3 (per-head q/k norms, head_dim != hidden / heads), OLMo-2 (post-norms; MLP only), Phi-3 (fused
    qkv and gate_up, LongRoPE past 16 positions), Granite (four multipliers) and Gemma 1/2/3 (1 + w norms,
    sliding layers with a 6-token window on 20 tokens, soft-capping, query_pre_attn_scalar != head_dim) pruned to
    the same sizes in every layer are written as llama.cpp's own architectures and give transformers' logits."""
    model = _uniform(family, tiny_tokenizer, units, channels=20)
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    report = write_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", "f32")
    assert report["architecture"] == family
    if family in ("qwen3", "olmo2"):
        assert {b["n_ff"] for b in report["blocks"]} == {20}
    ids = torch.randint(3, len(tiny_tokenizer), (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expect = model(ids).logits[0].numpy()
    got = gguf_logits(tmp_path / "m.gguf", n_ctx=64, tokens=ids[0].tolist())
    assert np.abs(got - expect).max() <= 1e-3 * np.abs(expect).max()


@pytest.mark.parametrize("family", ["qwen3", "granite", "gemma2"])
def test_per_layer_sizes_refused_with_the_way_out(family, tmp_path, tiny_tokenizer):
    from bonsai.errors import BonsaiError

    model = tiny_model(family, vocab_size=len(tiny_tokenizer))
    get_adapter(model).slice(GroupKey(1, MLP), torch.arange(10))
    with pytest.raises(BonsaiError, match="--allocation uniform"):
        write_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", "f32")
    assert not list(tmp_path.iterdir())


def test_per_layer_phi3_is_padded_exactly(tmp_path, tiny_tokenizer):
    """Phi-3 with different sizes per layer (one layer down to one key/value group, one MLP down to 8 channels):
    llama.cpp's phi3 holds one width, so the export pads with zeros, reports it, and stays exact."""
    model = tiny_model("phi3", "eager", num_hidden_layers=3, vocab_size=len(tiny_tokenizer)).float()
    adapter = get_adapter(model)
    keep = {GroupKey(0, ATTENTION): torch.tensor([1]), GroupKey(1, MLP): torch.arange(0, 48, 6),
            GroupKey(2, MLP): torch.arange(30)}
    windows = torch.randint(0, len(tiny_tokenizer), (4, 24), generator=torch.Generator().manual_seed(0))
    remove_units(model, adapter, keep, windows, "lstsq", batch_size=4)
    report = write_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", "f32")
    assert report["architecture"] == "phi3" and report["padding_overhead_params"] > 0
    assert any("layer 0: 1 zero key/value groups" in p for p in report["padded"])
    ids = torch.randint(3, len(tiny_tokenizer), (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expect = model(ids).logits[0].numpy()
    got = gguf_logits(tmp_path / "m.gguf", n_ctx=64, tokens=ids[0].tolist())
    assert np.abs(got - expect).max() <= 1e-3 * np.abs(expect).max()


def test_untied_gemma2_is_refused_in_one_line(tmp_path, tiny_tokenizer):
    from bonsai.errors import BonsaiError

    model = tiny_model("gemma2", vocab_size=len(tiny_tokenizer), tie_word_embeddings=False)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    with pytest.raises(BonsaiError, match="untied"):
        write_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", "f32")
    assert not list(tmp_path.iterdir())
