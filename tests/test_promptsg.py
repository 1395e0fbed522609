"""PromptSG (models.py section PROMPTSG, train_promptsg.py) on tiny CLIP checkpoints.

The first tests check what the CLIP-FH thesis code got wrong: the pseudo-word sits inside the
token sequence, the prompt feature changes the fused output (the attention has many keys), and the
losses train the inversion network and the cross-attention's query path."""
import json
import os

import pytest
import torch

import clip
import models
import train_promptsg

INPUT_SIZE = {"vit": (32, 32), "rn": (64, 64)}


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


@pytest.fixture(params=["vit", "rn"])
def tiny_model(request, tiny_vit_checkpoint, tiny_rn_checkpoint):
    checkpoint = tiny_vit_checkpoint if request.param == "vit" else tiny_rn_checkpoint
    return build_model(checkpoint, request.param), request.param


def batch(kind, n=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, *INPUT_SIZE[kind], generator=generator)
    labels = torch.arange(n) // 4  # two identities x 4 images, as a PK batch
    return images, labels


# ---- the composed prompt ----

def test_template_tokens_put_one_placeholder_at_s_star():
    tokens, pseudo_index, eot_index = models.composed_prompt_tokens("A photo of a S* hand.")
    assert torch.equal(tokens, clip.tokenize("A photo of a x hand.")[0])
    assert int(tokens[pseudo_index]) == int(clip.tokenize("x")[0, 1])
    assert eot_index == int(tokens.argmax()) == 8  # sot a photo of a x hand . eot
    _, pseudo_index, eot_index = models.composed_prompt_tokens("S* is a hand")
    assert (pseudo_index, eot_index) == (1, 5)


@pytest.mark.parametrize("template", ["A photo of a hand.", "A S* photo of a S* hand.", "S*" + " hand" * 80],
                         ids=["no S*", "two S*", "too long"])
def test_bad_template_is_refused(template):
    with pytest.raises(ValueError, match="prompt_template"):
        models.composed_prompt_tokens(template)


def test_pseudo_token_sits_at_s_star_and_end_token_survives(tiny_vit_checkpoint):
    model = build_model(tiny_vit_checkpoint, "vit").eval()
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


def test_fixed_prompt_is_encoded_once(tiny_vit_checkpoint, monkeypatch):
    model = build_model(tiny_vit_checkpoint, "vit").eval()
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


# ---- the text really matters ----

def test_prompt_feature_changes_fused_output(tiny_model):
    model, kind = tiny_model
    model.eval()
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
    model.train()
    criterion = train_promptsg.PromptSGLoss(model, lambda_sc=lambda_sc)
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


def test_contrastive_loss_alone_trains_the_inversion_network(tiny_vit_checkpoint):
    model = build_model(tiny_vit_checkpoint, "vit").train()
    images, labels = batch("vit")
    _, features = model(images, labels)
    train_promptsg.symmetric_supcon(features["image"], features["text"], labels, 0.07).backward()
    assert float(model.inversion.mlp[0].weight.grad.norm()) > 0
    assert model.interaction.cross_attn.q_proj.weight.grad is None  # the SupCon term does not use the fusion


def test_model_rebuilds_from_config_and_state_dict(tiny_model):
    model, kind = tiny_model
    config = {"model": json.loads(json.dumps(model.test_config)), "num_classes": 4}  # as read from config.json
    rebuilt = models.build_model_from_config(config)
    models.load_model_weights(rebuilt, models.image_side_state_dict(model), "test checkpoint")
    model.eval(), rebuilt.eval()
    images, _ = batch(kind, 4)
    with torch.no_grad():
        for prompt in models.INFERENCE_PROMPTS:
            model.inference_prompt = rebuilt.inference_prompt = prompt
            torch.testing.assert_close(rebuilt(images), model(images))
