"""What the scripts write can be trusted on any machine (issue 18): each trial of the issue's table,
reproduced. Races use a second process held at a multiprocessing Event; a full disk is an injected
ENOSPC; a read-only location is os.access saying no (the tests may run as root)."""
import argparse
import errno
import json
import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import scipy.io
import torch

import eval_query_gallery_clip_zeroshot as zero_shot
import eval_query_gallery_finetune as eval_finetune
import explain_matches
import models
import prepare_train_val_test_11k_r_l as prep11k
import query_ranking_result_demo as ranking
import train_finetune
import train_handid
from utils import errors, evaluation, flags, metrics, outputs, splits, synthetic, training, verification
from test_failures import ROOTS_11K, tree_digest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)
QUIET = ["--num_workers", "0", "--device", "cpu"]
TINY_TRAIN = ["--input_size", "32", "32", "--no-progress", "--epochs", "2", "--batch_size", "4", "--eval_every", "1",
              "--warmup_epochs", "0", "--lr", "1e-4", "--milestones", "1", *QUIET]

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def data_11k(tmp_path_factory):
    """A small synthetic 11k data set with its four split roots (seed 0); copy it before changing it."""
    root = tmp_path_factory.mktemp("trust") / "11k"
    synthetic.make_synthetic_11k(str(root), num_ids_per_aspect=8, images_per_id=(3, 4), image_size=(40, 30), seed=0)
    prep11k.main(["--data_dir", str(root), "--num_splits", "2", "--seed", "0"])
    return str(root)


@pytest.fixture
def own_11k(tmp_path, data_11k):
    data_dir = str(tmp_path / "11k")
    shutil.copytree(data_11k, data_dir)
    return data_dir


def train_argv(data_dir, f_name, checkpoint, *extra, m_name="run"):
    return ["--data_dir", data_dir, "--f_name", str(f_name), "--m_name", m_name, "--backbone_name", checkpoint,
            *TINY_TRAIN, *extra]


@pytest.fixture(scope="module")
def trained(data_11k, tiny_vit_checkpoint, tmp_path_factory):
    """One tiny fine-tuning run (with its final test) and a fine-tuned evaluation of it; read-only."""
    runs = tmp_path_factory.mktemp("trust_runs")
    test_dir = os.path.join(data_11k, ROOTS_11K[0])
    result = train_finetune.main(train_argv(test_dir, runs, tiny_vit_checkpoint))
    eval_dir = os.path.join(result["out_dir"], "eval_best")
    evaluated = eval_finetune.main(["--f_name", str(runs), "--m_name", "run", "--test_dir", test_dir,
                                    "--out_dir", eval_dir, "--no-flip", "--gallery", "both", *QUIET])
    return {"run_dir": result["out_dir"], "result": result, "eval_dir": eval_dir, "results": evaluated,
            "test_dir": test_dir}


def copy_run(trained, tmp_path):
    run_dir = str(tmp_path / "runs" / "run")
    shutil.copytree(trained["run_dir"], run_dir)
    return run_dir


def one_line(info):
    message = str(info.value)
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message, message
    return message


# ---- a suite that passes anywhere ----

def test_before_after_case_holds_under_another_instruction_set(tmp_path):
    """Row 1: the fine-tuning case of test_before_after, run under ATEN_CPU_CAPABILITY=default (other
    rounding than this machine's AVX-512/AVX2 kernels), is within the tolerances; bits are not compared."""
    code = ("import json, sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
            "import test_before_after as t\n"
            "got = t.generator.record(sys.argv[3], cases=['finetune_vit'])['finetune_vit']\n"
            "print(json.dumps(t.differences('finetune_vit', t.EXPECTED['cases']['finetune_vit'], got)))")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default", MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", code, TESTS_DIR, REPO, str(tmp_path)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


# ---- every CSV through the csv module, equal to its source ----

def test_results_csv_and_metrics_csv_read_back_with_pandas_equal_their_json(trained):
    for folder in (trained["eval_dir"], os.path.join(trained["run_dir"], "final_test")):
        results = json.load(open(os.path.join(folder, "results.json")))
        frame = pd.read_csv(os.path.join(folder, "results.csv"), keep_default_na=False)
        rows = results["rows"] + [{"split": stat, "gallery": v, **results["summary"][v][stat]}
                                  for v in results["gallery_variants"] for stat in ("mean", "std")]
        assert len(frame) == len(rows) and list(frame.columns[:4]) == ["split", "gallery", "num_query", "num_gallery"]
        for (_, got), want in zip(frame.iterrows(), rows):
            assert str(got["split"]) == str(want["split"]) and got["gallery"] == want["gallery"]
            for name in evaluation.metric_names():
                if want.get(name) is None:
                    assert got[name] == ""
                else:
                    assert float(got[name]) == pytest.approx(want[name], abs=5e-7), name  # 6 decimals
    history = trained["result"]["history"]
    frame = pd.read_csv(os.path.join(trained["run_dir"], "metrics.csv"))
    assert list(frame["epoch"]) == [row["epoch"] for row in history]
    for (_, got), want in zip(frame.iterrows(), history):
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-12), key  # .6g


