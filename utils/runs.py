"""Run folders, the training log, metrics.csv and the training curve, and the flag helpers and
end-of-epoch step every trainer shares."""
import argparse
import logging
import os
import shutil
import sys
from contextlib import contextmanager

import torch

import clip
from .errors import ClipFHError, NonFiniteLossError, TrainingInputError
from . import io, protocols
from .io import AMP_CHOICES, _atomic_write, add_common_args, read_config, set_seed, write_run_config
from .splits import read_split_layout
from .data import (LabeledImageDataset, PKSampler, ResizedImageCache, ShuffleSampler, SubsetCache, eval_transform,
                   train_load_size)
from .evaluation import evaluate_query_gallery
from .distributed import barrier, cleanup_distributed, rank0_first, ranks_agree, setup_distributed
from .training import capture_rng_state, restore_rng_state, save_checkpoint


def setup_logger(out_dir, is_main=True, name="clipfh.train", filename="train.log"):
    """Logger writing to stdout and <out_dir>/train.log (appended, so a resumed run continues it);
    silent on DDP ranks other than 0."""
    logger = get_logger(out_dir, name)
    close_logger(logger)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    if not is_main:
        logger.addHandler(logging.NullHandler())  # (without a handler Python prints warnings to stderr)
    else:
        formatter = logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(os.path.join(out_dir, filename))):
            handler.setFormatter(formatter)
            logger.addHandler(handler)
    return logger


def get_logger(out_dir, name="clipfh.train"):
    return logging.getLogger(f"{name}.{os.path.abspath(out_dir)}")


def close_logger(logger):
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)


def plot_training_curve(path, rows):
    """training_curve.png: losses, accuracies, val Rank-1/mAP and lr per epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [r["epoch"] for r in rows]

    def series(key):
        points = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
        return [p[0] for p in points], [p[1] for p in points]

    loss_keys = [k for k in rows[0] if k.startswith("loss")] if rows else []
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for key in loss_keys:
        axes[0].plot(*series(key), label=key)
    axes[0].set_title("training losses")
    for key in ("train_acc", "val_acc"):
        axes[1].plot(*series(key), marker=".", label=key)
    axes[1].set_title("closed-set accuracy")
    for key in ("val_rank1", "val_mAP"):
        axes[2].plot(*series(key), marker=".", label=key)
    axes[2].set_title("val retrieval (val vs train)")
    axes[3].plot(*series("lr"), label="lr (encoder)")
    axes[3].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("epoch")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        if epochs:
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.14, top=0.9, wspace=0.25)  # tight_layout is slow
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=72), mode="wb")
    plt.close(fig)


def parse_pretrained(value, backbone_name):
    """--pretrained true/false, else True for an official CLIP name and None (unknown) for a file."""
    if value is not None:
        return value == "true"
    return True if backbone_name in clip.available_models() else None


RUN_FILES = ("config.json", "train.log", "metrics.csv", "training_curve.png", "net_last.pth", "net_best.pth")


def trainer_parser(doc, m_name, several_roots=False):
    """A trainer's ArgumentParser (description: the first paragraph of doc) with the data and output flags."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_output_args(parser, m_name, several_roots)
    return parser


def add_data_output_args(parser, m_name, several_roots=False):
    g = parser.add_argument_group("data and output")
    if several_roots:
        g.add_argument("--data_dir", nargs="+", default=["./11k/train_val_test_split_dorsal_r"],
                       help="split root(s) holding train/ (or train_all/) and val/; several roots train one model "
                            "on several aspects (each root's identities are separate classes)")
    else:
        g.add_argument("--data_dir", default="./11k/train_val_test_split_dorsal_r",
                       help="split root holding train/ (or train_all/) and val/")
    g.add_argument("--f_name", default="./model_11k_d_r", help="output root")
    g.add_argument("--m_name", default=m_name, help="run folder inside --f_name")
    g.add_argument("--data_type", default="11k", choices=["11k", "HD"], help="dataset kind (recorded in config.json)")
    g.add_argument("--backbone_name", default="ViT-B/16",
                   help="CLIP model name (ViT-B/16, RN50, ...) or path to an OpenAI-format checkpoint")
    g.add_argument("--pretrained", choices=["true", "false"], default=None,
                   help="record whether the backbone weights are pretrained (default: true for official CLIP "
                        "names, unknown for local files)")
    g.add_argument("--train_all", action="store_true",
                   help="train on train_all (train + val); val then overlaps training, so net_best = last epoch")
    g.add_argument("--download_root", default=None, help="where pretrained CLIP weights are cached (~/.cache/clip)")
    g.add_argument("--force", action="store_true", help="overwrite an existing run folder")
    return g


