"""Evaluate a trained model (train_finetune.py, and the CLIP-ReID / PromptSG / CLIP-HandID trainers) on the
query/gallery Monte-Carlo splits of a split root, with the same protocol and outputs as the
zero-shot evaluator.

The model is rebuilt from the run's config.json and net_<which_epoch>.pth alone (no pretrained
download). --test_dir may be another split root than the training one (cross-domain: e.g. a
dorsal-right model on 11k dorsal-left or on HD).

    python eval_query_gallery_finetune.py --f_name ./model_11k_d_r --m_name clip_hand_vit \
        --test_dir ./11k/train_val_test_split_dorsal_r

--protocol (default clip-handid) sets the checkpoint (net_best; clip-reid: net_last), the feature,
flip, precision, galleries and mAP; images are preprocessed as the run was trained (the whole photo
squashed to its input size, CLIP mean/std), JPEGs decoded fully.

Writes <f_name>/<m_name>/eval_<which_epoch>_<test set>[_flip][_<feature>][_rerank][_composed]/ (or --out_dir):
result_split{i}.mat (+ result_split{i}_all.mat), results.json, results.csv and config.json. The folder
is written whole: a second evaluation into it is refused, and an interrupted or failed --force leaves
the earlier one as it was.
"""
import argparse
import os

import models
import models_handid  # noqa: F401  (registers the "handid" model kind)
from utils import data, errors, evaluation, flags, interrupts, io, preprocessing, protocols, result_files, splits


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--test_dir", default="./11k/train_val_test_split_dorsal_r",
                   help="split root made by a prepare script (query{i}/, gallery{i}/, splits.json)")
    p.add_argument("--f_name", default="./model_11k_d_r", help="output root of the training run")
    p.add_argument("--m_name", default="clip_hand_vit", help="run folder inside --f_name")
    p.add_argument("--which_epoch", default=None,
                   help="best, last or an epoch number N (net_N.pth); default: the checkpoint the protocol's "
                        "reference reports (clip-handid, clip-fh: best; clip-reid: last)")
    p.add_argument("--feature", default=None,
                   choices=list(dict.fromkeys(models.FEATURE_CHOICES + models.PROMPTSG_FEATURES)),
                   help="retrieval feature (default: the protocol's, not the run's --feature: clip-handid after the "
                        "BNNecks, concat_bn / PromptSG fused_bn; clip-reid and clip-fh before them, concat / fused); "
                        "PromptSG runs: fused, fused_bn, concat (CLIP feature + fused) or proj")
    p.add_argument("--inference_prompt", default=None, choices=models.INFERENCE_PROMPTS,
                   help="PromptSG runs: the prompt that guides the attention, fixed (encoded once) or composed "
                        "(each image's own pseudo-word); default: the run's --inference_prompt")
    protocols.add_protocol_args(p)
    p.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking (Zhong et al. 2017)")
    p.add_argument("--k1", type=int, default=20, help="re-ranking k1")
    p.add_argument("--k2", type=int, default=6, help="re-ranking k2")
    p.add_argument("--lambda_value", type=float, default=0.3, help="re-ranking weight of the original distance")
    p.add_argument("--fast_decode", action="store_true",
                   help="decode JPEGs in PIL's draft mode (faster on large photos, pixels differ slightly; "
                        "results.json records it); the default full decoding is what the references do")
    p.add_argument("--batch_size", type=int, default=64, help="images per encoding batch")
    p.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader workers that decode images (default: up to 4, one per CPU core)")
    p.add_argument("--max_rank", type=int, default=50, help="length of the stored CMC curves")
    io.add_compile_arg(p)
    p.add_argument("--out_dir", default=None, help="output folder (default: inside the run folder, see above)")
    p.add_argument("--force", action="store_true", help="overwrite earlier results in the output folder")
    p.add_argument("--allow_mixed_seeds", action="store_true",
                   help="accept a --test_dir prepared with another --seed than the run's training split roots")
    io.add_common_args(p)
    args = p.parse_args(argv)
    problems = flags.bound_problems(args, at_least={"batch_size": 1, "max_rank": 1, "num_workers": 0, "k1": 1, "k2": 1})
    if not 0 <= args.lambda_value <= 1:
        problems.append(f"--lambda_value must be in [0, 1], got {args.lambda_value}")
    flags.exit_on_problems(problems)
    return args


def default_out_dir(run_dir, args, feature, run_feature, which_epoch):
    test_name = "-".join(os.path.normpath(os.path.abspath(args.test_dir)).split(os.sep)[-2:])
    name = f"eval_{which_epoch}_{test_name}"
    if args.protocol != protocols.DEFAULT_PROTOCOL:
        name += f"_{args.protocol}"
    if args.flip is not None:
        name += "_flip" if args.flip else "_noflip"
    if args.feature is not None and feature != run_feature:
        name += f"_{feature}"
    if args.rerank:
        name += "_rerank"
    if args.inference_prompt == "composed":
        name += "_composed"
    if args.fast_decode:
        name += "_fastdecode"
    return os.path.join(run_dir, name)


