"""CLIP-HandID (nathanlem1/CLIP-HandID, IPTA 2025): the fine-tuning model plus textual inversion.

An inversion network maps each image's CLIP embedding to one pseudo-word S*; the frozen text tower
encodes "A photo of a S* hand" with S* spliced in at the position of the rare word "sks"; the
image-text supervised contrastive losses pull each image towards its identity's composed prompts.
The retrieval feature is that of the fine-tuning model: both BNNeck features, concatenated.

Unlike the released code, gradients flow through the frozen text tower into the inversion network
(the paper describes S* as learned). no_grad_text=True reproduces the released code's forward: its
text path runs under torch.no_grad and never reshapes the inversion output, so S* receives the
scalar mean of that output (a LayerNorm output: 0) in every dimension, and every image of a batch
gets one and the same text feature.

The optional interaction branch lets the composed-prompt feature attend over the image's token
sequence (global + patch tokens, as PromptSG's cross-attention); the released code calls
nn.MultiheadAttention on 2-D (batch, width) tensors, which attends across the images of a batch.
"""
import torch
import torch.nn as nn

import clip
from models import HandReIDModel, bnneck, linear_classifier, load_clip_model, register_model
from prompt_models import MultimodalInteraction, composed_prompt_tokens, encode_spliced_prompt, visual_tokens
from utils.errors import TrainingInputError

HANDID_TEMPLATE = "A photo of a S* hand"
HANDID_PLACEHOLDER_WORD = "sks"  # the rare word the reference tokenizes where S* goes
HANDID_FEATURE = "concat_bn"  # the reference's test feature: cat(BN(pre_proj), BN(proj))
INPUT_NORMS = ("clip", "imagenet")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def placeholder_prompt_tokens(template, word=HANDID_PLACEHOLDER_WORD, context_length=77):
    """Token ids of `template` up to its end token with `word`'s id where S* stands, and S*'s position."""
    tokens, pseudo_index, eot_index = composed_prompt_tokens(template, context_length)
    word_ids = clip.tokenize([word])[0]
    if int(word_ids.argmax()) != 2:  # [start, word, end]
        raise TrainingInputError(f"placeholder word {word!r} is more than one token")
    tokens[pseudo_index] = word_ids[1]
    return tokens[:eot_index + 1], pseudo_index


class TextualInversionMLP(nn.Module):
    """Image embedding (in_dim) -> one pseudo-word (token_dim): two blocks of Linear to 4 x in_dim,
    LayerNorm, GELU, Dropout, then Linear to token_dim and LayerNorm (as in CLIP-HandID)."""

    def __init__(self, in_dim, token_dim, dropout=0.5):
        super().__init__()
        hidden = 4 * in_dim
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden, token_dim), nn.LayerNorm(token_dim))

    def forward(self, image_feature):
        return self.mlp(image_feature.float())


