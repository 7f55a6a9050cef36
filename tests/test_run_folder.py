"""The run folder's guard against two processes making the same run (outputs.RunFolder)."""
import pytest

from fedlora.errors import ConfigError
from fedlora.outputs import RunFolder


def test_second_process_starting_the_same_run_gets_one_message(tmp_path):
    # Both looked before either created DIR.partial (the race two sweeps on one out folder hit).
    first, second = RunFolder(tmp_path / "run"), RunFolder(tmp_path / "run")
    first.open()
    with pytest.raises(ConfigError, match="just created by another fedlora process.*--shard"):
        second.open()
    assert (tmp_path / "run.partial").is_dir()  # the first one's folder is left alone


def test_resuming_a_run_another_process_holds_is_refused(tmp_path):
    first = RunFolder(tmp_path / "run").open()
    with pytest.raises(ConfigError, match="in use by another fedlora process"):
        RunFolder(tmp_path / "run", resume=True).open()
    first._release_lock()
    RunFolder(tmp_path / "run", resume=True).open()  # free again once the holder lets go
