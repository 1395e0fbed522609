"""PromptSG (models.py section PROMPTSG, train_promptsg.py) on tiny CLIP checkpoints.

The first tests check what the CLIP-FH thesis code got wrong: the pseudo-word sits inside the
token sequence, the prompt feature changes the fused output (the attention has many keys), and the
losses train the inversion network and the cross-attention's query path. The interaction's blocks
start as the identity and the fused feature at the global token, so a new model starts from CLIP's
own feature; the tests of what the text does give the blocks' residual branches weights first, as
the first optimiser steps do."""
import copy
import json
import os
import re

import pytest
import torch

import clip
import losses
import models
import prompt_models
import train_promptsg

INPUT_SIZE = {"vit": (32, 32), "rn": (64, 64)}


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def build_model(checkpoint, kind, num_classes=4, seed=0, **kwargs):
    """A PromptSG model on a tiny checkpoint; its config.json "model" entry is model.test_config."""
    torch.manual_seed(seed)
    spec = models.backbone_spec(checkpoint, INPUT_SIZE[kind], patch_stride=8, last_stride=1)
    clip_model = models.load_clip_model(spec, weights="pretrained")
    config = models.promptsg_model_config(spec, **kwargs)
    if kind == "rn":
        # random CLIP ResNets start every residual branch at zero (bn3.weight = 0); make sure the stem's own
        # bn3 is not zeroed as well, or every image would get the same features
        torch.nn.init.ones_(clip_model.visual.bn3.weight)
    model = models.build_promptsg_model(config, num_classes, clip_model)
    model.test_config = config
    return model


@pytest.fixture(scope="module")
def prototypes(tiny_vit_checkpoint, tiny_rn_checkpoint):
    return {"vit": build_model(tiny_vit_checkpoint, "vit"), "rn": build_model(tiny_rn_checkpoint, "rn")}


@pytest.fixture(params=["vit", "rn"])
def tiny_model(request, prototypes):
    """(fresh copy of a tiny PromptSG model, "vit" | "rn")."""
    return copy.deepcopy(prototypes[request.param]), request.param


@pytest.fixture
def vit_model(prototypes):
    return copy.deepcopy(prototypes["vit"])


