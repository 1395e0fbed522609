"""Numbers that sit next to the published tables: every released patch size trains with default
flags, CLIP-ReID's schedules step as the reference does, the ± over splits is a sample std."""
import bisect
import csv
import json
import math
import os

import numpy as np
import pytest

import clip
import train_clipreid
import train_finetune
import train_promptsg
from utils import io

pytestmark = pytest.mark.usefixtures("single_torch_thread")

QUIET = ["--num_workers", "0", "--no-progress", "--device", "cpu", "--seed", "0"]
TRAINERS = {"finetune": train_finetune, "clipreid": train_clipreid, "promptsg": train_promptsg}
# one short epoch each (no --stride: the default is under test)
SHORT = {"finetune": ["--epochs", "1", "--batch_size", "16"],
         "clipreid": ["--stage1_epochs", "1", "--stage1_batch_size", "16", "--epochs", "1", "--batch_size", "16"],
         "promptsg": ["--epochs", "1", "--batch_size", "16"]}


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def geometry_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("geometry_ckpts")
    return {kind: clip.save_tiny_checkpoint(root / f"{kind}.pt", kind=kind) for kind in ("vit-b32", "vit-l14")}


@pytest.mark.parametrize("method", list(TRAINERS))
@pytest.mark.parametrize("kind, patch", [("vit-b32", 32), ("vit-l14", 14)])
def test_patch_14_and_32_train_with_default_flags_without_overlap(method, kind, patch, geometry_checkpoints,
                                                                  hand_data, tmp_path):
    input_size = 2 * patch  # a 2 x 2 grid: fast, and any stride below the patch would give more tokens
    result = TRAINERS[method].main(["--data_dir", hand_data, "--f_name", str(tmp_path), "--m_name", method,
                                    "--backbone_name", geometry_checkpoints[kind], "--input_size", str(input_size),
                                    str(input_size), "--no-final_test", *QUIET, *SHORT[method]])
    with open(os.path.join(result["out_dir"], "config.json")) as f:
        spec = json.load(f)["model"]["backbone"]
    assert spec["patch_stride"] == patch  # the backbone's own patch size, not 16
    rows = read_csv(os.path.join(result["out_dir"], "metrics.csv"))
    assert len(rows) == 1 and math.isfinite(float(rows[0]["loss"]))


def test_explicit_stride_still_gives_overlap(geometry_checkpoints, hand_data, tmp_path):
    result = train_finetune.main(["--data_dir", hand_data, "--f_name", str(tmp_path), "--m_name", "olp",
                                  "--backbone_name", geometry_checkpoints["vit-b32"], "--input_size", "64", "64",
                                  "--stride", "16", "--no-final_test", *QUIET, *SHORT["finetune"]])
    with open(os.path.join(result["out_dir"], "config.json")) as f:
        assert json.load(f)["model"]["backbone"]["patch_stride"] == 16


# ---- CLIP-ReID's schedules, epoch by epoch, against the reference formulas ------------------------------

def reference_stage2_lr(epoch, base, warmup_epochs, warmup_factor, milestones, gamma):
    """CLIP-ReID's WarmupMultiStepLR at scheduler.step(epoch) called at the start of epoch 1, 2, ..."""
    if epoch < warmup_epochs:
        factor = warmup_factor * (1 - epoch / warmup_epochs) + epoch / warmup_epochs
    else:
        factor = 1.0
    return base * factor * gamma ** bisect.bisect_right(milestones, epoch)


def reference_stage1_lr(epoch, base, epochs, warmup_epochs, warmup_lr, min_lr):
    """timm CosineLRScheduler(t_initial=epochs, warmup_t, warmup_lr_init, lr_min) at t = epoch."""
    if epoch < warmup_epochs:
        return warmup_lr + epoch * (base - warmup_lr) / warmup_epochs
    if epoch >= epochs:
        return min_lr
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * epoch / epochs))