def add_batching_args(parser, batch_size, title="batching"):
    g = parser.add_argument_group(title)
    g.add_argument("--batch_size", type=int, default=batch_size, help="images per batch (per process under DDP)")
    g.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers")
    return g


def add_sampler_args(group, sampler):
    group.add_argument("--sampler", default=sampler, choices=["random", "pk"])
    group.add_argument("--num_instances", type=int, default=4, help="K images per identity with --sampler pk")


def add_optimisation_args(parser, lr, epochs, warmup_epochs, milestones, gamma, weight_decay=5e-4,
                          title="optimisation", description=None):
    """The optimiser and step-schedule flags every trainer has (a trainer's description says which
    parameter groups get a multiple of --lr)."""
    g = parser.add_argument_group(title, description)
    g.add_argument("--lr", type=float, default=lr, help="base learning rate (of the pretrained image encoder)")
    g.add_argument("--optimizer", default="adam", choices=["adam", "adamw", "sgd"])
    g.add_argument("--weight_decay", type=float, default=weight_decay)
    g.add_argument("--epochs", type=int, default=epochs)
    g.add_argument("--warmup_epochs", type=int, default=warmup_epochs,
                   help="epochs of linear warm-up from a fraction of --lr (0: none)")
    g.add_argument("--milestones", type=int, nargs="*", default=milestones,
                   help="epochs where lr is multiplied by --gamma")
    g.add_argument("--gamma", type=float, default=gamma)
    g.add_argument("--ls", type=float, default=0.1, help="label smoothing of the ID losses (0 disables)")
    return g


def add_input_args(parser, erasing_p=0.0, cache_root="<data_dir>"):
    """Input geometry, random erasing and the resized-image cache (a trainer adds its own augmentation flags
    to the group this returns)."""
    group = parser.add_argument_group("augmentation and input")
    group.add_argument("--erasing_p", type=float, default=erasing_p, help="random erasing probability")
    group.add_argument("--input_size", type=int, nargs=2, default=[224, 224], metavar=("H", "W"))
    group.add_argument("--stride", type=int, default=None,
                       help="ViT patch stride; default: the backbone's own patch size (smaller: overlapping patches)")
    group.add_argument("--pos_interp", choices=["bilinear", "bicubic"], default="bilinear",
                       help="resizing of the pretrained positional embedding to the input's token grid "
                            "(bilinear, as CLIP-ReID and CLIP-HandID)")
    group.add_argument("--last_stride", type=int, default=1, choices=[1, 2],
                       help="ResNet layer4 stride (1 as in CLIP-HandID: 14x14 map at 224)")
    group.add_argument("--cache_resized", nargs="?", const="", default=None, metavar="DIR",
                       help=f"decode and resize every photo once into a uint8 cache (default DIR: "
                            f"{cache_root}/.cache_resized) so epochs skip JPEG decoding")
    return group


def add_gpu_augment_arg(group):
    """--gpu_augment for trainers whose augmentation is data.build_train_transform's."""
    group.add_argument("--gpu_augment", action=argparse.BooleanOptionalAction, default=None,
                       help="keep the --cache_resized images on the GPU as uint8 and augment whole batches there "
                            "(default: on with CUDA and --cache_resized when the cache fits)")