class HandIDModel(HandReIDModel):
    """HandReIDModel (image encoder + two BNNeck heads) + textual inversion + frozen text tower, and
    with interaction=True a text-guided branch with its own BNNeck and classifier.

    Training forward: (scores, features): scores = [logits on BN(pre_proj), on BN(proj)] (+ on the
    interaction feature), features = forward_features' entries + "text" (composed-prompt feature),
    "pseudo_token" (+ "interaction"). Eval forward: the retrieval feature `self.feature`; with the
    interaction branch, the concat features end with that branch's feature.
    input_norm="imagenet" re-normalises the CLIP-normalised input with ImageNet's mean/std inside
    the model, so training and every evaluation see what the reference's transforms give."""

    def __init__(self, clip_model, num_classes, prompt_template=HANDID_TEMPLATE, feature=HANDID_FEATURE,
                 interaction=False, no_grad_text=False, interaction_blocks=2, input_norm="clip",
                 interaction_keys="tokens"):
        visual = clip_model.visual
        super().__init__(visual, num_classes, feature=feature)
        del clip_model.visual  # what remains is the text tower
        self.text = clip_model.requires_grad_(False)
        self.no_grad_text = bool(no_grad_text)
        token_dim = self.text.token_embedding.weight.shape[1]
        self.inversion = TextualInversionMLP(self.in_planes_proj, token_dim)
        if self.no_grad_text:  # the released code's text path never gives these weights a gradient; frozen,
            self.inversion.requires_grad_(False)  # so that DDP does not wait for one
        self.prompt_template = prompt_template
        tokens, self.pseudo_index = placeholder_prompt_tokens(prompt_template, context_length=self.text.context_length)
        self.register_buffer("prompt_tokens", tokens, persistent=False)
        self.interaction, self.interaction_keys = None, interaction_keys
        if interaction:  # the output at the text token, as an attention module's output is its query's
            self.interaction = MultimodalInteraction(self.in_planes_proj, max(1, self.in_planes_proj // 64),
                                                     interaction_blocks, pool="text" if interaction_keys == "tokens"
                                                     else "mean")
            self.is_vit = hasattr(self.visual, "proj")
            if interaction_keys == "tokens" and not self.is_vit:  # layer4 tokens -> the CLIP embedding's width
                self.token_proj = nn.Linear(self.in_planes, self.in_planes_proj)
            self.bottleneck_text = bnneck(self.in_planes_proj)
            self.classifier_text = linear_classifier(self.in_planes_proj, num_classes)
        if input_norm not in INPUT_NORMS:
            raise TrainingInputError(f"--norm must be one of {', '.join(INPUT_NORMS)}, got {input_norm!r}")
        self.input_norm = input_norm
        # x_imagenet = x_clip * scale + shift, per channel
        clip_mean, clip_std = torch.tensor(clip.CLIP_MEAN), torch.tensor(clip.CLIP_STD)
        in_mean, in_std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self.register_buffer("norm_scale", (clip_std / in_std)[:, None, None], persistent=False)
        self.register_buffer("norm_shift", ((clip_mean - in_mean) / in_std)[:, None, None], persistent=False)

    def train(self, mode=True):
        super().train(mode)
        self.text.eval()  # frozen tower (it has no dropout or batch norm either)
        return self

    def feature_dim(self, feature=None):
        dim = super().feature_dim(feature)
        if self.interaction is not None and (feature or self.feature).startswith("concat"):
            dim += self.in_planes_proj
        return dim

    def encode_text(self, image_feature):
        """(composed-prompt text features (N, embed_dim), pseudo-tokens (N, token_dim)). With
        no_grad_text, as the released code: under no_grad, and S* = the mean of the whole inversion
        output broadcast to every image and dimension."""
        if not self.no_grad_text:
            pseudo_tokens = self.inversion(image_feature)
            return encode_spliced_prompt(self.text, self.prompt_tokens, self.pseudo_index, pseudo_tokens), pseudo_tokens
        with torch.no_grad():
            pseudo_tokens = self.inversion(image_feature)
            spliced = pseudo_tokens.mean().expand_as(pseudo_tokens)
            return encode_spliced_prompt(self.text, self.prompt_tokens, self.pseudo_index, spliced), pseudo_tokens

    def interact(self, features, text_feature, return_weights=False):
        """The text feature (query) attends over the image's tokens (interaction_keys), then the blocks."""
        if self.interaction_keys == "tokens":
            keys = visual_tokens(self.visual, features, None if self.is_vit else self.token_proj)
        else:
            keys = features["proj"][:, None]
        return self.interaction(text_feature, keys, return_weights)

    def image_features(self, images):
        if self.input_norm == "imagenet":
            images = images * self.norm_scale.to(images.dtype) + self.norm_shift.to(images.dtype)
        return self.visual.forward_features(images)

    def forward(self, images, labels=None):
        features = self.image_features(images)
        if not self.training:
            return self.retrieval_feature(features)
        text, pseudo_tokens = self.encode_text(features["proj"])
        scores = self.classify(self.bottleneck(features["pre_proj"]), self.bottleneck_proj(features["proj"]))
        features = dict(features, text=text, pseudo_token=pseudo_tokens)
        if self.interaction is not None:
            features["interaction"] = self.interact(features, text)
            scores.append(self.classifier_text(self.bottleneck_text(features["interaction"])))
        return scores, features

    def retrieval_feature(self, features, feature=None):
        feature = feature or self.feature
        out = super().retrieval_feature(features, feature)
        if self.interaction is None or not feature.startswith("concat"):
            return out
        fused = self.interact(features, self.encode_text(features["proj"])[0])
        return torch.cat([out, self.bottleneck_text(fused) if feature.endswith("_bn") else fused], dim=1)

    @torch.no_grad()
    def predict_logits(self, images):
        features = self.image_features(images)
        return self.classify(self.bottleneck(features["pre_proj"]), self.bottleneck_proj(features["proj"]))


def handid_model_config(spec, prompt_template=HANDID_TEMPLATE, feature=HANDID_FEATURE, interaction=False,
                        no_grad_text=False, interaction_blocks=2, input_norm="clip"):
    return {"kind": "handid", "backbone": spec, "prompt_template": prompt_template, "feature": feature,
            "interaction": bool(interaction), "reference_no_grad_text": bool(no_grad_text),
            "interaction_blocks": int(interaction_blocks), "input_norm": input_norm, "interaction_keys": "tokens"}


@register_model("handid")
def build_handid_model(model_config, num_classes, clip_model=None):
    """`clip_model` given (pretrained, both towers) or None (zeroed, for a strict checkpoint load
    right afterwards: checkpoints hold the frozen text tower too)."""
    if clip_model is None:
        clip_model = load_clip_model(model_config["backbone"], weights="empty")
        for tensor in clip_model.state_dict().values():
            if tensor.is_floating_point():
                tensor.zero_()
    return HandIDModel(clip_model, num_classes, prompt_template=model_config.get("prompt_template", HANDID_TEMPLATE),
                       feature=model_config.get("feature", HANDID_FEATURE),
                       interaction=model_config.get("interaction", False),
                       no_grad_text=model_config.get("reference_no_grad_text", False),
                       interaction_blocks=model_config.get("interaction_blocks", 2),
                       input_norm=model_config.get("input_norm", "clip"),
                       interaction_keys=model_config.get("interaction_keys", "global"))  # earlier runs: "global"
