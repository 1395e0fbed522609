"""CLIP-HandID's own method (models_handid.py, losses.HandIDLoss, train_handid.py) on tiny checkpoints.

The first tests check the point where the released code and the paper part ways: by default the
inversion network learns through the frozen text tower; --reference_no_grad_text reproduces the
released code, where it never does and every image gets one constant text feature."""
import copy
import json
import math
import os

import pytest
import torch

import clip
import losses
import models
import models_handid
import prompt_models
from clip.model import MODEL_CONFIGS
from utils import errors, training

INPUT_SIZE = {"vit": (32, 32), "rn": (64, 64)}

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def build_model(checkpoint, kind, num_classes=4, seed=0, **kwargs):
    torch.manual_seed(seed)
    spec = models.backbone_spec(checkpoint, INPUT_SIZE[kind], patch_stride=8, last_stride=1)
    clip_model = models.load_clip_model(spec, weights="pretrained")
    if kind == "rn":  # keep the random ResNet stem's bn3 non-zero, or every image gets the same feature
        torch.nn.init.ones_(clip_model.visual.bn3.weight)
    config = models_handid.handid_model_config(spec, **kwargs)
    model = models_handid.build_handid_model(config, num_classes, clip_model)
    model.test_config = config
    return model


@pytest.fixture(scope="module")
def prototypes(tiny_vit_checkpoint, tiny_rn_checkpoint):
    return {"vit": build_model(tiny_vit_checkpoint, "vit"), "rn": build_model(tiny_rn_checkpoint, "rn"),
            "vit_interaction": build_model(tiny_vit_checkpoint, "vit", interaction=True)}


@pytest.fixture
def vit_model(prototypes):
    return copy.deepcopy(prototypes["vit"])


def batch(kind, n=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, *INPUT_SIZE[kind], generator=generator)
    return images, torch.arange(n) // 4  # two identities x 4 images


# ---- the composed prompt ----

def test_pseudo_token_sits_at_s_star_and_end_token_survives(vit_model):
    model = vit_model.eval()
    sentence = clip.tokenize("A photo of a sks hand")[0]
    assert torch.equal(model.prompt_tokens, sentence[:8])  # sot a photo of a sks hand eot
    assert model.pseudo_index == 5 and int(model.prompt_tokens[5]) == int(clip.tokenize("sks")[0, 1])
    text = model.text
    template = text.token_embedding(sentence[:8])
    pseudo = torch.randn(3, template.shape[1])
    embeds = prompt_models.splice_pseudo_token(text, model.prompt_tokens, model.pseudo_index, pseudo)
    assert embeds.shape == (3, 8, template.shape[1])
    assert torch.equal(embeds[:, 5], pseudo)
    others = [i for i in range(8) if i != 5]
    assert torch.equal(embeds[:, others], template[others].expand(3, -1, -1))
    eot_embedding = text.token_embedding.weight[int(clip.tokenize("")[0, 1])]
    assert torch.equal(embeds[:, -1], eot_embedding.expand(3, -1))
    # with the word embedding of "sks" as the pseudo-token, the feature is CLIP's own of the sentence
    with torch.no_grad():
        spliced = prompt_models.encode_spliced_prompt(text, model.prompt_tokens, 5, template[5:6])
        torch.testing.assert_close(spliced, text.encode_text(sentence[None]))


def test_template_without_s_star_is_refused():
    with pytest.raises(errors.TrainingInputError, match="prompt_template"):
        models_handid.placeholder_prompt_tokens("A photo of a hand")


# ---- gradients: the paper's learned pseudo-word against the released code's no-grad text path ----

@pytest.mark.parametrize("no_grad_text", [False, True], ids=["default", "reference_no_grad_text"])
def test_inversion_network_learns_only_with_gradient_through_text(prototypes, tiny_vit_checkpoint, no_grad_text):
    model = build_model(tiny_vit_checkpoint, "vit", no_grad_text=no_grad_text).train()
    criterion = losses.HandIDLoss(model)
    optimizer = training.make_optimizer("adam", training.param_groups(model, 1e-4, 5e-4), 1e-4, 5e-4)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    images, labels = batch("vit")
    loss, terms, logits = criterion(images, labels)
    assert set(terms) == {"loss_id", "loss_id_proj", "loss_i2t", "loss_t2i"} and logits.shape == (8, 4)
    assert float(loss.detach()) == pytest.approx(sum(float(t.detach()) for t in terms.values()), rel=1e-6)  # unweighted sum
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    inversion = [name for name, _ in model.named_parameters() if name.startswith("inversion.")]
    assert len(inversion) == 12  # 3 Linear + 3 LayerNorm, weights and biases
    for name, param in model.named_parameters():
        changed = not torch.equal(param.detach(), before[name])
        if name.startswith("inversion."):
            has_grad = param.grad is not None and float(param.grad.norm()) > 0
            assert has_grad == (not no_grad_text) and changed == (not no_grad_text), name
        elif name.startswith("text."):
            assert param.grad is None and not changed, name  # the text tower is frozen either way
    assert not torch.equal(model.visual.conv1.weight.detach(), before["visual.conv1.weight"])