def add_run_control_args(parser, resume_help, final_test_help):
    g = parser.add_argument_group("run control")
    g.add_argument("--amp", default=None, choices=AMP_CHOICES, help="default: bf16 on CUDA, none on CPU")
    io.add_compile_arg(g)
    g.add_argument("--grad_clip", type=float, default=0.0, help="max gradient norm (0: off); applied before the step")
    g.add_argument("--resume", action="store_true", help=resume_help)
    g.add_argument("--save_every", type=int, default=10, help="also keep net_<epoch>.pth every N epochs (0: never)")
    g.add_argument("--eval_every", type=int, default=5, help="validate every N epochs (and after the last)")
    g.add_argument("--final_test", action=argparse.BooleanOptionalAction, default=True, help=final_test_help)
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bars")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic GPU kernels, cuDNN autotuning off (slower): a resumed GPU run then ends "
                        "with the same weights as an uninterrupted one")
    add_common_args(g)
    return g


def common_arg_problems(args):
    """Messages for the flags every trainer shares (a flag still None takes a backbone default later)."""
    problems = []
    for flag in ("batch_size", "epochs", "eval_every"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            problems.append(f"--{flag} must be positive, got {value}")
    if args.lr is not None and args.lr <= 0:
        problems.append(f"--lr must be positive, got {args.lr}")
    if not 0 <= args.ls < 1:
        problems.append(f"--ls must be in [0, 1), got {args.ls}")
    if not 0 <= args.erasing_p <= 1:
        problems.append(f"--erasing_p must be in [0, 1], got {args.erasing_p}")
    if args.save_every < 0 or args.warmup_epochs < 0 or args.grad_clip < 0:
        problems.append("--save_every, --warmup_epochs and --grad_clip must not be negative")
    if min(args.input_size) < 1 or (args.stride is not None and args.stride < 1):
        problems.append(f"--input_size and --stride must be positive, got {args.input_size} and {args.stride}")
    return problems


def start_run(args, dist_info, run_files=RUN_FILES, resume_file="net_last.pth"):
    """Claim the run folder <f_name>/<m_name>, open train.log and seed; returns (out_dir, log).
    A folder holding a run is refused without --force (which empties it of run_files, net_*.pth and
    final_test/) or --resume (which needs resume_file there)."""
    out_dir = os.path.join(args.f_name, args.m_name)
    if args.resume and not os.path.isfile(os.path.join(out_dir, resume_file)):
        raise TrainingInputError(f"--resume: {os.path.join(out_dir, resume_file)} does not exist; start the run "
                                 f"without --resume")
    existing = [f for f in run_files if os.path.exists(os.path.join(out_dir, f))]
    if existing and not args.force and not args.resume:
        raise TrainingInputError(f"{out_dir} already holds a run ({', '.join(existing)}); pass --resume to "
                                 f"continue it, --force to overwrite it, or choose another --m_name")
    barrier(dist_info)
    if dist_info.is_main:
        os.makedirs(out_dir, exist_ok=True)
        if args.force and not args.resume:
            for name in os.listdir(out_dir):
                if name in run_files or (name.startswith("net_") and name.endswith(".pth")):
                    os.remove(os.path.join(out_dir, name))
            if os.path.isdir(os.path.join(out_dir, "final_test")):
                shutil.rmtree(os.path.join(out_dir, "final_test"))
    barrier(dist_info)
    log = setup_logger(out_dir, dist_info.is_main)
    log.info("command: " + " ".join(sys.argv))
    set_seed(args.seed, args.deterministic)
    if dist_info.device.startswith("cuda") and not args.deterministic:
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
    return out_dir, log


def val_gallery_items(train_items, val_items, train_all):
    """The gallery the val queries are ranked against: the training images, without the val images
    themselves when training on train_all (which contains them)."""
    if not train_all:
        return train_items
    val_files = {(os.path.basename(p), label) for p, label in val_items}
    return [(p, label) for p, label in train_items if (os.path.basename(p), label) not in val_files]


def cache_dir(args, data_dir):
    """Where --cache_resized keeps its files (None: no cache)."""
    if args.cache_resized is None:
        return None
    return args.cache_resized or os.path.join(data_dir, ".cache_resized")


def image_datasets(sets, cache_dir, dist_info):
    """{name: (items, size, transform)} -> {name: LabeledImageDataset}. With a cache_dir, every image
    is decoded and resized once into one ResizedImageCache per size (rank 0 builds it, the other ranks
    then open it), and each data set reads its images from a view of it."""
    caches = {}
    if cache_dir is not None:
        paths = {}
        for items, size, _ in sets.values():
            paths.setdefault(tuple(size), set()).update(p for p, _ in items)
        with rank0_first(dist_info):
            caches = {size: ResizedImageCache(sorted(found), size, cache_dir,
                                              desc=f"caching images at {size[0]}x{size[1]}")
                      for size, found in paths.items()}
    return {name: LabeledImageDataset(items, size, transform, SubsetCache.of(caches.get(tuple(size)), items))
            for name, (items, size, transform) in sets.items()}


def build_datasets(data, train_transform, input_size, train_all, cache_dir, dist_info):
    """(train set, val set, val gallery = the train images) of one split root; the train images are
    read at train_load_size(input_size) for train_transform's random crop."""
    eval_tf = eval_transform(input_size)
    sets = image_datasets({"train": (data["train"], train_load_size(input_size), train_transform),
                           "val": (data["val"], input_size, eval_tf),
                           "gallery": (val_gallery_items(data["train"], data["val"], train_all), input_size, eval_tf)},
                          cache_dir, dist_info)
    return sets["train"], sets["val"], sets["gallery"]


def make_sampler(args, train_set, dist_info, log):
    if args.sampler == "pk":
        sampler = PKSampler(train_set.labels, args.batch_size, args.num_instances, seed=args.seed,
                            rank=dist_info.rank, world_size=dist_info.world_size)
        if sampler.rare_labels:
            log.warning(f"warning: --sampler pk: {len(sampler.rare_labels)} identities have fewer than "
                        f"--num_instances {args.num_instances} training images; their images are drawn again "
                        f"(with replacement) to fill {args.num_instances} instances per batch")
    else:
        sampler = ShuffleSampler(len(train_set), args.batch_size, seed=args.seed, rank=dist_info.rank,
                                 world_size=dist_info.world_size)
    if len(sampler) == 0:
        raise TrainingInputError(
            f"the training set ({len(train_set)} images) does not fill one batch of {args.batch_size} per process "
            f"x {dist_info.world_size} process(es) with --sampler {args.sampler}; lower --batch_size")
    return sampler


def check_world_size(state, dist_info, path):
    if state.get("world_size", 1) != dist_info.world_size:
        raise TrainingInputError(f"{path} was written by a run with {state.get('world_size', 1)} process(es); "
                                 f"resume it with the same number ({dist_info.world_size} now)")


def restore_training_state(state, optimizer, scheduler, scaler, sampler, log, path, stage=""):
    """Everything of net_last.pth besides the weights; returns (history, best, epochs done)."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    sampler.load_state_dict(state["sampler"])
    restore_rng_state(state["rng"])
    log.info(f"{stage + ': ' if stage else ''}resumed from {path} after epoch {state['epoch']}")
    return list(state["history"]), dict(state["best"]), int(state["epoch"])


def write_training_config(out_dir, args, extra, start_epoch=0):
    """config.json of a training run; a resumed run also lists after which epochs it was resumed."""
    if args.resume:
        extra["resumed_after_epochs"] = read_config(out_dir).get("resumed_after_epochs", []) + [start_epoch]
    write_run_config(out_dir, args, extra=extra)


def batch_summary(args, dist_info, amp, speed_note=""):
    """The end of a trainer's start-up log line: batch sizes, AMP, device and speed-ups."""
    text = (f"batch {args.batch_size} x {dist_info.world_size} process(es) = effective batch "
            f"{args.batch_size * dist_info.world_size}; amp {amp}; device {dist_info.device}")
    return text + (f"; {speed_note}" if speed_note else "")


def training_config(args, method, data, amp, dist_info, num_train_images, num_val_images, **extra):
    """The config.json entries every trainer writes besides its arguments (write_run_config adds those)."""
    return {"method": method, "num_classes": len(data["class_names"]), "class_names": data["class_names"],
            "amp": amp, "world_size": dist_info.world_size,
            "effective_batch_size": args.batch_size * dist_info.world_size,
            "pretrained": parse_pretrained(args.pretrained, args.backbone_name), "train_split": data["train_split"],
            "num_train_images": num_train_images, "num_val_images": num_val_images, **extra}


def epoch_row(number, lrs, result, lr_names=("lr", "lr_heads")):
    """The metrics.csv row of a finished epoch (lrs: the learning rates the epoch ran with, first
    and last parameter group); validation fills in the val_* entries."""
    return {"epoch": number, lr_names[0]: lrs[0], lr_names[1]: lrs[-1], **result.losses,
            "train_acc": result.accuracy, "val_acc": None, "val_rank1": None, "val_mAP": None,
            "images_per_s": result.images_per_s, "epoch_seconds": result.seconds}


@contextmanager
def stop_on_nonfinite_loss(log, last_path, history, stage=""):
    """Around train_one_epoch: a NaN/inf loss is logged and ends the run with an error that names
    the last good checkpoint."""
    try:
        yield
    except NonFiniteLossError as err:
        prefix = f"{stage}: " if stage else ""
        kept = f"{last_path} (after epoch {history[-1]['epoch'] if history else 0})" if os.path.exists(last_path) \
            else f"none (no {stage + ' ' if stage else ''}epoch finished)"
        log.error(f"{prefix}{err}; stopped. Last good checkpoint: {kept}")
        raise NonFiniteLossError(f"{prefix}{err}; training stopped, last good checkpoint: {kept}") from None


def resume_state(optimizer, scheduler, scaler, sampler, dist_info, **extra):
    """What net_last.pth holds besides the model record, the history and the best epoch, for --resume."""
    return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "rng": capture_rng_state(), "sampler": sampler.state_dict(), "world_size": dist_info.world_size, **extra}


