"""Bad input: one line on stderr, non-zero exit, no traceback."""

import subprocess
import sys

import pytest

from bonsai.cli import main

pytestmark = pytest.mark.integration


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["bonsai", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err
    return exc.value.code, err


@pytest.mark.parametrize("args,message", [
    (["eval", "kjv", "--model", "/no/such/model"], "model path not found"),
    (["eval", "missing.txt", "--model", "tiny"], "data file not found"),
    (["eval", "kjv", "--model", "tiny", "--seqlen", "1"], "at least 2"),
    (["eval", "kjv", "--model", "tiny", "--seqlen", "100000"], "exceeds the model's"),
    (["eval", "wikitext2", "--model", "tiny"], "cannot be reached"),
    (["prune", "--model", "tiny", "--sparsity", "1.5", "--out", "x"], "--sparsity must be in (0, 1)"),
    (["prune", "--model", "tiny", "--sparsity", "0", "--out", "x"], "--sparsity must be in (0, 1)"),
    (["prune", "--model", "tiny", "--sparsity", "0.3", "--p-iter", "0.5", "--out", "x"], "--p-iter"),
    (["prune", "--model", "tiny", "--sparsity", "0.3", "--p-iter", "0", "--out", "x"], "--p-iter"),
    (["prune", "--model", "tiny", "--sparsity", "0.3", "--samples", "3", "--out", "x"], "--samples"),
    (["prune", "--model", "tiny", "--sparsity", "0.3", "--method", "magic", "--out", "x"], "unknown method"),
    (["prune", "--model", "tiny", "--sparsity", "0.3", "--prior", "magic", "--out", "x"], "unknown prior"),
    (["prune", "--config", "no-such-preset", "--out", "x"], "config not found"),
    (["prune", "--model", "tiny", "--bogus-flag", "1", "--out", "x"], "No such option"),
    (["eval", "hellaswg", "--model", "tiny"], "did you mean hellaswag"),
    (["eval", "kjv", "--model", "tiny", "--limit", "0"], "--limit must be positive"),
    (["eval", "--model", "tiny", "--suite", "nope"], "unknown --suite"),
    (["prune", "--model", "tiny", "--method", "wanda", "--sparsity-type", "3:4", "--out", "x"], "unknown --sparsity-type"),
    (["prune", "--model", "tiny", "--method", "wanda", "--sparsity-type", "2:4", "--sparsity", "0.3", "--out", "x"],
     "means sparsity 0.5"),
    (["prune", "--model", "tiny", "--method", "llm-pruner", "--llmp-importance", "x", "--out", "x"], "--llmp-importance"),
    (["prune", "--model", "tiny", "--method", "llm-pruner", "--llmp-layer-start", "5", "--llmp-layer-end", "9",
      "--calib", "kjv", "--out", "x"], "not within the model's 6 layers"),
    (["finetune", "--model", "tiny", "--teacher", "tiny", "--lora-rank", "0", "--out", "x"], "--lora-rank must be positive"),
    (["finetune", "--model", "tiny", "--teacher", "tiny", "--data", "missing.txt", "--out", "x"], "data file not found"),
    (["finetune", "--model", "tiny", "--data", "kjv", "--out", "x"], "--teacher (the parent model) is required"),
    (["finetune", "--model", "tiny", "--teacher", "tiny", "--data", "wikitext2", "--out", "x"], "cannot be reached"),
    (["finetune", "--model", "/no/such", "--teacher", "tiny", "--out", "x"], "model path not found"),
    (["prune", "--model", "tiny", "--reconstruct", "magic", "--out", "x"], "unknown --reconstruct"),
    (["prune", "--model", "tiny", "--method", "wanda", "--reconstruct", "lstsq", "--out", "x"], "keeps every shape"),
    (["prune", "--model", "tiny", "--selection", "magic", "--out", "x"], "unknown --selection"),
    (["prune", "--model", "tiny", "--utility", "magic", "--out", "x"], "unknown --utility"),
    (["prune", "--model", "tiny", "--method", "no-regression", "--out", "x"], "use it with --selection paper"),
    (["prune", "--model", "tiny", "--reconstruct-samples", "0", "--out", "x"], "--reconstruct-samples"),
    (["prune", "--model", "tiny", "--refit-target", "parent", "--out", "x"], "unknown --refit-target"),
    (["export", "/no/such", "--out", "x.gguf"], "model path not found"),
    (["export", "tiny", "--format", "onnx", "--out", "x.onnx"], "unknown export format"),
    (["export", "tiny", "--out", "x.gguf", "--dtype", "q4_0"], "unknown --dtype"),
    (["eval", "kjv", "--model", "missing.gguf"], "GGUF file not found"),
    (["eval", "boolq", "--model", "x.gguf"], "lm-eval tasks run on Hugging Face folders"),
])
def test_bad_input_is_one_line(monkeypatch, capsys, tmp_path, args, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = run_cli(monkeypatch, capsys, *args)
    assert code != 0
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_prune_refuses_to_remove_every_unit(monkeypatch, capsys, tmp_path):
    code, err = run_cli(monkeypatch, capsys, "prune", "--model", "tiny", "--sparsity", "0.6", "--units", "attention",
                        "--calib", "kjv", "--out", str(tmp_path / "o"))
    # the largest reachable sparsity is attention's share of the block parameters, computed here apart
    from bonsai.models.loading import load_model

    layer = load_model("tiny").model.layers[0]
    attn = sum(p.numel() for n, p in layer.self_attn.named_parameters() if "norm" not in n)
    block = sum(p.numel() for p in layer.parameters())  # the norms count in the block, as in report.json
    assert code == 2 and "cannot be reached" in err and "every unit it may touch" in err
    assert f"below {attn / block:.4f}" in err and len(err.strip().splitlines()) == 1


def test_existing_output_folder_is_refused(monkeypatch, capsys, tmp_path):
    (tmp_path / "o").mkdir()
    code, err = run_cli(monkeypatch, capsys, "prune", "--model", "tiny", "--sparsity", "0.3", "--calib", "kjv",
                        "--out", str(tmp_path / "o"))
    assert code == 2 and "already exists" in err and "--force" in err


def test_unsupported_architecture_subprocess(tmp_path):
    import transformers

    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=4096)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    from transformers import AutoTokenizer

    from bonsai.models.aliases import TINY_MODEL_DIR

    AutoTokenizer.from_pretrained(TINY_MODEL_DIR).save_pretrained(tmp_path / "gpt2")
    proc = subprocess.run([sys.executable, "-m", "bonsai", "prune", "--model", str(tmp_path / "gpt2"), "--sparsity",
                           "0.3", "--calib", "kjv", "--out", str(tmp_path / "o")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert "unsupported architecture 'gpt2'" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_tokenizer(monkeypatch, capsys, tmp_path):
    from helpers import tiny_model

    tiny_model("llama", "sdpa").save_pretrained(tmp_path / "m")
    code, err = run_cli(monkeypatch, capsys, "eval", "kjv", "--model", str(tmp_path / "m"))
    assert code == 2 and "tokenizer" in err


def test_finetune_teacher_with_other_vocabulary(monkeypatch, capsys, tmp_path, tiny_tokenizer):
    from helpers import tiny_model

    from bonsai.models.saving import save_pruned

    other = save_pruned(tiny_model("llama", vocab_size=len(tiny_tokenizer) + 7), tiny_tokenizer, tmp_path / "other")
    code, err = run_cli(monkeypatch, capsys, "finetune", "--model", "tiny", "--teacher", str(other), "--data", "kjv",
                        "--out", str(tmp_path / "o"))
    assert code == 2 and "vocabulary" in err and len(err.strip().splitlines()) == 1


def test_finetune_model_that_is_not_a_causal_lm(monkeypatch, capsys, tmp_path, tiny_tokenizer):
    import transformers

    folder = tmp_path / "bert"
    transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=37, vocab_size=len(tiny_tokenizer))
                           ).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    code, err = run_cli(monkeypatch, capsys, "finetune", "--model", str(folder), "--distill-weight", "0",
                        "--data", "kjv", "--seqlen", "32", "--samples", "4", "--out", str(tmp_path / "o"))
    assert code == 2 and "unsupported architecture 'bert'" in err and len(err.splitlines()) == 1


def test_export_refuses_an_existing_file_and_a_model_without_tokenizer(monkeypatch, capsys, tmp_path):
    pytest.importorskip("gguf")
    import shutil

    from bonsai.models.aliases import TINY_MODEL_DIR

    (tmp_path / "x.gguf").write_text("precious")
    code, err = run_cli(monkeypatch, capsys, "export", "tiny", "--out", str(tmp_path / "x.gguf"))
    assert code == 2 and "--force" in err and (tmp_path / "x.gguf").read_text() == "precious"
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(TINY_MODEL_DIR / name, bare / name)
    code, err = run_cli(monkeypatch, capsys, "export", str(bare), "--out", str(tmp_path / "y.gguf"))
    assert code == 2 and "tokenizer" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "y.gguf").exists()
