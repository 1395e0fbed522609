"""Zero-shot CLIP baseline for hand identification: rank every split's gallery for its queries by the
cosine similarity of CLIP image embeddings, over all Monte-Carlo splits of a split root.

    python eval_query_gallery_clip_zeroshot.py --test_dir ./11k/train_val_test_split_dorsal_r \
        --f_name ./model_eval --backbone_name ViT-B/16

Under --protocol clip-handid (the default) the photos are preprocessed as CLIP-HandID's zero-shot
script does, with CLIP's own preprocess: shorter side to the input size (bicubic), centre crop, CLIP
mean/std, full JPEG decoding; under clip-reid and clip-fh the whole photo is squashed to H x W.

Writes <f_name>/clip_zero_shot/<backbone>/<test set>/ (test set: the 11k aspect such as dorsal_r,
or HD, so two test sets never share a folder): result_split{i}.mat (and result_split{i}_all.mat for
11k's gallery{i}_all), results.json, results.csv and config.json. The folder is written whole: a
second evaluation into it is refused, and an interrupted or failed --force leaves the earlier one as
it was.
"""
import argparse
import os

import clip
import models
from utils import data, errors, evaluation, flags, interrupts, io, preprocessing, protocols, splits


def backbone_folder_name(backbone_name):
    """Output folder for a backbone: 'ViT-B/16' -> 'ViT-B-16'; a checkpoint path -> its file stem."""
    if backbone_name in clip.available_models():
        return backbone_name.replace("/", "-")
    return os.path.splitext(os.path.basename(os.path.normpath(backbone_name)))[0]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test_dir", default="./11k/train_val_test_split_dorsal_r",
                        help="split root made by a prepare script (holds query{i}/, gallery{i}/, splits.json)")
    parser.add_argument("--f_name", default="./model_eval", help="output root")
    parser.add_argument("--backbone_name", default="ViT-B/16",
                        help=f"official CLIP name {clip.available_models()} or a local checkpoint path")
    parser.add_argument("--download_root", default="~/.cache/clip", help="where official weights are cached")
    parser.add_argument("--pretrained", choices=["true", "false"], default=None,
                        help="record whether the checkpoint holds pretrained weights (default: true for "
                             "official names, unknown for local files)")
    parser.add_argument("--batch_size", type=int, default=64, help="images per encoding batch (default 64)")
    parser.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="DataLoader workers that decode images (default: up to 4, one per CPU core)")
    parser.add_argument("--input_size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="network input height and width (default: the backbone's own, as CLIP's preprocess: "
                             "224 224; 288 for RN50x4, 384 RN50x16, 448 RN50x64, 336 ViT-L/14@336px)")
    parser.add_argument("--resize", choices=["crop", "squash"], default=None,
                        help="crop: shorter side to the input size (bicubic), centre crop (CLIP's own preprocess, "
                             "clip-handid's); squash: the whole photo resized to H x W, nothing cut off (clip-reid's "
                             "and clip-fh's); default: the protocol's")
    parser.add_argument("--fast_decode", action="store_true",
                        help="decode JPEGs in PIL's draft mode (faster on large photos, pixels differ slightly; "
                             "results.json records it); the default full decoding is what the references do")
    protocols.add_protocol_args(parser)
    parser.add_argument("--stride", type=int, default=None,
                        help="ViT patch stride; default: the backbone's own patch size")
    parser.add_argument("--pos_interp", choices=list(clip.POS_INTERPOLATIONS), default="bilinear",
                        help="how positional embeddings are resized for another input size (bilinear, as "
                             "CLIP-ReID and CLIP-HandID)")
    parser.add_argument("--max_rank", type=int, default=50, help="length of the stored CMC curves")
    parser.add_argument("--force", action="store_true", help="overwrite an earlier result in the output folder")
    parser.add_argument("--allow_mixed_seeds", action="store_true",
                        help="accept a split root whose sibling aspect roots were prepared with another --seed")
    io.add_compile_arg(parser)
    io.add_common_args(parser)
    args = parser.parse_args(argv)
    args.input_size = list(args.input_size or clip.native_input_size(args.backbone_name))
    flags.exit_on_problems(flags.bound_problems(args, at_least={"input_size": 1, "batch_size": 1, "max_rank": 1,
                                                                "num_workers": 0, "stride": 1}))
    return args


@interrupts.sigterm_as_ctrl_c
def main(argv=None):
    args = parse_args(argv)
    try:
        return evaluate(args)
    except (errors.ClipFHError, clip.ModelDownloadError, clip.CheckpointError) as err:
        raise SystemExit(f"error: {err}") from None


def evaluate(args):
    io.set_seed(args.seed)
    layout = splits.read_split_layout(args.test_dir)
    setting = protocols.test_settings(args.protocol, None, input_size=tuple(args.input_size), flip=args.flip,
                                      amp=args.amp, gallery=args.gallery, resize=args.resize,
                                      fast_decode=args.fast_decode, available=layout["gallery_variants"],
                                      cuda=str(args.device).startswith("cuda"))
    image_paths = splits.query_gallery_paths(args.test_dir)
    out_dir = os.path.join(args.f_name, "clip_zero_shot", backbone_folder_name(args.backbone_name),
                           splits.test_set_name(args.test_dir))
    with evaluation.open_output(out_dir, args.force) as out:  # one evaluation per folder, from here to the end
        seeds = splits.check_split_seeds([args.test_dir], args.allow_mixed_seeds)
        official = args.backbone_name in clip.available_models()
        pretrained = {"true": True, "false": False}.get(args.pretrained, True if official else None)
        model, _ = clip.load(args.backbone_name, device=args.device, download_root=args.download_root,
                             input_size=tuple(args.input_size), patch_stride=args.stride, pos_interp=args.pos_interp)
        model.eval()
        out.check_space(evaluation.estimate_result_bytes(args.test_dir, layout["num_splits"], layout["gallery_variants"],
                                                         model.visual.output_dim))
        data.check_images(image_paths, tuple(args.input_size), args.num_workers,
                          what=f"images of {args.test_dir}")
        note = models.speed_up_image_encoder(model.visual, args.device, args.compile, for_training=False)
        args.compile = models.use_compile(args.compile, args.device)  # config.json records what ran
        if note:
            print(note)
        print(f"preprocessing ({args.protocol}): {preprocessing.describe(setting['preprocessing'])}")
        extra = {"backbone": args.backbone_name, "pretrained": pretrained, "feature": "CLIP encode_image",
                 "preprocessing": setting["preprocessing"], "protocol": setting,
                 "split_seed": seeds.get(os.path.abspath(args.test_dir))}
        results = evaluation.evaluate_query_gallery(
            model.encode_image, args.test_dir, out_dir, gallery=setting["gallery"],
            method_name=f"CLIP {args.backbone_name} zero-shot" if official
            else f"CLIP zero-shot ({os.path.basename(args.backbone_name)})",
            input_size=tuple(args.input_size), batch_size=args.batch_size, num_workers=args.num_workers,
            device=args.device, flip=setting["flip"], amp=io.resolve_amp(setting["amp"], args.device),
            max_rank=args.max_rank, extra=extra, table_mAP=setting["mAP"], run_args=args, output=out,
            feature_dim=model.visual.output_dim, preprocessing=setting["preprocessing"])
    variant = protocols.headline_gallery(results["gallery_variants"])
    mean = results["summary"][variant]["mean"]
    print(f"Wrote results.json, results.csv and {len(results['rows'])} result_split*.mat for "
          f"{results['num_splits']} split(s) to {out_dir} (protocol {args.protocol}, gallery{{i}}"
          f"{'_all' if variant == 'all' else ''}: Rank-1 {100 * mean['rank1']:.2f}%, "
          f"{setting['mAP']} {100 * mean[setting['mAP']]:.2f}%)")
    return results


if __name__ == "__main__":
    main()