def test_stage2_schedule_of_every_epoch_matches_the_reference():
    import torch
    from utils import training
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=5e-6)
    scheduler = training.WarmupMultiStepLR(optimizer, [30, 50], 0.1, 10, 0.1, first_epoch=1)
    for epoch in range(1, 61):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(
            reference_stage2_lr(epoch, 5e-6, 10, 0.1, [30, 50], 0.1), rel=1e-12), epoch
        optimizer.step()
        scheduler.step()
    # the figures: epoch 1 at 5e-6 x (0.1 + 0.9 / 10), x 0.1 from epoch 30
    assert reference_stage2_lr(1, 5e-6, 10, 0.1, [30, 50], 0.1) == pytest.approx(9.5e-7)
    assert reference_stage2_lr(30, 5e-6, 10, 0.1, [30, 50], 0.1) == pytest.approx(5e-7)
    assert reference_stage2_lr(29, 5e-6, 10, 0.1, [30, 50], 0.1) == pytest.approx(5e-6)


def test_clipreid_trainer_lr_of_every_epoch_of_both_stages(hand_data, tiny_vit_checkpoint, tmp_path):
    # warm-up, milestone and the end of the cosine all fall inside four epochs per stage
    flags = dict(stage1=dict(epochs=4, warmup_epochs=2, warmup_lr=1e-5, min_lr=1e-6, base=3.5e-4),
                 stage2=dict(base=5e-6, warmup_epochs=2, warmup_factor=0.1, milestones=[3], gamma=0.1))
    result = train_clipreid.main([
        "--data_dir", hand_data, "--f_name", str(tmp_path), "--m_name", "lr", "--backbone_name", tiny_vit_checkpoint,
        "--input_size", "32", "32", "--no-final_test", *QUIET, "--stage1_batch_size", "16", "--batch_size", "16",
        "--stage1_epochs", "4", "--stage1_warmup_epochs", "2", "--stage1_warmup_lr", "1e-5", "--stage1_min_lr",
        "1e-6", "--stage1_lr", "3.5e-4", "--epochs", "4", "--lr", "5e-6", "--warmup_epochs", "2", "--warmup_factor",
        "0.1", "--milestones", "3", "--gamma", "0.1"])
    stage1 = read_csv(os.path.join(result["out_dir"], "stage1_metrics.csv"))
    stage2 = read_csv(os.path.join(result["out_dir"], "metrics.csv"))
    s1, s2 = flags["stage1"], flags["stage2"]
    assert [float(r["lr"]) for r in stage1] == pytest.approx(
        [reference_stage1_lr(n, s1["base"], s1["epochs"], s1["warmup_epochs"], s1["warmup_lr"], s1["min_lr"])
         for n in range(1, 5)], rel=1e-4)
    assert [float(r["lr"]) for r in stage2] == pytest.approx(
        [reference_stage2_lr(n, s2["base"], s2["warmup_epochs"], s2["warmup_factor"], s2["milestones"], s2["gamma"])
         for n in range(1, 5)], rel=1e-4)


# ---- mean ± std over splits ----------------------------------------------------------------------------

def test_std_over_splits_is_the_sample_std():
    values = [0.5, 0.7, 0.9]
    mean, std = io.mean_std(values)
    assert mean == pytest.approx(0.7) and std == pytest.approx(np.std(values, ddof=1)) and std == pytest.approx(0.2)
    assert io.mean_std([0.4]) == (0.4, 0.0)


# ---- PromptSG's interaction module as the paper draws it --------------------------------------------------

