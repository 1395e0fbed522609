"""Hand re-identification models on the image encoder of a `clip/` backbone, and how to build, save
and reload them (registry, checkpoints). CLIP-ReID's and PromptSG's text-side modules: prompt_models.py.

Backbone contract (clip.model.VisionTransformer and ModifiedResNet keep it; a new backbone must too):
`visual.feature_dims` maps feature names to widths and `visual.forward_features(images)` returns
those (N, width) features: "pre_proj" (ViT: class token after ln_post; RN: pooled layer4), "proj"
(the CLIP embedding, == visual(images)) and one earlier one ("penultimate" / "layer3"), plus
"tokens" (N, 1 + h*w, width): ViT all tokens after ln_post, class token first; RN layer4's mean
token then its spatial tokens. The models below read nothing else of the encoder.

Every trainer saves a config.json whose "model" entry rebuilds its model (build_model_from_config)
without pretrained weights, and checkpoints of the image side (PromptSG's also keep the text tower).
"""
import os

import torch
import torch.nn as nn

import clip
from clip.model import CLIP, ModelBuildError, ModifiedResNet, build_model, infer_config, random_state_dict
from losses import ArcFace
from prompt_models import (PROMPTSG_FIXED_PROMPT, PROMPTSG_TEMPLATE, InversionNetwork, MultimodalInteraction,
                           check_text_tower, composed_prompt_tokens, encode_spliced_prompt,
                           splice_pseudo_token, visual_tokens)
from utils import io, distributed, training, runs, splits
from utils.speed import speed_up_image_encoder, use_compile  # noqa: F401  (the scripts call them as models.*)
from utils.errors import InputFileError, TrainingInputError

# Retrieval features a model can return at evaluation time (see HandReIDModel.retrieval_feature).
FEATURE_CHOICES = ("concat", "concat_bn", "proj", "proj_bn", "pre_proj", "pre_proj_bn")
DEFAULT_FEATURE = "concat"

MODEL_BUILDERS = {}


def register_model(kind):
    """Decorator: `build(model_config, num_classes)` builds the model of a config's "model" entry."""
    def wrap(build):
        MODEL_BUILDERS[kind] = build
        return build
    return wrap


def build_model_from_config(config):
    """Rebuild a trained model from a run's config.json dict, with UNINITIALISED image-encoder
    weights: load a checkpoint's "model" state dict into it right afterwards (load_trained_model)."""
    model_config = config["model"]
    kind = model_config.get("kind", "finetune")
    if kind not in MODEL_BUILDERS:
        raise TrainingInputError(f"config.json names model kind '{kind}', which this version of models.py does "
                                 f"not know (known: {sorted(MODEL_BUILDERS)})")
    return MODEL_BUILDERS[kind](model_config, config["num_classes"])


def backbone_signature(spec):
    """What must agree between a checkpoint and the model it is loaded into."""
    return {"arch": spec.get("arch"), "input_size": list(spec["input_size"]),
            "patch_stride": spec.get("patch_stride"), "last_stride": spec.get("last_stride")}


def describe_backbone(spec):
    arch = spec.get("arch")
    strides = [f"patch_stride {spec.get('patch_stride')}", f"last_stride {spec.get('last_stride')}"]
    if arch:  # only the stride that applies to this architecture
        strides = strides[1:] if is_resnet_arch(arch) else strides[:1]
    return f"{spec.get('name')} (input_size {list(spec['input_size'])}, {', '.join(strides)})"


def check_same_backbone(expected_spec, found_spec, where):
    """Raise TrainingInputError naming `where` if two backbone specs describe different encoders."""
    if backbone_signature(expected_spec) != backbone_signature(found_spec):
        raise TrainingInputError(f"{where} holds a model of backbone {describe_backbone(found_spec)}, but "
                                 f"{describe_backbone(expected_spec)} was expected; use the checkpoint of a run with "
                                 f"the same backbone (see its config.json)")