# ---- one writer per output folder ----

def _run_held(target, script, argv, ready, release):
    """In a second process: script.main(argv), held when it first calls `target` ("module.function"):
    `ready` is set and the call waits for `release`."""
    import importlib
    module_name, name = target.rsplit(".", 1)
    module = importlib.import_module(module_name)
    real = getattr(module, name)

    def held(*args, **kwargs):
        ready.set()
        release.wait(120)
        return real(*args, **kwargs)
    setattr(module, name, held)
    torch.set_num_threads(1)
    importlib.import_module(script).main(argv)


def start_held(target, script, argv):
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    process = ctx.Process(target=_run_held, args=(target, script, argv, ready, release))
    process.start()
    return process, ready, release


def test_a_second_trainer_on_the_same_run_is_refused_and_touches_nothing(data_11k, tiny_vit_checkpoint, tmp_path):
    """Row 3: two train_finetune.py on one --m_name; the refused one removed the other's fresh folder."""
    argv = train_argv(os.path.join(data_11k, ROOTS_11K[0]), tmp_path, tiny_vit_checkpoint, "--no-final_test",
                      "--epochs", "1")
    first, ready, release = start_held("utils.training.train_one_epoch", "train_finetune", argv)
    try:
        assert ready.wait(120), "the first run did not reach its first epoch"
        before = tree_digest(tmp_path / "run")
        for extra in ([], ["--force"], ["--resume"]):
            with pytest.raises(SystemExit, match=r"run is being written by another training run \(pid \d+\)") as info:
                train_finetune.main(argv + extra)
            one_line(info)
        assert tree_digest(tmp_path / "run") == before and "train.log" in before
    finally:
        release.set()
        first.join(120)
    assert first.exitcode == 0
    assert {"train.log", "config.json", "net_last.pth", "metrics.csv"} <= set(os.listdir(tmp_path / "run"))
    assert "epoch 1/1" in (tmp_path / "run" / "train.log").read_text()


def test_two_evaluations_into_one_folder_one_is_refused(data_11k, tiny_vit_checkpoint, tmp_path):
    """Row 5: both printed "Wrote results" and one was lost."""
    argv = ["--test_dir", os.path.join(data_11k, ROOTS_11K[0]), "--f_name", str(tmp_path), "--backbone_name",
            tiny_vit_checkpoint, "--input_size", "32", "32", *QUIET]
    first, ready, release = start_held("utils.evaluation.encode_split_images", "eval_query_gallery_clip_zeroshot", argv)
    try:
        assert ready.wait(120)
        with pytest.raises(SystemExit, match=r"is being written by another evaluation \(pid \d+\)") as info:
            zero_shot.main(argv + ["--force"])
        one_line(info)
    finally:
        release.set()
        first.join(120)
    assert first.exitcode == 0
    folder = tmp_path / "clip_zero_shot" / "tiny_vit" / "dorsal_r"
    assert sorted(os.listdir(folder)) == ["config.json", "result_split0_all.mat", "result_split1_all.mat",
                                          "results.csv", "results.json"]  # the first one's, whole
    assert [n for n in os.listdir(folder.parent) if n.startswith(".")] == []


# ---- evaluations all or nothing ----

@pytest.mark.parametrize("failure", ["disk full", "ctrl-c", "sigterm"])
def test_failed_force_leaves_the_earlier_evaluation_exactly_as_it_was(data_11k, tiny_vit_checkpoint, tmp_path,
                                                                     monkeypatch, capsys, failure):
    """Row 4: --force over an earlier evaluation failing half-way (new .mat beside the old JSON)."""
    argv = ["--test_dir", os.path.join(data_11k, ROOTS_11K[0]), "--f_name", str(tmp_path), "--backbone_name",
            tiny_vit_checkpoint, *QUIET]
    zero_shot.main(argv + ["--input_size", "32", "32"])
    folder = tmp_path / "clip_zero_shot" / "tiny_vit" / "dorsal_r"
    before = tree_digest(folder)
    real, written = scipy.io.savemat, []

    def savemat_then_fail(*args, **kwargs):
        written.append(1)
        if len(written) == 2:
            if failure == "disk full":
                raise OSError(errno.ENOSPC, "No space left on device")
            os.kill(os.getpid(), signal.SIGINT if failure == "ctrl-c" else signal.SIGTERM)
        return real(*args, **kwargs)
    monkeypatch.setattr(scipy.io, "savemat", savemat_then_fail)
    with pytest.raises(SystemExit) as info:
        zero_shot.main(argv + ["--input_size", "64", "64", "--force"])  # another input size than the old one
    if failure == "disk full":
        assert "no space left on the device" in one_line(info)
    else:
        assert info.value.code == 130 and "interrupted" in capsys.readouterr().err
    assert tree_digest(folder) == before  # results.json, config.json and the .mat files all the old ones
    assert json.load(open(folder / "config.json"))["args"]["input_size"] == [32, 32]
    assert [n for n in os.listdir(folder.parent) if n.startswith(".")] == []


