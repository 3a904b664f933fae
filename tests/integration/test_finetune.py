"""`bonsai finetune` end to end on the shipped tiny model pruned by 30%."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from bonsai.eval.perplexity import window_nll
from bonsai.finetune.config import FinetuneConfig
from bonsai.finetune.data import finetune_windows
from bonsai.finetune.trainer import FinetuneRun
from bonsai.models.loading import load_model, load_tokenizer
from bonsai.methods.settings import PruneConfig
from bonsai.methods.bonsai.runner import PruneRun

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("finetune")]  # one worker builds the pruned fixture

FAST = dict(teacher="tiny", data="kjv", lora_rank=8, lora_alpha=32, lr=2e-3, seqlen=64, samples=256, steps=30,
            batch_size=4, eval_windows=8, checkpoint_every=10, log_every=5, top_k=32, device="cpu")


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "pruned"
    # without the refit, so that recovery has damage to repair (the test is about finetuning's mechanics)
    cfg = PruneConfig(model="tiny", sparsity=0.3, method="prior-only", p_iter=0.1, calib="kjv", seqlen=64,
                      calib_samples=8, batch_size=8, reconstruct="none").validate()
    PruneRun(cfg, out).run()
    return out


def finetune(out, pruned, **kw):
    settings = dict(FAST, model=str(pruned))
    settings.update(kw)
    return FinetuneRun(FinetuneConfig(**settings).validate(), out).run()


@pytest.fixture(scope="module")
def merged_run(pruned):
    out = pruned.parent / "merged"
    return out, finetune(out, pruned)


def test_finetune_lowers_held_out_perplexity_and_report(merged_run, pruned):
    out, report = merged_run
    assert report["ppl_after"] < report["ppl_before"] - 0.5
    saved = json.loads((out / "report.json").read_text())
    assert saved["merged"] and saved["total_steps"] == 30 and saved["tokens_seen"] == 30 * 4 * 64
    assert [e["step"] for e in saved["losses"]] == [5, 10, 15, 20, 25, 30]
    assert all(e["kl"] > 0 for e in saved["losses"]) and saved["teacher_cache"]["k"] == 32
    assert not (out / ".bonsai-finetune").exists() and not (out / "adapter").exists()
    # the saved model is an ordinary pruned checkpoint: same shapes as the student, held-out ppl by a hand loop
    model, student = load_model(str(out), device="cpu"), load_model(str(pruned), device="cpu")
    assert {n: p.shape for n, p in model.named_parameters()} == {n: p.shape for n, p in student.named_parameters()}
    tok = load_tokenizer(str(out))
    _, held, _ = finetune_windows(tok, "kjv", 64, 256, 8, 0)
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in held:
            logp = torch.log_softmax(model(w[None]).logits[0, :-1].double(), -1)
            nll -= logp.gather(1, w[1:, None]).sum().item()
            count += len(w) - 1
    assert abs(torch.tensor(nll / count).exp().item() - saved["ppl_after"]) < 1e-3 * saved["ppl_after"]


def test_merged_logits_equal_the_peft_model(merged_run, pruned):
    from peft import PeftModel

    out, _ = merged_run
    unmerged = pruned.parent / "unmerged"
    report = finetune(unmerged, pruned, merge=False)
    assert (unmerged / "adapter" / "adapter_config.json").exists() and not report["merged"]
    ids = torch.randint(0, 4000, (2, 40), generator=torch.Generator().manual_seed(0))
    plain = load_model(str(pruned), device="cpu")  # the student's weights (unchanged by LoRA training)
    peft_model = PeftModel.from_pretrained(plain, str(unmerged / "adapter")).eval()
    merged = load_model(str(out), device="cpu")
    with torch.no_grad():
        a, b = peft_model(ids).logits, merged(ids).logits
        c = load_model(str(unmerged), device="cpu")(ids).logits  # base + adapter folder, merged on load
        with peft_model.disable_adapter():
            untrained = peft_model(ids).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-4)
    assert (a - untrained).abs().max() > 1e-2  # the adapter changed the model, so the equality means something


@pytest.mark.heavy
def test_resumed_run_equals_uninterrupted(merged_run, pruned, tmp_path):
    out, _ = merged_run
    resumed = tmp_path / "resumed"
    args = [sys.executable, "-m", "bonsai", "finetune", "--model", str(pruned), "--out", str(resumed)]
    for k, v in FAST.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    env = dict(os.environ, BONSAI_ABORT_AFTER_STEPS="10")
    crashed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert crashed.returncode == 75, crashed.stderr
    assert (resumed / ".bonsai-finetune" / "checkpoint" / "trainable.safetensors").exists()
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)  # the same command resumes
    assert done.returncode == 0, done.stderr
    again = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=300)  # finished: reported
    assert again.returncode == 0 and "already holds the finished run" in " ".join(again.stderr.split()), again.stderr
    a, b = load_file(str(out / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra, rb = json.loads((out / "report.json").read_text()), json.loads((resumed / "report.json").read_text())
    assert ra["losses"] == rb["losses"] and ra["ppl_after"] == rb["ppl_after"]


def test_full_finetuning_without_teacher(pruned, tmp_path):
    report = finetune(tmp_path / "full", pruned, full=True, teacher=None, distill_weight=0.0, steps=20, lr=1e-4)
    assert report["mode"] == "full" and report["teacher_cache"] is None
    assert report["trainable_params"] == sum(p.numel() for p in load_model(str(pruned), device="cpu").parameters())
    assert report["ppl_after"] < report["ppl_before"]


def test_window_nll_matches_report_before(merged_run, pruned):
    """ppl_before in the report is the student's held-out perplexity (independent of the training loop)."""
    _, report = merged_run
    tok = load_tokenizer(str(pruned))
    _, held, where = finetune_windows(tok, "kjv", 64, 256, 8, 0)
    assert where == "kjv test" and held.shape == (8, 64) and report["bos"]["token_id"] is None
    assert window_nll(load_model(str(pruned), device="cpu"), held).ppl == pytest.approx(report["ppl_before"], rel=1e-6)


def test_bos_windows_in_training_and_held_out(pruned, tmp_path):
    """--bos always: training and held-out windows are BOS + 63 text tokens, and the report's held-out perplexity
    is that of those windows."""
    report = finetune(tmp_path / "bos", pruned, bos="always", steps=2, eval_every=2)
    tok = load_tokenizer(str(pruned))
    train, held, _ = finetune_windows(tok, "kjv", 64, 256, 8, 0, bos=tok.bos_token_id)
    assert (train[:, 0] == tok.bos_token_id).all() and (held[:, 0] == tok.bos_token_id).all()
    assert report["bos"] == {"mode": "always", "token_id": tok.bos_token_id, "token": tok.bos_token}
    assert window_nll(load_model(str(pruned), device="cpu"), held).ppl == pytest.approx(report["ppl_before"], rel=1e-6)
