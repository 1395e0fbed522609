"""Explanation maps (utils/explanation.py, explain_matches.py) on tiny models, and the synthetic
generator's part masks."""
import json
import os

import numpy as np
import pytest
import torch

import eval_query_gallery_finetune
import explain_matches
import models
import train_finetune
from utils import explanation, synthetic

pytestmark = pytest.mark.usefixtures("single_torch_thread")
QUIET = ["--num_workers", "0", "--no-progress", "--device", "cpu"]


def tiny_spec(checkpoint, kind):
    spec = models.backbone_spec(checkpoint, (64, 64), 8 if kind == "vit" else None)
    models.load_clip_model(spec, "pretrained")  # records the architecture
    return spec


def method_models(checkpoint, kind):
    """One untrained model of every method on the tiny backbone: (name, encode, image encoder)."""
    spec = tiny_spec(checkpoint, kind)
    torch.manual_seed(0)
    finetune = models.build_finetune_model(models.finetune_model_config(spec), 6, visual=models.load_backbone(spec))
    clipreid = models.build_clipreid_model(models.clipreid_model_config(spec), 6, visual=models.load_backbone(spec))
    promptsg = models.build_promptsg_model(models.promptsg_model_config(spec), 6,
                                           clip_model=models.load_clip_model(spec, "pretrained"))
    zero_shot = models.load_clip_model(spec, "pretrained")
    out = [(name, m.eval(), m.visual) for name, m in (("finetune", finetune), ("clipreid", clipreid),
                                                      ("promptsg", promptsg))]
    return out + [("zero-shot", zero_shot.eval().encode_image, zero_shot.visual)]


def images(count, seed):
    return torch.randn(count, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["vit", "rn"])
def test_every_method_gets_image_size_maps(kind, tiny_vit_checkpoint, tiny_rn_checkpoint):
    checkpoint = tiny_vit_checkpoint if kind == "vit" else tiny_rn_checkpoint
    for name, encode, visual in method_models(checkpoint, kind):
        recorder = explain_matches.SimilarityMaps(visual)
        maps, similarity = explain_matches.explain_query(encode, recorder, images(4, 0))
        assert maps.shape == (4, 64, 64), name
        assert torch.isfinite(maps).all() and torch.isfinite(similarity).all(), name
        assert maps[0].max() > maps[0].min(), f"{name}: constant query map"
        other, _ = explain_matches.explain_query(encode, recorder, images(4, 1))
        assert not torch.allclose(maps[0], other[0], atol=1e-3), f"{name}: two queries got the same map"
        if kind == "vit":  # the gradient of the similarity reaches the first block's attention
            first = visual.transformer.resblocks[0].attn.attention_probs
            assert first.grad is not None and first.grad.abs().sum() > 0, name
            assert not recorder.attentions[0].keep_attention  # switched off again after the map


def test_keep_attention_leaves_outputs_unchanged(tiny_vit_checkpoint):
    visual = models.load_backbone(tiny_spec(tiny_vit_checkpoint, "vit")).eval()
    x = images(2, 3)
    with torch.no_grad():
        plain = visual(x)
        for block in visual.transformer.resblocks:
            block.attn.keep_attention = True
        kept = visual(x)
    assert torch.allclose(plain, kept, atol=1e-5)
    probs = visual.transformer.resblocks[0].attn.attention_probs
    assert torch.allclose(probs.sum(-1), torch.ones_like(probs.sum(-1)), atol=1e-5)


def test_rollout_and_grad_cam_by_hand():
    # one block, one head, 3 tokens: R = I + (grad * A)^+; relevance = r_out @ R
    probs = torch.tensor([[[[0.5, 0.3, 0.2], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]]])
    grads = torch.tensor([[[[1.0, -1.0, 2.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]]]])
    relevance = explanation.attention_rollout([probs], [grads], torch.tensor([[1.0, 0.0, 0.0]]))
    assert torch.allclose(relevance, torch.tensor([[1.5, 0.0, 0.4]]))
    acts = torch.tensor([[[[1.0, 2.0]], [[3.0, -1.0]]]])  # (1, 2 channels, 1, 2)
    grads = torch.tensor([[[[1.0, 1.0]], [[-1.0, 0.0]]]])  # channel weights 1 and -0.5
    assert torch.allclose(explanation.grad_cam(acts, grads), torch.tensor([[[0.0, 2.5]]]))


