"""The whole CLIP-FH path in one command, on a synthetic hand dataset made on the spot:

    python demo.py                      # pretrained ViT-B/16 when cached or downloadable
    python demo.py --backbone_name RN50 --device cpu

1. draws a small synthetic hand dataset in 11k format under --data_dir (default ./demo_data);
2. prepares the MBA-Net splits (prepare_train_val_test_11k_r_l.py);
3. evaluates zero-shot CLIP on dorsal-right over all Monte-Carlo splits;
4. draws the ranking figure of split 0;
5. fine-tunes the image encoder (train_finetune.py) and evaluates it (eval_query_gallery_finetune.py);
6. trains CLIP-ReID (train_clipreid.py) and PromptSG (train_promptsg.py) and evaluates them;
7. prints the methods side by side.

When the pretrained weights cannot be had, a banner says so and every step uses randomly
initialised weights of the same architecture; every output then records "pretrained": false.
Training runs are short (--epochs); on a CPU the input size defaults to 112x112 to keep them quick.
"""
import argparse
import json
import os
import sys
import time

import clip
from utils import io, splits, synthetic

ASPECT = "dorsal_r"
# the synthetic training set has about a dozen identities: PK batches of 8 identities x 4 images
PK_BATCH = ["--batch_size", "32", "--num_instances", "4"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="./demo_data", help="where the synthetic dataset is drawn")
    p.add_argument("--out", default="./demo_output", help="output root of every step")
    p.add_argument("--backbone_name", default="ViT-B/16", help="official CLIP name or a local checkpoint path")
    p.add_argument("--download_root", default="~/.cache/clip", help="where official weights are cached")
    p.add_argument("--random_init", action="store_true",
                   help="use randomly initialised weights even if pretrained ones are available")
    p.add_argument("--num_ids", type=int, default=24,
                   help="synthetic identities per hand aspect (at least 16: half of them train)")
    p.add_argument("--num_splits", type=int, default=10, help="Monte-Carlo query/gallery splits")
    p.add_argument("--input_size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="default 224 224 on CUDA, 112 112 on CPU")
    p.add_argument("--epochs", type=int, default=None, help="epochs of each training run (default 10 on CUDA, 4 on CPU)")
    p.add_argument("--methods", nargs="*", default=["finetune", "clipreid", "promptsg"],
                   choices=["finetune", "clipreid", "promptsg"], help="training methods to run after zero-shot")
    p.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader workers of every step (default: up to 4, one per CPU core)")
    io.add_common_args(p)
    return p.parse_args(argv)


def banner(lines):
    width = max(len(line) for line in lines) + 4
    print("\n" + "!" * width)
    for line in lines:
        print("! " + line.ljust(width - 4) + " !")
    print("!" * width + "\n", flush=True)


def resolve_backbone(args):
    """Returns (backbone argument for the scripts, pretrained flag). Falls back to random weights, loudly.
    A local checkpoint path is used as it is; whether it holds pretrained weights is then unknown (None)."""
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
            reason = str(err).splitlines()[0]
    path = os.path.join(args.out, f"random_init_{args.backbone_name.replace('/', '-')}_seed{args.seed}.pt")
    if not os.path.isfile(path):
        os.makedirs(args.out, exist_ok=True)
        io.atomic_torch_save(clip.random_state_dict(args.backbone_name, seed=args.seed), path)
    banner([f"PRETRAINED {args.backbone_name} WEIGHTS ARE NOT AVAILABLE ({reason[:90]})",
            "This demo runs with RANDOMLY INITIALISED weights: the numbers below say nothing",
            "about CLIP. Every output records \"pretrained\": false.",
            f"Random weights: {path}"])
    return path, False


def load_results(path):
    with open(path) as f:
        return json.load(f)


def table_rows(results, name):
    variant = results["gallery_variants"][-1]
    rows = [r for r in results["rows"] if r["gallery"] == variant]
    per_split = {k: [r[k] for r in rows] for k in ("rank1", "rank5", "rank10")}
    per_split["mAP"] = [r["mAP_hand"] for r in rows]
    return f"{name} [gallery {variant}]", per_split


def main(argv=None):
    args = parse_args(argv)
    if args.num_ids < 16:
        raise SystemExit("--num_ids must be at least 16: the PK batches need 8 training identities")
    start = time.time()
    on_cuda = args.device.startswith("cuda")
    input_size = args.input_size or ([224, 224] if on_cuda else [112, 112])
    epochs = args.epochs or (10 if on_cuda else 4)
    size_args = ["--input_size", str(input_size[0]), str(input_size[1])]
    common = ["--device", args.device, "--seed", str(args.seed), "--num_workers", str(args.num_workers)]

    import prepare_train_val_test_11k_r_l as prepare
    import eval_query_gallery_clip_zeroshot as zeroshot
    import query_ranking_result_demo as ranking

    data_11k = os.path.join(args.data_dir, "11k")
    print(f"[1/6] drawing a synthetic 11k-format dataset in {data_11k}", flush=True)
    synthetic.make_synthetic_11k(data_11k, num_ids_per_aspect=args.num_ids, seed=args.seed)
    print("[2/6] preparing the MBA-Net splits", flush=True)
    prepare.main(["--data_dir", data_11k, "--num_splits", str(args.num_splits), "--seed", str(args.seed),
                  "--force"])
    split_root = os.path.join(data_11k, f"train_val_test_split_{ASPECT}")

    backbone, pretrained = resolve_backbone(args)
    pretrained_flag = [] if pretrained is None else ["--pretrained", "true" if pretrained else "false"]
    print("[3/6] zero-shot CLIP", flush=True)
    zs = zeroshot.main(["--test_dir", split_root, "--f_name", args.out, "--backbone_name", backbone,
                        "--download_root", args.download_root, "--force", *size_args, *common,
                        *pretrained_flag])
    zs_dir = os.path.join(args.out, "clip_zero_shot", zeroshot.backbone_folder_name(backbone),
                          splits.test_set_name(split_root))
    rows = [table_rows(zs, "zero-shot CLIP")]

    print("[4/6] ranking figure", flush=True)
    figure = os.path.join(args.out, "ranking_zero_shot.png")
    ranking.main(["--mat", os.path.join(zs_dir, "result_split0_all.mat"), "--num_queries", "4",
                  "--top_k", "8", "--out", figure, "--seed", str(args.seed), "--force"])

    print(f"[5/6] training: {', '.join(args.methods) or 'nothing'}", flush=True)
    import eval_query_gallery_finetune as eval_finetune
    train_common = ["--data_dir", split_root, "--f_name", args.out, "--backbone_name", backbone,
                    "--epochs", str(epochs), "--warmup_epochs", "1", "--force", "--no-final_test", *size_args, *common,
                    *pretrained_flag]
    if args.download_root:
        train_common += ["--download_root", args.download_root]
    for method in args.methods:
        m_name, name = run_method(method, train_common, epochs, args)
        results = eval_finetune.main(["--test_dir", split_root, "--f_name", args.out, "--m_name", m_name,
                                      "--out_dir", os.path.join(args.out, m_name, "eval_best"), "--force",
                                      "--device", args.device, "--num_workers", str(args.num_workers)])
        rows.append(table_rows(results, name))

    print("[6/6] summary", flush=True)
    weights = {True: "pretrained", False: "RANDOM INIT", None: "local checkpoint"}[pretrained]
    title = (f"Synthetic 11k {ASPECT}, {args.num_splits} splits, backbone {args.backbone_name} ({weights}), "
             f"input {input_size[0]}x{input_size[1]}")
    table = io.format_results_table(rows, title=title)
    print(table)
    io.atomic_write_text(os.path.join(args.out, "summary.txt"), table + "\n")
    io.write_run_config(args.out, args, extra={"pretrained": pretrained, "backbone": backbone,
                                                  "input_size": input_size, "epochs": epochs},
                           name="demo_config.json")
    print(f"Wrote the demo's data to {args.data_dir}, results, the ranking figure ({figure}) and summary.txt "
          f"to {args.out} in {time.time() - start:.0f} s")
    return rows


def run_method(method, train_common, epochs, args):
    if method == "finetune":
        import train_finetune
        m_name = "finetune"
        train_finetune.main([*train_common, "--m_name", m_name, "--eval_every", str(epochs), "--batch_size", "16"])
        return m_name, "fine-tuned (CLIP-HandID recipe)"
    if method == "clipreid":
        import train_clipreid
        m_name = "clipreid"
        train_clipreid.main([*train_common, "--m_name", m_name, "--eval_every", str(epochs),
                             "--stage1_epochs", str(max(epochs, 10)), *PK_BATCH])
        return m_name, "CLIP-ReID (two-stage)"
    import train_promptsg
    m_name = "promptsg"
    train_promptsg.main([*train_common, "--m_name", m_name, "--eval_every", str(epochs), *PK_BATCH])
    return m_name, "PromptSG"


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
