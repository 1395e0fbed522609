"""Robustness benchmark: how far the match holds when the photos get worse. The queries (by default;
--degrade gallery or both) of every Monte-Carlo split are degraded by each corruption family of
utils/corruptions.py (blur, motion blur, JPEG, low resolution, noise, brightness, contrast, colour
cast, occlusion, rotation) at severities 1-5, in the form of ImageNet-C, and evaluated as the
evaluators do (same protocol settings, metrics and splits) against the clean gallery.

    python eval_robustness.py --run_dir ./model_11k_d_r/clip_hand_vit \
        --test_dir ./11k/train_val_test_split_dorsal_r
    python eval_robustness.py --backbone_name ViT-B/16 --test_dir ./11k/train_val_test_split_dorsal_r

Each image is first preprocessed as the protocol says (decoded, resized to the model's input size),
then corrupted, then normalised: a corruption acts on the image the model would see, at the model's
resolution. Every image of the split root is encoded clean once (severity 0 is the plain
evaluation); the degraded images (the union of the query sets over the splits) are decoded once and
encoded once per family and severity, for all splits together.

Writes <run_dir>/robustness_<which_epoch>_<test set>[_<degrade>][_<protocol>]/ (zero-shot:
<f_name>/clip_zero_shot/<backbone>/robustness_<test set>[...]/, or --out_dir): robustness.json,
robustness.csv, robustness_mAP.png (mAP against severity per family), corruptions.png (one hand
under every family and severity) and config.json.
"""
import argparse
import os
import time

import numpy as np
import torch
from tqdm import tqdm

import clip
import eval_query_gallery_clip_zeroshot as zero_shot
import models
import models_handid  # noqa: F401  (registers the "handid" model kind)
from utils import corruptions, data, errors, evaluation, flags, interrupts, io, outputs, protocols, splits
from utils import robustness as report

DEGRADE_CHOICES = ("query", "gallery", "both")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--test_dir", default="./11k/train_val_test_split_dorsal_r",
                   help="split root made by a prepare script (query{i}/, gallery{i}/, splits.json)")
    model = p.add_argument_group("the model: a trained run (--run_dir, or --f_name/--m_name) or a zero-shot backbone")
    model.add_argument("--run_dir", default=None, help="run folder of any trainer (holds config.json, net_*.pth)")
    model.add_argument("--f_name", default=None, help="output root of the training run (with --m_name); zero-shot: "
                                                      "output root (default ./model_eval)")
    model.add_argument("--m_name", default=None, help="run folder inside --f_name")
    model.add_argument("--which_epoch", default=None,
                       help="best, last or an epoch number N (net_N.pth); default: the checkpoint the protocol reports")
    model.add_argument("--feature", default=None,
                       choices=list(dict.fromkeys(models.FEATURE_CHOICES + models.PROMPTSG_FEATURES)),
                       help="retrieval feature of a run (default: the protocol's)")
    model.add_argument("--backbone_name", default=None,
                       help=f"zero-shot CLIP: an official name {clip.available_models()} or a local checkpoint")
    model.add_argument("--download_root", default="~/.cache/clip", help="zero-shot: where official weights are cached")
    model.add_argument("--input_size", type=int, nargs=2, default=None, metavar=("H", "W"),
                       help="zero-shot: input size (default: the backbone's own, 224 224 for ViT-B/16 and RN50); "
                            "a run uses its own")
    model.add_argument("--stride", type=int, default=None, help="zero-shot ViT patch stride (default: the patch size)")
    model.add_argument("--pos_interp", choices=list(clip.POS_INTERPOLATIONS), default="bilinear",
                       help="zero-shot: resizing of the positional embeddings to another input size")
    bench = p.add_argument_group("the benchmark")
    bench.add_argument("--degrade", choices=DEGRADE_CHOICES, default="query",
                       help="which side is degraded: the evidence (query, default), the enrolled gallery, or both")
    bench.add_argument("--families", nargs="+", choices=corruptions.FAMILIES, default=list(corruptions.FAMILIES),
                       metavar="FAMILY", help=f"corruption families (default: all: {', '.join(corruptions.FAMILIES)})")
    bench.add_argument("--severities", nargs="+", type=int, default=[1, 2, 3, 4, 5],
                       help="severities 1-5 to run (default all; the clean images are always evaluated)")
    protocols.add_protocol_args(p)
    io.add_compile_arg(p)
    p.add_argument("--batch_size", type=int, default=64, help="images per encoding batch")
    p.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader workers that decode images (default: up to 4, one per CPU core)")
    p.add_argument("--out_dir", default=None, help="output folder (default: see above)")
    p.add_argument("--force", action="store_true", help="replace earlier results in the output folder")
    p.add_argument("--pdf", action="store_true", help="also write the mAP plot as a vector PDF")
    p.add_argument("--allow_mixed_seeds", action="store_true",
                   help="accept a --test_dir prepared with another --seed than its sibling split roots")
    io.add_common_args(p)  # --seed: the corruptions' random choices, --device
    args = p.parse_args(argv)
    run = args.run_dir is not None or args.m_name is not None
    problems = flags.bound_problems(args, at_least={"batch_size": 1, "num_workers": 0, "input_size": 1})
    if run == (args.backbone_name is not None):
        problems.append("name one model: --run_dir (or --f_name and --m_name) for a trained run, or --backbone_name "
                        "for zero-shot CLIP")
    if args.run_dir is not None and (args.m_name is not None or args.f_name is not None):
        problems.append("--run_dir names the run; --f_name/--m_name name it too: give one or the other")
    if run and (args.input_size or args.stride):
        problems.append("--input_size and --stride are for zero-shot backbones; a run is evaluated at its own input "
                        "size")
    if not run and args.feature:
        problems.append("--feature chooses a trained run's feature; zero-shot CLIP has one (encode_image)")
    if sorted(set(args.severities)) != sorted(args.severities) or not all(
            1 <= s <= corruptions.MAX_SEVERITY for s in args.severities):
        problems.append(f"--severities must be distinct numbers from 1 to {corruptions.MAX_SEVERITY}, got "
                        f"{' '.join(map(str, args.severities))}")
    if len(set(args.families)) != len(args.families):
        problems.append("--families lists a family twice")
    flags.exit_on_problems(problems)
    args.severities, args.families = sorted(args.severities), list(args.families)
    if run and args.run_dir is None:
        args.run_dir = os.path.join(args.f_name or "./model_11k_d_r", args.m_name)
    if run and args.which_epoch is None:
        args.which_epoch = protocols.PROTOCOLS[args.protocol]["checkpoint"]
    return args


