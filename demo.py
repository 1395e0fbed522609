"""The whole CLIP-FH path in one command, on a synthetic hand dataset made on the spot:

    python demo.py                      # pretrained ViT-B/16 when cached or downloadable
    python demo.py --backbone_name RN50 --device cpu

1. draws a small synthetic hand dataset in 11k format under --data_dir (default ./demo_data);
2. prepares the MBA-Net splits (prepare_train_val_test_11k_r_l.py);
3. evaluates zero-shot CLIP on dorsal-right over all Monte-Carlo splits;
4. draws the ranking figure of split 0;
5. fine-tunes the image encoder (train_finetune.py) and evaluates it (eval_query_gallery_finetune.py);
6. trains CLIP-ReID (train_clipreid.py), PromptSG (train_promptsg.py) and CLIP-HandID's own method
   (train_handid.py) and evaluates them;
7. prints the methods side by side and writes the results table (collect_results.py).

When the pretrained weights cannot be had, a banner says so and the demo builds a small CLIP-format
model instead (SMALL_VIT below: random init, 64x64 inputs), with a training recipe that lets it learn
within minutes on a CPU; every output then records "pretrained": false. With pretrained weights,
training runs are short (--epochs); on a CPU the input size defaults to 112x112 to keep them quick.
"""
import argparse
import os
import sys
import textwrap
import time

import clip
from clip.model import MODEL_CONFIGS
from utils import flags, interrupts, io, outputs, splits, synthetic
from utils.errors import ClipFHError

ASPECT = "dorsal_r"
# PK batches of 8 identities x 4 images
PK_BATCH = ["--batch_size", "32", "--num_instances", "4"]
# The model built when no pretrained weights are available: a CLIP-format ViT small enough to train on
# two CPU cores in seconds an epoch (patch 8 at 64x64: 64 tokens, width 128, 4 layers; text width 64).
SMALL_VIT = dict(embed_dim=64, image_resolution=64, vision_layers=4, vision_width=128, vision_patch_size=8,
                 context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=2)
