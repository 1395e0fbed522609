"""Failure paths that never lose work (issue 10): each trial of the issue's table, reproduced.

Split preparation is all or nothing, readers refuse roots of different seeds, the pre-flight image
check lists every unreadable file in one message, outputs name their test set, and bad backbones
and moved image folders end with one line that says what to do."""
import hashlib
import os
import shutil
import urllib.error

import numpy as np
import pytest
from PIL import Image

import clip
import eval_query_gallery_clip_zeroshot as zero_shot
import prepare_train_val_test_11k_r_l as prep11k
import prepare_train_val_test_hd as prephd
import query_ranking_result_demo as ranking
from utils import data, errors, evaluation, splits, synthetic
from test_evaluation import colour_encoder, make_split_root

ROOTS_11K = [f"train_val_test_split_{folder}" for folder in splits.ASPECT_FOLDERS_11K.values()]


def tree_digest(folder):
    """{relative path: sha256} of every file below `folder` (folders and links included by name)."""
    digest = {}
    for parent, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(parent, name)
            rel = os.path.relpath(path, folder)
            digest[rel] = hashlib.sha256(open(path, "rb").read()).hexdigest() if os.path.isfile(path) else "dir"
    return digest


@pytest.fixture(scope="module")
def source_11k(tmp_path_factory):
    root = tmp_path_factory.mktemp("failures") / "11k"
    synthetic.make_synthetic_11k(str(root), num_ids_per_aspect=8, images_per_id=(3, 4), image_size=(40, 30), seed=0)
    return str(root)


@pytest.fixture
def prepared_11k(tmp_path, source_11k):
    """A fresh copy of the synthetic 11k data with its four split roots prepared with --seed 0."""
    data_dir = str(tmp_path / "11k")
    shutil.copytree(source_11k, data_dir)
    prep11k.main(["--data_dir", data_dir, "--num_splits", "2", "--seed", "0"])
    return data_dir


# ---- split preparation: all or nothing ----

def interrupt_linker_after(monkeypatch, count, error=KeyboardInterrupt):
    calls = []

    def link(self, src, dst):
        calls.append(dst)
        if len(calls) > count:
            raise error()
        shutil.copyfile(src, dst)
    monkeypatch.setattr(splits.FileLinker, "__call__", link)
    return calls


def test_interrupted_split_preparation_leaves_old_roots_byte_identical(prepared_11k, monkeypatch):
    before = {root: tree_digest(os.path.join(prepared_11k, root)) for root in ROOTS_11K}
    one_root = sum(len(rows) for rows in splits.read_manifest(os.path.join(prepared_11k, ROOTS_11K[0]))["sets"].values())
    calls = interrupt_linker_after(monkeypatch, 2 * one_root + 5)  # Ctrl-C while the third aspect is built
    with pytest.raises(SystemExit, match="^130$"):  # Ctrl-C: one line, exit status 130
        prep11k.main(["--data_dir", prepared_11k, "--num_splits", "2", "--seed", "1", "--force"])
    assert len(calls) > 2 * one_root
    assert {root: tree_digest(os.path.join(prepared_11k, root)) for root in ROOTS_11K} == before
    assert [n for n in os.listdir(prepared_11k) if n.startswith(".")] == []


def test_failed_swap_restores_the_old_roots(prepared_11k, monkeypatch):
    before = {root: tree_digest(os.path.join(prepared_11k, root)) for root in ROOTS_11K}
    real_rename, renames = os.rename, []

    def rename(src, dst):
        renames.append(dst)
        if len(renames) == 6:  # the 4 old roots moved aside, one new root placed, then a failure
            raise OSError("simulated failure during the swap")
        real_rename(src, dst)
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        prep11k.main(["--data_dir", prepared_11k, "--num_splits", "2", "--seed", "1", "--force"])
    monkeypatch.undo()
    assert {root: tree_digest(os.path.join(prepared_11k, root)) for root in ROOTS_11K} == before
    assert [n for n in os.listdir(prepared_11k) if n.startswith(".")] == []