def test_reference_no_grad_text_gives_every_image_one_constant_text_feature(tiny_vit_checkpoint):
    # the released code never reshapes the inversion output: S* receives the scalar mean of a LayerNorm
    # output (0) in every dimension, under no_grad
    model = build_model(tiny_vit_checkpoint, "vit", no_grad_text=True).train()
    images, labels = batch("vit")
    _, features = model(images, labels)
    text = features["text"]
    assert not text.requires_grad
    assert torch.equal(text, text[:1].expand_as(text))  # identical for every image of the batch
    default = build_model(tiny_vit_checkpoint, "vit").train()
    assert (default(images, labels)[1]["text"] - text).abs().max() > 1e-3  # the default splices each image's own
    # image -> text: every logit of a row equal, so the loss is log B and its gradient zero
    image = features["proj"]
    i2t = losses.SupConLoss(temperature=1.0)(image, text, labels, labels)
    assert float(i2t.detach()) == pytest.approx(math.log(len(images)), abs=1e-5)
    assert torch.autograd.grad(i2t, image)[0].abs().max() < 1e-6


def test_contrastive_losses_alone_reach_the_inversion_network(vit_model):
    model = vit_model.train()
    images, labels = batch("vit")
    _, features = model(images, labels)
    supcon = losses.SupConLoss(temperature=1.0)
    supcon(features["text"], features["proj"], labels, labels).backward()
    assert float(model.inversion.mlp[0].weight.grad.norm()) > 0
    assert model.classifier.weight.grad is None


# ---- the test feature ----

@pytest.mark.parametrize("kind", ["vit", "rn"])
def test_test_feature_is_both_bnneck_features(prototypes, kind):
    model = copy.deepcopy(prototypes[kind]).eval()
    images, _ = batch(kind, 4)
    with torch.no_grad():
        feature = model(images)
        features = model.visual.forward_features(images)
    expected = torch.cat([model.bottleneck(features["pre_proj"]), model.bottleneck_proj(features["proj"])], dim=1)
    torch.testing.assert_close(feature, expected)
    assert feature.shape[1] == model.feature_dim() == model.in_planes + model.in_planes_proj


def test_test_feature_is_1280_d_for_vit_b16_and_3072_d_for_rn50():
    def spec_of(name):
        spec = models.backbone_spec(name)
        spec["arch"] = dict(MODEL_CONFIGS[name], vision_layers=MODEL_CONFIGS[name]["vision_layers"])
        return spec
    vit = models_handid.build_handid_model(models_handid.handid_model_config(spec_of("ViT-B/16")), 3).eval()
    with torch.no_grad():  # uninitialised (zeroed) ViT-B/16 weights: only the shapes matter here
        assert vit(torch.zeros(1, 3, 224, 224)).shape == (1, 1280) and vit.feature_dim() == 768 + 512
    rn50 = MODEL_CONFIGS["RN50"]
    assert rn50["vision_width"] * 32 + rn50["embed_dim"] == 3072  # pooled layer4 (2048) + CLIP embedding (1024)


# ---- the optional interaction network, the ImageNet statistics, rebuilding ----

