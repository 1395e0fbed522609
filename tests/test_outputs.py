"""utils/outputs.py: one writer per output folder, folders swapped in whole, write errors as one
line; the CSV writer and the checkpoints' tensor SHA-256."""
import errno
import multiprocessing
import os

import pandas as pd
import pytest
import torch

from utils import errors, io, outputs, training


def _hold_lock(folder, ready, release):
    with outputs.FolderLock(folder):
        ready.set()
        release.wait(30)


def test_a_second_process_is_refused_and_touches_nothing(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(folder), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(errors.OutputBusyError, match=f"pid {holder.pid}"):
            with outputs.OutputFolder(str(folder), overwrite=True):
                pass
        assert (folder / "keep.txt").read_text() == "mine"
    finally:
        release.set()
        holder.join(30)
    with outputs.OutputFolder(str(folder), overwrite=True):  # free again once the holder is gone
        pass
    assert not os.path.exists(outputs.lock_path(str(folder)))


def test_staged_folder_replaces_the_old_one_whole(tmp_path):
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "old.txt").write_text("old")
    with pytest.raises(errors.OutputExistsError, match="--force"):
        with outputs.OutputFolder(str(folder)):
            pass
    with outputs.OutputFolder(str(folder), overwrite=True) as out:
        with out.staged() as tmp:
            open(os.path.join(tmp, "new.txt"), "w").write("new")
            assert not (folder / "new.txt").exists()
    assert sorted(os.listdir(folder)) == ["new.txt"]
    assert sorted(os.listdir(tmp_path)) == ["eval"]  # no lock, tmp or old folder left


@pytest.mark.parametrize("failure", [RuntimeError("boom"), KeyboardInterrupt(),
                                     OSError(errno.ENOSPC, "No space left on device")])
def test_a_failure_while_building_leaves_the_old_folder_as_it_was(tmp_path, failure):
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "results.json").write_text("{}")
    expected = errors.OutputWriteError if isinstance(failure, OSError) else type(failure)
    with pytest.raises(expected):
        with outputs.OutputFolder(str(folder), overwrite=True) as out:
            with out.staged() as tmp:
                open(os.path.join(tmp, "results.json"), "w").write("half")
                raise failure
    assert os.listdir(folder) == ["results.json"] and (folder / "results.json").read_text() == "{}"
    assert sorted(os.listdir(tmp_path)) == ["eval"]


def test_leftovers_of_a_dead_process_are_recovered(tmp_path):
    folder = tmp_path / "root"
    # a crash between the two renames: the old folder is aside, the new one not yet in place
    old, tmp = outputs.staging_name(str(folder), "old", 999999), outputs.staging_name(str(folder), "tmp", 999999)
    os.makedirs(old)
    open(os.path.join(old, "a.txt"), "w").write("old")
    os.makedirs(tmp)
    with outputs.OutputFolder(str(folder), overwrite=True):
        assert (folder / "a.txt").read_text() == "old"
        assert not os.path.exists(old) and not os.path.exists(tmp)


def test_full_disk_and_unwritable_locations_are_one_line(tmp_path, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(errors.OutputWriteError, match="no space left") as info:
        io.atomic_write_text(str(tmp_path / "x.txt"), "data")
    assert "\n" not in str(info.value)
    assert os.listdir(tmp_path) == []  # the temporary file is gone
    monkeypatch.undo()
    with pytest.raises(errors.OutputWriteError, match="MiB free"):
        outputs.check_space(str(tmp_path / "new"), outputs.free_bytes(str(tmp_path)) + 1)
    outputs.check_space(str(tmp_path / "new"), 1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(errors.OutputWriteError, match="is a file"):
        outputs.check_writable(str(tmp_path / "file" / "out"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_read_only_location_is_refused_before_work(tmp_path):
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(errors.OutputWriteError, match="not writable"):
            with outputs.OutputFolder(str(tmp_path / "out")):
                pass
    finally:
        tmp_path.chmod(0o755)


def test_csv_cells_with_commas_and_quotes_read_back_with_pandas(tmp_path):
    rows = [{"method": 'finetune (finetune, net_best) "x"', "rank1": 0.5, "note": None},
            {"method": "line\nbreak", "rank1": 0.25, "note": "a,b"}]
    path = str(tmp_path / "t.csv")
    io.write_metrics_csv(path, rows)
    frame = pd.read_csv(path, keep_default_na=False)
    assert list(frame.columns) == ["method", "rank1", "note"]
    assert frame["method"].tolist() == [r["method"] for r in rows]
    assert frame["rank1"].tolist() == [0.5, 0.25] and frame["note"].tolist() == ["", "a,b"]


def test_checkpoint_tensors_are_verified_on_load(tmp_path):
    path = str(tmp_path / "net.pth")
    state = {"model": {"w": torch.randn(3, 4), "h": torch.ones(2, dtype=torch.bfloat16)}, "epoch": 2}
    training.save_checkpoint(path, state)
    assert training.load_checkpoint(path)["epoch"] == 2
    stored = torch.load(path, weights_only=True)
    stored["model"]["w"][0, 0] += 1  # overwritten tensor bytes
    torch.save(stored, path)
    with pytest.raises(errors.TrainingInputError, match="damaged"):
        training.load_checkpoint(path)
    with open(path, "w") as f:
        f.write("not a checkpoint\n")
    with pytest.raises(errors.TrainingInputError, match="not a checkpoint"):
        training.load_checkpoint(path)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_virtual_file_system_is_one_line_not_a_hang():
    with pytest.raises(errors.OutputWriteError, match="takes no new files|not writable|permission denied"):
        with outputs.OutputFolder("/proc/clipfh_test_output"):
            pass