@interrupts.sigterm_as_ctrl_c
def main(argv=None):
    args = parse_args(argv)
    try:
        return evaluate(args)
    except errors.ClipFHError as err:
        raise SystemExit(f"error: {err}") from None


def evaluate(args):
    io.set_seed(args.seed)
    run_dir = os.path.join(args.f_name, args.m_name)
    image_paths = splits.query_gallery_paths(args.test_dir)
    layout = splits.read_split_layout(args.test_dir)
    config = models.read_run_config(run_dir, "--f_name/--m_name")
    setting = protocols.test_settings(args.protocol, config, flip=args.flip, feature=args.feature, amp=args.amp,
                                      gallery=args.gallery, which_epoch=args.which_epoch, fast_decode=args.fast_decode,
                                      available=layout["gallery_variants"], cuda=str(args.device).startswith("cuda"))
    which_epoch = setting["which_epoch"]
    model, config, checkpoint = models.load_trained_model(run_dir, which_epoch, device=args.device)
    trained_on = config.get("args", {}).get("data_dir") or []
    trained_on = [trained_on] if isinstance(trained_on, str) else trained_on
    seeds = splits.check_split_seeds([args.test_dir] + [d for d in trained_on if os.path.isdir(d)],
                                     args.allow_mixed_seeds)
    if hasattr(model, "set_test_dir"):  # models with per-aspect parts (CLIP-ReID --sie) pick the test aspect
        note = model.set_test_dir(args.test_dir)
        if note:
            print(note)
    run_feature = getattr(model, "feature", None)
    kind = config["model"].get("kind", "finetune")
    if args.feature is not None and not hasattr(model, "feature"):
        raise errors.EvaluationInputError(f"the {kind} model of {run_dir} has no --feature choice")
    feature = setting["feature"] or run_feature
    if hasattr(model, "feature"):
        model.check_feature(feature)
        model.feature = feature
    if args.inference_prompt is not None:
        if not hasattr(model, "inference_prompt"):
            raise errors.EvaluationInputError(f"--inference_prompt applies to PromptSG runs; {run_dir} holds a "
                                              f"{kind} model")
        model.inference_prompt = args.inference_prompt
    out_dir = args.out_dir or default_out_dir(run_dir, args, feature, run_feature, which_epoch)
    with evaluation.open_output(out_dir, args.force) as out:  # one evaluation per folder, from here to the end
        feature_dim = model.feature_dim() if hasattr(model, "feature_dim") else None
        rerank = {"k1": args.k1, "k2": args.k2, "lambda_value": args.lambda_value} if args.rerank else None
        out.check_space(evaluation.estimate_result_bytes(args.test_dir, layout["num_splits"], layout["gallery_variants"],
                                                         feature_dim, bool(rerank)))
        note = models.speed_up_image_encoder(model.visual, args.device, args.compile, for_training=False)
        args.compile = models.use_compile(args.compile, args.device)  # config.json records what ran
        if note:
            print(note)
        input_size = tuple(setting["preprocessing"]["size"])
        extra = {**result_files.model_record(run_dir, config, seeds.get(os.path.abspath(args.test_dir))),
                 "which_epoch": which_epoch, "epoch": checkpoint.get("epoch"), "feature": feature, "rerank": rerank,
                 "protocol": setting, "inference_prompt": getattr(model, "inference_prompt", None),
                 "preprocessing": setting["preprocessing"]}
        data.check_images(image_paths, input_size, args.num_workers, what=f"images of {args.test_dir}")
        method = f"{args.m_name} ({kind}, net_{which_epoch})" + (" + RK" if rerank else "")
        print(f"net_{which_epoch} (epoch {checkpoint.get('epoch')}), feature {feature}, preprocessing: "
              f"{preprocessing.describe(setting['preprocessing'])}")
        results = evaluation.evaluate_query_gallery(
            model, args.test_dir, out_dir, gallery=setting["gallery"], method_name=method, input_size=input_size,
            batch_size=args.batch_size, num_workers=args.num_workers, device=args.device, flip=setting["flip"],
            amp=io.resolve_amp(setting["amp"], args.device), max_rank=args.max_rank, rerank=rerank, extra=extra,
            table_mAP=setting["mAP"], run_args=args, output=out, feature_dim=feature_dim,
            preprocessing=setting["preprocessing"])
    variant = protocols.headline_gallery(results["gallery_variants"])
    mean = results["summary"][variant]["mean"]
    print(f"Wrote results.json, results.csv and {len(results['rows'])} result_split*.mat for "
          f"{results['num_splits']} split(s) to {out_dir} (protocol {args.protocol}, gallery{{i}}"
          f"{'_all' if variant == 'all' else ''}: Rank-1 {100 * mean['rank1']:.2f}%, "
          f"{setting['mAP']} {100 * mean[setting['mAP']]:.2f}%)")
    return results


if __name__ == "__main__":
    main()