def test_time_settings(args, run_config, input_size, layout):
    """The model's test-time settings under --protocol (protocols.test_settings, as both evaluators
    resolve them, explicit flags winning), with the precision resolved for --device."""
    setting = protocols.test_settings(args.protocol, run_config, input_size=input_size, flip=args.flip,
                                      feature=args.feature, amp=args.amp, gallery=args.gallery,
                                      which_epoch=args.which_epoch, available=layout["gallery_variants"],
                                      cuda=str(args.device).startswith("cuda"))
    setting["amp"] = io.resolve_amp(setting["amp"], args.device)
    return setting


def load_model(args, layout):
    """The model to evaluate: {"encode" (normalised batch -> features), "setting", "method", "record"}."""
    if args.backbone_name is not None:
        input_size = tuple(args.input_size or clip.native_input_size(args.backbone_name))
        setting = test_time_settings(args, None, input_size, layout)
        model, _ = clip.load(args.backbone_name, device=args.device, download_root=args.download_root,
                             input_size=input_size, patch_stride=args.stride, pos_interp=args.pos_interp)
        model.eval()
        official = args.backbone_name in clip.available_models()
        name = args.backbone_name if official else os.path.basename(args.backbone_name)
        record = {"backbone": args.backbone_name, "model_kind": "zero-shot", "feature": "CLIP encode_image"}
        encode, visual, method = model.encode_image, model.visual, f"CLIP {name} zero-shot"
    else:
        config = models.read_run_config(args.run_dir, "--run_dir (or --f_name/--m_name)")
        input_size = tuple(config["model"]["backbone"]["input_size"])
        setting = test_time_settings(args, config, input_size, layout)
        model, config, checkpoint = models.load_trained_model(args.run_dir, setting["which_epoch"], device=args.device)
        kind = config["model"].get("kind", "finetune")
        if hasattr(model, "set_test_dir"):  # per-aspect parts (CLIP-ReID --sie) pick the test aspect
            note = model.set_test_dir(args.test_dir)
            if note:
                print(note)
        if hasattr(model, "feature"):
            model.check_feature(setting["feature"] or model.feature)
            model.feature = setting["feature"] or model.feature
        elif args.feature is not None:
            raise errors.EvaluationInputError(f"--feature: the {kind} model of {args.run_dir} has no feature choice")
        record = {"run_dir": os.path.abspath(args.run_dir), "model_kind": kind, "which_epoch": str(args.which_epoch),
                  "epoch": checkpoint.get("epoch"), "backbone": config["model"]["backbone"]["name"],
                  "feature": getattr(model, "feature", None), "pretrained": config.get("pretrained")}
        encode, visual = model, model.visual
        method = f"{os.path.basename(os.path.normpath(args.run_dir))} ({kind}, net_{args.which_epoch})"
    note = models.speed_up_image_encoder(visual, args.device, args.compile, for_training=False)
    if note:
        print(note)
    args.compile = models.use_compile(args.compile, args.device)  # config.json records what ran
    return {"encode": encode, "setting": setting, "method": method, "record": record}


