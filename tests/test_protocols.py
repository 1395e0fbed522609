"""Protocols as the references report (issue 19): the checkpoint each reports, the feature of every
model kind, selection and precision as the reference, and short runs that warn. One short
fine-tuning run on the synthetic hands serves the end-to-end checks."""
import argparse
import json
import os
import re

import pandas as pd
import pytest

import eval_query_gallery_finetune as evaluator
import models
import models_handid  # noqa: F401  (registers the "handid" model kind)
import train_clipreid
import train_finetune
import train_handid
import train_promptsg
from utils import io, preprocessing, protocols, runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = ["--num_workers", "0", "--no-progress", "--device", "cpu", "--seed", "0"]

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def short_run(hand_data, tiny_vit_checkpoint, tmp_path_factory):
    """3 epochs with the reference's 10-epoch warm-up and milestones 40/60 (so it warns), validated
    every epoch (the default), net_best by CLIP-HandID's val_acc subset, the final test under clip-reid."""
    f_name = tmp_path_factory.mktemp("protocols")
    return train_finetune.main(["--data_dir", hand_data, "--f_name", str(f_name), "--m_name", "run",
                                "--backbone_name", tiny_vit_checkpoint, "--input_size", "32", "32", "--epochs", "3",
                                "--lr", "1e-3", "--batch_size", "8", "--select_by", "val_acc",
                                "--reference_val_acc", "--protocol", "clip-reid", *QUIET])


def read_json(*parts):
    with open(os.path.join(*parts)) as f:
        return json.load(f)


# ---- the checkpoint each protocol reports ----------------------------------------------------------

def test_each_protocol_names_the_checkpoint_its_reference_reports():
    assert {name: p["checkpoint"] for name, p in protocols.PROTOCOLS.items()} == \
        {"clip-handid": "best", "clip-reid": "last", "clip-fh": "best"}
    run = {"model": {"kind": "finetune", "backbone": {"input_size": [32, 32]}}}
    assert protocols.test_settings("clip-reid", run)["which_epoch"] == "last"
    given = protocols.test_settings("clip-reid", run, which_epoch=7)
    assert given["which_epoch"] == "7" and given["explicit"] == ["which_epoch"]
    assert protocols.test_settings("clip-handid", None)["which_epoch"] is None  # zero-shot CLIP: no checkpoint


def test_final_test_evaluates_the_protocols_checkpoint_with_its_settings(short_run):
    final = read_json(short_run["out_dir"], "final_test", "results.json")
    assert final["which_epoch"] == "last" and final["epoch"] == 3  # clip-reid: the last epoch
    assert final["protocol"]["protocol"] == "clip-reid" and final["feature"] == "concat" and final["flip"] is False
    assert final["table_mAP"] == "mAP_standard"
    assert final["preprocessing"] == preprocessing.record((32, 32), "squash")  # as trained, full decoding
    with open(os.path.join(short_run["out_dir"], "train.log")) as f:
        assert "final test (net_last, protocol clip-reid, gallery{i}_all)" in f.read()


def test_evaluator_default_checkpoint_follows_the_protocol(short_run, hand_data):
    run_dir = short_run["out_dir"]
    base = ["--test_dir", hand_data, "--f_name", os.path.dirname(run_dir), "--m_name", "run", "--gallery", "own",
            "--num_workers", "0", "--device", "cpu"]
    handid = evaluator.main(base)
    assert handid["which_epoch"] == "best" and handid["epoch"] == short_run["best"]["epoch"]
    assert handid["protocol"]["which_epoch"] == "best" and handid["feature"] == "concat_bn"
    assert handid["preprocessing"] == read_json(run_dir, "config.json")["preprocessing"]
    reid = evaluator.main([*base, "--protocol", "clip-reid"])
    assert reid["which_epoch"] == "last" and reid["epoch"] == 3
    assert any(name.startswith("eval_last_") for name in os.listdir(run_dir))  # the folder names it


# ---- selection and precision as the reference ------------------------------------------------------

def test_selection_and_precision_defaults_are_the_references():
    for trainer in (train_finetune, train_handid):  # the reference validates every epoch, in fp32
        args = trainer.parse_args([])
        assert (args.eval_every, args.amp, args.select_by, args.reference_val_acc) == (1, "none", "val_mAP", False)
        assert io.resolve_amp(args.amp, "cuda") == "none"
    for trainer in (train_clipreid, train_promptsg):  # no per-epoch validation to follow; bf16 on CUDA
        args = trainer.parse_args([])
        assert args.eval_every == 5 and io.resolve_amp(args.amp, "cuda") == "bf16"
    for trainer in (train_finetune, train_handid, train_clipreid, train_promptsg):
        args = trainer.parse_args([])
        assert args.fast_decode is False and args.protocol == protocols.DEFAULT_PROTOCOL