def load_model_weights(model, state_dict, where):
    """Strict load with an error that names the checkpoint instead of a long key listing."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or wrong:
        details = "; ".join(f"{label}: {keys[:3]}{' ...' if len(keys) > 3 else ''}"
                            for label, keys in (("missing", missing), ("unexpected", unexpected),
                                                ("shape differs", wrong)) if keys)
        raise TrainingInputError(f"{where} does not fit the model rebuilt from config.json ({details}); was it written "
                                 f"by another backbone or model kind?")
    model.load_state_dict(state_dict, strict=True)
    return model


def image_side_state_dict(model):
    """Everything a trained model needs at test time; text towers are never part of these models."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def checkpoint_record(kind, model, spec, epoch, metrics):
    """What net_<epoch>.pth / net_best.pth hold: the image side of a model of `kind`, and its epoch."""
    return {"format": 1, "kind": kind, "epoch": epoch, "backbone": spec,
            "model": image_side_state_dict(model), "metrics": metrics}


RUN_CONFIG_KEYS = ("model.backbone.name", "model.backbone.input_size", "model.backbone.arch", "num_classes")


def read_run_config(run_dir, flag="--run_dir"):
    """config.json of a trainer's run folder, checked for the entries a model is rebuilt from
    (TrainingInputError naming `flag`, the script's way to name the run, when there is none;
    InputFileError when it is damaged)."""
    if not os.path.isfile(os.path.join(run_dir, "config.json")):
        raise TrainingInputError(f"{os.path.join(run_dir, 'config.json')} does not exist: {flag} must name a run "
                                 f"folder a CLIP-FH trainer wrote")
    return io.read_config(run_dir, required=RUN_CONFIG_KEYS)


def load_trained_model(run_dir, which_epoch="best", device="cpu", flag="--run_dir"):
    """Rebuild the model of a run folder (config.json + net_<which_epoch>.pth) without any pretrained
    download. Returns (model in eval mode on device, config dict, checkpoint dict without weights)."""
    config = read_run_config(run_dir, flag)
    path = training.checkpoint_path(run_dir, which_epoch)
    if not os.path.isfile(path):
        saved = sorted(n for n in os.listdir(run_dir) if n.startswith("net_") and n.endswith(".pth"))
        raise TrainingInputError(f"{path} does not exist; this run has {saved or 'no checkpoints'}")
    checkpoint = training.load_checkpoint(path)
    if "model" not in checkpoint:
        raise TrainingInputError(f"{path} is not a CLIP-FH checkpoint (no 'model' entry)")
    if "backbone" in checkpoint:
        check_same_backbone(config["model"]["backbone"], checkpoint["backbone"], path)
    try:
        model = build_model_from_config(config)
    except (KeyError, TypeError, ValueError) as err:  # a hand-edited "model" entry
        raise InputFileError(f"{os.path.join(run_dir, 'config.json')}: its model entry cannot be built ({err!r}); "
                             f"restore the file or train again") from None
    load_model_weights(model, checkpoint.pop("model"), path)
    return model.to(device).eval(), config, checkpoint


# ---- backbones ----

def backbone_spec(name, input_size=(224, 224), patch_stride=None, last_stride=1, pos_interp="bilinear"):
    """How to build a backbone: the `clip.load` name or checkpoint path and the input geometry.
    patch_stride applies to ViTs only, last_stride to ResNets only (1: layer4 at 1/16 of the input,
    as in CLIP-HandID; patch_stride None: the patch size). pos_interp: how the pretrained positional
    embedding is resized to the input's token grid (bilinear as CLIP-ReID and CLIP-HandID, or
    bicubic). load_backbone fills "arch" (the CLIP constructor arguments) so the model can be
    rebuilt without the pretrained file."""
    return {"name": name, "input_size": [int(s) for s in input_size],
            "patch_stride": None if patch_stride is None else int(patch_stride),
            "last_stride": int(last_stride), "pos_interp": pos_interp, "arch": None}


def is_resnet_arch(arch):
    return isinstance(arch["vision_layers"], (tuple, list))


def _geometry(spec, arch):
    if is_resnet_arch(arch):
        return dict(input_size=tuple(spec["input_size"]), patch_stride=None, last_stride=spec["last_stride"])
    return dict(input_size=tuple(spec["input_size"]), patch_stride=spec["patch_stride"], last_stride=2)


def _jsonable_arch(arch):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in arch.items()}


