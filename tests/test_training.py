"""utils/training.py, utils/distributed.py and the run helpers of utils/runs.py: learning-rate
schedules, RNG state, rank0_first, one run folder, the shared end-of-epoch step, the data sets with
a shared resized-image cache, and the trainers' error edge."""
import csv
import logging
import math
import os
import random
import types

import numpy as np
import pytest
import torch

import train_finetune
from utils import data, distributed, errors, training, runs


def test_lr_schedule_matches_clip_handid():
    optimizer = torch.optim.Adam(training.param_groups(torch.nn.ModuleDict(
        {"visual": torch.nn.Linear(2, 2), "head": torch.nn.Linear(2, 2)}), 5e-6, 5e-4))
    scheduler = training.WarmupMultiStepLR(optimizer, [40, 60], 0.5, 10, 0.01)
    lrs = []
    for _ in range(70):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    expected = {0: 5e-8, 1: 5.45e-7, 5: 2.525e-6, 9: 4.505e-6, 10: 5e-6, 39: 5e-6, 40: 2.5e-6, 59: 2.5e-6,
                60: 1.25e-6, 69: 1.25e-6}
    for epoch, lr in expected.items():
        assert lrs[epoch][0] == pytest.approx(lr, rel=1e-9)
        assert lrs[epoch][1] == pytest.approx(10 * lr, rel=1e-9)  # heads get 10x


def test_checkpoint_rng_round_trip_with_weights_only(tmp_path):
    path = str(tmp_path / "state.pth")
    training.save_checkpoint(path, {"rng": training.capture_rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    training.restore_rng_state(training.load_checkpoint(path)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_stage1_schedule_matches_the_reference():
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=3.5e-4)
    scheduler = training.Stage1CosineLR(optimizer, epochs=120, warmup_epochs=5, warmup_lr=1e-5, min_lr=1e-6)
    lrs = []
    for _ in range(120):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # epochs 1..4 warm up linearly from 1e-5; the cosine clock starts at 0, so epoch 5 is ~3.49e-4
    assert lrs[:4] == pytest.approx([7.8e-5, 1.46e-4, 2.14e-4, 2.82e-4], rel=1e-9)
    assert lrs[4] == pytest.approx(1e-6 + 0.5 * (3.5e-4 - 1e-6) * (1 + math.cos(math.pi * 5 / 120)), rel=1e-9)
    assert lrs[59] == pytest.approx(1e-6 + 0.5 * (3.5e-4 - 1e-6), rel=1e-9) and lrs[119] == 1e-6


def test_rank0_first_runs_rank_0_before_the_others(monkeypatch):
    events = []
    monkeypatch.setattr(distributed, "barrier", lambda info: events.append(f"barrier {info.rank}"))
    for rank in (0, 1):
        with distributed.rank0_first(distributed.DistInfo(rank=rank, world_size=2)):
            events.append(f"work {rank}")
    # rank 0 works, then meets the others at the barrier; rank 1 waits there first, then works
    assert events == ["work 0", "barrier 0", "barrier 1", "work 1"]


def tiny_run_args(tmp_path, **changes):
    args = dict(f_name=str(tmp_path), m_name="run", resume=False, force=False, seed=0, deterministic=False)
    return types.SimpleNamespace(**dict(args, **changes))


def test_start_run_refuses_to_overwrite_and_force_empties_the_folder(tmp_path):
    info = distributed.DistInfo()
    out_dir, log = runs.start_run(tiny_run_args(tmp_path), info)
    runs.close_logger(log)
    for name in ("net_last.pth", "net_7.pth", "notes.txt"):
        open(os.path.join(out_dir, name), "w").close()
    with pytest.raises(errors.TrainingInputError, match="already holds a run"):
        runs.start_run(tiny_run_args(tmp_path), info)
    with pytest.raises(errors.TrainingInputError, match="does not exist"):
        runs.start_run(tiny_run_args(tmp_path, m_name="other", resume=True), info)
    _, log = runs.start_run(tiny_run_args(tmp_path, force=True), info)
    runs.close_logger(log)
    assert sorted(os.listdir(out_dir)) == ["notes.txt", "train.log"]  # the user's own file stays


def test_end_of_epoch_tracks_the_best_epoch_and_writes_the_run_files(tmp_path):
    info, log = distributed.DistInfo(), logging.getLogger("test_end_of_epoch")
    history, best = [], None
    for number, val_map in ((1, 0.5), (2, None), (3, 0.4), (4, 0.5)):
        row = {"epoch": number, "lr": 0.1, "loss": 1.0 / number, "train_acc": 0.5,
               "val_acc": None if val_map is None else 0.3, "val_rank1": None if val_map is None else 0.25, "val_mAP": val_map, "epoch_seconds": 1.0}
        record = {"epoch": number, "model": {"w": torch.full((2,), float(number))}}
        best = runs.end_of_epoch(str(tmp_path), row, history, best, log, info, 4, {"extra": number}, record,
                                 save_every=2, plot=False)
    assert best == {"epoch": 4, "val_mAP": 0.5, "val_rank1": 0.25}  # ties go to the later epoch
    load = lambda name: torch.load(tmp_path / name, weights_only=True)
    assert load("net_best.pth")["epoch"] == 4 and load("net_2.pth")["epoch"] == 2 and load("net_4.pth")["epoch"] == 4
    last = load("net_last.pth")
    assert last["extra"] == 4 and last["best"] == best and [r["epoch"] for r in last["history"]] == [1, 2, 3, 4]
    assert not os.path.exists(tmp_path / "net_3.pth") and not os.path.exists(tmp_path / "training_curve.png")
    with open(tmp_path / "metrics.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2", "3", "4"]
    # with --train_all the last validated epoch is the best even when its mAP is lower
    os.makedirs(tmp_path / "all")
    best = runs.end_of_epoch(str(tmp_path / "all"), dict(row, epoch=5, val_mAP=0.1), [], best, log, info, 5, {},
                             train_all=True, plot=False)
    assert best["epoch"] == 5


def test_image_datasets_share_one_cache_per_size(tmp_path):
    from PIL import Image
    paths = []
    for i in range(4):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(np.full((10, 8, 3), 40 * i, dtype=np.uint8)).save(paths[-1])
    items = [(p, i % 2) for i, p in enumerate(paths)]
    to_tensor = data.eval_transform((6, 5))
    sets = {"a": (items[:3], (6, 5), to_tensor), "b": (items[1:], (6, 5), to_tensor)}
    plain = runs.image_datasets(sets, None, distributed.DistInfo())
    cached = runs.image_datasets(sets, str(tmp_path / "cache"), distributed.DistInfo())
    assert len(os.listdir(tmp_path / "cache")) == 1
    for name in sets:
        for index in range(3):
            image, label = cached[name][index]
            expected, expected_label = plain[name][index]
            assert label == expected_label and torch.equal(image, expected)


def test_only_the_projects_errors_become_one_line_messages(monkeypatch):
    def fail_with(error):
        def train(args, dist_info):
            raise error
        return train
    args = train_finetune.parse_args(["--device", "cpu"])
    with pytest.raises(SystemExit, match="error: bad flag"):
        runs.run_training(args, lambda a: None, fail_with(errors.TrainingInputError("bad flag")))
    with pytest.raises(ValueError, match="a bug"):  # not turned into a message: it keeps its traceback
        runs.run_training(args, lambda a: None, fail_with(ValueError("a bug")))
