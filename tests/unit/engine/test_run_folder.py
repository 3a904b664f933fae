import subprocess
import sys

import pytest

from bonsai.engine import faults
from bonsai.engine.run_folder import open_run_folder
from bonsai.errors import BonsaiError

SETTINGS = {"sparsity": 0.3, "seed": 0, "bos": "auto"}


def never_called():
    raise AssertionError("the folder's run was read where the rule does not need it")


def test_a_missing_folder_is_a_new_run(tmp_path):
    folder = open_run_folder(tmp_path / "new", False, SETTINGS, never_called)
    assert (folder.resuming, folder.replace) == (False, False)


def test_a_folder_of_the_same_run_resumes(tmp_path):
    folder = open_run_folder(tmp_path, False, SETTINGS, lambda: dict(SETTINGS))
    assert (folder.resuming, folder.replace) == (True, False)


def test_settings_added_since_the_checkpoint_count_as_what_that_version_did(tmp_path):
    old = {"sparsity": 0.3, "seed": 0}  # checkpointed before "bos" existed, when windows had no BOS
    assert open_run_folder(tmp_path, False, {**SETTINGS, "bos": "never"}, lambda: old, legacy={"bos": "never"}).resuming
    with pytest.raises(BonsaiError, match=r"other settings \(bos\)"):
        open_run_folder(tmp_path, False, SETTINGS, lambda: old, legacy={"bos": "never"})


def test_other_settings_are_named_and_refused(tmp_path):
    with pytest.raises(BonsaiError, match=r"holds a finetune run with other settings \(seed, sparsity\).*--force"):
        open_run_folder(tmp_path, False, SETTINGS, lambda: {**SETTINGS, "seed": 1, "sparsity": 0.5}, what="finetune run")


def test_a_folder_without_a_run_is_refused(tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(BonsaiError, match="already exists and holds no flap run.*--force"):
        open_run_folder(tmp_path, False, SETTINGS, lambda: None, what="flap run")
    assert (tmp_path / "file").read_text() == "mine"


def test_force_removes_the_old_folder_only_when_told(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "old").write_text("x")
    folder = open_run_folder(out, True, SETTINGS, never_called)
    assert (folder.resuming, folder.replace) == (False, True) and (out / "old").exists()  # nothing checked yet
    calls = []
    folder.clear_replaced(barrier=lambda: calls.append("barrier"))
    assert not out.exists() and calls == ["barrier", "barrier"]
    folder.clear_replaced(barrier=lambda: calls.append("again"))  # once only
    assert calls == ["barrier", "barrier"]


@pytest.mark.parametrize(("count", "done", "crashes"), [("3", 2, False), ("3", 3, True), ("", 99, False)])
def test_a_crash_point_exits_like_a_killed_process_only_when_asked(count, done, crashes):
    code = (f"import os; os.environ[{faults.AFTER_STEPS!r}] = {count!r}\n"
            f"from bonsai.engine import faults\n"
            f"try:\n    faults.crash_after(faults.AFTER_STEPS, {done})\nfinally:\n    print('cleanup')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == (faults.CRASH_STATUS if crashes else 0), result.stderr
    assert ("cleanup" in result.stdout) is not crashes  # os._exit: no finally, as a kill