def load_clip_model(spec, weights="pretrained", download_root=None, text_tower=True):
    """The CLIP model (fp32) described by `spec`, or with text_tower=False only its image encoder.

    weights="pretrained": from clip.load(spec["name"]) (an official name, downloaded if needed, or a
      checkpoint path); records the architecture in spec["arch"].
    weights="random": CLIP-style random weights built from spec["arch"] (no file needed).
    weights="empty": uninitialised tensors shaped from spec["arch"], fast; only for loading a
      checkpoint that holds every weight right afterwards (strict load)."""
    if weights == "pretrained":
        kwargs = {"download_root": download_root} if download_root else {}
        clip_model, _ = clip.load(spec["name"], device="cpu", jit=False, **kwargs)
        state_dict = clip_model.state_dict()
        del clip_model
        spec["arch"] = _jsonable_arch(infer_config(state_dict))
    elif not spec.get("arch"):
        raise TrainingInputError(f"backbone '{spec['name']}' has no recorded architecture ('arch'); cannot "
                                 f"rebuild it without its pretrained weights")
    arch = dict(spec["arch"])
    if is_resnet_arch(arch):
        arch["vision_layers"] = tuple(arch["vision_layers"])
    elif spec["patch_stride"] is None:  # no --stride: the backbone's own patch size, no overlap
        spec["patch_stride"] = int(arch["vision_patch_size"])
    geometry = _geometry(spec, spec["arch"])
    try:
        if weights == "empty":
            with torch.device("meta"):
                model = CLIP(**arch, **geometry)
            return model.visual.to_empty(device="cpu") if not text_tower else model.to_empty(device="cpu").eval()
        if weights == "random":
            state_dict = random_state_dict(arch, seed=0)
        elif weights != "pretrained":
            raise TrainingInputError(f"weights must be pretrained, random or empty, got {weights!r}")
        model = build_model(state_dict, **geometry, interpolation=spec.get("pos_interp", "bilinear")).float()
    except ModelBuildError as err:
        raise TrainingInputError(f"backbone {spec['name']}: {err} (--input_size, --stride, --last_stride)") from None
    return model if text_tower else model.visual


def load_backbone(spec, weights="pretrained", download_root=None):
    """The image encoder alone (see load_clip_model)."""
    return load_clip_model(spec, weights, download_root, text_tower=False)


def load_pretrained(spec, download_root, dist_info, text_tower=True):
    """load_clip_model(spec, "pretrained") in every process of a run; rank 0 first, so that only it
    downloads."""
    with distributed.rank0_first(dist_info):
        model = load_clip_model(spec, "pretrained", download_root, text_tower)
    if is_resnet_arch(spec["arch"]) and spec["patch_stride"] is not None:  # else config.json would record it
        raise TrainingInputError(f"--stride {spec['patch_stride']} applies to ViT backbones only and {spec['name']} "
                                 f"is a ResNet: leave --stride out (--last_stride sets its layer4 stride)")
    return model


def resumed_run(out_dir, args, class_names):
    """(backbone spec, config.json) of the run being resumed in out_dir (whose flags, backbone and
    geometry included, runs.run_training has made the run's own: utils/resume.py); refuses another set
    of training identities."""
    config = io.read_config(out_dir, required=RUN_CONFIG_KEYS + ("class_names",))
    spec = config["model"]["backbone"]
    if config.get("class_names") != list(class_names):
        raise TrainingInputError(f"{args.data_dir} has other training identities than the run being resumed "
                                 f"in {out_dir}")
    return spec, config


def read_run_checkpoint(spec, path, dist_info):
    """net_last.pth of the run being resumed, checked against this run's backbone and process count."""
    state = training.load_checkpoint(path)
    check_same_backbone(spec, state["backbone"], path)
    runs.check_world_size(state, dist_info, path)
    return state


def resume_from_last(args, out_dir, model, spec, dist_info, log, optimizer, scheduler, scaler, sampler):
    """With --resume: weights and training state from <out_dir>/net_last.pth; returns (its state,
    history, best, epochs done). Without: (None, [], None, 0)."""
    if not args.resume:
        return None, [], None, 0
    path = os.path.join(out_dir, "net_last.pth")
    state = read_run_checkpoint(spec, path, dist_info)
    load_model_weights(model, state["model"], path)
    return (state, *runs.restore_training_state(state, optimizer, scheduler, scaler, sampler, log, path))


# ==== SECTION FINE-TUNE ========================================================================

