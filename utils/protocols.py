"""Evaluation protocols by name: the settings with which each reference produced its published
tables (see README "Protocols"). An evaluator flag given explicitly wins over its protocol.

test_settings() resolves everything a test needs for a model under a protocol (feature, flip,
precision, galleries, mAP, preprocessing, which checkpoint); every script that reports a number
calls it; add_protocol_args() gives those scripts the same flags."""
import argparse

from . import preprocessing
from .io import AMP_CHOICES

# neck: the retrieval feature of a fine-tuned model, after or before its BNNeck ("proj": before it, the
# projected CLIP embedding alone, as encode_image gives it); amp: the precision
# of fine-tuned models and of zero-shot CLIP ("none" = fp32); gallery: the gallery variants ("all"
# = 11k gallery{i}_all, own gallery on HD, which has no other); mAP: which AP is the table's mAP;
# zero_shot_resize: how zero-shot CLIP's input is made (trained models are tested with the resize they
# were trained with: the whole photo squashed to the input size); checkpoint: the one the reference
# reports ("best" = net_best, chosen on validation; "last" = net_last).
PROTOCOLS = {
    # MBA-Net / CLIP-HandID tables: mirrored image added, after-BN features, fp32 (zero-shot: the
    # fp16 weights of the released CLIP on CUDA, with CLIP's own preprocess: shorter side to 224,
    # centre crop), gallery{i}_all on 11k, trapezoid AP, net_best (validated every epoch)
    "clip-handid": dict(flip=True, neck="after", amp={"finetuned": "none", "zero-shot": "fp16"}, gallery="all",
                        mAP="mAP_hand", zero_shot_resize="crop", checkpoint="best"),
    # CLIP-ReID: no flip, pre-BN concatenation, fp32, standard (non-interpolated) AP, the last epoch
    # (no validation split, no selection); it has no zero-shot evaluation: squashed like its test images
    "clip-reid": dict(flip=False, neck="before", amp={"finetuned": "none", "zero-shot": "none"}, gallery="all",
                      mAP="mAP_standard", zero_shot_resize="squash", checkpoint="last"),
    # CLIP-FH thesis: no flip, the projected pre-BN embedding (its Stage 2 tests encode_image's output;
    # Stage 3 the fusion output), fp16 backbone, own gallery{i} (no distractors), standard AP, photos
    # squashed to H x W at test time, the BEST checkpoint (best val Rank-1) re-loaded
    "clip-fh": dict(flip=False, neck="proj", amp={"finetuned": "fp16", "zero-shot": "fp16"}, gallery="own",
                    mAP="mAP_standard", zero_shot_resize="squash", checkpoint="best"),
}
DEFAULT_PROTOCOL = "clip-handid"
# the retrieval feature each neck setting names, per model kind (every kind of models.MODEL_BUILDERS)
NECK_FEATURES = {"finetune": {"after": "concat_bn", "before": "concat", "proj": "proj"},
                 "clipreid": {"after": "concat_bn", "before": "concat", "proj": "proj"},
                 "handid": {"after": "concat_bn", "before": "concat", "proj": "proj"},
                 "promptsg": {"after": "fused_bn", "before": "fused", "proj": "fused"}}


def add_protocol_args(parser, galleries=True):
    """--protocol and the flags that override one of its settings (--flip, --amp and, with
    `galleries`, --gallery), as every script that reports a number under a protocol takes them."""
    parser.add_argument("--protocol", choices=list(PROTOCOLS), default=DEFAULT_PROTOCOL,
                        help="the reference whose test-time settings to use: preprocessing, checkpoint, feature, "
                             "flip, precision, galleries and mAP convention (README 'Protocols'); a flag given "
                             "explicitly wins")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                        help="feature = f(image) + f(mirrored image) (default: the protocol's)")
    parser.add_argument("--amp", choices=AMP_CHOICES, default=None,
                        help="autocast on CUDA; none = fp32 (default: the protocol's precision; fp32 on a CPU)")
    if galleries:
        parser.add_argument("--gallery", choices=["own", "all", "both"], default=None,
                            help="own: gallery{i}; all: gallery{i}_all with the other aspects as distractors "
                                 "(11k only); both: every variant the split root has (default: the protocol's)")
    return parser


def headline_gallery(gallery_variants):
    """The gallery the published tables use: 11k gallery{i}_all when evaluated, else the own one."""
    return "all" if "all" in gallery_variants else gallery_variants[0]


