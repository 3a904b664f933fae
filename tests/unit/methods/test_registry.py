import json
import os
import subprocess
import sys
import textwrap
from dataclasses import fields
from pathlib import Path

import pytest
import typer.main

from bonsai.cli import app
from bonsai.methods.registry import METHODS, option_fields
from bonsai.methods.settings import PruneConfig, RunSettings, method_settings


def test_the_run_settings_are_the_shared_ones_and_every_methods_own_each_once():
    names = [f.name for f in fields(RunSettings)] + [f.name for s in method_settings() for f in fields(s)]
    assert len(names) == len(set(names))  # no two methods claim one setting
    assert sorted(names) == sorted(f.name for f in fields(PruneConfig))
    assert list(METHODS) == ["bonsai", "prior-only", "no-regression", "random", "wanda", "llm-pruner", "besa", "flap"]


def test_every_setting_with_a_flag_is_an_option_of_prune_in_its_methods_panel():
    params = {p.name: p for p in typer.main.get_command(app).commands["prune"].params}
    for settings in (RunSettings, *method_settings()):
        for f in option_fields(settings):
            flags = f.metadata["flags"] or (f"--{f.name.replace('_', '-')}",)
            assert flags[0].split("/")[0] in params[f.name].opts, f.name
            panel = f.metadata["panel"] or getattr(settings, "PANEL", None)
            if panel:
                assert params[f.name].rich_help_panel == panel, f.name


TOY_METHOD = textwrap.dedent('''
    """A method written outside bonsai: each MLP's channels ranked by the norm of their output column to a power."""
    import sys
    from dataclasses import dataclass

    import bonsai.methods  # the built-in methods first
    from bonsai.errors import BonsaiError
    from bonsai.methods.registry import option, register_method


    @dataclass
    class ToySettings:
        PANEL = "Toy (--method toy)"

        toy_power: float = option(2.0, "toy: the power of each column's norm.")

        def check(self) -> None:
            if self.method == "toy" and self.toy_power <= 0:
                raise BonsaiError(f"--toy-power must be positive (got {self.toy_power})")


    def toy_step(run, windows, block_params, progress):
        keys = run.adapter.groups(("mlp",))
        scores = {k: run.adapter.output_projection(k).weight.norm(dim=0).pow(run.cfg.toy_power).detach().numpy()
                  for k in keys}
        return run.remove(run.uniform_drops(scores, run.cfg.sparsity * block_params), progress)


    register_method("toy", "bonsai.methods.one_shot:OneShotRun", "a toy", structured=True, step=toy_step)(ToySettings)

    from bonsai.cli import main  # noqa: E402  (built with every registered method)

    sys.argv = ["bonsai", *sys.argv[1:]]
    main()
''')


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy") / "toy_method.py"
    path.write_text(TOY_METHOD)
    return path


ROOT = Path(__file__).resolve().parents[3]


def run_toy(toy, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(toy), *args], capture_output=True, text=True, timeout=600, env=env)


def test_a_method_is_one_module_its_options_help_and_report_come_from_the_registry(toy, tmp_path):
    help_text = run_toy(toy, "prune", "--help")
    assert help_text.returncode == 0 and "Toy (--method toy)" in help_text.stdout and "--toy-power" in help_text.stdout
    out = tmp_path / "toy"
    done = run_toy(toy, "prune", "--model", "tiny", "--method", "toy", "--toy-power", "3", "--sparsity", "0.2",
                   "--calib", "kjv", "--calib-samples", "2", "--seqlen", "32", "--reconstruct", "none", "--units", "mlp",
                   "--out", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "toy" and report["settings"]["toy_power"] == 3.0
    assert report["totals"]["target_reached"] and report["totals"]["sparsity"] >= 0.2
    refused = run_toy(toy, "prune", "--model", "tiny", "--method", "toy", "--toy-power", "-1", "--sparsity", "0.2",
                      "--out", str(tmp_path / "bad"))
    assert refused.returncode == 2 and refused.stderr.strip() == "bonsai: error: --toy-power must be positive (got -1.0)"
    assert not (tmp_path / "bad").exists()