def test_interaction_attends_over_the_image_tokens_with_text_dependent_weights(prototypes):
    model = copy.deepcopy(prototypes["vit_interaction"]).train()
    images, labels = batch("vit")
    loss, terms, _ = losses.HandIDLoss(model)(images, labels)
    assert "loss_id_text" in terms
    loss.backward()
    # a softmax over several keys (the global token and the patch tokens): queries and keys learn
    assert float(model.interaction.cross_attn.q_proj.weight.grad.norm()) > 0
    assert float(model.interaction.cross_attn.k_proj.weight.grad.norm()) > 0
    assert float(model.inversion.mlp[0].weight.grad.norm()) > 0
    model.eval()
    with torch.no_grad():
        features = model.visual.forward_features(images)
        feature = model(images)
        text_a = model.encode_text(features["proj"])[0]
        fused_a, weights_a = model.interact(features, text_a, return_weights=True)
        fused_b, weights_b = model.interact(features, text_a.flip(0), return_weights=True)
    assert weights_a.shape == (8, 1, features["tokens"].shape[1])  # one key per token of the image
    torch.testing.assert_close(weights_a.sum(dim=2), torch.ones(8, 1))
    assert (weights_a - weights_b).abs().max() > 1e-4  # the weights depend on the text
    assert (fused_a - fused_b).abs().max() > 1e-3  # and so does the branch's feature
    assert feature.shape[1] == model.feature_dim() == model.in_planes + 2 * model.in_planes_proj


def test_interaction_of_a_resnet_and_of_earlier_runs(tiny_rn_checkpoint, tiny_vit_checkpoint):
    model = build_model(tiny_rn_checkpoint, "rn", interaction=True).eval()
    images, _ = batch("rn", 2)
    with torch.no_grad():
        features = model.visual.forward_features(images)
        _, weights = model.interact(features, model.encode_text(features["proj"])[0], return_weights=True)
    assert weights.shape == (2, 1, features["tokens"].shape[1])  # layer4 tokens through token_proj
    # a config.json from before the token sequence rebuilds the single-key branch it was trained with
    old = build_model(tiny_vit_checkpoint, "vit", interaction=True)
    config = dict(old.test_config)
    del config["interaction_keys"]
    rebuilt = models.build_model_from_config({"model": config, "num_classes": 4}).eval()
    assert rebuilt.interaction_keys == "global" and rebuilt.interaction.pool == "mean"
    models.load_model_weights(rebuilt, models.image_side_state_dict(old), "test checkpoint")
    images, _ = batch("vit", 2)
    with torch.no_grad():
        features = rebuilt.visual.forward_features(images)
        _, weights = rebuilt.interact(features, rebuilt.encode_text(features["proj"])[0], return_weights=True)
    assert weights.shape == (2, 1, 1)


def test_imagenet_norm_equals_imagenet_normalised_pixels(tiny_vit_checkpoint):
    clip_norm = build_model(tiny_vit_checkpoint, "vit").eval()
    imagenet_norm = build_model(tiny_vit_checkpoint, "vit", input_norm="imagenet").eval()
    pixels = torch.rand(2, 3, *INPUT_SIZE["vit"])

    def normalised(mean, std):
        return (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        ours = imagenet_norm(normalised(clip.CLIP_MEAN, clip.CLIP_STD))
        reference = clip_norm(normalised(models_handid.IMAGENET_MEAN, models_handid.IMAGENET_STD))
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["vit", "vit_interaction"])
def test_model_rebuilds_from_config_and_state_dict(prototypes, kind):
    model = copy.deepcopy(prototypes[kind]).eval()
    config = {"model": json.loads(json.dumps(model.test_config)), "num_classes": 4}  # as read from config.json
    rebuilt = models.build_model_from_config(config)
    models.load_model_weights(rebuilt, models.image_side_state_dict(model), "test checkpoint")
    rebuilt.eval()
    images, _ = batch("vit", 4)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), model(images))


# ---- train_handid.py and the evaluator on the synthetic hands ----

QUIET = ["--num_workers", "0", "--no-progress", "--device", "cpu"]
RUN = ["--input_size", "64", "64", "--stride", "8", "--epochs", "10", "--lr", "3e-4", "--warmup_epochs", "1",
       "--milestones", "8", "--batch_size", "16", "--eval_every", "5", "--save_every", "5"]


def test_default_schedule_is_the_reference_one():
    import train_handid
    args = train_handid.parse_args([])
    assert (args.optimizer, args.weight_decay, args.lr, args.epochs, args.batch_size) == ("adam", 5e-4, 5e-6, 70, 20)
    assert train_handid.parse_args(["--backbone_name", "RN50"]).batch_size == 4
    assert (args.feature, args.norm, args.reference_no_grad_text, args.interaction) == \
        ("concat_bn", "clip", False, False)
    encoder, heads = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [encoder], "lr": args.lr}, {"params": [heads], "lr": 10 * args.lr}],
                                lr=args.lr)
    scheduler = training.WarmupMultiStepLR(optimizer, args.milestones, args.gamma, args.warmup_epochs, 0.01)
    lrs = []
    for _ in range(args.epochs):
        lrs.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    # linear warm-up over 10 epochs from 0.01 x, then 5e-6; x0.5 at epochs 40 and 60 (0-based)
    assert lrs[0] == pytest.approx([5e-8, 5e-7]) and lrs[1] == pytest.approx([5.45e-7, 5.45e-6])
    assert lrs[9] == pytest.approx([4.505e-6, 4.505e-5]) and lrs[10] == lrs[11] == pytest.approx([5e-6, 5e-5])
    assert lrs[40] == pytest.approx([2.5e-6, 2.5e-5]) and lrs[69] == pytest.approx([1.25e-6, 1.25e-5])