def test_interrupted_first_preparation_writes_nothing(tmp_path, source_11k, monkeypatch):
    data_dir = str(tmp_path / "11k")
    shutil.copytree(source_11k, data_dir)
    interrupt_linker_after(monkeypatch, 40)
    with pytest.raises(SystemExit, match="^130$"):  # Ctrl-C: one line, exit status 130
        prep11k.main(["--data_dir", data_dir, "--num_splits", "2"])
    monkeypatch.undo()
    assert not any(n.startswith(("train_val", ".train_val")) for n in os.listdir(data_dir))
    prep11k.main(["--data_dir", data_dir, "--num_splits", "2"])  # the rerun is not refused
    assert all(os.path.isfile(os.path.join(data_dir, r, splits.SPLITS_MANIFEST)) for r in ROOTS_11K)


# ---- seeds, data type and test-set names from the manifest ----

def test_roots_of_different_seeds_are_refused_unless_allowed(prepared_11k, tmp_path, source_11k, tiny_vit_checkpoint,
                                                               capsys):
    other = str(tmp_path / "other")
    shutil.copytree(source_11k, other)
    prep11k.main(["--data_dir", other, "--num_splits", "2", "--seed", "1"])
    shutil.rmtree(os.path.join(prepared_11k, ROOTS_11K[1]))  # what an interrupted old-style rerun left
    shutil.copytree(os.path.join(other, ROOTS_11K[1]), os.path.join(prepared_11k, ROOTS_11K[1]))
    test_dir = os.path.join(prepared_11k, ROOTS_11K[0])
    argv = ["--test_dir", test_dir, "--f_name", str(tmp_path / "runs"), "--backbone_name", tiny_vit_checkpoint,
            "--input_size", "32", "32", "--num_workers", "0", "--device", "cpu"]
    with pytest.raises(SystemExit, match=r"^error: split roots prepared with different --seed values: .*"
                                         r"dorsal_l \(seed 1\).*dorsal_r \(seed 0\).*--allow_mixed_seeds$"):
        zero_shot.main(argv)
    assert not os.path.exists(tmp_path / "runs")
    results = zero_shot.main(argv + ["--allow_mixed_seeds"])
    assert results["split_seed"] == 0 and "warning: --allow_mixed_seeds" in capsys.readouterr().err


def test_zero_shot_outputs_name_the_test_set(prepared_11k, tmp_path, tiny_vit_checkpoint):
    argv = ["--f_name", str(tmp_path / "runs"), "--backbone_name", tiny_vit_checkpoint, "--input_size", "32", "32",
            "--num_workers", "0", "--device", "cpu"]
    for root in ROOTS_11K[:2]:
        zero_shot.main(["--test_dir", os.path.join(prepared_11k, root)] + argv)
    base = tmp_path / "runs" / "clip_zero_shot" / "tiny_vit"
    assert sorted(os.listdir(base)) == ["dorsal_l", "dorsal_r"]
    assert all((base / name / "results.json").is_file() for name in ("dorsal_l", "dorsal_r"))


def test_data_type_and_test_set_name_come_from_the_manifest(prepared_11k, tmp_path):
    hd = str(tmp_path / "HD")
    synthetic.make_synthetic_hd(hd, num_train_ids=3, num_test_ids=3, num_distractor_ids=2, images_per_id=(2, 3),
                                seed=0)
    prephd.main(["--data_dir", hd, "--num_splits", "1"])
    hd_root = os.path.join(hd, prephd.SPLIT_ROOT)
    assert splits.dataset_of_roots([hd_root]) == "HD" and splits.test_set_name(hd_root) == "HD"
    assert splits.dataset_of_roots([os.path.join(prepared_11k, ROOTS_11K[2])], "11k") == "11k"
    assert splits.test_set_name(os.path.join(prepared_11k, ROOTS_11K[2])) == "palmar_r"
    with pytest.raises(errors.SplitInputError, match=r"--data_type 11k disagrees with .*splits.json, which "
                                                     r"records dataset HD; drop --data_type"):
        splits.dataset_of_roots([hd_root], "11k")
    with pytest.raises(errors.SplitInputError, match="different datasets"):
        splits.dataset_of_roots([hd_root, os.path.join(prepared_11k, ROOTS_11K[0])])
    assert splits.dataset_of_roots([str(tmp_path)], "HD") == "HD"  # hand-made folders: the flag decides


