"""CLIP-ReID: prompt learner, truncated text tower, two-stage training (train_clipreid.py)."""
import pytest
import torch

import clip
import models


@pytest.fixture(scope="module")
def tiny_clip(tiny_vit_checkpoint):
    model, _ = clip.load(tiny_vit_checkpoint, device="cpu")
    return model


def fresh_text_encoder(tiny_vit_checkpoint, num_classes=5, template=models.DEFAULT_PROMPT_TEMPLATE, **kwargs):
    model, _ = clip.load(tiny_vit_checkpoint, device="cpu")
    torch.manual_seed(0)
    return models.PromptTextEncoder(model, num_classes, template, **kwargs)


def test_template_parsing_counts_placeholders():
    tokens, positions, eot = models.parse_prompt_template("A photo of a X X X X hand.")
    assert positions == [5, 6, 7, 8] and eot == 11
    assert tokens[eot] == 49407 and tokens[9] == clip.tokenize("hand")[0, 1]
    _, positions, eot = models.parse_prompt_template("X X hand of X.")
    assert positions == [1, 2, 5] and eot == 7


@pytest.mark.parametrize("template", ["A photo of a hand.", "A photo of a " + "word " * 80 + "X."])
def test_template_without_placeholder_or_too_long_is_refused(template):
    with pytest.raises(ValueError, match="--prompt_template"):
        models.parse_prompt_template(template)


def test_prompt_splice_positions_and_end_token(tiny_clip):
    torch.manual_seed(0)
    learner = models.PromptLearner(4, "A photo of a X X X X hand.", tiny_clip.token_embedding)
    assert learner.cls_ctx.shape == (4, 4, tiny_clip.token_embedding.weight.shape[1])
    assert 0.015 < learner.cls_ctx.std().item() < 0.025  # N(0, 0.02^2) initialisation
    labels = torch.tensor([2, 0, 2])
    embeds = learner(labels)
    template = tiny_clip.token_embedding(clip.tokenize("A photo of a X X X X hand.")[0, :12]).detach()
    assert embeds.shape == (3, 12, template.shape[1])
    for row, label in enumerate(labels):
        torch.testing.assert_close(embeds[row, 5:9], learner.cls_ctx[label].detach(), rtol=0, atol=0)
        # every other position is the template's own embedding, the end token included
        keep = [0, 1, 2, 3, 4, 9, 10, 11]
        torch.testing.assert_close(embeds[row, keep], template[keep], rtol=0, atol=0)
    eot_embedding = tiny_clip.token_embedding.weight[49407].detach()
    torch.testing.assert_close(embeds[:, learner.eot_index], eot_embedding.expand(3, -1), rtol=0, atol=0)


def test_truncated_text_tower_equals_full_tower(tiny_vit_checkpoint):
    short = fresh_text_encoder(tiny_vit_checkpoint)
    full = fresh_text_encoder(tiny_vit_checkpoint, full_length=True)
    full.prompt_learner.cls_ctx.data.copy_(short.prompt_learner.cls_ctx.data)
    assert short.prompt_learner.template_embeds.shape[1] == 12
    assert full.prompt_learner.template_embeds.shape[1] == 77
    labels = torch.tensor([0, 3, 4, 3])
    with torch.no_grad():
        torch.testing.assert_close(short(labels), full(labels), rtol=1e-5, atol=1e-5)
        # and the plain template through CLIP's own encode_text matches the learner's layout
        plain = fresh_text_encoder(tiny_vit_checkpoint, template="A photo of a X X X X hand.")
        word = plain.clip_model.token_embedding.weight[clip.tokenize("X")[0, 1]]
        plain.prompt_learner.cls_ctx.data[:] = word
        expected = plain.clip_model.encode_text(clip.tokenize("A photo of a X X X X hand."))
        torch.testing.assert_close(plain(torch.tensor([1])), expected, rtol=1e-5, atol=1e-5)


def test_text_tower_is_frozen_and_only_prompts_get_gradients(tiny_vit_checkpoint):
    encoder = fresh_text_encoder(tiny_vit_checkpoint)
    trainable = [name for name, p in encoder.named_parameters() if p.requires_grad]
    assert trainable == ["prompt_learner.cls_ctx"]
    features = encoder(torch.tensor([0, 1, 1, 4]))
    features.pow(2).sum().backward()
    grad = encoder.prompt_learner.cls_ctx.grad
    assert grad is not None and grad[[0, 1, 4]].abs().sum() > 0 and grad[[2, 3]].abs().sum() == 0
    assert all(p.grad is None for p in encoder.clip_model.parameters())
    assert encoder.clip_model.visual is None