def test_a_trainers_final_test_is_staged_too(trained, tmp_path, monkeypatch):
    from utils import runs
    run_dir = copy_run(trained, tmp_path)
    before = tree_digest(os.path.join(run_dir, "final_test"))

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(evaluation, "write_results", no_space)
    model, _, _ = models.load_trained_model(run_dir, "best")
    args = argparse.Namespace(input_size=[32, 32], batch_size=4, num_workers=0, protocol="clip-handid")
    with pytest.raises(errors.OutputWriteError, match="no space left"):
        runs.final_test(model, args, trained["test_dir"], run_dir, "final_test", "run", "none", "cpu",
                        logging.getLogger("test"), extra={})
    assert tree_digest(os.path.join(run_dir, "final_test")) == before


# ---- a run's record never lies ----

def test_resume_refuses_a_flag_it_cannot_honour_before_writing_anything(trained, tiny_vit_checkpoint, tmp_path):
    """Rows 6 and 7: --resume --lr 0.01 ran with the checkpoint's lr but recorded 0.01; --resume
    --optimizer sgd rewrote config.json, then a KeyError."""
    run_dir = copy_run(trained, tmp_path)
    argv = train_argv(trained["test_dir"], tmp_path / "runs", tiny_vit_checkpoint, "--no-final_test", "--resume")
    before = tree_digest(run_dir)
    for flag, value, recorded in (("--lr", "0.01", "0.0001"), ("--optimizer", "sgd", "adam"),
                                  ("--milestones", "5", "1"), ("--batch_size", "8", "4"), ("--input_size", "64 64", "32 32")):
        with pytest.raises(SystemExit) as info:
            train_finetune.main(argv + [flag, *value.split()])
        message = one_line(info)
        assert message.startswith(f"error: --resume: {flag} {value} disagrees with {run_dir}/config.json, "
                                  f"which records {recorded}; drop {flag}"), message
        assert tree_digest(run_dir) == before  # config.json, train.log, checkpoints: untouched
    with pytest.raises(SystemExit) as info:
        train_finetune.main(argv + ["--lr", "0.01", "--optimizer", "sgd"])
    assert [line.split(":")[2].split()[0] for line in str(info.value).splitlines()] == ["--lr", "--optimizer"]
    with pytest.raises(SystemExit, match="--epochs 1 is below the 2 epochs"):
        train_finetune.main(argv + ["--epochs", "1"])
    assert tree_digest(run_dir) == before
    elsewhere = tmp_path / "HD_root"  # another data set's split root given as the run's moved --data_dir
    shutil.copytree(trained["test_dir"], elsewhere)
    manifest = json.loads((elsewhere / "splits.json").read_text())
    (elsewhere / "splits.json").write_text(json.dumps(dict(manifest, dataset="HD")))
    with pytest.raises(SystemExit) as info:
        train_finetune.main([*argv[:argv.index("--data_dir") + 1], str(elsewhere), *argv[argv.index("--data_dir") + 2:]])
    assert one_line(info).startswith(f"error: --resume: --data_dir {elsewhere} holds the HD data set"), one_line(info)
    assert tree_digest(run_dir) == before