@pytest.fixture(scope="module")
def trained_run(hand_data, tiny_vit_checkpoint, tmp_path_factory):
    import eval_query_gallery_clip_zeroshot
    import train_handid
    root = tmp_path_factory.mktemp("handid_runs")
    out = train_handid.main(["--data_dir", hand_data, "--f_name", str(root), "--m_name", "handid",
                             "--backbone_name", tiny_vit_checkpoint, *QUIET, *RUN])
    zero_shot = eval_query_gallery_clip_zeroshot.main(
        ["--test_dir", hand_data, "--f_name", str(root / "zs"), "--backbone_name", tiny_vit_checkpoint,
         "--input_size", "64", "64", "--gallery", "both", *QUIET[:2], *QUIET[3:]])
    return {"root": root, "out": out, "zero_shot": zero_shot}


def test_training_beats_zero_shot(trained_run):
    out, zero_shot = trained_run["out"], trained_run["zero_shot"]
    tuned, zs = out["final_test"]["summary"]["own"]["mean"], zero_shot["summary"]["own"]["mean"]
    # own gallery, hand mAP: zero-shot 0.29; this recipe gave 0.35 at --seed 0 (see the README for seeds 0-2)
    assert tuned["mAP_hand"] > zs["mAP_hand"] + 0.03, (zs["mAP_hand"], tuned["mAP_hand"])
    with open(os.path.join(out["out_dir"], "config.json")) as f:
        config = json.load(f)
    assert config["method"] == "handid" and config["model"]["kind"] == "handid"
    assert config["model"]["reference_no_grad_text"] is False and config["retrieval_feature_dim"] == 64 + 32
    with open(os.path.join(out["out_dir"], "metrics.csv")) as f:
        header = f.readline().strip().split(",")
    assert {"loss_id", "loss_id_proj", "loss_i2t", "loss_t2i", "val_mAP", "lr_heads"} <= set(header)


def test_evaluator_reproduces_the_final_test(trained_run, hand_data):
    import eval_query_gallery_finetune
    out = trained_run["out"]
    results = eval_query_gallery_finetune.main(
        ["--test_dir", hand_data, "--f_name", str(trained_run["root"]), "--m_name", "handid",
         "--out_dir", str(trained_run["root"] / "eval"), "--gallery", "both", *QUIET[:2], *QUIET[3:]])
    for key in ("rank1", "rank5", "mAP_hand"):
        assert results["summary"]["own"]["mean"][key] == pytest.approx(
            out["final_test"]["summary"]["own"]["mean"][key], abs=1e-6), key


def test_bad_template_stops_with_a_clear_error(hand_data, tiny_vit_checkpoint, tmp_path):
    import train_handid
    with pytest.raises(SystemExit, match="prompt_template"):
        train_handid.main(["--data_dir", hand_data, "--f_name", str(tmp_path), "--backbone_name", tiny_vit_checkpoint,
                           "--prompt_template", "A photo of a hand", *QUIET])


@pytest.mark.parametrize("select_by, best_epoch", [("val_mAP", 2), ("val_acc", 1)])
def test_select_by_picks_net_best(tmp_path, select_by, best_epoch):
    import logging
    from utils import distributed, runs
    info, log, history, best = distributed.DistInfo(), logging.getLogger("test_select_by"), [], None
    for number, val_acc, val_map in ((1, 0.9, 0.3), (2, 0.5, 0.6)):
        row = {"epoch": number, "lr": 0.1, "loss": 1.0, "train_acc": 0.5, "val_acc": val_acc, "val_rank1": 0.2,
               "val_mAP": val_map, "epoch_seconds": 1.0}
        best = runs.end_of_epoch(str(tmp_path), row, history, best, log, info, 2, {}, {"epoch": number},
                                 plot=False, select_by=select_by)
    assert best["epoch"] == best_epoch
    assert torch.load(tmp_path / "net_best.pth", weights_only=True)["epoch"] == best_epoch
