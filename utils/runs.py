"""Run folders, the training log, metrics.csv and the training curve, and the flag helpers and
end-of-epoch step every trainer shares."""
import argparse
import json
import logging
import os
import shutil
import sys

import torch

from .errors import NonFiniteLossError, TrainingInputError
from . import io
from .io import AMP_CHOICES, _atomic_write, add_common_args, read_config, set_seed, write_run_config
from .splits import read_split_layout
from .data import LabeledImageDataset, PKSampler, ResizedImageCache, ShuffleSampler, build_train_transform, epoch_seed, eval_transform, make_loader, train_load_size
from .evaluation import evaluate_query_gallery
from .distributed import barrier, cleanup_distributed, ranks_agree, setup_distributed
from .training import capture_rng_state, restore_rng_state, save_checkpoint, train_one_epoch


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
    """training_curve.png (or stage1_curve.png): losses, accuracy, val Rank-1/mAP (only when the rows
    have val values) and learning rate per epoch, titled with the method and backbone of the
    config.json next to it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    stage1 = os.path.basename(path).startswith("stage1")
    names = {"loss": "total", "loss_id": "ID (cross-entropy)", "loss_id_proj": "ID, projected feature",
             "loss_triplet": "triplet", "loss_center": "center", "loss_supcon": "image-text supervised contrastive",
             "loss_i2t": "image-to-text supervised contrastive" if stage1 else "image-to-text cross-entropy",
             "loss_t2i": "text-to-image supervised contrastive",
             "train_acc": "text accuracy (image to identity prompt)" if stage1 else "train accuracy",
             "val_acc": "val accuracy", "val_rank1": "val Rank-1", "val_mAP": "val mAP"}

    def series(key):
        points = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
        return [p[0] for p in points], [p[1] for p in points]

    panels = [("prompt-learning losses" if stage1 else "training losses", "loss",
               [k for k in (rows[0] if rows else {}) if k.startswith("loss")]),
              ("text accuracy" if stage1 else "closed-set accuracy", "accuracy", ["train_acc", "val_acc"]),
              ("val retrieval (val vs train)", "fraction", ["val_rank1", "val_mAP"]),
              ("learning rate", "learning rate", ["lr"])]
    panels = [(t, y, [k for k in keys if series(k)[0]]) for t, y, keys in panels]
    panels = [p for p in panels if p[2]]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.5 * max(1, len(panels)), 4), squeeze=False)
    for ax, (title, ylabel, keys) in zip(axes[0], panels):
        for key in keys:
            ax.plot(*series(key), marker="." if key != "lr" and not key.startswith("loss") else None,
                    label=names.get(key, ("prompt tokens" if stage1 else "encoder") if key == "lr" else key))
        ax.set(title=title, xlabel="epoch", ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if rows:
            ax.set_xlim(rows[0]["epoch"] - 0.5, rows[-1]["epoch"] + 0.5)
        ax.legend(fontsize=8)
    try:
        with open(os.path.join(os.path.dirname(path), "config.json")) as f:
            config = json.load(f)
        backbone = str(config.get("model", {}).get("backbone", {}).get("name") or config.get("backbone", ""))
        if backbone.endswith((".pt", ".pth")):
            backbone = os.path.splitext(os.path.basename(backbone))[0]
        fig.suptitle(f"{config.get('method', '?')}{', stage 1 (prompt learning)' if stage1 else ''}, backbone {backbone}")
    except (OSError, ValueError):
        pass
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.14, top=0.84, wspace=0.3)  # tight_layout is slow
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=72), mode="wb")
    plt.close(fig)


def parse_pretrained(value, backbone_name):
    """--pretrained true/false, else True for an official CLIP name and None (unknown) for a file."""
    if value is not None:
        return value == "true"
    import clip
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
                          title="optimisation", helps=None):
    """The optimiser and learning-rate schedule flags; helps: {flag name: help text}."""
    helps = helps or {}
    g = parser.add_argument_group(title)
    g.add_argument("--lr", type=float, default=lr, help=helps.get("lr"))
    g.add_argument("--optimizer", default="adam", choices=["adam", "adamw", "sgd"])
    g.add_argument("--weight_decay", type=float, default=weight_decay, help=helps.get("weight_decay"))
    g.add_argument("--epochs", type=int, default=epochs, help=helps.get("epochs"))
    g.add_argument("--warmup_epochs", type=int, default=warmup_epochs,
                   help=helps.get("warmup_epochs", "linear warm-up from 0.01 x lr"))
    g.add_argument("--milestones", type=int, nargs="*", default=milestones,
                   help=helps.get("milestones", "epochs where lr is multiplied by --gamma"))
    g.add_argument("--gamma", type=float, default=gamma)
    g.add_argument("--ls", type=float, default=0.1, help=helps.get("ls", "label smoothing of the ID loss (0 disables)"))
    return g


def add_input_args(parser, erasing_p=0.0, cache_root="<data_dir>", color_jitter=True):
    """Augmentation, input geometry and the resized-image cache."""
    group = parser.add_argument_group("augmentation and input")
    if color_jitter:
        group.add_argument("--color_jitter", action="store_true")
    group.add_argument("--erasing_p", type=float, default=erasing_p, help="random erasing probability")
    group.add_argument("--input_size", type=int, nargs=2, default=[224, 224], metavar=("H", "W"))
    group.add_argument("--stride", type=int, default=16, help="ViT patch stride (< patch size: overlapping patches)")
    group.add_argument("--last_stride", type=int, default=1, choices=[1, 2],
                       help="ResNet layer4 stride (1 as in CLIP-HandID: 14x14 map at 224)")
    group.add_argument("--cache_resized", nargs="?", const="", default=None, metavar="DIR",
                       help=f"decode and resize every photo once into a uint8 cache (default DIR: "
                            f"{cache_root}/.cache_resized) so epochs skip JPEG decoding")
    return group


def add_run_control_args(parser, resume_help, final_test_help):
    g = parser.add_argument_group("run control")
    g.add_argument("--amp", default=None, choices=AMP_CHOICES, help="default: bf16 on CUDA, none on CPU")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the image encoder (CUDA only; the first steps are slower while it compiles)")
    g.add_argument("--grad_clip", type=float, default=0.0, help="max gradient norm (0: off); applied before the step")
    g.add_argument("--resume", action="store_true", help=resume_help)
    g.add_argument("--save_every", type=int, default=0, help="also keep net_<epoch>.pth every N epochs (0: never)")
    g.add_argument("--eval_every", type=int, default=5, help="validate every N epochs (and after the last)")
    g.add_argument("--final_test", action=argparse.BooleanOptionalAction, default=True, help=final_test_help)
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bars")
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
    if min(args.input_size) < 1 or args.stride < 1:
        problems.append(f"--input_size and --stride must be positive, got {args.input_size} and {args.stride}")
    return problems


def prepare_run_folder(out_dir, args, run_files, resume_file="net_last.pth"):
    """Refuse to overwrite a run without --force; --resume needs `resume_file` in the run folder."""
    if args.resume:
        path = os.path.join(out_dir, resume_file)
        if not os.path.isfile(path):
            raise TrainingInputError(f"--resume: {path} does not exist; start the run without --resume")
        return
    existing = [f for f in run_files if os.path.exists(os.path.join(out_dir, f))]
    if existing and not args.force:
        raise TrainingInputError(f"{out_dir} already holds a run ({', '.join(existing)}); pass --resume to "
                                 f"continue it, --force to overwrite it, or choose another --m_name")


def clear_run_folder(out_dir, run_files):
    for name in os.listdir(out_dir):
        if name in run_files or (name.startswith("net_") and name.endswith(".pth")):
            os.remove(os.path.join(out_dir, name))
    if os.path.isdir(os.path.join(out_dir, "final_test")):
        shutil.rmtree(os.path.join(out_dir, "final_test"))


def open_run_folder(out_dir, args, dist_info, run_files):
    """Create (or with --force, empty) the run folder on rank 0, then open train.log on every rank."""
    barrier(dist_info)
    if dist_info.is_main:
        os.makedirs(out_dir, exist_ok=True)
        if args.force and not args.resume:
            clear_run_folder(out_dir, run_files)
    barrier(dist_info)
    log = setup_logger(out_dir, dist_info.is_main)
    log.info("command: " + " ".join(sys.argv))
    return log


def val_gallery_items(train_items, val_items, train_all):
    """The gallery the val queries are ranked against: the training images, without the val images
    themselves when training on train_all (which contains them)."""
    if not train_all:
        return train_items
    val_files = {(os.path.basename(p), label) for p, label in val_items}
    return [(p, label) for p, label in train_items if (os.path.basename(p), label) not in val_files]


def build_datasets(args, data, input_size, dist_info):
    """(train set with augmentation, val set, val gallery = train images) of one split root."""
    load_size = train_load_size(input_size)
    gallery_items = val_gallery_items(data["train"], data["val"], args.train_all)
    caches = {"train": None, "val": None, "gallery": None}
    if args.cache_resized is not None:
        cache_dir = args.cache_resized or os.path.join(args.data_dir, ".cache_resized")
        wanted = {"train": (data["train"], load_size), "val": (data["val"], input_size),
                  "gallery": (gallery_items, input_size)}
        for turn in ("main", "others"):  # rank 0 builds the cache files, the other ranks then open them
            if (turn == "main") == dist_info.is_main:
                for name, (items, size) in wanted.items():
                    caches[name] = ResizedImageCache([p for p, _ in items], size, cache_dir,
                                                     desc=f"caching {name} images at {size[0]}x{size[1]}")
            barrier(dist_info)
    eval_tf = eval_transform(input_size)
    train_set = LabeledImageDataset(data["train"], load_size,
                                    build_train_transform(input_size, args.color_jitter, args.erasing_p),
                                    caches["train"])
    val_set = LabeledImageDataset(data["val"], input_size, eval_tf, caches["val"])
    gallery_set = LabeledImageDataset(gallery_items, input_size, eval_tf, caches["gallery"])
    return train_set, val_set, gallery_set


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


def stopped_by_nonfinite_loss(err, log, last_path, done_epoch, stage=""):
    """Log a NaN/inf loss and return the error that ends the run, naming the last good checkpoint."""
    prefix = f"{stage}: " if stage else ""
    kept = f"{last_path} (after epoch {done_epoch})" if os.path.exists(last_path) else \
        f"none (no {stage + ' ' if stage else ''}epoch finished)"
    log.error(f"{prefix}{err}; stopped. Last good checkpoint: {kept}")
    return NonFiniteLossError(f"{prefix}{err}; training stopped, last good checkpoint: {kept}")


def _call_module(module, images, labels):
    return module(images, labels)


def run_epochs(args, loop, log, history=(), best=None, start_epoch=0, stage="", lr_names=("lr", "lr_heads"),
               accuracy_name="train acc"):
    """The epoch loop of every trainer: train, validate every --eval_every epochs (net_best on val
    mAP, ties to the later epoch, the last epoch with --train_all), write net_last / net_best /
    net_<epoch>.pth, metrics.csv and the curve. `loop` holds:
      model; train_module: module(images, labels) -> (loss, terms, logits), DDP-wrapped if distributed;
      optimizers (the first one is checkpointed), scheduler, scaler, sampler, train_set;
      validate() -> val metrics; record(epoch, row) -> checkpoint dict; extra_state() -> more
      net_last.pth entries (optional); out_dir, dist_info, device, amp.
    Returns (best, history)."""
    out_dir, dist_info, device, amp = loop["out_dir"], loop["dist_info"], loop["device"], loop["amp"]
    optimizers, scheduler, sampler = loop["optimizers"], loop["scheduler"], loop["sampler"]
    history, best = list(history), dict(best or {"epoch": None, "val_mAP": -1.0})
    last_path, best_path = os.path.join(out_dir, "net_last.pth"), os.path.join(out_dir, "net_best.pth")
    for epoch in range(start_epoch, args.epochs):
        number = epoch + 1  # epochs are numbered from 1 in logs and file names
        set_seed(epoch_seed(args.seed, epoch))
        sampler.set_epoch(epoch)
        loader = make_loader(loop["train_set"], args.batch_size, sampler, args.num_workers, args.seed, epoch, device,
                             drop_last=True)
        lrs = [group["lr"] for group in optimizers[0].param_groups]
        try:
            result = train_one_epoch(loop["train_module"], loader, _call_module, optimizers, loop["scaler"], amp,
                                     device, number, grad_clip=args.grad_clip, dist_info=dist_info,
                                     progress=args.progress and dist_info.is_main)
        except NonFiniteLossError as err:
            raise stopped_by_nonfinite_loss(err, log, last_path, history[-1]["epoch"] if history else start_epoch,
                                            stage) from None
        scheduler.step()
        row = {"epoch": number, lr_names[0]: lrs[0], lr_names[1]: lrs[-1], **result.losses,
               "train_acc": result.accuracy, "val_acc": None, "val_rank1": None, "val_mAP": None,
               "images_per_s": result.images_per_s, "epoch_seconds": result.seconds}
        validate_now = number % args.eval_every == 0 or number == args.epochs
        improved = False
        if validate_now and dist_info.is_main:
            loop["model"].eval()
            row.update(loop["validate"]())
            loop["model"].train()
            improved = args.train_all or row["val_mAP"] >= best["val_mAP"]
            if improved:
                best = {"epoch": number, "val_mAP": row["val_mAP"], "val_rank1": row["val_rank1"]}
        history.append(row)
        if dist_info.is_main:
            record = loop["record"](number, row)
            if improved:
                save_checkpoint(best_path, record)
            if args.save_every and number % args.save_every == 0:
                save_checkpoint(os.path.join(out_dir, f"net_{number}.pth"), record)
            state = dict(record, optimizer=optimizers[0].state_dict(), scheduler=scheduler.state_dict(),
                         scaler=loop["scaler"].state_dict(), rng=capture_rng_state(), sampler=sampler.state_dict(),
                         history=history, best=best, world_size=dist_info.world_size)
            if loop.get("extra_state"):
                state.update(loop["extra_state"]())
            save_checkpoint(last_path, state)
            io.write_metrics_csv(os.path.join(out_dir, "metrics.csv"), history)
            if validate_now:  # drawing costs seconds: only when new val points arrive
                plot_training_curve(os.path.join(out_dir, "training_curve.png"), history)
            losses = ", ".join(f"{k} {v:.4f}" for k, v in result.losses.items())
            val = (f" | val acc {row['val_acc']:.4f} Rank-1 {row['val_rank1']:.4f} mAP {row['val_mAP']:.4f}"
                   + (" (best)" if improved else "")) if row["val_mAP"] is not None else ""
            log.info(f"{stage + ' ' if stage else ''}epoch {number}/{args.epochs} lr {lrs[0]:.3g} | {losses} | "
                     f"{accuracy_name} {result.accuracy:.4f}{val} | {result.images_per_s:.1f} img/s")
        barrier(dist_info)
    if dist_info.distributed:
        agree = ranks_agree(loop["model"], dist_info)
        log.info(f"model weights {'identical' if agree else 'DIFFERENT'} on all {dist_info.world_size} ranks")
        if not agree:
            raise RuntimeError("DDP ranks ended with different weights; the saved checkpoint is rank 0's")
    return best, history


def final_test(model, args, data_dir, out_dir, folder, method_name, amp, device, log, extra, what="net_best"):
    """Evaluate `model` on the query/gallery splits of data_dir into out_dir/folder with the shared
    pipeline; None (and a log line) when data_dir has no test splits."""
    try:
        read_split_layout(data_dir)
    except ValueError as err:
        log.info(f"final test skipped: {err}")
        return None
    results = evaluate_query_gallery(
        model, data_dir, os.path.join(out_dir, folder), method_name=method_name, input_size=tuple(args.input_size),
        batch_size=max(args.batch_size, 64), num_workers=args.num_workers, device=device, amp=amp, overwrite=True,
        extra=extra)
    variant = results["gallery_variants"][-1]
    mean = results["summary"][variant]["mean"]
    log.info(f"final test ({what}, gallery {variant}): Rank-1 {100 * mean['rank1']:.2f} "
             f"mAP {100 * mean['mAP_hand']:.2f} -> {os.path.join(out_dir, folder)}")
    return results


def start_run(args, dist_info, run_files, resume_file="net_last.pth"):
    """Claim the run folder <f_name>/<m_name> (see prepare_run_folder), open train.log and seed;
    returns (out_dir, log)."""
    out_dir = os.path.join(args.f_name, args.m_name)
    prepare_run_folder(out_dir, args, run_files, resume_file)
    log = open_run_folder(out_dir, args, dist_info, run_files)
    set_seed(args.seed)
    if dist_info.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
    return out_dir, log


def run_training(args, check_args, train_fn):
    """main() of a trainer: check_args(args), then train_fn(args, dist_info) in this process's share
    of a torchrun job (or alone). Bad input and NaN losses end with a clear message, not a traceback."""
    try:
        check_args(args)
        dist_info = setup_distributed(args.device)
        try:
            return train_fn(args, dist_info)
        finally:
            close_logger(get_logger(os.path.join(args.f_name, args.m_name)))
            cleanup_distributed(dist_info)
    except (TrainingInputError, NonFiniteLossError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