# Its recipe: randomly initialised weights need learning rates far above the fine-tuning ones, more
# identities to learn from and more optimiser steps (PK batches of 4 identities x 4 images).
# CLIP-ReID's stage 2 learns slower (its image-to-text loss pulls towards text features of a random
# text tower): a lower learning rate for twice the epochs.
SMALL_RECIPE = {"num_ids": 40, "input_size": [64, 64], "stride": 8, "epochs": 20, "lr": 1e-3,
                "pk_batch": ["--batch_size", "16", "--num_instances", "4"],
                "clipreid": ["--lr", "3e-4", "--epochs", "40", "--eval_every", "40"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="./demo_data", help="where the synthetic dataset is drawn")
    p.add_argument("--out", default="./demo_output", help="output root of every step")
    p.add_argument("--backbone_name", default="ViT-B/16", help="official CLIP name or a local checkpoint path")
    p.add_argument("--download_root", default="~/.cache/clip", help="where official weights are cached")
    p.add_argument("--random_init", action="store_true",
                   help="use randomly initialised weights even if pretrained ones are available")
    p.add_argument("--num_ids", type=int, default=None,
                   help="synthetic identities per hand aspect (at least 16: half of them train); default 24, "
                        "40 for the small random model")
    p.add_argument("--images_per_id", type=int, nargs=2, default=[5, 7], metavar=("MIN", "MAX"),
                   help="synthetic images per identity and aspect")
    p.add_argument("--num_splits", type=int, default=10, help="Monte-Carlo query/gallery splits")
    p.add_argument("--input_size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="default 224 224 on CUDA, 112 112 on CPU (128 128 for ViT-B/32: whole patches); 64 64 for "
                        "the small random model")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs of each training run (default 10 on CUDA, 4 on CPU; 20 for the small random model, "
                        "40 for its CLIP-ReID)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate of every trainer (default: each trainer's own; 1e-3 for the small random model, "
                        "3e-4 for its CLIP-ReID)")
    p.add_argument("--methods", nargs="*", default=["finetune", "clipreid", "promptsg", "handid"],
                   choices=["finetune", "clipreid", "promptsg", "handid"], help="training methods to run after zero-shot")
    p.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader workers of every step (default: up to 4, one per CPU core)")
    io.add_common_args(p)
    args = p.parse_args(argv)
    # a knob given as 0 is an error, not "unset": only a flag left out takes the default
    problems = flags.bound_problems(args, at_least={"num_ids": 16, "images_per_id": 2, "num_splits": 1,
                                                    "input_size": 1, "epochs": 1, "num_workers": 0}, positive=("lr",))
    if args.images_per_id[0] > args.images_per_id[1]:
        problems.append(f"--images_per_id MIN MAX needs MIN <= MAX, got {args.images_per_id[0]} {args.images_per_id[1]}")
    flags.exit_on_problems(problems)
    return args


def banner(lines):
    width = max(len(line) for line in lines) + 4
    print("\n" + "!" * width)
    for line in lines:
        print("! " + line.ljust(width - 4) + " !")
    print("!" * width + "\n", flush=True)


def resolve_backbone(args):
    """Returns (backbone argument for the scripts, pretrained flag). Without pretrained weights it builds
    the small random model, loudly. A local checkpoint path is used as it is; whether it holds
    pretrained weights is then unknown (None)."""
    if args.backbone_name not in clip.available_models():
        if not os.path.isfile(args.backbone_name):
            raise SystemExit(f"--backbone_name {args.backbone_name} is neither an official CLIP name "
                             f"{clip.available_models()} nor a checkpoint file")
        return args.backbone_name, None
    if args.random_init:
        reason = "--random_init was given"
    else:
        try:
            clip.load(args.backbone_name, device="cpu", download_root=args.download_root)
            return args.backbone_name, True
        except (RuntimeError, OSError) as err:
            reason = " ".join(str(err).split())
    path = os.path.join(args.out, f"small_vit_random_init_seed{args.seed}.pt")
    if not os.path.isfile(path):
        os.makedirs(args.out, exist_ok=True)
        io.atomic_torch_save(clip.random_state_dict(SMALL_VIT, seed=args.seed), path)
    banner([f"PRETRAINED {args.backbone_name} WEIGHTS ARE NOT AVAILABLE:", *textwrap.wrap(reason, 92, break_long_words=False, break_on_hyphens=False),
            "This demo runs a SMALL CLIP-FORMAT ViT with RANDOMLY INITIALISED weights built by the",
            "project (patch 8, width 128, 4 layers, 64x64 inputs): the numbers below say nothing",
            "about CLIP. Every output records \"pretrained\": false.",
            f"Random weights: {path}"])
    return path, False


def cpu_input_size(backbone):
    """The quick CPU input: 112 x 112, rounded up to whole patches of an official ViT (128 for ViT-B/32)."""
    patch = MODEL_CONFIGS[backbone]["vision_patch_size"] if backbone in MODEL_CONFIGS else None
    side = 112 if patch is None else -(-112 // patch) * patch
    return [side, side]


def check_geometry(backbone, input_size, stride, download_root):
    """Before any data is drawn: the backbone builds at the demo's input size (a ViT's patches cover it
    whole, a ResNet gets at least 32 pixels a side), so no step fails after the work has begun."""
    try:
        clip.load(backbone, device="cpu", download_root=download_root, input_size=tuple(input_size),
                  patch_stride=stride)
    except clip.CheckpointError as err:
        raise SystemExit(f"error: {err}") from None


def table_rows(results, name):
    variant = results["gallery_variants"][-1]
    rows = [r for r in results["rows"] if r["gallery"] == variant]
    per_split = {k: [r[k] for r in rows] for k in ("rank1", "rank5", "rank10")}
    per_split["mAP"] = [r["mAP_hand"] for r in rows]
    return f"{name} [gallery {variant}]", per_split


@interrupts.sigterm_as_ctrl_c
def main(argv=None):
    args = parse_args(argv)
    try:
        for folder, flag in ((args.out, "--out"), (args.data_dir, "--data_dir")):
            outputs.check_writable(folder, flag)
    except ClipFHError as err:
        raise SystemExit(f"error: {err}") from None
    start = time.time()
    backbone, pretrained = resolve_backbone(args)
    small = pretrained is False
    num_ids = args.num_ids if args.num_ids is not None else SMALL_RECIPE["num_ids"] if small else 24
    on_cuda = args.device.startswith("cuda")
    input_size = args.input_size if args.input_size is not None else (
        SMALL_RECIPE["input_size"] if small else [224, 224] if on_cuda else cpu_input_size(backbone))
    epochs = args.epochs if args.epochs is not None else SMALL_RECIPE["epochs"] if small else 10 if on_cuda else 4
    lr = args.lr if args.lr is not None else SMALL_RECIPE["lr"] if small else None
    check_geometry(backbone, input_size, SMALL_RECIPE["stride"] if small else None, args.download_root)
    import prepare_train_val_test_11k_r_l as prepare
    import eval_query_gallery_clip_zeroshot as zeroshot
    import query_ranking_result_demo as ranking
    import collect_results

    data_11k = os.path.join(args.data_dir, "11k")
    print(f"[1/7] drawing a synthetic 11k-format dataset in {data_11k}", flush=True)
    synthetic.make_synthetic_11k(data_11k, num_ids_per_aspect=num_ids, images_per_id=tuple(args.images_per_id),
                                 image_size=(80, 60), seed=args.seed)
    print("[2/7] preparing the MBA-Net splits", flush=True)
    prepare.main(["--data_dir", data_11k, "--num_splits", str(args.num_splits), "--seed", str(args.seed),
                  "--force"])
    split_root = os.path.join(data_11k, f"train_val_test_split_{ASPECT}")

    size_args = ["--input_size", str(input_size[0]), str(input_size[1])]
    common = ["--device", args.device, "--seed", str(args.seed), "--num_workers", str(args.num_workers)]
    pretrained_flag = [] if pretrained is None else ["--pretrained", "true" if pretrained else "false"]
    print("[3/7] zero-shot CLIP", flush=True)
    zs = zeroshot.main(["--test_dir", split_root, "--f_name", args.out, "--backbone_name", backbone,
                        "--download_root", args.download_root, "--force", *size_args, *common,
                        *pretrained_flag])
    zs_dir = os.path.join(args.out, "clip_zero_shot", zeroshot.backbone_folder_name(backbone),
                          splits.test_set_name(split_root))
    rows = [table_rows(zs, "zero-shot CLIP")]

    print("[4/7] ranking figure", flush=True)
    figure = os.path.join(args.out, "ranking_zero_shot.png")
    ranking.main(["--mat", os.path.join(zs_dir, "result_split0_all.mat"), "--num_queries", "4",
                  "--top_k", "8", "--out", figure, "--pdf", "--seed", str(args.seed), "--force"])

    print(f"[5/7] training: {', '.join(args.methods) or 'nothing'}", flush=True)
    import eval_query_gallery_finetune as eval_finetune
    train_common = ["--data_dir", split_root, "--f_name", args.out, "--backbone_name", backbone,
                    "--epochs", str(epochs), "--warmup_epochs", "1", "--eval_every", str(epochs), "--force",
                    "--no-final_test", *size_args, *common, *pretrained_flag]
    if small:
        train_common += ["--stride", str(SMALL_RECIPE["stride"])]
    if lr is not None:
        train_common += ["--lr", str(lr)]
    if args.download_root:
        train_common += ["--download_root", args.download_root]
    result_dirs = [zs_dir]
    for method in args.methods:
        own = SMALL_RECIPE.get(method, []) if small and args.epochs is None and args.lr is None else []
        if method != "clipreid" and epochs <= 20:
            # the recipes' first LR step (epoch 20 or 40) lies past a demo run: say so, constant LR after warm-up
            own = own + ["--milestones"]
        m_name, name = run_method(method, train_common + own, epochs, SMALL_RECIPE["pk_batch"] if small else PK_BATCH)
        result_dirs.append(os.path.join(args.out, m_name, "eval_best"))
        print(f"[6/7] evaluating {name}", flush=True)
        results = eval_finetune.main(["--test_dir", split_root, "--f_name", args.out, "--m_name", m_name,
                                      "--out_dir", result_dirs[-1], "--force",
                                      "--device", args.device, "--num_workers", str(args.num_workers)])
        rows.append(table_rows(results, name))

    print("[7/7] summary", flush=True)
    weights = {True: "pretrained", False: "SMALL VIT, RANDOM INIT", None: "local checkpoint"}[pretrained]
    title = (f"Synthetic 11k {ASPECT}, {args.num_splits} splits, backbone "
             f"{'small ViT' if small else args.backbone_name} ({weights}), input {input_size[0]}x{input_size[1]}")
    table = io.format_results_table(rows, title=title) + "\n" + versus_zero_shot(rows)
    print(table)
    io.atomic_write_text(os.path.join(args.out, "summary.txt"), table + "\n")
    collect_results.main([*result_dirs, "--out", os.path.join(args.out, "results_table"), "--plot", "--force"])
    io.write_run_config(args.out, args, extra={"pretrained": pretrained, "backbone": backbone,
                                                  "input_size": input_size, "epochs": epochs, "lr": lr,
                                                  "num_ids": num_ids},
                           name="demo_config.json")
    print(f"Wrote the demo's data to {args.data_dir}, results, the ranking figure ({figure}), summary.txt and "
          f"results_table.md/.tex/.csv to {args.out} in {time.time() - start:.0f} s")
    return rows


def versus_zero_shot(rows):
    """One line per trained method: its mean Rank-1 and mAP against zero-shot's (the first row)."""
    def mean(values):
        return 100 * sum(values) / len(values)
    (_, base), lines = rows[0], []
    for name, metrics in rows[1:]:
        gains = [mean(metrics[k]) - mean(base[k]) for k in ("rank1", "mAP")]
        verdict = "above" if min(gains) > 0 else "NOT above"
        lines.append(f"{name}: Rank-1 {gains[0]:+.2f}, mAP {gains[1]:+.2f} points vs zero-shot ({verdict} zero-shot)")
    return "\n".join(lines)


def run_method(method, train_common, epochs, pk_batch):
    if method == "finetune":
        import train_finetune
        train_finetune.main([*train_common, "--m_name", "finetune", "--batch_size", "16"])
        return "finetune", "fine-tuned (CLIP-HandID recipe)"
    if method == "clipreid":
        import train_clipreid
        train_clipreid.main([*train_common, "--m_name", "clipreid", "--stage1_epochs", str(max(epochs, 10)),
                             *pk_batch])
        return "clipreid", "CLIP-ReID (two-stage)"
    if method == "handid":
        import train_handid
        train_handid.main([*train_common, "--m_name", "handid", "--batch_size", "16"])
        return "handid", "CLIP-HandID (textual inversion)"
    import train_promptsg
    train_promptsg.main([*train_common, "--m_name", "promptsg", *pk_batch])
    return "promptsg", "PromptSG"


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