def test_resume_honours_more_epochs_and_keeps_the_original_settings(trained, tiny_vit_checkpoint, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    original = json.load(open(os.path.join(run_dir, "config.json")))
    # the other flags are left out: the run's own values (lr 1e-4, batch 4, 32x32) are used, not the defaults
    result = train_finetune.main(["--data_dir", trained["test_dir"], "--f_name", str(tmp_path / "runs"), "--m_name",
                                  "run", "--resume", "--epochs", "3", "--no-final_test", "--no-progress", *QUIET])
    assert [row["epoch"] for row in result["history"]] == [1, 2, 3]
    config = json.load(open(os.path.join(run_dir, "config.json")))
    assert config["args"] == original["args"] and config["model"] == original["model"]
    (entry,) = config["resumes"]
    assert entry["after_epoch"] == 2 and entry["argv"] and entry["git_commit"] and entry["date"]
    assert entry["changed_flags"] == {"epochs": {"from": 2, "to": 3}, "final_test": {"from": True, "to": False}}
    assert training.load_checkpoint(os.path.join(run_dir, "net_last.pth"))["optimizer"]["param_groups"][0][
        "initial_lr"] == pytest.approx(1e-4)


# ---- every trainer runs the same pre-flight ----

def test_clip_handid_runs_the_preflight(own_11k, tiny_vit_checkpoint, tmp_path):
    """Row 8: train_handid.py trained on mixed-seed roots and recorded a contradicting --data_type."""
    root = os.path.join(own_11k, ROOTS_11K[0])
    argv = train_argv(root, tmp_path / "runs", tiny_vit_checkpoint, "--no-final_test")
    with pytest.raises(SystemExit, match=r"^error: --data_type HD disagrees with .*dataset 11k") as info:
        train_handid.main(argv + ["--data_type", "HD"])
    one_line(info)
    sibling = os.path.join(own_11k, ROOTS_11K[1], splits.SPLITS_MANIFEST)
    manifest = json.load(open(sibling))
    json.dump(dict(manifest, seed=7), open(sibling, "w"))
    with pytest.raises(SystemExit, match=r"^error: split roots prepared with different --seed values: .*seed 7"):
        train_handid.main(argv)
    json.dump(manifest, open(sibling, "w"))
    victims = [os.path.join(root, splits.read_manifest(root)["sets"][name][0][0]) for name in ("train", "val")]
    for victim in victims:
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)
    with pytest.raises(SystemExit, match=r"^error: 2 of \d+ images of the training run cannot be read"):
        train_handid.main(argv)
    assert not os.path.exists(tmp_path / "runs" / "run")


# ---- split preparation: Ctrl-C during the clean-up after the swap ----

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_during_split_cleanup_finishes_it_without_a_traceback(own_11k, monkeypatch, capsys, sig):
    """Row 9: a traceback, and hidden half-deleted .<root>.old-<pid> folders nothing removed."""
    real, calls = shutil.rmtree, []

    def interrupted_rmtree(path, *args, **kwargs):
        if ".old-" in os.path.basename(str(path)):
            calls.append(path)
            if len(calls) == 1:
                os.kill(os.getpid(), sig)
        return real(path, *args, **kwargs)
    monkeypatch.setattr(shutil, "rmtree", interrupted_rmtree)
    with pytest.raises(SystemExit) as info:
        prep11k.main(["--data_dir", own_11k, "--num_splits", "2", "--seed", "1", "--force"])
    assert info.value.code == 130 and len(calls) == 4  # the clean-up finished before the interrupt
    err = capsys.readouterr().err
    assert "Traceback" not in err and "interrupted" in err
    assert [n for n in os.listdir(own_11k) if n.startswith(".")] == []
    assert all(splits.read_manifest(os.path.join(own_11k, r))["seed"] == 1 for r in ROOTS_11K)


def test_leftovers_of_a_killed_preparation_are_removed_by_the_next(own_11k):
    hidden = os.path.join(own_11k, f".{ROOTS_11K[0]}.old-999999")
    shutil.copytree(os.path.join(own_11k, ROOTS_11K[0]), hidden)
    prep11k.main(["--data_dir", own_11k, "--num_splits", "2", "--seed", "0", "--force"])
    assert [n for n in os.listdir(own_11k) if n.startswith(".")] == []


# ---- files read are checked as they are read ----

def test_a_checkpoint_with_overwritten_tensor_bytes_is_refused(trained, tmp_path):
    """Row 10: it loaded silently and wrote chance-level results."""
    run_dir = copy_run(trained, tmp_path)
    path = os.path.join(run_dir, "net_best.pth")
    state = torch.load(path, weights_only=True)
    first = next(k for k, v in state["model"].items() if v.is_floating_point() and v.numel() >= 8)
    state["model"][first].view(-1)[:8] = 0.5
    torch.save(state, path)
    argv = ["--f_name", str(tmp_path / "runs"), "--m_name", "run", "--test_dir", trained["test_dir"], *QUIET]
    with pytest.raises(SystemExit, match="net_best.pth is damaged: its tensors do not match the SHA-256") as info:
        eval_finetune.main(argv)
    one_line(info)
    with open(path, "w") as f:
        f.write("a text file, not a checkpoint\n")
    with pytest.raises(SystemExit, match="is not a checkpoint of this project"):
        eval_finetune.main(argv)