ROBUSTNESS_FILES = ("robustness.json", "robustness.csv", "robustness_mAP.png", "robustness_mAP.pdf", "corruptions.png",
                    "corruptions.pdf", "config.json")


def is_robustness_file(name, folder):
    """A file main() writes into `folder` (anything else there is the user's); a config.json only
    beside the robustness.json it describes."""
    if name == "config.json":
        return os.path.isfile(os.path.join(folder, "robustness.json"))
    return name in ROBUSTNESS_FILES


def default_out_dir(args):
    test_name = splits.test_set_name(args.test_dir)
    suffix = (f"_{args.degrade}" if args.degrade != "query" else "") + (
        f"_{args.protocol}" if args.protocol != protocols.DEFAULT_PROTOCOL else "")
    if args.backbone_name is not None:
        return os.path.join(args.f_name or "./model_eval", "clip_zero_shot",
                            zero_shot.backbone_folder_name(args.backbone_name),
                            f"robustness_{test_name}{suffix}")
    return os.path.join(args.run_dir, f"robustness_{args.which_epoch}_{test_name}{suffix}")


def degraded_rows(encoded, degrade, num_splits, variants):
    """Rows (into encoded["paths"]) of the images `degrade` names: the union over the splits of the
    query sets, of the gallery sets, or of both; in first-seen order."""
    names = [f"query{i}" for i in range(num_splits)] if degrade in ("query", "both") else []
    if degrade in ("gallery", "both"):
        names += [splits.gallery_set_name(i, v) for i in range(num_splits) for v in variants]
    rows = {}
    for name in names:
        for _, _, key in encoded["sets"][name]:
            rows.setdefault(encoded["row_of_key"][key], key)
    return list(rows), list(rows.values())


class DecodedImages(torch.utils.data.Dataset):
    """The photos at `paths` decoded and resized as the preprocessing record says, as uint8 (H, W, 3)."""

    def __init__(self, paths, rec):
        self.paths, self.rec = paths, rec

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        rec = self.rec
        image = data.load_image(self.paths[index], rec["size"], rec["resize"], rec["decode"], rec["interpolation"])
        return torch.from_numpy(np.array(image, dtype=np.uint8))


def decode_all(paths, rec, num_workers, batch_size=64):
    loader = torch.utils.data.DataLoader(DecodedImages(paths, rec), batch_size=batch_size, num_workers=num_workers)
    return torch.cat(list(tqdm(loader, desc=f"decode {len(paths)} images", unit="batch", leave=False,
                               disable=io.bars_off())))


def degraded_batches(images, identities, family, severity, seed, rec, device, batch_size):
    """(normalised degraded batch on `device`, indices) for extract_features."""
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device, non_blocking=True)
        batch = corruptions.corrupt(batch, family, severity, identities[start:start + batch_size], seed)
        yield corruptions.to_model_input(batch, rec["mean"], rec["std"]), torch.arange(start, start + len(batch))


def encode_degraded(encode_fn, images, identities, family, severity, args, setting):
    rec = setting["preprocessing"]
    batches = degraded_batches(images, identities, family, severity, args.seed, rec, args.device, args.batch_size)
    features, _ = evaluation.extract_features(encode_fn, batches, args.device, setting["amp"], setting["flip"])
    features = torch.nn.functional.normalize(features, dim=1).numpy()
    if not np.isfinite(features).all():
        raise errors.EvaluationInputError(f"the encoder produced NaN/inf features under {family} severity "
                                          f"{severity}; try --amp none or check the checkpoint")
    return features