def bnneck(dim):
    """BatchNorm1d with weight 1 and a frozen zero bias (BNNeck, Luo et al. 2019)."""
    bn = nn.BatchNorm1d(dim)
    nn.init.constant_(bn.weight, 1.0)
    nn.init.constant_(bn.bias, 0.0)
    bn.bias.requires_grad_(False)
    return bn


def linear_classifier(dim, num_classes):
    classifier = nn.Linear(dim, num_classes, bias=False)
    nn.init.normal_(classifier.weight, std=0.001)
    return classifier


class HandReIDModel(nn.Module):
    """CLIP image encoder + two BNNeck heads (CLIP-HandID / CLIP-ReID baseline).

    Heads sit on the pre-projection feature (ViT: CLS after ln_post; RN: pooled layer4) and on the
    projected CLIP embedding. Training forward: (scores, features) where scores = [logits on
    BN(pre_proj), logits on BN(proj)] and features = every pre-BN feature of the encoder's
    forward_features (e.g. "penultimate"/"layer3", "pre_proj", "proj", "tokens").
    Eval forward: the retrieval feature named by `self.feature` (FEATURE_CHOICES).
    """

    def __init__(self, visual, num_classes, feature=DEFAULT_FEATURE, classifier="linear",
                 arcface_s=30.0, arcface_m=0.5):
        super().__init__()
        self.visual = visual
        dims = visual.feature_dims
        self.in_planes, self.in_planes_proj = dims["pre_proj"], dims["proj"]
        self.num_classes = num_classes
        self.bottleneck = bnneck(self.in_planes)
        self.bottleneck_proj = bnneck(self.in_planes_proj)
        if classifier == "linear":
            self.classifier = linear_classifier(self.in_planes, num_classes)
            self.classifier_proj = linear_classifier(self.in_planes_proj, num_classes)
        elif classifier == "arcface":
            self.classifier = ArcFace(self.in_planes, num_classes, s=arcface_s, m=arcface_m)
            self.classifier_proj = ArcFace(self.in_planes_proj, num_classes, s=arcface_s, m=arcface_m)
        else:
            raise TrainingInputError(f"unknown classifier '{classifier}' (linear or arcface)")
        self.classifier_kind = classifier
        self.feature = feature
        self.check_feature(feature)

    @staticmethod
    def check_feature(feature):
        if feature not in FEATURE_CHOICES:
            raise TrainingInputError(f"--feature '{feature}' is not one of {', '.join(FEATURE_CHOICES)}")

    def feature_dim(self, feature=None):
        feature = feature or self.feature
        if feature.startswith("concat"):
            return self.in_planes + self.in_planes_proj
        return self.in_planes_proj if feature.startswith("proj") else self.in_planes

    def classify(self, f_bn, f_proj_bn, labels=None):
        if self.classifier_kind == "arcface":
            return [self.classifier(f_bn, labels), self.classifier_proj(f_proj_bn, labels)]
        return [self.classifier(f_bn), self.classifier_proj(f_proj_bn)]

    def retrieval_feature(self, features, feature=None):
        """Pick the retrieval feature from forward_features' output (BN applied in eval mode)."""
        feature = feature or self.feature
        f, f_proj = features["pre_proj"], features["proj"]
        if feature.endswith("_bn"):
            f, f_proj = self.bottleneck(f), self.bottleneck_proj(f_proj)
        if feature.startswith("concat"):
            return torch.cat([f, f_proj], dim=1)
        return f_proj if feature.startswith("proj") else f

    def forward(self, images, labels=None):
        features = self.visual.forward_features(images)
        if not self.training:
            return self.retrieval_feature(features)
        f_bn = self.bottleneck(features["pre_proj"])
        f_proj_bn = self.bottleneck_proj(features["proj"])
        return self.classify(f_bn, f_proj_bn, labels), features

    @torch.no_grad()
    def predict_logits(self, images):
        """Closed-set logits of both heads in eval mode (ArcFace heads without margin)."""
        features = self.visual.forward_features(images)
        f_bn = self.bottleneck(features["pre_proj"])
        f_proj_bn = self.bottleneck_proj(features["proj"])
        return self.classify(f_bn, f_proj_bn)