def as_after_training(model, std=0.05):
    """Weights in the interaction blocks' residual branches (zero at initialisation), as a few
    optimiser steps give them, so that the text can steer the fused feature."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in model.interaction.blocks:
            for layer in (block.attn.out_proj, block.mlp.c_proj):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * std)
    return model


def batch(kind, n=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, *INPUT_SIZE[kind], generator=generator)
    labels = torch.arange(n) // 4  # two identities x 4 images, as a PK batch
    return images, labels


# ---- the composed prompt ----

def test_template_tokens_put_one_placeholder_at_s_star():
    tokens, pseudo_index, eot_index = prompt_models.composed_prompt_tokens("A photo of a S* hand.")
    assert torch.equal(tokens, clip.tokenize("A photo of a x hand.")[0])
    assert int(tokens[pseudo_index]) == int(clip.tokenize("x")[0, 1])
    assert eot_index == int(tokens.argmax()) == 8  # sot a photo of a x hand . eot
    _, pseudo_index, eot_index = prompt_models.composed_prompt_tokens("S* is a hand")
    assert (pseudo_index, eot_index) == (1, 5)


@pytest.mark.parametrize("template", ["A photo of a hand.", "A S* photo of a S* hand.", "S*" + " hand" * 80],
                         ids=["no S*", "two S*", "too long"])
def test_bad_template_is_refused(template):
    with pytest.raises(ValueError, match="prompt_template"):
        prompt_models.composed_prompt_tokens(template)


def test_pseudo_token_sits_at_s_star_and_end_token_survives(vit_model):
    model = vit_model.eval()
    text = model.text
    template = text.token_embedding(clip.tokenize("A photo of a x hand.")[0, :9])
    pseudo = torch.randn(3, template.shape[1])
    embeds = model.compose_prompt_embeddings(pseudo)
    assert embeds.shape == (3, 9, template.shape[1])
    assert torch.equal(embeds[:, model.pseudo_index], pseudo)
    others = [i for i in range(9) if i != model.pseudo_index]
    assert torch.equal(embeds[:, others], template[others].expand(3, -1, -1))
    eot_embedding = text.token_embedding.weight[int(clip.tokenize("")[0, 1])]
    assert torch.equal(embeds[:, -1], eot_embedding.expand(3, -1))
    # with the embedding of the word "x" as the pseudo-token, the composed feature is exactly CLIP's
    # text feature of the sentence: the real text tower, end-token pooling and text_projection
    with torch.no_grad():
        word = template[model.pseudo_index].expand(1, -1)
        composed = text.encode_text_embeddings(model.compose_prompt_embeddings(word), torch.tensor([8]))
        reference = text.encode_text(clip.tokenize("A photo of a x hand."))
    torch.testing.assert_close(composed, reference)


def test_fixed_prompt_is_encoded_once(vit_model, monkeypatch):
    model = as_after_training(vit_model).eval()
    with torch.no_grad():
        expected = model.text.encode_text(clip.tokenize("A photo of a hand."))[0]
    torch.testing.assert_close(model.fixed_text_feature, expected)
    images, _ = batch("vit", 4)
    with torch.no_grad():
        composed = model.retrieval_feature(model.visual.forward_features(images), inference_prompt="composed")

    def no_text_tower(*args, **kwargs):
        raise AssertionError("the text tower ran at inference with the fixed prompt")
    monkeypatch.setattr(model.text, "encode_text_embeddings", no_text_tower)
    with torch.no_grad():
        fixed = model(images)
    assert fixed.shape == (4, model.width)
    assert not torch.allclose(fixed, composed, atol=1e-4)  # the guiding prompt matters at test time too
    model.inference_prompt = "composed"
    with pytest.raises(AssertionError, match="text tower"):
        model(images)


# ---- the start from CLIP's own feature; the text really matters ----

@pytest.mark.parametrize("pool", ["global", "mean"])
def test_a_new_model_starts_from_clips_own_feature(tiny_model, pool):
    model, kind = tiny_model
    model.interaction.pool = pool
    model.eval()
    images, _ = batch(kind, 4)
    with torch.no_grad():
        features = model.visual.forward_features(images)
        sequence = torch.randn(4, 6, model.width)
        assert torch.equal(model.interaction.blocks(sequence), sequence)  # zero residual branches: the identity
        fused = model(images)
        clip_feature = model.interaction.ln_post(features["proj"])  # ln_post: centring and scale only
    start = torch.nn.functional.cosine_similarity(fused, clip_feature, dim=1)
    if pool == "global":  # the default
        assert (start > 0.9999).all()
    else:  # the mean over all tokens, in which the global token weighs 1 / (2 + grid)
        assert (start < 0.999).any()


def test_prompt_feature_changes_fused_output(tiny_model):
    model, kind = tiny_model
    as_after_training(model).eval()
    images, _ = batch(kind, 4)
    with torch.no_grad():
        features = model.visual.forward_features(images)
        text_a = model.fixed_text_feature.expand(4, -1)
        text_b = model.text.encode_text(clip.tokenize(["A photo of a left palm."] * 4))
        fused_a, weights_a = model.fuse(features, text_a, return_weights=True)
        fused_b, weights_b = model.fuse(features, text_b, return_weights=True)
    assert weights_a.shape[-1] == features["tokens"].shape[1]  # keys: global + every patch token
    assert (fused_a - fused_b).abs().max() > 1e-2
    # the attention itself depends on the query (with one key, as in the thesis code, it could not)
    assert (weights_a - weights_b).abs().max() > 1e-4


@pytest.mark.parametrize("lambda_sc", [0.0, 0.5])
def test_losses_train_inversion_and_query_path(tiny_model, lambda_sc):
    model, kind = tiny_model
    as_after_training(model).train()
    criterion = losses.PromptSGLoss(model, lambda_sc=lambda_sc)
    images, labels = batch(kind)
    loss, terms, logits = criterion(images, labels)
    assert set(terms) == {"loss_id", "loss_triplet", "loss_supcon"} and logits.shape == (8, 4)
    loss.backward()

    def grad_norm(param):
        return 0.0 if param.grad is None else float(param.grad.norm())
    # even without the contrastive term (lambda_sc 0), ID + triplet reach the pseudo-word
    for name, param in model.inversion.named_parameters():
        assert grad_norm(param) > 0, f"no gradient in inversion.{name}"
    assert grad_norm(model.interaction.cross_attn.q_proj.weight) > 0
    assert grad_norm(model.interaction.cross_attn.k_proj.weight) > 0
    assert grad_norm(model.visual.conv1.weight) > 0
    if kind == "rn":
        assert grad_norm(model.token_proj.weight) > 0
    assert all(p.grad is None for p in model.text.parameters())  # the text tower is frozen


def test_contrastive_loss_alone_trains_the_inversion_network(vit_model):
    model = vit_model.train()
    images, labels = batch("vit")
    _, features = model(images, labels)
    losses.symmetric_supcon(features["image"], features["text"], labels, 0.07).backward()
    assert float(model.inversion.mlp[0].weight.grad.norm()) > 0
    assert model.interaction.cross_attn.q_proj.weight.grad is None  # the SupCon term does not use the fusion


def test_model_rebuilds_from_config_and_state_dict(tiny_model):
    model, kind = tiny_model
    config = {"model": json.loads(json.dumps(model.test_config)), "num_classes": 4}  # as read from config.json
    rebuilt = models.build_model_from_config(config)
    models.load_model_weights(rebuilt, models.image_side_state_dict(model), "test checkpoint")
    model.eval(), rebuilt.eval()
    earlier = {k: v for k, v in config["model"].items() if k != "pool"}  # a run from before --pool
    assert models.build_model_from_config({"model": earlier, "num_classes": 4}).interaction.pool == "mean"
    images, _ = batch(kind, 4)
    with torch.no_grad():
        for prompt in models.INFERENCE_PROMPTS:
            model.inference_prompt = rebuilt.inference_prompt = prompt
            torch.testing.assert_close(rebuilt(images), model(images))


# ---- train_promptsg.py and the evaluator on the synthetic 11k data ----

def train_args(synthetic_11k, f_name, m_name, checkpoint, *extra):
    return ["--data_dir", os.path.join(synthetic_11k, "train_val_test_split_dorsal_r"), "--f_name", str(f_name),
            "--m_name", m_name, "--backbone_name", checkpoint, "--input_size", "32", "32", "--stride", "8",
            "--batch_size", "8", "--num_workers", "0", "--device", "cpu", "--no-progress", *extra]


def own_gallery_map(results):
    return results["summary"]["own"]["mean"]["mAP_hand"]


@pytest.fixture(scope="module")
def trained_run(synthetic_11k, tiny_vit_checkpoint, tmp_path_factory):
    """A short PromptSG run (net_best on val, final test with both prompts) and the zero-shot results
    of the same tiny checkpoint."""
    import eval_query_gallery_clip_zeroshot
    root = tmp_path_factory.mktemp("promptsg_runs")
    out = train_promptsg.main(train_args(synthetic_11k, root, "psg", tiny_vit_checkpoint, "--epochs", "12",
                                         "--lr", "1e-3", "--milestones", "9", "--eval_every", "6",
                                         "--save_every", "6"))
    zero_shot = eval_query_gallery_clip_zeroshot.main([
        "--test_dir", os.path.join(synthetic_11k, "train_val_test_split_dorsal_r"), "--f_name", str(root / "zs"),
        "--backbone_name", tiny_vit_checkpoint, "--input_size", "32", "32", "--num_workers", "0", "--device", "cpu",
        "--gallery", "both"])
    return {"root": root, "out": out, "zero_shot": zero_shot}


def test_training_beats_zero_shot(trained_run):
    out, zero_shot = trained_run["out"], trained_run["zero_shot"]
    fixed, composed = (own_gallery_map(out["final_test"][p]) for p in ("fixed", "composed"))
    # mAP on the own gallery (8 test identities): zero-shot 0.30; this recipe gave 0.36 to 0.48 (fixed)
    # and 0.39 to 0.53 (composed) over --seed 0..3
    assert fixed > own_gallery_map(zero_shot) + 0.04, (fixed, own_gallery_map(zero_shot))
    assert composed > own_gallery_map(zero_shot) + 0.04, (composed, own_gallery_map(zero_shot))
    run_dir = out["out_dir"]
    for name in ("config.json", "train.log", "metrics.csv", "training_curve.png", "net_last.pth", "net_best.pth",
                 "net_6.pth", "net_12.pth", "final_test/results.json", "final_test_composed/results.json"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    assert config["method"] == "promptsg" and config["model"]["kind"] == "promptsg"
    assert config["pretrained"] is None  # a local checkpoint file, no --pretrained
    assert config["model"]["prompt_template"] == "A photo of a S* hand." and config["args"]["lambda_sc"] == 0.5
    assert config["sc_temperature_used"] == pytest.approx(0.07, rel=1e-3)  # the tiny checkpoint's logit scale
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        header = f.readline().strip().split(",")
    assert {"loss_id", "loss_triplet", "loss_supcon", "val_mAP", "lr_heads"} <= set(header)
    assert out["history"][0]["lr_heads"] == pytest.approx(10 * out["history"][0]["lr"])
    assert out["best"]["epoch"] in (6, 12)


@pytest.mark.parametrize("prompt", ["fixed", "composed"])
def test_evaluator_reproduces_the_final_test(trained_run, synthetic_11k, prompt):
    import eval_query_gallery_finetune
    out = trained_run["out"]
    results = eval_query_gallery_finetune.main([
        "--f_name", str(trained_run["root"]), "--m_name", "psg", "--which_epoch", "best",
        "--test_dir", os.path.join(synthetic_11k, "train_val_test_split_dorsal_r"), "--num_workers", "0",
        "--device", "cpu", "--inference_prompt", prompt, "--gallery", "both"])
    assert results["inference_prompt"] == prompt
    for variant in ("own", "all"):
        expected = out["final_test"][prompt]["summary"][variant]["mean"]
        for metric in ("rank1", "mAP_hand"):
            assert results["summary"][variant]["mean"][metric] == pytest.approx(expected[metric], abs=1e-6)


def test_evaluator_refuses_a_feature_the_model_lacks(trained_run, synthetic_11k):
    import eval_query_gallery_finetune
    with pytest.raises(SystemExit, match="pre_proj"):
        eval_query_gallery_finetune.main([
            "--f_name", str(trained_run["root"]), "--m_name", "psg", "--feature", "pre_proj",
            "--test_dir", os.path.join(synthetic_11k, "train_val_test_split_dorsal_r"), "--device", "cpu"])


def test_resume_gives_the_same_weights(synthetic_11k, tiny_vit_checkpoint, tmp_path):
    common = ["--epochs", "2", "--lr", "1e-3", "--eval_every", "1", "--save_every", "0", "--no-final_test"]
    train_promptsg.main(train_args(synthetic_11k, tmp_path, "straight", tiny_vit_checkpoint, *common))
    stopped = train_args(synthetic_11k, tmp_path, "resumed", tiny_vit_checkpoint, *common)
    stopped[stopped.index("--epochs") + 1] = "1"
    train_promptsg.main(stopped)
    train_promptsg.main(train_args(synthetic_11k, tmp_path, "resumed", tiny_vit_checkpoint, *common, "--resume"))
    straight = torch.load(tmp_path / "straight" / "net_last.pth", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "net_last.pth", weights_only=True)
    assert resumed["epoch"] == straight["epoch"] == 2
    for key, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=0, msg=key)
    assert resumed["history"][-1]["loss"] == straight["history"][-1]["loss"]
    # a resumed run keeps its model: another prompt template is refused
    with pytest.raises(SystemExit, match="prompt_template"):
        train_promptsg.main(train_args(synthetic_11k, tmp_path, "resumed", tiny_vit_checkpoint, *common, "--resume",
                                       "--prompt_template", "A picture of S*."))


@pytest.mark.parametrize("extra, message", [
    (["--prompt_template", "A photo of a hand."], "S\\*"),
    (["--lambda_sc", "-1"], "--lambda_sc"),
    (["--sc_temperature", "0"], "--sc_temperature"),
    (["--batch_size", "1"], "--batch_size"),
    (["--inference_prompt", "simplified"], "--inference_prompt"),
])
def test_bad_flags_stop_with_a_clear_error(synthetic_11k, tiny_vit_checkpoint, tmp_path, extra, message, capsys):
    with pytest.raises(SystemExit) as info:
        train_promptsg.main(train_args(synthetic_11k, tmp_path, "bad", tiny_vit_checkpoint, *extra))
    text = str(info.value) + capsys.readouterr().err
    assert re.search(message, text), text
    assert not os.path.exists(tmp_path / "bad" / "net_last.pth")


def test_data_dir_without_train_folder_is_refused(tiny_vit_checkpoint, tmp_path):
    args = train_args(str(tmp_path), tmp_path, "bad", tiny_vit_checkpoint)
    with pytest.raises(SystemExit, match="train"):
        train_promptsg.main(args)