# ---- the pre-flight image check ----

def make_bad_images(folder, count):
    """`count` unreadable files: zero-byte ones and truncated JPEGs."""
    paths = []
    for k in range(count):
        path = os.path.join(folder, f"bad_{k:02d}.jpg")
        if k % 2:
            open(path, "wb").close()
        else:
            Image.fromarray(np.full((60, 80, 3), 120, np.uint8)).save(path, quality=95)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
        paths.append(path)
    return paths


def test_preflight_lists_every_unreadable_image_in_one_message(tmp_path):
    good = os.path.join(tmp_path, "good.png")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(good)
    bad = make_bad_images(str(tmp_path), 12)
    assert data.check_images([good] * 3, size=(16, 16)) == 1
    with pytest.raises(errors.ImageLoadError) as info:
        data.check_images([good] + bad, size=(16, 16), num_workers=1, what="training images")
    message = str(info.value)
    assert "\n" not in message and message.startswith("12 of 13 training images cannot be read: ")
    assert all(path in message for path in bad[:10]) and bad[10] not in message and "; ..." in message
    assert "truncated" in message or "cannot identify" in message


def test_zero_shot_stops_on_a_truncated_test_image_before_encoding(prepared_11k, tmp_path, tiny_vit_checkpoint):
    test_dir = os.path.join(prepared_11k, ROOTS_11K[0])
    rows = splits.read_manifest(test_dir)["sets"]["gallery1"]
    victim = os.path.join(prepared_11k, rows[0][2])  # the source photo: every hard link to it breaks
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    with pytest.raises(SystemExit, match=r"^error: 1 of \d+ images of .* cannot be read: cannot read image "
                                         r".*; replace these files"):
        zero_shot.main(["--test_dir", test_dir, "--f_name", str(tmp_path / "runs"), "--backbone_name",
                        tiny_vit_checkpoint, "--input_size", "32", "32", "--num_workers", "0", "--device", "cpu"])
    assert not os.path.exists(tmp_path / "runs")


# ---- backbone errors ----

def test_junk_backbone_file_gets_one_line_without_torch_advice(prepared_11k, tmp_path):
    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    with pytest.raises(SystemExit) as info:
        zero_shot.main(["--test_dir", os.path.join(prepared_11k, ROOTS_11K[0]), "--f_name", str(tmp_path / "runs"),
                        "--backbone_name", readme, "--device", "cpu"])
    message = str(info.value)
    assert message.startswith(f"error: {readme} is not a CLIP checkpoint") and "--backbone_name" in message
    assert "weights_only=False" not in message and "weights_only` set to `False" not in message
    assert "\n" not in message and not os.path.exists(tmp_path / "runs")