def test_deletion_curve_starts_at_the_similarity(tiny_vit_checkpoint):
    visual = models.load_backbone(tiny_spec(tiny_vit_checkpoint, "vit")).eval()
    recorder = explain_matches.SimilarityMaps(visual)
    x = images(2, 4)
    maps, similarity = explain_matches.explain_query(visual, recorder, x)
    with torch.no_grad():
        match = explain_matches.normalized(visual, x[1:2])[0]
    result = explanation.deletion_test(lambda b: explain_matches.normalized(visual, b) @ match, x[0], maps[0],
                                       recorder.grid_size, num_random=3, seed=0, batch_size=7)
    curves = result["curves"]
    assert len(curves["map"]) == len(explanation.DELETION_FRACTIONS) == 11
    for name in ("map", "reverse", "random"):
        assert curves[name][0] == pytest.approx(float(similarity[0]), abs=1e-5)
    # everything removed: the same grey image whatever the order
    assert curves["map"][-1] == pytest.approx(curves["reverse"][-1], abs=1e-6)
    assert curves["map"][-1] == pytest.approx(curves["random"][-1], abs=1e-6)
    assert result["auc"]["random_std"] > 0  # the seeds give different orderings
    batch = explanation.deletion_batch(x[0], maps[:1], fractions=(0.0, 0.5, 1.0))
    removed = (batch == 0).all(dim=1).flatten(1).float().mean(dim=1)
    assert removed.tolist() == pytest.approx([0.0, 0.5, 1.0], abs=1e-3)
    assert explanation.area_under_curve([1.0, 1.0, 0.0], (0.0, 0.5, 1.0)) == pytest.approx(0.75)


def test_part_masks_leave_the_photos_unchanged():
    person, side = synthetic._random_person(np.random.default_rng(1)), synthetic._random_hand_side(np.random.default_rng(2))
    side["ring"] = (1, np.array([212.0, 175.0, 55.0]))
    plain = synthetic.render_synthetic_hand(person, side, "dorsal right", np.random.default_rng(3))
    photo, mask = synthetic.render_synthetic_hand(person, side, "dorsal right", np.random.default_rng(3),
                                                  with_parts=True)
    assert np.array_equal(np.asarray(plain), np.asarray(photo))
    assert mask.mode == "L" and mask.size == photo.size
    covered = np.asarray(mask) > 0
    assert 0.01 < covered.mean() < 0.3 and set(np.unique(np.asarray(mask))) == {0, 255}


@pytest.mark.parametrize("kind", ["vit", "rn"])
def test_finetuned_map_beats_random_deletion(kind, hand_data, tiny_vit_checkpoint, tiny_rn_checkpoint, tmp_path):
    runs = tmp_path / "runs"
    checkpoint, size = (tiny_vit_checkpoint, ["--stride", "8"]) if kind == "vit" else (tiny_rn_checkpoint, [])
    train_finetune.main(["--data_dir", hand_data, "--f_name", str(runs), "--m_name", "vit",
                         "--backbone_name", checkpoint, *QUIET, "--input_size", "64", "64", *size,
                         "--epochs", "10", "--lr", "3e-4", "--warmup_epochs", "1", "--milestones", "8",
                         "--batch_size", "16", "--eval_every", "5", "--save_every", "5"])
    eval_query_gallery_finetune.main(["--f_name", str(runs), "--m_name", "vit", "--test_dir", hand_data,
                                      "--gallery", "own", "--no-flip", "--out_dir", str(tmp_path / "eval"), "--num_workers", "0",
                                      "--device", "cpu"])
    out_dir = tmp_path / "explain"
    argv = ["--mat", str(tmp_path / "eval" / "result_split0.mat"), "--run_dir", str(runs / "vit"),
            "--num_queries", "24", "--top_k", "3", "--draw", "2", "--out_dir", str(out_dir),
            "--part_masks", os.path.join(os.path.dirname(hand_data), synthetic.PART_MASK_DIR), *QUIET[2:]]
    result = explain_matches.main(argv)
    summary = result["summary"]
    assert summary["num_queries"] == 24
    auc = summary["deletion_auc"]
    assert auc["map"] < auc["random"], auc  # the map finds what the similarity rests on
    assert auc["map"] < auc["reverse"], auc
    assert 0 < summary["part_area"] < 1 and 0 < summary["mass_on_parts"] < 1
    if kind == "vit":  # rollout: about twice the parts' area (Grad-CAM's coarse 4x4 grid: about their area)
        assert summary["mass_on_parts"] > 1.5 * summary["part_area"]
    saved = json.loads((out_dir / "explain.json").read_text())
    assert saved["summary"]["deletion_auc"] == auc and len(saved["queries"]) == 24
    assert (out_dir / "explain.png").stat().st_size > 0 and (out_dir / "explain.pdf").is_file()
    assert (out_dir / "config.json").is_file()
    with pytest.raises(SystemExit, match="--force"):
        explain_matches.main(argv)