def test_reference_val_acc_counts_the_drop_last_subset():
    args = argparse.Namespace(reference_val_acc=True, batch_size=20, seed=0)
    subsets = [runs.val_acc_images(args, 72, epoch) for epoch in range(3)]
    assert [len(set(s)) for s in subsets] == [60, 60, 60]  # 11k dorsal right: 60 of 72 images
    assert subsets[0] != subsets[1] and max(subsets[0]) < 72  # reshuffled every epoch
    assert runs.val_acc_images(argparse.Namespace(reference_val_acc=False), 72, 0) is None


def test_short_run_validates_every_epoch_selects_by_the_reference_subset_and_warns(short_run):
    history = pd.read_csv(os.path.join(short_run["out_dir"], "metrics.csv"))
    assert history["val_mAP"].notna().all() and list(history["epoch"]) == [1, 2, 3]
    num_val = read_json(short_run["out_dir"], "config.json")["num_val_images"]
    assert num_val == 12  # 8 of them counted (batch 8, the incomplete batch dropped), over all 12
    counted = history["val_acc"] * num_val
    assert ((counted - counted.round()).abs() < 1e-6).all() and (counted <= 8 + 1e-6).all()
    best = max(range(3), key=lambda i: (history["val_acc"][i], i))  # ties to the later epoch
    assert short_run["best"]["epoch"] == best + 1
    config = read_json(short_run["out_dir"], "config.json")
    assert config["amp"] == "none" and config["train_decode"] == "full"
    with open(os.path.join(short_run["out_dir"], "train.log")) as f:
        log = f.read()
    assert "warning: --epochs 3 ends inside the 10-epoch warm-up (--warmup_epochs)" in log
    assert "warning: --epochs 3 ends before the first --milestones step (epoch 40)" in log


def test_schedule_warnings_follow_the_schedules_first_epoch():
    from utils.training import schedule_warnings
    assert schedule_warnings(10, 10, [40, 60]) and not schedule_warnings(41, 10, [40, 60])
    assert len(schedule_warnings(40, 10, [40, 60])) == 1  # the step at 40 would apply from the 41st epoch
    assert not schedule_warnings(40, 10, [40], first_epoch=1)  # CLIP-ReID's epoch 40 already is at step 40
    assert not schedule_warnings(5, 0, [])


# ---- the feature of every model kind, and its documentation ----------------------------------------

def test_neck_features_cover_every_model_kind():
    valid = {"promptsg": models.PROMPTSG_FEATURES}
    assert set(protocols.NECK_FEATURES) == set(models.MODEL_BUILDERS)
    for kind in models.MODEL_BUILDERS:
        run = {"model": {"kind": kind, "backbone": {"input_size": [32, 32]}}}
        for name in protocols.PROTOCOLS:
            feature = protocols.test_settings(name, run)["feature"]
            assert feature in valid.get(kind, models.FEATURE_CHOICES), (kind, name)
    handid = {"model": {"kind": "handid", "backbone": {"input_size": [32, 32]}}}
    assert protocols.test_settings("clip-reid", handid)["feature"] == "concat"  # before the BNNecks


def test_feature_documentation_matches_the_code(capsys):
    with pytest.raises(SystemExit):
        evaluator.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "default: the protocol's, not the run's --feature" in help_text
    assert "default: the checkpoint the protocol's reference reports" in help_text
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    assert "with the run's own `--feature`" not in readme
    table = re.search(r"\| protocol \| reproduces \|.*?\n\n", readme, re.S).group(0)
    for name, reference in protocols.PROTOCOLS.items():
        row = next(line for line in table.splitlines() if line.startswith(f"| `{name}`"))
        for kind in ("finetune", "promptsg"):
            assert f"`{protocols.NECK_FEATURES[kind][reference['neck']]}`" in row, (name, kind)
        assert ("net_best" if reference["checkpoint"] == "best" else "net_last") in row, name
        assert ("centre crop" if reference["zero_shot_resize"] == "crop" else "squash") in row, name


def test_fast_decode_is_a_training_speed_option_with_its_own_cache(hand_data, tiny_vit_checkpoint, tmp_path):
    cache = tmp_path / "cache"
    result = train_finetune.main(["--data_dir", hand_data, "--f_name", str(tmp_path), "--m_name", "fast",
                                  "--backbone_name", tiny_vit_checkpoint, "--input_size", "32", "32", "--epochs", "1",
                                  "--batch_size", "16", "--warmup_epochs", "0", "--fast_decode", "--cache_resized",
                                  str(cache), "--no-final_test", *QUIET])
    assert sorted(os.listdir(cache)) and all("_draft_" in name for name in os.listdir(cache))
    config = read_json(result["out_dir"], "config.json")
    assert config["train_decode"] == "draft" and config["preprocessing"]["decode"] == "full"  # tests decode fully