def test_promptsg_blocks_start_as_the_identity_and_run_over_the_visual_token_sequence():
    import torch
    import models
    torch.manual_seed(0)
    module = models.MultimodalInteraction(width=64, heads=2, num_blocks=2)
    assert module.pool == "global"
    text = torch.randn(3, 64)
    tokens = torch.randn(3, 5, 64, requires_grad=True)
    sequence = torch.randn(3, 6, 64)
    with torch.no_grad():  # zero residual branches: the blocks start as the identity ...
        assert torch.equal(module.blocks(sequence), sequence)
        # ... and the global-token output starts as the global token (ln_post removes the attention's scale)
        start = torch.nn.functional.cosine_similarity(module(text, tokens), module.ln_post(tokens[:, 0]), dim=1)
        assert (start > 0.9999).all()
        for block in module.blocks:  # as after some training steps
            for layer in (block.attn.out_proj, block.mlp.c_proj):
                torch.nn.init.normal_(layer.weight, std=0.05)
    for pool in ("global", "mean"):
        module.pool = pool
        module.zero_grad()
        tokens.grad = None
        fused, weights = module(text, tokens, return_weights=True)
        assert fused.shape == (3, 64) and weights.shape == (3, 1, 5)
        fused.square().sum().backward()
        # self-attention over one token would be the identity: its query/key weights would get no gradient
        for block in module.blocks:
            q_grad, k_grad = block.attn.in_proj_weight.grad[:128].chunk(2)
            assert q_grad.abs().max() > 0 and k_grad.abs().max() > 0, pool
        assert module.cross_attn.q_proj.weight.grad.abs().max() > 0
        assert module.cross_attn.k_proj.weight.grad.abs().max() > 0
        # the output depends on every visual token
        assert (tokens.grad.abs().amax(dim=2) > 0).all()
        with torch.no_grad():
            for index in range(5):
                moved = tokens.detach().clone()
                moved[:, index] += torch.randn(64)
                assert (module(text, moved) - fused).abs().max() > 1e-3, (pool, index)


# ---- protocols by name ------------------------------------------------------------------------------------

def read_json(path):
    with open(path) as f:
        return json.load(f)


def test_protocol_settings_and_explicit_flags_win():
    from utils import protocols
    handid = protocols.settings("clip-handid", "finetune")
    assert (handid["flip"], handid["feature"], handid["amp"], handid["gallery"], handid["mAP"]) == \
        (True, "concat_bn", "none", "all", "mAP_hand")
    assert protocols.settings("clip-handid", None)["amp"] == "fp16"  # its zero-shot CLIP runs in fp16
    assert protocols.settings("clip-handid", None, cuda=False)["amp"] == "none"
    assert protocols.settings("clip-handid", "finetune", available=("own",))["gallery"] == "own"  # HD
    reid = protocols.settings("clip-reid", "clipreid", flip=True)
    assert (reid["flip"], reid["feature"], reid["mAP"], reid["explicit"]) == (True, "concat", "mAP_standard", ["flip"])
    fh = protocols.settings("clip-fh", "promptsg")
    assert (fh["flip"], fh["feature"], fh["gallery"], fh["amp"]) == (False, "fused", "own", "fp16")
    with pytest.raises(ValueError, match="--protocol"):
        protocols.settings("market", "finetune")


def test_zero_shot_defaults_follow_clip_handid(synthetic_11k, tiny_vit_checkpoint, tmp_path, capsys):
    import eval_query_gallery_clip_zeroshot as zero_shot
    test_dir = os.path.join(synthetic_11k, "train_val_test_split_dorsal_r")
    base = ["--test_dir", test_dir, "--backbone_name", tiny_vit_checkpoint, "--input_size", "32", "32",
            "--num_workers", "0", "--device", "cpu"]
    results = zero_shot.main([*base, "--f_name", str(tmp_path / "default")])
    assert results["flip"] is True and results["gallery_variants"] == ["all"]
    assert results["protocol"]["protocol"] == "clip-handid" and results["protocol"]["explicit"] == []
    assert results["table_mAP"] == "mAP_hand" and results["amp"] == "none"  # fp32 on a CPU
    assert results["metric_conventions"]["std"].startswith("sample standard deviation")
    assert "protocol clip-handid, gallery{i}_all: Rank-1" in capsys.readouterr().out.splitlines()[-1]
    explicit = zero_shot.main([*base, "--f_name", str(tmp_path / "explicit"), "--no-flip", "--gallery", "own"])
    assert explicit["flip"] is False and explicit["gallery_variants"] == ["own"]
    assert explicit["protocol"]["explicit"] == ["flip", "gallery"]
    fh = zero_shot.main([*base, "--f_name", str(tmp_path / "fh"), "--protocol", "clip-fh"])
    assert fh["flip"] is False and fh["gallery_variants"] == ["own"] and fh["protocol"]["mAP"] == "mAP_standard"
    assert "gallery{i}: Rank-1" in capsys.readouterr().out.splitlines()[-1]