def end_of_epoch(out_dir, row, history, best, log, dist_info, epochs, state, record=None, train_all=False,
                 save_every=0, plot=True, stage="", accuracy_name="train acc", last_file="net_last.pth",
                 metrics_file="metrics.csv", curve_file="training_curve.png"):
    """What every epoch ends with. Tracks the best epoch (highest val mAP, ties to the later epoch;
    with train_all the last validated one), appends row to history and, on rank 0, writes
    net_best.pth (record, when the epoch is the best) and net_<epoch>.pth (record, every save_every
    epochs), last_file (record + state + history + best: what --resume reads), metrics_file, the
    curve (with plot) and the log line; then waits for every rank. Returns the best epoch's
    {"epoch", "val_mAP", "val_rank1"}."""
    number = row["epoch"]
    best = dict(best or {"epoch": None, "val_mAP": -1.0})
    improved = row.get("val_mAP") is not None and (train_all or row["val_mAP"] >= best["val_mAP"])
    if improved:
        best = {"epoch": number, "val_mAP": row["val_mAP"], "val_rank1": row["val_rank1"]}
    history.append(row)
    if dist_info.is_main:
        if record is not None and improved:
            save_checkpoint(os.path.join(out_dir, "net_best.pth"), record)
        if record is not None and save_every and number % save_every == 0:
            save_checkpoint(os.path.join(out_dir, f"net_{number}.pth"), record)
        save_checkpoint(os.path.join(out_dir, last_file), dict(record or {}, **state, history=history, best=best))
        io.write_metrics_csv(os.path.join(out_dir, metrics_file), history)
        if plot:  # drawing costs seconds (more than a stage-1 epoch): only when new points matter
            plot_training_curve(os.path.join(out_dir, curve_file), history)
        losses = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k.startswith("loss"))
        accuracy = f" | {accuracy_name} {row['train_acc']:.4f}" if row.get("train_acc") is not None else ""
        val = (f" | val acc {row['val_acc']:.4f} Rank-1 {row['val_rank1']:.4f} mAP {row['val_mAP']:.4f}"
               + (" (best)" if improved else "")) if row.get("val_mAP") is not None else ""
        speed = f", {row['images_per_s']:.1f} img/s" if "images_per_s" in row else ""
        log.info(f"{stage + ' ' if stage else ''}epoch {number}/{epochs} lr {row['lr']:.3g} | {losses}{accuracy}"
                 f"{val} | {row['epoch_seconds']:.2f} s{speed}")
    barrier(dist_info)
    return best