def finetune_model_config(spec, classifier="linear", feature=DEFAULT_FEATURE, arcface_s=30.0, arcface_m=0.5):
    return {"kind": "finetune", "backbone": spec, "classifier": classifier, "feature": feature,
            "arcface_s": arcface_s, "arcface_m": arcface_m}


@register_model("finetune")
def build_finetune_model(model_config, num_classes, visual=None):
    """`visual` given (pretrained encoder) or None (random weights rebuilt from the recorded arch)."""
    if visual is None:
        visual = load_backbone(model_config["backbone"], weights="empty")
    return HandReIDModel(visual, num_classes, feature=model_config.get("feature", DEFAULT_FEATURE),
                         classifier=model_config.get("classifier", "linear"),
                         arcface_s=model_config.get("arcface_s", 30.0),
                         arcface_m=model_config.get("arcface_m", 0.5))


# ==== SECTION CLIP-REID ========================================================================
# CLIP-ReID (Li et al., AAAI 2023): the stage-1 prompt modules are in prompt_models.py; the stage-2
# model is a HandReIDModel, optionally with a side-information embedding.


class ClipReIDModel(HandReIDModel):
    """HandReIDModel with an optional side-information embedding (SIE) of the hand aspect.

    As CLIP-ReID does with camera ids, sie_coe * sie_embed[aspect] is added to the ViT class token
    (before ln_pre; adding it before or after the positional embedding is the same). In training
    the aspect of each image comes from its label (class_aspect: aspect index of every class). In
    evaluation it is `test_aspect` (set_test_aspect / set_test_dir); an unknown aspect uses the
    mean of the learned embeddings."""

    def __init__(self, visual, num_classes, feature=DEFAULT_FEATURE, sie_aspects=None, class_aspect=None,
                 sie_coe=1.0):
        super().__init__(visual, num_classes, feature=feature)
        self.sie_aspects = list(sie_aspects or [])
        self.sie_coe = float(sie_coe)
        self.test_aspect = None
        self._sie_rows = None
        if not self.sie_aspects:
            return
        if not hasattr(visual, "ln_pre"):
            raise TrainingInputError("--sie needs a ViT backbone: the side-information embedding is added to the class "
                                     "token, which ResNets do not have")
        if class_aspect is None or len(class_aspect) != num_classes:
            raise TrainingInputError("--sie needs the aspect index of every class (class_aspect)")
        self.sie_embed = nn.Parameter(nn.init.trunc_normal_(torch.empty(len(self.sie_aspects),
                                                                        visual.class_embedding.shape[0]), std=0.02))
        self.register_buffer("class_aspect", torch.as_tensor(class_aspect, dtype=torch.long))
        visual.ln_pre.register_forward_pre_hook(self._add_sie)

    def _add_sie(self, module, inputs):
        x = inputs[0]
        if self._sie_rows is not None:
            bias = self.sie_embed[self._sie_rows]
        elif self.test_aspect is not None:
            bias = self.sie_embed[self.test_aspect].expand(x.shape[0], -1)
        else:
            bias = self.sie_embed.mean(dim=0).expand(x.shape[0], -1)
        cls = x[:, :1] + self.sie_coe * bias[:, None].to(x.dtype)
        return (torch.cat([cls, x[:, 1:]], dim=1),)

    def set_test_aspect(self, aspect):
        """Aspect name of the images to encode in eval mode; None or an unknown name: the mean SIE."""
        if not self.sie_aspects:
            return None
        self.test_aspect = self.sie_aspects.index(aspect) if aspect in self.sie_aspects else None
        return self.test_aspect

    def set_test_dir(self, test_dir):
        """Pick the SIE aspect from a split root's splits.json ("aspect"); returns a note for the log."""
        if not self.sie_aspects:
            return None
        aspect = (splits.read_manifest(test_dir) or {}).get("aspect")
        if self.set_test_aspect(aspect) is None:
            return (f"side-information embedding: aspect {aspect!r} of {test_dir} was not trained "
                    f"({self.sie_aspects}); using the mean embedding")
        return f"side-information embedding: aspect {aspect!r}"

    def forward(self, images, labels=None):
        if self.sie_aspects and self.training and labels is not None:
            self._sie_rows = self.class_aspect[labels]
        try:
            return super().forward(images, labels)
        finally:
            self._sie_rows = None


