"""The trainers and evaluators on one GPU, run as a researcher runs them (tiny checkpoints, synthetic
hands): each trainer with the CUDA defaults and its evaluation compiled in bf16 against the plain
one; `--deterministic --resume` bit-identical; a one-process NCCL DDP run; and a run whose image
cache does not fit on the GPU falling back to the DataLoader with a log line."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.io
import torch

import eval_query_gallery_clip_zeroshot
import eval_query_gallery_finetune
import train_clipreid
import train_finetune
import train_handid
import train_promptsg
from utils import gpu_augment

pytestmark = pytest.mark.gpu

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN = ["--input_size", "64", "64", "--num_workers", "0", "--no-progress", "--batch_size", "16"]
TRAINERS = {"finetune": (train_finetune, ["--epochs", "1"]),
            "clipreid": (train_clipreid, ["--stage1_epochs", "1", "--stage1_batch_size", "16", "--epochs", "1"]),
            "promptsg": (train_promptsg, ["--epochs", "1"]),
            "handid": (train_handid, ["--epochs", "1"])}
AUGMENTED_ON_DEVICE = {"finetune", "promptsg"}  # the trainers with --gpu_augment


def train(method, hand_data, out_root, name, checkpoint, device, *extra):
    script, epochs = TRAINERS[method]
    return script.main(["--data_dir", hand_data, "--f_name", str(out_root), "--m_name", name, "--backbone_name",
                        checkpoint, "--device", device, *RUN, *epochs, *extra])


def read_json(path):
    with open(path) as f:
        return json.load(f)


def features_of(eval_dir):
    """Every image's feature of an evaluation (the .mat files), by image path."""
    found = {}
    for name in sorted(os.listdir(eval_dir)):
        if name.startswith("result_split") and name.endswith(".mat"):
            mat = scipy.io.loadmat(os.path.join(eval_dir, name))
            for side in ("query", "gallery"):
                for path, feature in zip(mat[f"{side}_path"].reshape(-1), mat[f"{side}_f"]):
                    found[str(np.asarray(path).reshape(-1)[0])] = feature.astype(np.float64)
    return found


def assert_same_features(got_dir, expected_dir):
    """Every image's feature of a bf16 evaluation within bf16's rounding of the fp32 one (a wrong
    feature, e.g. another image's or a padding row's, has a cosine far below)."""
    got, expected = features_of(got_dir), features_of(expected_dir)
    assert got.keys() == expected.keys() and len(got) > 20
    for path, feature in expected.items():
        cosine = float(got[path] @ feature / np.linalg.norm(got[path]) / np.linalg.norm(feature))
        assert cosine > 0.995, path