def check_protocol(protocol):
    if protocol not in PROTOCOLS:
        raise ValueError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    return PROTOCOLS[protocol]


def settings(protocol, model_kind=None, flip=None, feature=None, amp=None, gallery=None, mAP=None,
             available=("own", "all"), cuda=True):
    """The retrieval settings `protocol` implies for a model of `model_kind` (None: zero-shot CLIP),
    with the explicitly given ones (not None) in their place: {"protocol", "flip", "feature", "amp",
    "gallery", "mAP", "explicit": [names given explicitly]}. `available`: the split root's gallery
    variants; a protocol's "all" means the own gallery where there is no gallery{i}_all (HD); off
    CUDA (cuda=False) a protocol's precision is fp32. test_settings() adds the preprocessing and the
    checkpoint; scripts call that."""
    reference = check_protocol(protocol)
    implied_gallery = reference["gallery"] if reference["gallery"] in available else "own"
    implied_amp = reference["amp"]["zero-shot" if model_kind is None else "finetuned"] if cuda else "none"
    implied = {"flip": reference["flip"], "amp": implied_amp,
               "gallery": implied_gallery, "mAP": reference["mAP"],
               "feature": NECK_FEATURES.get(model_kind, {}).get(reference["neck"])}
    given = {"flip": flip, "feature": feature, "amp": amp, "gallery": gallery, "mAP": mAP}
    out = {name: given[name] if given[name] is not None else value for name, value in implied.items()}
    return dict(out, protocol=protocol, explicit=sorted(name for name, value in given.items() if value is not None))


def trained_preprocessing(run_config):
    """The test-time preprocessing record of a trained run: the one its config.json records, or for
    runs from before that record existed, what every trainer used: the whole photo squashed
    (bicubic) to the backbone's input size, CLIP mean/std, full decode."""
    recorded = run_config.get("preprocessing")
    if isinstance(recorded, dict):
        return preprocessing.check(dict(recorded), "config.json 'preprocessing'")
    return preprocessing.record(run_config["model"]["backbone"]["input_size"], "squash")


def test_settings(protocol, run_config=None, *, input_size=(224, 224), flip=None, feature=None, amp=None,
                  gallery=None, mAP=None, which_epoch=None, resize=None, fast_decode=False,
                  available=("own", "all"), cuda=True):
    """Every test-time setting of a model under `protocol`, explicit arguments (not None) winning.

    run_config: a trained run's config.json dict (its "model" entry names the kind; its preprocessing
    is the one it was trained with), or None for zero-shot CLIP at `input_size` (H, W), preprocessed
    as the protocol's reference did (clip-handid: CLIP's own preprocess, shorter side + centre crop;
    the others: squashed). resize ("crop" | "squash") overrides that for zero-shot CLIP only.
    fast_decode: draft JPEG decoding (speed runs; the record says so). which_epoch: "best", "last"
    or an epoch number; None = the checkpoint the protocol reports (None for zero-shot CLIP).
    `available` and `cuda`: see settings().
    Returns {"protocol", "flip", "feature" (None for zero-shot CLIP), "amp", "gallery", "mAP",
    "preprocessing" (a utils.preprocessing record), "which_epoch", "explicit" (names given explicitly)}."""
    reference = check_protocol(protocol)
    kind = None if run_config is None else run_config["model"].get("kind", "finetune")
    out = settings(protocol, kind, flip=flip, feature=feature, amp=amp, gallery=gallery, mAP=mAP,
                   available=available, cuda=cuda)
    if kind is None:
        if resize is not None and resize not in preprocessing.RESIZE_MODES:
            raise ValueError(f"--resize must be one of {', '.join(preprocessing.RESIZE_MODES)}, got {resize!r}")
        record = preprocessing.record(input_size, resize or reference["zero_shot_resize"])
        which = None
    else:
        if resize is not None:
            raise ValueError("--resize applies to zero-shot CLIP; a trained model is tested with the resize it was "
                             "trained with")
        record = trained_preprocessing(run_config)
        which = str(which_epoch) if which_epoch is not None else reference["checkpoint"]
    if fast_decode:
        record = dict(record, decode="draft")
    explicit = out["explicit"] + [name for name, given in (("which_epoch", which_epoch), ("resize", resize))
                                  if given is not None] + (["decode"] if fast_decode else [])
    return dict(out, preprocessing=record, which_epoch=which, explicit=sorted(explicit))