def clipreid_model_config(spec, feature=DEFAULT_FEATURE, sie_aspects=None, class_aspect=None, sie_coe=1.0):
    sie = {"aspects": list(sie_aspects), "class_aspect": [int(a) for a in class_aspect], "coe": float(sie_coe)} \
        if sie_aspects else None
    return {"kind": "clipreid", "backbone": spec, "feature": feature, "sie": sie}


@register_model("clipreid")
def build_clipreid_model(model_config, num_classes, visual=None):
    """`visual` given (pretrained encoder) or None (uninitialised, for loading a checkpoint)."""
    if visual is None:
        visual = load_backbone(model_config["backbone"], weights="empty")
    sie = model_config.get("sie") or {}
    return ClipReIDModel(visual, num_classes, feature=model_config.get("feature", DEFAULT_FEATURE),
                         sie_aspects=sie.get("aspects"), class_aspect=sie.get("class_aspect"),
                         sie_coe=sie.get("coe", 1.0))



# ==== SECTION PROMPTSG =========================================================================
# PromptSG (Yang et al., CVPR 2024); its inversion network and multimodal interaction are in
# prompt_models.py.

PROMPTSG_FEATURES = ("fused", "fused_bn", "concat", "proj")
INFERENCE_PROMPTS = ("fixed", "composed")