@pytest.mark.parametrize("method", list(TRAINERS))
def test_each_trainer_with_the_cuda_defaults_and_its_compiled_evaluation(method, fast_paths, hand_data,
                                                                          tiny_vit_checkpoint, tmp_path):
    device, graphs = fast_paths
    result = train(method, hand_data, tmp_path, "run", tiny_vit_checkpoint, device, "--cache_resized",
                   str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    config = read_json(run_dir / "config.json")
    assert config["args"]["device"] == device and config["args"]["compile"] is False and not graphs  # off by default
    if method in AUGMENTED_ON_DEVICE and device.startswith("cuda"):
        assert config["args"]["gpu_augment"] is True
        assert f"training images augmented on {device} in whole batches" in (run_dir / "train.log").read_text()
    assert all(np.isfinite(row["loss"]) for row in result.get("history", [])) and (run_dir / "net_best.pth").exists()

    common = ["--f_name", str(tmp_path), "--m_name", "run", "--test_dir", hand_data, "--num_workers", "0",
              "--device", device]
    plain_dir, fast_dir = tmp_path / "eval_plain", tmp_path / "eval_fast"
    eval_query_gallery_finetune.main([*common, "--out_dir", str(plain_dir), "--no-compile", "--amp", "none"])
    eval_query_gallery_finetune.main([*common, "--out_dir", str(fast_dir), "--compile", "--amp", "bf16"])
    assert read_json(fast_dir / "config.json")["args"]["compile"] is True
    assert read_json(plain_dir / "config.json")["args"]["compile"] is False
    assert_same_features(fast_dir, plain_dir)
    assert len(graphs) == 1  # one graph for every batch, the last (padded) and the mirrored ones included
    if method == "finetune":  # the zero-shot evaluator compiles the encoder's forward (CLIP's encode_image)
        zero_shot = ["--test_dir", hand_data, "--backbone_name", tiny_vit_checkpoint, "--input_size", "64", "64",
                     "--num_workers", "0", "--device", device, "--force"]
        eval_query_gallery_clip_zeroshot.main([*zero_shot, "--f_name", str(tmp_path / "zs_plain"), "--no-compile",
                                               "--amp", "none"])
        eval_query_gallery_clip_zeroshot.main([*zero_shot, "--f_name", str(tmp_path / "zs_fast"), "--compile",
                                               "--amp", "bf16"])
        found = {name: [os.path.join(root, "results.json") for root, _, files in os.walk(tmp_path / name)
                        if "results.json" in files] for name in ("zs_plain", "zs_fast")}
        assert len(found["zs_plain"]) == len(found["zs_fast"]) == 1
        assert_same_features(os.path.dirname(found["zs_fast"][0]), os.path.dirname(found["zs_plain"][0]))
        assert len(graphs) == 2


def test_deterministic_resume_is_bit_identical(fast_paths, hand_data, tiny_vit_checkpoint, tmp_path):
    """Two epochs in one go against one epoch and --resume for the second, with the CUDA defaults
    (images augmented on the GPU from --cache_resized), on the same GPU."""
    device, _ = fast_paths
    extra = ["--deterministic", "--cache_resized", str(tmp_path / "cache"), "--no-final_test", "--eval_every", "1"]
    if not device.startswith("cuda"):
        extra.append("--gpu_augment")  # the CUDA default, asked for in a dry run
    train("finetune", hand_data, tmp_path, "straight", tiny_vit_checkpoint, device, *extra, "--epochs", "2")
    train("finetune", hand_data, tmp_path, "resumed", tiny_vit_checkpoint, device, *extra, "--epochs", "1")
    train("finetune", hand_data, tmp_path, "resumed", tiny_vit_checkpoint, device, *extra, "--epochs", "2",
          "--resume")
    straight = torch.load(tmp_path / "straight" / "net_last.pth", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "net_last.pth", weights_only=True)
    assert straight["epoch"] == resumed["epoch"] == 2
    assert straight["model"].keys() == resumed["model"].keys()
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    assert read_json(tmp_path / "resumed" / "config.json")["args"]["gpu_augment"] is True


def test_one_process_nccl_ddp_run(gpu_device, hand_data, tiny_vit_checkpoint, tmp_path):
    """torchrun with one process on one GPU: the NCCL process group, DDP around the objective and the
    ranks' collectives (a one-process job is DDP too, see utils/distributed.setup_distributed)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               os.path.join(REPO, "train_finetune.py"), "--data_dir", hand_data, "--f_name", str(tmp_path),
               "--m_name", "ddp", "--backbone_name", tiny_vit_checkpoint, "--device", gpu_device, *RUN,
               "--epochs", "2", "--sampler", "pk", "--eval_every", "1", "--no-final_test"]
    done = subprocess.run(command, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = (tmp_path / "ddp" / "train.log").read_text()
    assert "batch 16 x 1 process(es) = effective batch 16" in log
    assert "model weights identical on all 1 ranks" in log  # only said by a DDP run
    assert torch.load(tmp_path / "ddp" / "net_last.pth", weights_only=True)["world_size"] == 1


def test_a_cache_that_does_not_fit_falls_back_with_a_log_line(fast_paths, hand_data, tiny_vit_checkpoint, tmp_path,
                                                             monkeypatch):
    """The GPU filled up to half the margin that training needs beside the cache (max(4 GiB, a quarter
    of the GPU)): the cache no longer fits, so augmentation goes to the DataLoader, said in train.log
    and recorded; asked for with --gpu_augment, it is a one-line error."""
    device, _ = fast_paths
    hog = None
    if device.startswith("cuda"):  # leave half the margin free: enough for the tiny model, too little for the cache
        free, total = torch.cuda.mem_get_info(torch.device(device))
        margin = max(4 * 2 ** 30, total // 4)
        hog = torch.empty(max(0, free - margin // 2), dtype=torch.uint8, device=device)
    else:  # dry run: a CPU always fits, so pretend, and let the CUDA default choose the device path
        monkeypatch.setattr(gpu_augment, "fits_in_device_memory", lambda nbytes, device: False)
        monkeypatch.setattr(gpu_augment, "use_gpu_augment", lambda flag, device, cached: flag is not False and cached)
    try:
        cache = ["--cache_resized", str(tmp_path / "cache"), "--no-final_test"]
        train("finetune", hand_data, tmp_path, "fallback", tiny_vit_checkpoint, device, *cache)
        log = (tmp_path / "fallback" / "train.log").read_text()
        assert f"image cache does not fit on {device}: augmenting in the DataLoader workers" in log
        assert read_json(tmp_path / "fallback" / "config.json")["args"]["gpu_augment"] is False
        with pytest.raises(SystemExit, match="does not fit on .*pass --no-gpu_augment"):
            train("finetune", hand_data, tmp_path, "asked", tiny_vit_checkpoint, device, *cache, "--gpu_augment")
    finally:
        del hog
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