def check_ranks_agree(model, dist_info, log):
    """After DDP training: every rank must hold the same weights (checkpoints hold rank 0's)."""
    if not dist_info.distributed:
        return
    agree = ranks_agree(model, dist_info)
    log.info(f"model weights {'identical' if agree else 'DIFFERENT'} on all {dist_info.world_size} ranks")
    if not agree:
        raise RuntimeError("DDP ranks ended with different weights; the saved checkpoint is rank 0's")


def final_test(model, args, data_dir, out_dir, folder, method_name, amp, device, log, extra, what="net_best"):
    """Evaluate `model` on the query/gallery splits of data_dir into out_dir/folder with the shared
    pipeline under the default protocol (clip-handid: fp32, the mirrored image added, the feature
    after the BNNeck) on every gallery variant; the log line reports the published tables' gallery
    (11k: gallery{i}_all). None (and a log line) when data_dir has no test splits. `amp` (the
    training precision) is not used."""
    try:
        read_split_layout(data_dir)
    except ValueError as err:
        log.info(f"final test skipped: {err}")
        return None
    kind = "promptsg" if hasattr(model, "inference_prompt") else "finetune"
    setting = protocols.settings(protocols.DEFAULT_PROTOCOL, kind, gallery="both")
    run_feature, model.feature = model.feature, setting["feature"]
    try:
        results = evaluate_query_gallery(
            model, data_dir, os.path.join(out_dir, folder), method_name=method_name,
            input_size=tuple(args.input_size), batch_size=max(args.batch_size, 64), num_workers=args.num_workers,
            device=device, amp="none", flip=setting["flip"], overwrite=True, table_mAP=setting["mAP"],
            extra=dict(extra, feature=setting["feature"], protocol=dict(setting, amp="none")))
    finally:
        model.feature = run_feature
    variant = protocols.headline_gallery(results["gallery_variants"])
    mean = results["summary"][variant]["mean"]
    log.info(f"final test ({what}, protocol {protocols.DEFAULT_PROTOCOL}, gallery{{i}}"
             f"{'_all' if variant == 'all' else ''}): Rank-1 {100 * mean['rank1']:.2f} "
             f"mAP {100 * mean['mAP_hand']:.2f} -> {os.path.join(out_dir, folder)}")
    return results


def run_training(args, check_args, train_fn):
    """main() of a trainer: check_args(args), then train_fn(args, dist_info) in this process's share
    of a torchrun job (or alone). The project's own errors (bad input, unreadable checkpoints, NaN
    losses) and failed downloads end with a one-line message; anything else is a bug and keeps its
    traceback."""
    try:
        check_args(args)
        dist_info = setup_distributed(args.device)
        try:
            return train_fn(args, dist_info)
        finally:
            close_logger(get_logger(os.path.join(args.f_name, args.m_name)))
            cleanup_distributed(dist_info)
    except (ClipFHError, clip.ModelDownloadError) as err:
        raise SystemExit(f"error: {err}") from None
