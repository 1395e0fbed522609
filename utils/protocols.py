"""Evaluation protocols by name: the settings with which each reference produced its published
tables (see README "Protocols"). An evaluator flag given explicitly wins over its protocol.

Depends on nothing in the package."""

# neck: the retrieval feature of a fine-tuned model, after or before its BNNeck; amp: the precision
# of fine-tuned models and of zero-shot CLIP ("none" = fp32); gallery: the gallery variants ("all"
# = 11k gallery{i}_all, own gallery on HD, which has no other); mAP: which AP is the table's mAP.
PROTOCOLS = {
    # MBA-Net / CLIP-HandID tables: mirrored image added, after-BN features, fp32 (zero-shot: the
    # fp16 weights of the released CLIP on CUDA), gallery{i}_all on 11k, trapezoid AP
    "clip-handid": dict(flip=True, neck="after", amp={"finetuned": "none", "zero-shot": "fp16"}, gallery="all",
                        mAP="mAP_hand"),
    # CLIP-ReID: no flip, pre-BN concatenation, fp32, standard (non-interpolated) AP
    "clip-reid": dict(flip=False, neck="before", amp={"finetuned": "none", "zero-shot": "none"}, gallery="all",
                      mAP="mAP_standard"),
    # CLIP-FH thesis: no flip, pre-BN feature, fp16 backbone, own gallery{i} (no distractors), standard AP
    "clip-fh": dict(flip=False, neck="before", amp={"finetuned": "fp16", "zero-shot": "fp16"}, gallery="own",
                    mAP="mAP_standard"),
}
DEFAULT_PROTOCOL = "clip-handid"
# the retrieval feature each neck setting names, per model kind
NECK_FEATURES = {"finetune": {"after": "concat_bn", "before": "concat"},
                 "clipreid": {"after": "concat_bn", "before": "concat"},
                 "promptsg": {"after": "fused_bn", "before": "fused"}}


def headline_gallery(gallery_variants):
    """The gallery the published tables use: 11k gallery{i}_all when evaluated, else the own one."""
    return "all" if "all" in gallery_variants else gallery_variants[0]


def settings(protocol, model_kind=None, flip=None, feature=None, amp=None, gallery=None, mAP=None,
             available=("own", "all"), cuda=True):
    """Every setting `protocol` implies for a model of `model_kind` (None: zero-shot CLIP), with the
    explicitly given ones (not None) in their place. `available`: the split root's gallery variants;
    a protocol's "all" means the own gallery where there is no gallery{i}_all (HD); off CUDA
    (cuda=False) a protocol's precision is fp32. Returns {"protocol", "flip", "feature", "amp",
    "gallery", "mAP", "explicit": [names given explicitly]}."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    reference = PROTOCOLS[protocol]
    implied_gallery = reference["gallery"] if reference["gallery"] in available else "own"
    implied_amp = reference["amp"]["zero-shot" if model_kind is None else "finetuned"] if cuda else "none"
    implied = {"flip": reference["flip"], "amp": implied_amp,
               "gallery": implied_gallery, "mAP": reference["mAP"],
               "feature": NECK_FEATURES.get(model_kind, {}).get(reference["neck"])}
    given = {"flip": flip, "feature": feature, "amp": amp, "gallery": gallery, "mAP": mAP}
    out = {name: given[name] if given[name] is not None else value for name, value in implied.items()}
    return dict(out, protocol=protocol, explicit=sorted(name for name, value in given.items() if value is not None))