class PromptSGModel(nn.Module):
    """CLIP image encoder (trained) + inversion network + frozen text tower + multimodal interaction
    + BNNeck classifier on the fused feature.

    Training forward: (scores, features) like HandReIDModel: scores = [logits on BN(fused)],
    features = {"fused", "image" (global CLIP feature, also the inversion input), "text"
    (composed-prompt feature), "pseudo_token"}. Eval forward: the retrieval feature `self.feature`
    (PROMPTSG_FEATURES) guided by the fixed prompt (encoded once, a buffer) or the composed one
    (`self.inference_prompt`). pool: see prompt_models.MultimodalInteraction."""

    def __init__(self, clip_model, num_classes, prompt_template=PROMPTSG_TEMPLATE,
                 fixed_prompt=PROMPTSG_FIXED_PROMPT, feature="fused", inference_prompt="fixed", num_blocks=2,
                 pool="global"):
        super().__init__()
        check_text_tower(clip_model)
        self.visual = clip_model.visual
        del clip_model.visual  # what remains is the text tower; CLIP.encode_text_embeddings runs on it
        self.text = clip_model.requires_grad_(False)
        self.is_vit = not isinstance(self.visual, ModifiedResNet)
        dims = self.visual.feature_dims
        self.width = dims["proj"]
        token_dim = self.text.token_embedding.weight.shape[1]
        token_std = self.text.token_embedding.weight.detach().float().std()
        self.inversion = InversionNetwork(self.width, token_dim, token_std=token_std)
        if not self.is_vit:  # layer4 spatial tokens -> the width of the global feature
            self.token_proj = nn.Linear(dims["pre_proj"], self.width)
        heads = max(1, self.width // 64)
        self.interaction = MultimodalInteraction(self.width, heads, num_blocks, pool=pool)
        self.bottleneck = bnneck(self.width)
        self.classifier = linear_classifier(self.width, num_classes)
        self.num_classes = num_classes

        self.prompt_template, self.fixed_prompt = prompt_template, fixed_prompt
        tokens, self.pseudo_index, eot_index = composed_prompt_tokens(prompt_template, self.text.context_length)
        self.register_buffer("prompt_tokens", tokens[:eot_index + 1], persistent=False)
        self.register_buffer("fixed_text_feature", self.encode_fixed_prompt(fixed_prompt))
        self.feature, self.inference_prompt = feature, inference_prompt
        self.check_feature(feature)
        self.check_inference_prompt(inference_prompt)

    @staticmethod
    def check_feature(feature):
        if feature not in PROMPTSG_FEATURES:
            raise TrainingInputError(f"--feature '{feature}' is not one of {', '.join(PROMPTSG_FEATURES)} "
                                     f"(PromptSG model)")

    @staticmethod
    def check_inference_prompt(inference_prompt):
        if inference_prompt not in INFERENCE_PROMPTS:
            raise TrainingInputError(f"--inference_prompt must be one of {', '.join(INFERENCE_PROMPTS)}, "
                                     f"got {inference_prompt!r}")

    def feature_dim(self, feature=None):
        return 2 * self.width if (feature or self.feature) == "concat" else self.width

    def clip_temperature(self, as_tensor=False):
        """CLIP's own contrastive temperature 1 / exp(logit_scale) (0.01 for OpenAI's models)."""
        temperature = self.text.logit_scale.detach().float().exp().reciprocal()
        return temperature if as_tensor else float(temperature)

    @torch.no_grad()
    def encode_fixed_prompt(self, text):
        tokens = clip.tokenize([text], context_length=self.text.context_length)
        tokens = tokens.to(self.text.token_embedding.weight.device)
        return self.text.encode_text(tokens)[0].float()

    def compose_prompt_embeddings(self, pseudo_tokens):
        return splice_pseudo_token(self.text, self.prompt_tokens, self.pseudo_index, pseudo_tokens)

    def encode_composed_prompt(self, image_feature):
        """Composed-prompt text features (N, width) and the pseudo-tokens (N, token_dim)."""
        pseudo_tokens = self.inversion(image_feature)
        return encode_spliced_prompt(self.text, self.prompt_tokens, self.pseudo_index, pseudo_tokens), pseudo_tokens

    def fuse(self, features, text_feature, return_weights=False):
        tokens = visual_tokens(self.visual, features, None if self.is_vit else self.token_proj)
        return self.interaction(text_feature, tokens, return_weights)

    def forward(self, images, labels=None):
        features = self.visual.forward_features(images)
        if not self.training:
            return self.retrieval_feature(features)
        text_feature, pseudo_tokens = self.encode_composed_prompt(features["proj"])
        fused = self.fuse(features, text_feature)
        logits = self.classifier(self.bottleneck(fused))
        return [logits], {"fused": fused, "image": features["proj"], "text": text_feature,
                          "pseudo_token": pseudo_tokens}

    def guiding_text(self, features, inference_prompt=None):
        if (inference_prompt or self.inference_prompt) == "composed":
            return self.encode_composed_prompt(features["proj"])[0]
        return self.fixed_text_feature.expand(features["proj"].shape[0], -1)

    def retrieval_feature(self, features, feature=None, inference_prompt=None):
        feature = feature or self.feature
        if feature == "proj":
            return features["proj"]
        fused = self.fuse(features, self.guiding_text(features, inference_prompt))
        if feature == "fused_bn":
            return self.bottleneck(fused)
        return torch.cat([features["proj"], fused], dim=1) if feature == "concat" else fused

    @torch.no_grad()
    def predict_logits(self, images):
        """Closed-set logits in eval mode, guided by the inference prompt."""
        features = self.visual.forward_features(images)
        return [self.classifier(self.bottleneck(self.fuse(features, self.guiding_text(features))))]


def promptsg_model_config(spec, prompt_template=PROMPTSG_TEMPLATE, fixed_prompt=PROMPTSG_FIXED_PROMPT,
                          feature="fused", inference_prompt="fixed", num_blocks=2, pool="global"):
    return {"kind": "promptsg", "backbone": spec, "prompt_template": prompt_template,
            "fixed_prompt": fixed_prompt, "feature": feature, "inference_prompt": inference_prompt,
            "num_blocks": num_blocks, "pool": pool}


@register_model("promptsg")
def build_promptsg_model(model_config, num_classes, clip_model=None):
    """`clip_model` given (pretrained, both towers) or None (uninitialised, for a strict checkpoint
    load right afterwards; the checkpoint holds the text tower and the cached fixed-prompt feature)."""
    if clip_model is None:
        clip_model = load_clip_model(model_config["backbone"], weights="empty")
        # uninitialised weights could hold NaNs; the real text tower comes with the checkpoint
        for tensor in clip_model.state_dict().values():
            if tensor.is_floating_point():
                tensor.zero_()
    return PromptSGModel(clip_model, num_classes,
                         prompt_template=model_config.get("prompt_template", PROMPTSG_TEMPLATE),
                         fixed_prompt=model_config.get("fixed_prompt", PROMPTSG_FIXED_PROMPT),
                         feature=model_config.get("feature", "fused"),
                         inference_prompt=model_config.get("inference_prompt", "fixed"),
                         num_blocks=model_config.get("num_blocks", 2),
                         pool=model_config.get("pool", "mean"))  # runs from before "pool": the mean