def test_offline_download_error_names_the_flag_the_cache_path_and_the_checksum(prepared_11k, tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(clip.clip.urllib.request, "urlopen", offline)
    with pytest.raises(SystemExit) as info:
        zero_shot.main(["--test_dir", os.path.join(prepared_11k, ROOTS_11K[0]), "--f_name", str(tmp_path / "runs"),
                        "--backbone_name", "RN50", "--download_root", str(tmp_path / "cache"), "--device", "cpu"])
    message = str(info.value)
    sha = clip.clip._MODELS["RN50"].split("/")[-2]
    assert message.startswith("error: could not download") and "\n" not in message
    assert str(tmp_path / "cache" / "RN50.pt") in message and sha in message and "--backbone_name" in message
    assert "clip.load()" not in message and not os.path.exists(tmp_path / "runs")


# ---- the ranking figure ----

def test_ranking_figure_reports_unreadable_images_and_follows_moved_folders(tmp_path):
    root = tmp_path / "split"
    make_split_root(str(root), num_splits=1, with_all=False)
    evaluation.evaluate_query_gallery(colour_encoder([]), str(root), str(tmp_path / "out"), input_size=(16, 16),
                                      verbose=False)
    mat = str(tmp_path / "out" / "result_split0.mat")
    victim = sorted((root / "gallery0" / "0003").iterdir())[0]
    saved = victim.read_bytes()
    victim.write_bytes(saved[:len(saved) // 3])
    argv = ["--mat", mat, "--query_index", "0", "--top_k", "4", "--out", str(tmp_path / "fig.png")]
    with pytest.raises(SystemExit, match=r"^error: 1 of 5 images named in .* cannot be read: cannot read image "
                                         r".*gallery0.0003.*--image_root OLD=NEW$"):
        ranking.main(argv)
    victim.write_bytes(saved)
    moved = tmp_path / "moved"
    shutil.move(str(root), str(moved))
    with pytest.raises(SystemExit, match=r"^error: 5 of 5 images .* image file not found: "):
        ranking.main(argv)
    png, pdf = ranking.main(argv + ["--image_root", f"{root}={moved}", "--pdf"])
    assert os.path.getsize(png) > 0 and os.path.getsize(pdf) > 0
    with pytest.raises(SystemExit):
        ranking.parse_args(["--mat", mat, "--image_root", "no-equals-sign"])


# ---- help texts ----

SCRIPTS = ["prepare_train_val_test_11k_r_l", "prepare_train_val_test_hd", "eval_query_gallery_clip_zeroshot",
           "eval_query_gallery_finetune", "query_ranking_result_demo", "train_finetune", "train_clipreid",
           "train_promptsg", "demo", "benchmark"]


class _Captured(Exception):
    pass


def script_parser(name, monkeypatch):
    """The ArgumentParser a script's parse_args builds."""
    import argparse
    import importlib
    found = []

    def capture(self, args=None, namespace=None):
        found.append(self)
        raise _Captured
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Captured):
        importlib.import_module(name).parse_args([])
    monkeypatch.undo()
    return found[0]


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_flag_has_a_help_text_and_no_default_is_printed_twice(name, monkeypatch):
    import argparse
    parser = script_parser(name, monkeypatch)
    adds_defaults = issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flag = action.option_strings[0] if action.option_strings else action.dest
        assert action.help, f"{name} {flag} has no help text"
        shown = parser._get_formatter()._expand_help(action)
        assert shown.lower().count("default") <= 1, f"{name} {flag}: default printed twice: {shown!r}"
        if adds_defaults and action.default is None:
            assert "(default: None)" not in shown, f"{name} {flag}: prints '(default: None)'"


# ---- trainers: --force, backbone, images, Ctrl-C ----

def train(data_dir, out_root, checkpoint, *extra):
    import train_finetune
    return train_finetune.main(["--data_dir", data_dir, "--f_name", str(out_root), "--m_name", "run",
                                "--backbone_name", checkpoint, "--input_size", "32", "32", "--num_workers", "0",
                                "--no-progress", "--device", "cpu", "--epochs", "2", "--batch_size", "4",
                                "--eval_every", "1", "--warmup_epochs", "0", *extra])


@pytest.mark.usefixtures("single_torch_thread")
def test_force_with_an_invalid_new_run_keeps_the_old_run_byte_identical(prepared_11k, tmp_path, tiny_vit_checkpoint):
    data_dir = os.path.join(prepared_11k, ROOTS_11K[0])
    result = train(data_dir, tmp_path, tiny_vit_checkpoint, "--no-final_test")
    run_dir = result["out_dir"]
    assert splits.read_manifest(data_dir)["dataset"] == "11k"
    import json
    assert json.load(open(os.path.join(run_dir, "config.json")))["args"]["data_type"] == "11k"
    before = tree_digest(run_dir)
    old_log = open(os.path.join(run_dir, "train.log")).read()
    with pytest.raises(SystemExit, match=r"^error: .*lower --batch_size$"):
        train(data_dir, tmp_path, tiny_vit_checkpoint, "--force", "--batch_size", "500")
    after = tree_digest(run_dir)
    assert after.pop("train.log") != before.pop("train.log") and after == before  # net_best.pth included
    log = open(os.path.join(run_dir, "train.log")).read()
    assert log.startswith(old_log) and "error: " in log[len(old_log):] and "--batch_size" in log[len(old_log):]
    with pytest.raises(SystemExit, match=r"^error: --data_type HD disagrees with .*dataset 11k"):
        train(data_dir, tmp_path, tiny_vit_checkpoint, "--force", "--data_type", "HD")
    assert tree_digest(run_dir) == dict(after, **{"train.log": tree_digest(run_dir)["train.log"]})


def test_trainer_with_a_junk_backbone_leaves_no_run_folder(prepared_11k, tmp_path):
    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    with pytest.raises(SystemExit) as info:
        train(os.path.join(prepared_11k, ROOTS_11K[0]), tmp_path / "runs", readme)
    message = str(info.value)
    assert message.startswith(f"error: {readme} is not a CLIP checkpoint") and "\n" not in message
    assert "weights_only=False" not in message and not os.path.exists(tmp_path / "runs" / "run")


@pytest.mark.parametrize("which", ["train", "test"])
def test_unreadable_image_stops_the_trainer_before_any_work(prepared_11k, tmp_path, tiny_vit_checkpoint, which):
    data_dir = os.path.join(prepared_11k, ROOTS_11K[0])
    sets = splits.read_manifest(data_dir)["sets"]
    source = sets["train"][0][2] if which == "train" else sets["query0"][0][2]
    victim = os.path.join(prepared_11k, source)
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    with pytest.raises(SystemExit, match=r"^error: 1 of \d+ images of the training run cannot be read: "
                                         r"cannot read image .*; replace these files"):
        train(data_dir, tmp_path / "runs", tiny_vit_checkpoint)  # --final_test is the default
    assert not os.path.exists(tmp_path / "runs" / "run")


@pytest.mark.usefixtures("single_torch_thread")
def test_ctrl_c_in_a_trainer_exits_130_with_a_resume_hint(prepared_11k, tmp_path, tiny_vit_checkpoint,
                                                          monkeypatch, capsys):
    from utils import training
    real, calls = training.train_one_epoch, []

    def interrupted_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(training, "train_one_epoch", interrupted_in_epoch_2)
    with pytest.raises(SystemExit) as info:
        train(os.path.join(prepared_11k, ROOTS_11K[0]), tmp_path, tiny_vit_checkpoint, "--no-final_test")
    assert info.value.code == 130
    assert "interrupted in epoch 2; continue with --resume" in capsys.readouterr().err
    run_dir = tmp_path / "run"
    assert training.load_checkpoint(str(run_dir / "net_last.pth"))["epoch"] == 1
    assert [n for n in os.listdir(run_dir) if n.startswith(".")] == []  # no temporary file left
    assert "interrupted (Ctrl-C)" in (run_dir / "train.log").read_text()


def test_an_unreadable_image_inside_a_worker_is_one_line(tmp_path):
    from utils import runs
    bad = make_bad_images(str(tmp_path), 1)[0]
    loader = data.make_loader(data.ImageListDataset([bad], size=(16, 16)), batch_size=1, num_workers=1)
    with pytest.raises(errors.ImageLoadError) as info:
        next(iter(loader))
    assert "Original Traceback" in str(info.value)
    message = runs.one_line(info.value)
    assert message.startswith(f"cannot read image {bad}: ") and "\n" not in message


@pytest.mark.parametrize("flags, message", [
    (["--input_size", "7", "7"], "input size (7, 7) is smaller than the patch size"),
    (["--input_size", "32", "32", "--stride", "40"], "patch_stride must be between 1 and the patch size"),
])
def test_a_geometry_the_backbone_cannot_take_is_one_line(prepared_11k, tmp_path, tiny_vit_checkpoint, flags, message):
    root = os.path.join(prepared_11k, "train_val_test_split_dorsal_r")
    with pytest.raises(SystemExit) as info:
        zero_shot.main(["--test_dir", root, "--f_name", str(tmp_path / "zs"), "--backbone_name", tiny_vit_checkpoint,
                        "--device", "cpu", *flags])
    text = str(info.value.code)
    assert text.startswith("error: cannot build CLIP from") and message in text and "\n" not in text
    assert not os.path.exists(tmp_path / "zs")


def test_a_state_dict_that_is_not_clip_is_one_line(prepared_11k, tmp_path):
    import torch
    path = str(tmp_path / "not_clip.pt")
    torch.save({"weight": torch.zeros(3)}, path)
    root = os.path.join(prepared_11k, "train_val_test_split_dorsal_r")
    with pytest.raises(SystemExit) as info:
        zero_shot.main(["--test_dir", root, "--f_name", str(tmp_path / "zs"), "--backbone_name", path, "--device", "cpu"])
    assert "not an OpenAI-layout CLIP state dict" in str(info.value.code)


# ---- flag values no range check caught: nan, inf, negative decay and factors ----

def trainer_error(script, *extra, data_dir="missing_root", out_root="runs"):
    """The SystemExit message of a trainer refused at its flag check (no data is read before it)."""
    with pytest.raises(SystemExit) as info:
        script.main(["--data_dir", data_dir, "--f_name", out_root, "--backbone_name", "missing.pt", "--device",
                     "cpu", "--num_workers", "0", *extra])
    return str(info.value.code)


@pytest.mark.parametrize("extra, line", [
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--gamma", "nan"], "--gamma must be a finite number, got nan"),
    (["--gamma", "-0.5"], "--gamma must be positive, got -0.5"),
    (["--grad_clip", "nan"], "--grad_clip must be a finite number, got nan"),
    (["--center_weight", "nan"], "--center_weight must be a finite number, got nan"),
    (["--triplet_weight=-inf"], "--triplet_weight must be a finite number, got -inf"),
    (["--ls", "nan"], "--ls must be in [0, 1), got nan"),
    (["--weight_decay=-1e-4"], "--weight_decay must be at least 0, got -0.0001"),
    (["--sampler", "pk", "--num_instances", "0"], "--num_instances must be at least 1, got 0"),
])
def test_finetune_refuses_non_finite_and_negative_flags_in_one_line(tmp_path, extra, line):
    import train_finetune
    assert trainer_error(train_finetune, *extra, out_root=str(tmp_path)) == f"error: {line}"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("extra, line", [
    (["--sc_temperature", "nan"], "--sc_temperature must be a finite number, got nan"),
    (["--lambda_sc", "inf"], "--lambda_sc must be a finite number, got inf"),
    (["--weight_decay", "-1"], "--weight_decay must be at least 0, got -1.0"),
])
def test_promptsg_refuses_non_finite_and_negative_flags_in_one_line(tmp_path, extra, line):
    import train_promptsg
    assert trainer_error(train_promptsg, *extra, out_root=str(tmp_path)) == f"error: {line}"


@pytest.mark.parametrize("extra, line", [
    (["--stage1_lr", "nan"], "--stage1_lr must be a finite number, got nan"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--stage1_weight_decay", "-1"], "--stage1_weight_decay must be at least 0, got -1.0"),
    (["--margin", "-5"], "--margin must be at least 0, got -5.0"),
    (["--warmup_factor", "5"], "--warmup_factor must be in (0, 1] (the warm-up starts at that fraction of --lr), "
                               "got 5.0"),
    (["--warmup_factor", "nan"], "--warmup_factor must be a finite number, got nan"),
    (["--sie_coe", "inf"], "--sie_coe must be a finite number, got inf"),
])
def test_clipreid_refuses_non_finite_and_out_of_range_flags_in_one_line(tmp_path, extra, line):
    import train_clipreid
    assert trainer_error(train_clipreid, *extra, out_root=str(tmp_path)) == f"error: {line}"


def test_every_bad_flag_is_named_once(tmp_path):
    import train_finetune
    lines = trainer_error(train_finetune, "--lr=-inf", "--triplet_weight=-inf", "--gamma", "0",
                          out_root=str(tmp_path)).splitlines()
    assert lines == ["error: --lr must be a finite number, got -inf", "error: --gamma must be positive, got 0.0",
                     "error: --triplet_weight must be a finite number, got -inf"]


def test_attribute_evaluation_refuses_nan_and_a_which_epoch_without_a_model(capsys):
    import eval_attributes_clip_zeroshot as attributes
    for argv, line in ((["--probe_l2", "nan"], "--probe_l2 must be a finite number, got nan"),
                       (["--which_epoch", "5"], "--which_epoch 5 picks a checkpoint of a --model run; zero-shot "
                                                "CLIP has none: give --model RUN_DIR or leave --which_epoch out")):
        with pytest.raises(SystemExit) as info:
            attributes.parse_args(argv)
        assert info.value.code == 2 and capsys.readouterr().err.splitlines() == [f"error: {line}"]
    assert attributes.parse_args([]).which_epoch is None
    assert attributes.parse_args(["--model", "run"]).which_epoch == "best"


def test_a_text_file_as_backbone_is_one_line(prepared_11k, tmp_path):
    text = tmp_path / "txt.pt"
    text.write_text("hello\n")
    with pytest.raises(SystemExit) as info:
        zero_shot.main(["--test_dir", os.path.join(prepared_11k, ROOTS_11K[0]), "--f_name", str(tmp_path / "zs"),
                        "--backbone_name", str(text), "--device", "cpu"])
    message = str(info.value.code)
    assert message.startswith(f"error: {text} is not a CLIP checkpoint (KeyError") and "\n" not in message
    with pytest.raises(SystemExit) as info:
        train(os.path.join(prepared_11k, ROOTS_11K[0]), tmp_path / "runs", str(text))
    assert str(info.value.code).startswith(f"error: {text} is not a CLIP checkpoint (")
    assert not os.path.exists(tmp_path / "runs" / "run")


@pytest.mark.parametrize("flags, message", [
    (["--input_size", "33", "30"], "--input_size 33 30 leaves pixels outside the patch grid (patch 16, stride 16: "
                                   "each side must be 16 + a multiple of 16); nearest valid: height 32 or 48, "
                                   "width 16 or 32"),
])
def test_an_input_size_the_patches_do_not_cover_is_refused(prepared_11k, tmp_path, tiny_vit_checkpoint, flags,
                                                           message):
    root = os.path.join(prepared_11k, ROOTS_11K[0])
    with pytest.raises(SystemExit) as info:
        zero_shot.main(["--test_dir", root, "--f_name", str(tmp_path / "zs"), "--backbone_name", tiny_vit_checkpoint,
                        "--device", "cpu", *flags])
    assert message in str(info.value.code) and "\n" not in str(info.value.code)
    with pytest.raises(SystemExit) as info:
        train(root, tmp_path / "runs", tiny_vit_checkpoint, *flags)
    text = str(info.value.code)
    assert text.startswith("error: backbone ") and message in text and "\n" not in text
    assert not os.path.exists(tmp_path / "runs" / "run")


def test_stride_on_a_resnet_is_refused(prepared_11k, tmp_path, tiny_rn_checkpoint):
    with pytest.raises(SystemExit) as info:
        train(os.path.join(prepared_11k, ROOTS_11K[0]), tmp_path, tiny_rn_checkpoint, "--stride", "8")
    assert str(info.value.code) == (f"error: --stride 8 applies to ViT backbones only and {tiny_rn_checkpoint} is a "
                                    f"ResNet: leave --stride out (--last_stride sets its layer4 stride)")
    assert not os.path.exists(tmp_path / "run")


def test_overlapping_patches_keep_clip_reids_geometry():
    from clip.model import ModelBuildError, vit_grid_size
    assert vit_grid_size((256, 128), 16, 12) == (21, 10)  # CLIP-ReID's 256 x 128, stride 12: 4 columns dropped
    assert vit_grid_size((224, 224), 16) == (14, 14)
    with pytest.raises(ModelBuildError, match="nearest valid: width 112 or 128"):
        vit_grid_size((256, 120), 16)