def test_finetuned_evaluator_protocols_and_final_test(hand_data, tiny_vit_checkpoint, tmp_path):
    import eval_query_gallery_finetune as evaluator
    result = train_finetune.main(["--data_dir", hand_data, "--f_name", str(tmp_path), "--m_name", "run",
                                  "--backbone_name", tiny_vit_checkpoint, "--input_size", "32", "32", *QUIET,
                                  *SHORT["finetune"]])
    final = read_json(os.path.join(result["out_dir"], "final_test", "results.json"))
    assert final["flip"] is True and final["feature"] == "concat_bn"  # the published protocol, not --amp
    assert final["protocol"]["protocol"] == "clip-handid" and final["table_mAP"] == "mAP_hand"
    with open(os.path.join(result["out_dir"], "train.log")) as f:
        assert "final test (net_best, protocol clip-handid, gallery{i}_all)" in f.read()
    base = ["--test_dir", hand_data, "--f_name", str(tmp_path), "--m_name", "run", "--num_workers", "0",
            "--device", "cpu"]
    handid = evaluator.main(base)
    assert handid["feature"] == "concat_bn" and handid["flip"] is True and handid["gallery_variants"] == ["all"]
    reid = evaluator.main([*base, "--protocol", "clip-reid"])
    assert reid["feature"] == "concat" and reid["flip"] is False
    assert reid["protocol"]["mAP"] == "mAP_standard" and reid["protocol"]["amp"] == "none"
    own = evaluator.main([*base, "--protocol", "clip-reid", "--feature", "proj", "--flip"])
    assert own["feature"] == "proj" and own["flip"] is True and own["protocol"]["explicit"] == ["feature", "flip"]


# ---- determinism, DDP timeout, tokenizer mismatch in the text-side methods ------------------------------

def test_deterministic_flag_turns_on_deterministic_kernels(hand_data, tiny_vit_checkpoint, tmp_path, monkeypatch):
    import torch
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        train_finetune.main(["--data_dir", hand_data, "--f_name", str(tmp_path), "--m_name", "det",
                             "--backbone_name", tiny_vit_checkpoint, "--input_size", "32", "32", "--no-final_test",
                             "--deterministic", *QUIET, *SHORT["finetune"]])
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
    for trainer in (train_clipreid, train_promptsg):
        assert trainer.parse_args(["--deterministic"]).deterministic is True


def test_process_group_timeout_covers_a_long_stage1(monkeypatch):
    import datetime
    import torch.distributed as dist
    from utils import distributed
    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    info = distributed.setup_distributed("cpu")
    assert info.rank == 1 and seen["backend"] == "gloo"
    assert seen["timeout"] >= datetime.timedelta(hours=12)


@pytest.mark.parametrize("method", ["clipreid", "promptsg"])
def test_small_vocabulary_stops_the_text_side_methods_with_both_sizes(method, hand_data, tmp_path):
    checkpoint = clip.save_tiny_checkpoint(tmp_path / "small_vocab.pt", kind="vit", vocab_size=1000)
    with pytest.raises(SystemExit, match=r"1000 tokens.*49408"):
        TRAINERS[method].main(["--data_dir", hand_data, "--f_name", str(tmp_path), "--m_name", method,
                               "--backbone_name", checkpoint, "--input_size", "32", "32", "--no-final_test",
                               *QUIET, *SHORT[method]])


def test_pos_interp_flag_reaches_the_backbone(tmp_path):
    import torch
    import models
    checkpoint = clip.save_tiny_checkpoint(tmp_path / "rn.pt", kind="rn")
    built = {}
    for mode in ("bilinear", "bicubic"):
        spec = models.backbone_spec(checkpoint, (96, 64), last_stride=1, pos_interp=mode)
        built[mode] = models.load_backbone(spec).attnpool.positional_embedding.detach()
    assert train_finetune.parse_args([]).pos_interp == "bilinear"
    assert not torch.allclose(built["bilinear"], built["bicubic"])