@pytest.mark.parametrize("damage, message", [
    ("truncate", r"config.json is not valid JSON \(.* line \d+, column \d+\); it is truncated"),
    ("no model", r"config.json lacks 'model.backbone.name', 'model.backbone.input_size'"),
    ("a list", r"config.json holds a JSON list, not the dict"),
])
def test_a_hand_edited_run_config_is_one_line(trained, tmp_path, damage, message):
    """Row 12 (config.json)."""
    run_dir = copy_run(trained, tmp_path)
    path = os.path.join(run_dir, "config.json")
    text = open(path).read()
    config = json.loads(text)
    new = {"truncate": text[:len(text) // 2], "no model": json.dumps({k: v for k, v in config.items() if k != "model"}),
           "a list": "[1, 2]"}[damage]
    open(path, "w").write(new)
    with pytest.raises(SystemExit, match=message) as info:
        eval_finetune.main(["--f_name", str(tmp_path / "runs"), "--m_name", "run", "--test_dir", trained["test_dir"],
                            "--out_dir", str(tmp_path / "eval"), *QUIET])
    one_line(info)
    assert not os.path.exists(tmp_path / "eval")


def damaged_mat(source, target, change):
    mat = scipy.io.loadmat(source)
    mat = {k: v for k, v in mat.items() if not k.startswith("__")}
    change(mat)
    scipy.io.savemat(target, mat)


@pytest.mark.parametrize("damage, message", [
    ("truncated", r"cannot read .*result_split0.mat \(.*\); it is truncated or not a result file"),
    ("no labels", r"result_split0.mat lacks query_label"),
    ("fewer labels", r"result_split0.mat: query_f has \d+ rows but query_label has \d+ entries"),
    ("other dims", r"result_split0.mat: query_f has \d+-d features but gallery_f \d+-d"),
    ("nan", r"result_split0.mat: gallery_f holds NaN or inf values in 1 of \d+ rows"),
])
def test_a_damaged_mat_is_one_line_in_the_ranking_figure_and_explain(trained, tmp_path, damage, message):
    """Rows 12 (.mat) and 15 (NaN features: a ranking drawn from NaN)."""
    folder = tmp_path / "eval"
    shutil.copytree(trained["eval_dir"], folder)
    mat = str(folder / "result_split0.mat")
    if damage == "truncated":
        data = open(mat, "rb").read()
        open(mat, "wb").write(data[:len(data) // 2])
    else:
        def change(m):
            if damage == "no labels":
                del m["query_label"]
            elif damage == "fewer labels":
                m["query_label"] = m["query_label"][:, :-1]
            elif damage == "other dims":
                m["gallery_f"] = m["gallery_f"][:, :-1]
            else:
                m["gallery_f"][0, 0] = np.nan
        damaged_mat(mat, mat, change)
    with pytest.raises(SystemExit, match=message):
        ranking.main(["--mat", mat, "--out", str(tmp_path / "fig.png")])
    with pytest.raises(SystemExit, match=message) as info:
        explain_matches.main(["--mat", mat, "--run_dir", trained["run_dir"], "--out_dir", str(tmp_path / "explain"),
                              "--device", "cpu", "--no-progress"])
    one_line(info)
    assert not os.path.exists(tmp_path / "fig.png") and not os.path.exists(tmp_path / "explain")


def test_a_truncated_evaluation_config_is_one_line_in_explain(trained, tmp_path):
    folder = tmp_path / "eval"
    shutil.copytree(trained["eval_dir"], folder)
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text[:100])
    with pytest.raises(SystemExit, match=r"config.json is not valid JSON") as info:
        explain_matches.main(["--mat", str(folder / "result_split0.mat"), "--run_dir", trained["run_dir"],
                              "--out_dir", str(tmp_path / "explain"), "--device", "cpu"])
    one_line(info)


# ---- explain_matches explains the checkpoint that ranked the gallery ----

def test_explain_refuses_another_checkpoint_than_the_one_that_ranked(trained, tmp_path):
    """Row 14: --which_epoch last on an eval_best .mat explained another checkpoint."""
    mat = os.path.join(trained["eval_dir"], "result_split0.mat")
    common = ["--mat", mat, "--run_dir", trained["run_dir"], "--query_index", "0", "--top_k", "2", "--num_random", "1",
              "--device", "cpu", "--no-progress"]
    with pytest.raises(SystemExit, match=r"^error: --which_epoch last: .*result_split0.mat was ranked by "
                                         r"net_best.pth; explain the checkpoint that ranked it"):
        explain_matches.main(common + ["--which_epoch", "last", "--out_dir", str(tmp_path / "a")])
    result = explain_matches.main(common + ["--out_dir", str(tmp_path / "b")])
    saved = json.load(open(tmp_path / "b" / "explain.json"))
    assert "net_best" in saved["model"] and result["queries"][0]["query"] == 0
    for match in result["queries"][0]["matches"]:  # the model that ranked the gallery (no flip: same similarity)
        assert match["similarity"] == pytest.approx(match["mat_similarity"], abs=1e-4)


# ---- unknown aspects, NaN features, zero knobs, flags one per line, SIGTERM ----

def test_unknown_aspect_values_are_listed(own_11k):
    path = os.path.join(own_11k, "HandInfo.csv")
    lines = open(path).read().splitlines()
    lines[3] = lines[3].replace("dorsal right", "dorsal rigth").replace("dorsal left", "dorsal rigth").replace(
        "palmar right", "dorsal rigth").replace("palmar left", "dorsal rigth")
    lines[5] = lines[5].replace("dorsal", "dorsl").replace("palmar", "dorsl")
    open(path, "w").write("\n".join(lines) + "\n")
    before = tree_digest(own_11k)
    with pytest.raises(SystemExit, match=r"^error: .*HandInfo.csv: unknown aspectOfHand value\(s\) 'dorsal rigth' "
                                         r"\(line 4\); 'dorsl \w+' \(line 6\); each must be one of dorsal right") as info:
        prep11k.main(["--data_dir", own_11k, "--num_splits", "2", "--force"])
    one_line(info)
    assert tree_digest(own_11k) == before


@pytest.mark.parametrize("call", [
    lambda s, q, g: metrics.rank_metrics(s, q, g),
    lambda s, q, g: metrics.query_gallery_metrics(s, q, g),
    lambda s, q, g: metrics.re_ranking(s, s, k1=2, k2=1),
    lambda s, q, g: verification.verification_metrics(s, q, g),
    lambda s, q, g: verification.pair_scores(s, q, g),
    lambda s, q, g: verification.equal_error_rate(np.sort(s[0]), np.sort(s[1])),
    lambda s, q, g: verification.roc_auc(np.sort(s[0]), np.sort(s[1])),
    lambda s, q, g: verification.tar_at_far(np.sort(s[0]), np.sort(s[1]), [0.1]),
], ids=["rank_metrics", "query_gallery_metrics", "re_ranking", "verification_metrics", "pair_scores",
        "equal_error_rate", "roc_auc", "tar_at_far"])
def test_every_metric_function_refuses_nan(call):
    scores = np.random.default_rng(0).random((4, 4))
    labels = np.array([0, 1, 2, 3])
    call(scores, labels, labels)  # finite: fine
    scores[1, 2] = np.nan
    with pytest.raises(errors.EvaluationInputError, match="NaN or infinite"):
        call(scores, labels, labels)


@pytest.mark.parametrize("argv, lines", [
    (["--epochs", "0"], ["--epochs must be at least 1, got 0"]),
    (["--num_ids", "0", "--lr", "0", "--num_splits", "0"], ["--num_ids must be at least 16, got 0",
                                                            "--num_splits must be at least 1, got 0",
                                                            "--lr must be positive, got 0.0"]),
])
def test_demo_knobs_given_as_zero_are_errors(argv, lines, tmp_path, capsys):
    """Row 15: demo.py --epochs 0 trained 20 epochs."""
    import demo
    with pytest.raises(SystemExit) as info:
        demo.main(["--out", str(tmp_path / "out"), "--data_dir", str(tmp_path / "data"), *argv])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {line}" for line in lines]
    assert not os.path.exists(tmp_path / "data")


@pytest.mark.parametrize("script, argv, lines", [
    (zero_shot, ["--batch_size", "0", "--max_rank", "-1", "--input_size", "0", "32"],
     ["--input_size must be at least 1, got 0 32", "--batch_size must be at least 1, got 0",
      "--max_rank must be at least 1, got -1"]),
    (eval_finetune, ["--k1", "0", "--num_workers", "-2"], ["--num_workers must be at least 0, got -2",
                                                           "--k1 must be at least 1, got 0"]),
    (explain_matches, ["--mat", "x.mat", "--backbone_name", "RN50", "--top_k", "0", "--draw", "0"],
     ["--top_k must be at least 1, got 0", "--draw must be at least 1, got 0"]),
])
def test_each_invalid_number_is_named_in_its_own_line(script, argv, lines, capsys):
    """Row 16: the whole usage, then one line naming four flags."""
    with pytest.raises(SystemExit) as info:
        script.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"error: {line}" for line in lines] and "usage" not in err


def test_trainer_flags_are_named_one_per_line(data_11k, tiny_vit_checkpoint, tmp_path):
    with pytest.raises(SystemExit) as info:
        train_finetune.main(train_argv(os.path.join(data_11k, ROOTS_11K[0]), tmp_path, tiny_vit_checkpoint,
                                       "--save_every", "-1", "--grad_clip", "-1", "--stride", "0"))
    assert str(info.value).splitlines() == ["error: --save_every must be at least 0, got -1",
                                            "error: --stride must be at least 1, got 0",
                                            "error: --grad_clip must not be negative, got -1.0"]


def test_sigterm_in_a_trainer_exits_130_with_the_resume_hint(data_11k, tiny_vit_checkpoint, tmp_path, monkeypatch,
                                                            capsys):
    """Row 15: SIGTERM behaves like Ctrl-C."""
    real, calls = training.train_one_epoch, []

    def terminated_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    monkeypatch.setattr(training, "train_one_epoch", terminated_in_epoch_2)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as info:
        train_finetune.main(train_argv(os.path.join(data_11k, ROOTS_11K[0]), tmp_path, tiny_vit_checkpoint,
                                       "--no-final_test"))
    assert info.value.code == 130
    assert "interrupted in epoch 2; continue with --resume" in capsys.readouterr().err
    assert training.load_checkpoint(str(tmp_path / "run" / "net_last.pth"))["epoch"] == 1
    assert signal.getsignal(signal.SIGTERM) == handler  # the script's handler only while it runs


# ---- the output location is checked before the work ----

def no_compute(*args, **kwargs):
    raise AssertionError("the work started before the output location was checked")


def scripts_and_outputs(trained, data_11k, checkpoint, tmp_path):
    """(name, main, argv, where the output would go, the function whose call means the work started)."""
    import benchmark
    import collect_results
    import eval_attributes_clip_zeroshot as attributes_script
    test_dir = trained["test_dir"]
    mat = os.path.join(trained["eval_dir"], "result_split0.mat")
    out = tmp_path / "out"
    return [
        ("zero-shot", zero_shot.main, ["--test_dir", test_dir, "--f_name", str(out), "--backbone_name", checkpoint,
                                       *QUIET], (evaluation, "encode_split_images")),
        ("fine-tuned", eval_finetune.main, ["--f_name", os.path.dirname(trained["run_dir"]), "--m_name", "run",
                                            "--test_dir", test_dir, "--out_dir", str(out / "eval"), *QUIET],
         (evaluation, "encode_split_images")),
        ("explain", explain_matches.main, ["--mat", mat, "--run_dir", trained["run_dir"], "--out_dir", str(out / "x"),
                                           "--device", "cpu"], (explain_matches, "explain_query")),
        ("attributes", attributes_script.main, ["--data_dir", test_dir, "--backbone_name", checkpoint, "--out_dir",
                                                str(out / "attr"), *QUIET], (evaluation, "encode_images")),
        ("trainer", train_finetune.main, train_argv(test_dir, out, checkpoint), (training, "train_one_epoch")),
        ("split preparation", prep11k.main, ["--data_dir", str(out / "11k"), "--num_splits", "2"],
         (splits, "build_split_root")),
        ("benchmark", benchmark.main, ["--only", "metrics", "--out", str(out / "bench.json"), "--metrics_shape",
                                       "20", "50"], (metrics, "query_gallery_metrics")),
        ("collect", collect_results.main, [trained["eval_dir"], "--out", str(out / "table")], None),
        ("ranking figure", ranking.main, ["--mat", mat, "--out", str(out / "fig.png")], (ranking, "draw_figure")),
    ]


@pytest.mark.parametrize("problem", ["read-only", "full"])
def test_an_unwritable_or_full_output_location_is_one_line_before_the_work(trained, data_11k, tiny_vit_checkpoint,
                                                                          tmp_path, monkeypatch, problem):
    """Row 11: an OSError traceback, and for the evaluators, explain and benchmark only after all the compute."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(data_11k, out / "11k", ignore=shutil.ignore_patterns("train_val_test_split_*"))
    real_access = os.access
    for name, main, argv, work in scripts_and_outputs(trained, data_11k, tiny_vit_checkpoint, tmp_path):
        if problem == "full" and name in ("collect", "ranking figure"):
            continue  # tables and figures of a few KiB: a full disk is caught as they are written (below)
        with monkeypatch.context() as patch:
            if problem == "read-only":
                patch.setattr(os, "access", lambda path, mode: False if os.path.abspath(path).startswith(str(out))
                              else real_access(path, mode))
            else:
                patch.setattr(outputs, "free_bytes", lambda path: 1024)
            if work is not None:
                patch.setattr(*work, no_compute)
            with pytest.raises(SystemExit) as info:
                main(argv)
        message = one_line(info)
        expected = "is not writable" if problem == "read-only" else "MiB free"
        assert expected in message, (name, message)
    assert sorted(os.listdir(out)) == ["11k"]


def test_a_full_disk_while_a_trainer_writes_a_checkpoint_is_one_line(data_11k, tiny_vit_checkpoint, tmp_path,
                                                                    monkeypatch):
    real, calls = torch.save, []

    def save_until_full(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:  # epoch 1's net_best and net_last, then a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)
    monkeypatch.setattr(torch, "save", save_until_full)
    with pytest.raises(SystemExit, match=r"cannot write .*: no space left on the device") as info:
        train_finetune.main(train_argv(os.path.join(data_11k, ROOTS_11K[0]), tmp_path, tiny_vit_checkpoint,
                                       "--no-final_test"))
    one_line(info)
    run_dir = tmp_path / "run"
    assert training.load_checkpoint(str(run_dir / "net_last.pth"))["epoch"] == 1  # the last good one, whole
    assert [n for n in os.listdir(run_dir) if n.startswith(".")] == []  # no half-written file


def test_a_full_disk_while_writing_a_table_or_figure_is_one_line(trained, tmp_path, monkeypatch):
    import collect_results
    from utils import io

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(io.tempfile, "mkstemp", no_space)
    with pytest.raises(SystemExit, match="no space left on the device") as info:
        collect_results.main([trained["eval_dir"], "--out", str(tmp_path / "table")])
    one_line(info)
    monkeypatch.setattr("matplotlib.figure.Figure.savefig", no_space)
    with pytest.raises(SystemExit, match="no space left on the device") as info:
        ranking.main(["--mat", os.path.join(trained["eval_dir"], "result_split0.mat"), "--out",
                      str(tmp_path / "fig.png")])
    one_line(info)
    assert sorted(os.listdir(tmp_path)) == []


def test_flag_helpers():
    args = argparse.Namespace(a=0, b=[1, 0], c=None, d=-1.0)
    assert flags.bound_problems(args, at_least={"a": 1, "b": 1, "c": 1}, positive=("d",)) == [
        "--a must be at least 1, got 0", "--b must be at least 1, got 1 0", "--d must be positive, got -1.0"]


# ---- run folder flags, and what an interrupted or failed run says and leaves ----

def test_run_folder_flags_and_the_trainer_of_a_resumed_run(trained, tiny_vit_checkpoint, tmp_path):
    import train_handid
    data_dir = trained["test_dir"]
    for m_name, shown in (("", "''"), ("../escape", "'../escape'"), ("..", "'..'")):
        with pytest.raises(SystemExit) as info:
            train_finetune.main(train_argv(data_dir, tmp_path / "runs", tiny_vit_checkpoint, m_name=m_name))
        assert one_line(info) == (f"error: --m_name {shown} must be a plain folder name inside --f_name (no "
                                  f"separators, not '.' or '..')")
    assert not (tmp_path / "escape").exists()
    run_dir = copy_run(trained, tmp_path)
    before = tree_digest(run_dir)
    with pytest.raises(SystemExit) as info:
        train_finetune.main(train_argv(data_dir, tmp_path / "runs", tiny_vit_checkpoint, "--resume", "--force"))
    assert one_line(info) == "error: --resume continues the run and --force replaces it: give one of them"
    with pytest.raises(SystemExit) as info:
        train_handid.main(train_argv(data_dir, tmp_path / "runs", tiny_vit_checkpoint, "--resume", "--epochs", "3"))
    assert one_line(info) == (f"error: --resume: {run_dir} was written by train_finetune.py, not train_handid.py; "
                              f"resume it with train_finetune.py, or start a new --m_name")
    assert tree_digest(run_dir) == before


def test_ctrl_c_in_the_final_test_says_the_epochs_are_done(data_11k, tiny_vit_checkpoint, tmp_path, monkeypatch,
                                                           capsys):
    from utils import runs

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(runs, "final_test", interrupted)
    with pytest.raises(SystemExit) as info:
        train_finetune.main(train_argv(os.path.join(data_11k, ROOTS_11K[0]), tmp_path, tiny_vit_checkpoint))
    assert info.value.code == 130
    assert "interrupted after the last epoch (2), in the final test; finish it with --resume" in capsys.readouterr().err


def test_a_clipreid_run_failing_in_stage_1_leaves_no_folder(data_11k, tiny_vit_checkpoint, tmp_path, monkeypatch):
    import train_clipreid
    from utils import training

    def diverged(*args, **kwargs):
        raise errors.NonFiniteLossError("non-finite loss in epoch 1")
    monkeypatch.setattr(training, "train_one_epoch", diverged)
    with pytest.raises(SystemExit, match="non-finite loss"):
        train_clipreid.main(train_argv(os.path.join(data_11k, ROOTS_11K[0]), tmp_path, tiny_vit_checkpoint,
                                       "--stage1_epochs", "1", "--no-final_test"))
    assert not (tmp_path / "run").exists()  # its stage-1 feature cache is no progress to keep