def test_zero_shot_cli_and_bad_input(hand_data, tiny_vit_checkpoint, tiny_rn_checkpoint, tmp_path):
    import eval_query_gallery_clip_zeroshot
    eval_query_gallery_clip_zeroshot.main(["--test_dir", hand_data, "--f_name", str(tmp_path), "--backbone_name",
                                           tiny_vit_checkpoint, "--input_size", "64", "64", "--gallery", "own", "--no-flip",
                                           "--num_workers", "0", "--device", "cpu"])
    mat = str(next((tmp_path / "clip_zero_shot").glob("*/*/result_split0.mat")))
    out_dir = tmp_path / "explain"
    common = ["--mat", mat, "--query_index", "0", "3", "--top_k", "2", "--num_random", "2", "--out_dir", str(out_dir),
              *QUIET[2:]]
    result = explain_matches.main(["--backbone_name", tiny_vit_checkpoint, *common])
    saved = json.loads((out_dir / "explain.json").read_text())
    assert saved["input_size"] == [64, 64]  # taken from the evaluation's config.json
    assert [q["query"] for q in saved["queries"]] == [0, 3]
    for query in result["queries"]:  # same model, same images: the similarity the .mat ranked by
        for match in query["matches"]:
            assert match["similarity"] == pytest.approx(match["mat_similarity"], abs=1e-4)
    with pytest.raises(SystemExit, match="zero-shot evaluator; pass --backbone_name"):
        explain_matches.main(["--run_dir", str(tmp_path), *common, "--force"])
    with pytest.raises(SystemExit, match="was computed with backbone"):
        explain_matches.main(["--backbone_name", tiny_rn_checkpoint, *common, "--force"])
    with pytest.raises(SystemExit, match="does not exist"):
        explain_matches.main(["--backbone_name", tiny_vit_checkpoint, *common, "--force", "--mat",
                              str(tmp_path / "missing.mat")])
    with pytest.raises(SystemExit, match="--query_index 999"):
        explain_matches.main(["--backbone_name", tiny_vit_checkpoint, *common, "--force", "--query_index", "999"])
    with pytest.raises(SystemExit, match="--input_size 32 32: .* was ranked at 64 64"):
        explain_matches.main(["--backbone_name", tiny_vit_checkpoint, *common, "--force", "--input_size", "32", "32"])
    with pytest.raises(SystemExit):  # a run is explained at its own input size: the flag is refused at parsing
        explain_matches.parse_args(["--run_dir", str(tmp_path), "--mat", mat, "--input_size", "64", "64"])


def test_zero_shot_explains_the_model_that_ranked(hand_data, tiny_vit_checkpoint, tmp_path, monkeypatch):
    """A relative path to the evaluated checkpoint is the same backbone; the evaluation's --stride
    (overlapping patches) is rebuilt, so the explained similarities are the ranked ones."""
    import eval_query_gallery_clip_zeroshot
    eval_query_gallery_clip_zeroshot.main(["--test_dir", hand_data, "--f_name", str(tmp_path), "--backbone_name",
                                           tiny_vit_checkpoint, "--input_size", "64", "64", "--stride", "12",
                                           "--gallery", "own", "--no-flip", "--num_workers", "0", "--device", "cpu"])
    mat = str(next((tmp_path / "clip_zero_shot").glob("*/*/result_split0.mat")))
    monkeypatch.chdir(os.path.dirname(tiny_vit_checkpoint))
    result = explain_matches.main(["--backbone_name", os.path.basename(tiny_vit_checkpoint), "--mat", mat,
                                   "--query_index", "0", "--top_k", "2", "--num_random", "1",
                                   "--out_dir", str(tmp_path / "explain"), *QUIET[2:]])
    for match in result["queries"][0]["matches"]:
        assert match["similarity"] == pytest.approx(match["mat_similarity"], abs=1e-4)