def run_benchmark(model, args, layout):
    """Encode clean once, each degraded set once per family x severity, score every split.
    Returns (results without the figures, the example's identity and uint8 image)."""
    setting, rec = model["setting"], model["setting"]["preprocessing"]
    variants = evaluation.wanted_gallery_variants(layout, setting["gallery"], args.test_dir)
    num_splits = layout["num_splits"]
    encoded = evaluation.encode_split_images(model["encode"], args.test_dir, num_splits, variants,
                                             batch_size=args.batch_size, num_workers=args.num_workers,
                                             device=args.device, flip=setting["flip"], amp=setting["amp"],
                                             preprocessing=rec)
    scored = {("clean", 0): evaluation.score_splits(encoded, num_splits, variants)[0]}
    rows, identities = degraded_rows(encoded, args.degrade, num_splits, variants)
    start = time.time()
    images = decode_all([encoded["paths"][r] for r in rows], rec, args.num_workers)
    _, hand_found = corruptions.hand_mask(images)
    runs = [(f, s) for f in args.families for s in args.severities]
    for family, severity in tqdm(runs, desc="families x severities", unit="run", disable=io.bars_off()):
        features = encoded["features"].copy()
        features[rows] = encode_degraded(model["encode"], images, identities, family, severity, args, setting)
        roles = ("query", "gallery") if args.degrade == "both" else (args.degrade,)
        degraded = dict(encoded, **{f"{role}_features": features for role in roles})
        scored[(family, severity)] = evaluation.score_splits(degraded, num_splits, variants)[0]
    results = report.summarise(scored, variants, args.families, args.severities, setting["mAP"],
                               protocols.headline_gallery(variants))
    results.update({
        "method": model["method"], "test_dir": os.path.abspath(args.test_dir), "dataset": layout["dataset"],
        "num_splits": num_splits, "gallery_variants": variants, "headline_gallery": protocols.headline_gallery(variants),
        "degrade": args.degrade, "families": args.families, "severities": args.severities, "seed": args.seed,
        "protocol": setting, "table_mAP": setting["mAP"], "metrics": list(evaluation.metric_names()),
        "metric_conventions": evaluation.METRIC_CONVENTIONS, "corruptions": report.corruption_table(args.families),
        "corruption_stage": "after the test-time preprocessing (decode, resize to the model's input size), "
                            "before mean/std normalisation; see utils/corruptions.py",
        "num_images_encoded_clean": len(encoded["paths"]), "num_degraded_images": len(rows),
        "hand_found": int(hand_found.sum()), "feature_dim": int(encoded["features"].shape[1]),
        "seconds": {"encode_clean": round(encoded["seconds"], 3), "degrade_and_encode": round(time.time() - start, 3)},
        **model["record"]})
    return results, identities[0], images[:1]


@interrupts.sigterm_as_ctrl_c
def main(argv=None):
    start = time.time()
    args = parse_args(argv)
    io.set_seed(args.seed)
    try:
        layout = splits.read_split_layout(args.test_dir)
        seeds = splits.check_split_seeds([args.test_dir], args.allow_mixed_seeds)
        if args.run_dir is not None and not os.path.isfile(os.path.join(args.run_dir, "config.json")):
            raise errors.TrainingInputError(f"{args.run_dir} holds no config.json: --run_dir (or --f_name/--m_name) "
                                            f"must name a folder written by a CLIP-FH trainer")
        if args.backbone_name is not None and not (args.backbone_name in clip.available_models()
                                                   or os.path.isfile(os.path.expanduser(args.backbone_name))):
            raise errors.EvaluationInputError(f"--backbone_name {args.backbone_name} is neither an official CLIP name "
                                              f"({', '.join(clip.available_models())}) nor a checkpoint file")
        out_dir = args.out_dir or default_out_dir(args)
        outputs.refuse_overlap("--out_dir", out_dir, {"--run_dir": args.run_dir, "--test_dir": args.test_dir},
                               may_hold=("--run_dir",))
        with outputs.OutputFolder(out_dir, overwrite=args.force, what="another robustness benchmark",
                                  ours=lambda name: is_robustness_file(name, out_dir)) as out:
            out.check_space(8 * 2 ** 20)  # two figures, JSON and CSV: a few MB
            model = load_model(args, layout)
            data.check_images(splits.query_gallery_paths(args.test_dir),
                              tuple(model["setting"]["preprocessing"]["size"]), args.num_workers,
                              what=f"images of {args.test_dir}")
            results, identity, example = run_benchmark(model, args, layout)
            results["split_seed"] = seeds.get(os.path.abspath(args.test_dir))
            results["seconds"]["total"] = round(time.time() - start, 3)
            with out.staged() as tmp:
                report.write(tmp, results, identity, example, args.seed, pdf=args.pdf)
                io.write_run_config(tmp, args, extra={k: results[k] for k in ("protocol", "method", "seconds")})
    except (errors.ClipFHError, clip.ModelDownloadError, clip.CheckpointError) as err:
        raise SystemExit(f"error: {err}") from None
    print(report.format_table(results))
    print(f"Wrote robustness.json, robustness.csv, robustness_mAP.png and corruptions.png to {out_dir} in "
          f"{time.time() - start:.1f} s; {report.damage_line(results)}")
    return results


if __name__ == "__main__":
    main()
