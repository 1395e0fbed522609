"""Run folders, the training log, metrics.csv and the training curve, and the flag helpers and
end-of-epoch step every trainer shares."""
import json
import logging
import os
import shutil
import sys
import traceback
from contextlib import contextmanager


import clip
from .errors import ClipFHError, NonFiniteLossError, SplitInputError, TrainingInputError
from . import io, outputs, preprocessing, protocols, result_files, resume, speed
from .io import _atomic_write, read_config, set_seed, write_run_config
from . import splits
from .splits import read_split_layout
from .data import (LabeledImageDataset, check_images, PKSampler, ResizedImageCache, ShuffleSampler, SubsetCache, eval_transform,
                   train_load_size)
from .evaluation import estimate_result_bytes, evaluate_query_gallery
from .distributed import barrier, cleanup_distributed, rank0_first, ranks_agree, setup_distributed
from .training import capture_rng_state, restore_rng_state, save_checkpoint, schedule_warnings


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


def plot_training_curve(path, rows, return_figure=False):
    """training_curve.png (or stage1_curve.png): losses, accuracy, val Rank-1/mAP (only when the rows
    have val values) and learning rate per epoch, titled with the method and backbone of the
    config.json next to it; each panel's legend below it, in the project's figure style."""
    from matplotlib.ticker import MaxNLocator
    from . import figures
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
    with figures.paper_style() as plt:
        fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(2.6 * max(1, len(panels)), 2.9), squeeze=False)
        for ax, (title, ylabel, keys) in zip(axes[0], panels):
            for key in keys:
                xs, ys = series(key)
                ax.plot(xs, ys, marker="." if key != "lr" and (len(xs) == 1 or not key.startswith("loss")) else None,
                        label=names.get(key, ("prompt tokens" if stage1 else "encoder") if key == "lr" else key))
            ax.set(title=title, xlabel="epoch", ylabel=ylabel)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if rows:
                ax.set_xlim(rows[0]["epoch"] - 0.5, rows[-1]["epoch"] + 0.5)
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncols=1, handlelength=1.8)
        try:
            config = io.read_json(os.path.join(os.path.dirname(path), "config.json"))
            backbone = str(config.get("model", {}).get("backbone", {}).get("name") or config.get("backbone", ""))
            if backbone.endswith((".pt", ".pth")):
                backbone = os.path.splitext(os.path.basename(backbone))[0]
            fig.suptitle(f"{config.get('method', '?')}{', stage 1 (prompt learning)' if stage1 else ''}, "
                         f"backbone {backbone}")
        except ClipFHError:
            pass  # no title from a missing or broken config.json
        if return_figure:
            return fig
        _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120), mode="wb")
        plt.close(fig)


def parse_pretrained(value, backbone_name):
    """--pretrained true/false, else True for an official CLIP name and None (unknown) for a file."""
    if value is not None:
        return value == "true"
    return True if backbone_name in clip.available_models() else None


RUN_FILES = ("config.json", "train.log", "metrics.csv", "training_curve.png", "net_last.pth", "net_best.pth")


def start_run(args, dist_info, run_files=RUN_FILES, resume_file="net_last.pth"):
    """Claim the run folder <f_name>/<m_name>, open train.log and seed; returns (out_dir, log).
    A folder holding a run is refused without --force (which moves its run_files, net_*.pth and
    final_test/ aside: see move_old_run_aside) or --resume (which needs resume_file there)."""
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
            move_old_run_aside(out_dir, run_files)
    barrier(dist_info)
    log = setup_logger(out_dir, dist_info.is_main)
    log.info("command: " + " ".join(sys.argv))
    set_seed(args.seed, args.deterministic)
    speed.autotune_convolutions(dist_info.device, args.deterministic)
    return out_dir, log


REPLACED_PREFIX = ".replaced-run-"


def move_old_run_aside(out_dir, run_files):
    """--force: move the old run's files into out_dir/.replaced-run-<pid>/; discard_old_run deletes
    them after the new run's first checkpoint, undo_failed_start puts them back if it fails before."""
    old = [n for n in os.listdir(out_dir) if n in run_files or n == "final_test"
           or (n.startswith("net_") and n.endswith(".pth"))]
    if old:
        aside = os.path.join(out_dir, f"{REPLACED_PREFIX}{os.getpid()}")
        os.mkdir(aside)
        for name in old:
            os.rename(os.path.join(out_dir, name), os.path.join(aside, name))


def replaced_runs(out_dir):
    if not os.path.isdir(out_dir):
        return []
    return [os.path.join(out_dir, n) for n in os.listdir(out_dir) if n.startswith(REPLACED_PREFIX)]


def discard_old_run(out_dir):
    for aside in replaced_runs(out_dir):
        shutil.rmtree(aside)


def undo_failed_start(out_dir, existed, err):
    """A run that fails before its first checkpoint leaves things as they were: the run --force
    replaced is put back (the failed attempt's train.log appended to its own) and a run folder this
    run created is removed. A later failure keeps the folder; train.log gets the traceback.
    Returns "restored", "removed" or "kept"."""
    log_path = os.path.join(out_dir, "train.log")
    if isinstance(err, KeyboardInterrupt):
        note = "interrupted (Ctrl-C)\n"
    elif isinstance(err, ClipFHError):
        note = f"error: {err}\n"
    else:
        note = "".join(traceback.format_exception(err))
    asides = replaced_runs(out_dir)
    attempt = open(log_path).read() if asides and os.path.isfile(log_path) else ""
    for aside in asides:
        for name in os.listdir(out_dir):
            path = os.path.join(out_dir, name)
            if path != aside and (name in os.listdir(aside) or (name.startswith("net_") and name.endswith(".pth"))):
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        for name in os.listdir(aside):
            os.rename(os.path.join(aside, name), os.path.join(out_dir, name))
        os.rmdir(aside)
    if not os.path.isdir(out_dir):
        return "removed"
    # a checkpoint is progress worth keeping; a feature cache (stage1_features.pth) is not
    if not existed and not any(n.endswith(".pth") and not n.endswith("_features.pth") for n in os.listdir(out_dir)):
        shutil.rmtree(out_dir)
        return "removed"
    with open(log_path, "a") as f:
        f.write(attempt + note)
    return "restored" if asides else "kept"


def preflight(args, hands, data_dirs, what="training"):
    """Before anything is written: one --seed across the split roots, --data_type from their
    manifests, and every image the run will read decodes (train, val and, with --final_test, the
    query/gallery sets). Sets args.data_type."""
    data_dirs = [data_dirs] if isinstance(data_dirs, str) else list(data_dirs)
    splits.check_split_seeds(data_dirs, args.allow_mixed_seeds)
    args.data_type = splits.dataset_of_roots(data_dirs, args.data_type)
    paths = [p for p, _ in hands["train"]] + [p for p, _ in hands["val"]]
    if args.final_test:
        for data_dir in data_dirs:
            try:
                paths += splits.query_gallery_paths(data_dir)
            except ClipFHError:
                pass  # a root without test splits: the final test skips it
    check_images(paths, None, args.num_workers, what=f"images of the {what} run", progress=args.progress)


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


def image_datasets(sets, cache_dir, dist_info, decode="full"):
    """{name: (items, size, transform)} -> {name: LabeledImageDataset}. With a cache_dir, every image
    is decoded and resized once into one ResizedImageCache per size (rank 0 builds it, the other ranks
    then open it), and each data set reads its images from a view of it. decode: JPEG decoding,
    "full" or "draft" (--fast_decode)."""
    caches = {}
    if cache_dir is not None:
        paths = {}
        for items, size, _ in sets.values():
            paths.setdefault(tuple(size), set()).update(p for p, _ in items)
        with rank0_first(dist_info):
            caches = {size: ResizedImageCache(sorted(found), size, cache_dir, decode=decode,
                                              desc=f"caching images at {size[0]}x{size[1]}")
                      for size, found in paths.items()}
    return {name: LabeledImageDataset(items, size, transform, SubsetCache.of(caches.get(tuple(size)), items), decode)
            for name, (items, size, transform) in sets.items()}


def build_datasets(data, train_transform, input_size, train_all, cache_dir, dist_info, decode="full"):
    """(train set, val set, val gallery = the train images) of one split root; the train images are
    read at train_load_size(input_size) for train_transform's random crop."""
    eval_tf = eval_transform(input_size)
    sets = image_datasets({"train": (data["train"], train_load_size(input_size), train_transform),
                           "val": (data["val"], input_size, eval_tf),
                           "gallery": (val_gallery_items(data["train"], data["val"], train_all), input_size, eval_tf)},
                          cache_dir, dist_info, decode)
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


RECORDED_SETUP = ("method", "num_classes", "class_names", "model", "amp", "world_size", "effective_batch_size",
                  "num_train_images", "num_val_images", "train_split")


def write_training_config(out_dir, args, extra, start_epoch=0, **where):
    """config.json of a training run. A resumed run keeps the original and appends this resume
    (utils/resume.py); it must have set up what the run recorded (model, identities, images, precision,
    processes), else it is refused before anything is written."""
    if not args.resume:
        write_run_config(out_dir, args, extra=extra)
        return
    recorded = read_config(out_dir)
    for key in RECORDED_SETUP:
        if key in extra and key in recorded and resume.as_recorded(extra[key]) != recorded[key]:
            raise TrainingInputError(f"--resume: this command sets up {key} {_brief(extra[key])}, but "
                                     f"{os.path.join(out_dir, 'config.json')} records {_brief(recorded[key])}; resume "
                                     f"with the run's own data and settings, or start a new --m_name")
    resume.record_resume(out_dir, args, start_epoch, **where)


def _brief(value, limit=120):
    text = json.dumps(resume.as_recorded(value), sort_keys=True)
    return text if len(text) <= limit else text[:limit] + "..."


def check_run_space(out_dir, args, model, final_test_dir=None, feature_dim=None):
    """Before the first epoch: the run folder's file system must hold what the run writes: net_last
    (weights + optimizer state, twice while it is replaced), net_best, every --save_every checkpoint,
    and the final test's results (with final_test_dir). Weights are counted from the model's state,
    the optimizer's from its trainable parameters (Adam/AdamW keep two moments, SGD one)."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    moments = 1 if args.optimizer == "sgd" else 2
    state = moments * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    saved = args.epochs // args.save_every if args.save_every else 0
    need = 2 * (weights + state) + weights * (1 + saved)
    if final_test_dir and args.final_test:
        try:
            layout = read_split_layout(final_test_dir)
            need += estimate_result_bytes(final_test_dir, layout["num_splits"], layout["gallery_variants"], feature_dim)
        except ClipFHError:
            pass  # no test splits: the final test is skipped
    outputs.check_space(out_dir, need, "--f_name")


def batch_summary(args, dist_info, amp, speed_note=""):
    """The end of a trainer's start-up log line: batch sizes, AMP, device and speed-ups."""
    text = (f"batch {args.batch_size} x {dist_info.world_size} process(es) = effective batch "
            f"{args.batch_size * dist_info.world_size}; amp {amp}; device {dist_info.device}")
    return text + (f"; {speed_note}" if speed_note else "")


def decode_mode(args):
    """JPEG decoding of the images a trainer reads: "draft" with --fast_decode, else "full"."""
    return "draft" if getattr(args, "fast_decode", False) else "full"


def val_acc_images(args, num_val, epoch):
    """--reference_val_acc: the val images CLIP-HandID's released code counts in epoch `epoch`
    (0-based): a shuffled loader of --batch_size that drops the incomplete batch (60 of 72 on 11k
    dorsal right), drawn from (--seed, epoch); None (every val image) without the flag."""
    if not getattr(args, "reference_val_acc", False):
        return None
    sampler = ShuffleSampler(num_val, args.batch_size, seed=args.seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def warn_about_schedule(args, log, first_epoch=0):
    """Log (train.log too) a warning when --epochs ends inside the warm-up or before the first milestone
    (first_epoch: as training.WarmupMultiStepLR's); with CLIP-ReID's stage 1 (args.stage1_epochs), also
    when --stage1_epochs ends inside its warm-up."""
    stage = getattr(args, "stage", "both")
    found = schedule_warnings(args.epochs, args.warmup_epochs, args.milestones, first_epoch) if stage != "1" else []
    if getattr(args, "stage1_epochs", None) is not None and stage != "2":
        found = schedule_warnings(args.stage1_epochs, args.stage1_warmup_epochs, [], 1,
                                  ("--stage1_epochs", "--stage1_warmup_epochs", "")) + found
    for message in found:
        log.warning(message)


def training_config(args, method, data, amp, dist_info, num_train_images, num_val_images, **extra):
    """The config.json entries every trainer writes besides its arguments (write_run_config adds those):
    among them the test-time preprocessing record of the run (the whole photo squashed to --input_size,
    bicubic, CLIP mean/std, full decoding; protocols.test_settings reads it) and the JPEG decoding of
    training ("train_decode")."""
    return {"method": method, "num_classes": len(data["class_names"]), "class_names": data["class_names"],
            "preprocessing": preprocessing.record(args.input_size, "squash"), "train_decode": decode_mode(args),
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
                 metrics_file="metrics.csv", curve_file="training_curve.png", select_by="val_mAP"):
    """What every epoch ends with. Tracks the best epoch (highest val mAP, or the row's select_by
    entry; ties to the later epoch; with train_all the last validated one), appends row to
    history and, on rank 0, writes
    net_best.pth (record, when the epoch is the best) and net_<epoch>.pth (record, every save_every
    epochs), last_file (record + state + history + best: what --resume reads), metrics_file, the
    curve (with plot) and the log line; then waits for every rank. Returns the best epoch's
    {"epoch", "val_mAP", "val_rank1"}."""
    number = row["epoch"]
    best = dict(best or {"epoch": None, "val_mAP": -1.0})
    improved = row.get("val_mAP") is not None and (train_all or row[select_by] >= best.get(select_by, -1.0))
    if improved:
        best = {"epoch": number, "val_mAP": row["val_mAP"], "val_rank1": row["val_rank1"]}
        if select_by != "val_mAP":  # e.g. val_acc, CLIP-HandID's own choice
            best[select_by] = row[select_by]
    history.append(row)
    if dist_info.is_main:
        if record is not None and improved:
            save_checkpoint(os.path.join(out_dir, "net_best.pth"), record)
        if record is not None and save_every and number % save_every == 0:
            save_checkpoint(os.path.join(out_dir, f"net_{number}.pth"), record)
        save_checkpoint(os.path.join(out_dir, last_file), dict(record or {}, **state, history=history, best=best))
        discard_old_run(out_dir)
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


def reported_checkpoint(out_dir, protocol):
    """("best" | "last", path): the checkpoint `protocol` reports (net_best for clip-handid and
    clip-fh, net_last for clip-reid: utils.protocols), the one the final test evaluates."""
    which = protocols.check_protocol(protocol)["checkpoint"]
    return which, os.path.join(out_dir, f"net_{which}.pth")


def final_test(model, args, data_dir, out_dir, folder, method_name, amp, device, log, extra, what="net_best"):
    """Evaluate `model` (the caller loaded reported_checkpoint's weights into it) on the query/gallery
    splits of data_dir into out_dir/folder with the shared pipeline, as --protocol says for this run
    (protocols.test_settings with the run's config.json: flip, feature, precision, mAP, the
    preprocessing it was trained with, full JPEG decoding) on every gallery variant; the log line
    reports the published tables' gallery (11k: gallery{i}_all). None (and a log line) when data_dir
    has no test splits. `amp` (the training precision) is not used."""
    try:
        read_split_layout(data_dir)
    except SplitInputError as err:
        log.info(f"final test skipped: {err}")
        return None
    config = io.read_config(out_dir)
    setting = protocols.test_settings(args.protocol, config, gallery="both", cuda=str(device).startswith("cuda"))
    # the keys the evaluator records of the model and the split root, so that collect_results pairs the two
    identity = result_files.model_record(out_dir, config, (splits.read_manifest(data_dir) or {}).get("seed"))
    run_feature, model.feature = model.feature, setting["feature"]
    try:
        results = evaluate_query_gallery(
            model, data_dir, os.path.join(out_dir, folder), method_name=method_name, gallery=setting["gallery"],
            batch_size=max(args.batch_size, 64), num_workers=args.num_workers, device=device, amp=setting["amp"],
            flip=setting["flip"], overwrite=True, table_mAP=setting["mAP"], preprocessing=setting["preprocessing"],
            extra=dict(extra, **identity, feature=setting["feature"], protocol=setting),
            feature_dim=model.feature_dim())
    finally:
        model.feature = run_feature
    variant = protocols.headline_gallery(results["gallery_variants"])
    mean = results["summary"][variant]["mean"]
    log.info(f"final test ({what}, protocol {args.protocol}, gallery{{i}}"
             f"{'_all' if variant == 'all' else ''}): Rank-1 {100 * mean['rank1']:.2f} "
             f"{setting['mAP']} {100 * mean[setting['mAP']]:.2f} -> {os.path.join(out_dir, folder)}")
    return results


def run_problems(args):
    """Problems of the run folder flags that every trainer shares."""
    problems = []
    if not io.is_plain_folder_name(args.m_name):
        problems.append(f"--m_name {args.m_name!r} must be a plain folder name inside --f_name (no separators, "
                        f"not '.' or '..')")
    if args.resume and args.force:
        problems.append("--resume continues the run and --force replaces it: give one of them")
    return problems


def check_trainer_of(out_dir, method):
    """--resume of a run another trainer wrote is refused, naming that trainer."""
    recorded = read_config(out_dir).get("method")
    if recorded and recorded != method:
        raise TrainingInputError(f"--resume: {out_dir} was written by train_{recorded}.py, not train_{method}.py; "
                                 f"resume it with train_{recorded}.py, or start a new --m_name")


def run_training(args, check_args, train_fn, method=None):
    """main() of a trainer: check_args(args); the run folder <f_name>/<m_name> locked (rank 0; a
    second run on it is refused before anything, and never touches it); with --resume the run's own
    settings (utils/resume.py), of a run of this trainer (`method`); then train_fn(args, dist_info) in
    this process's share of a torchrun job (or alone). The project's own errors (bad input, unreadable
    checkpoints, NaN losses) and failed downloads end with one line per problem; anything else is a
    bug and keeps its traceback."""
    out_dir = os.path.join(args.f_name, args.m_name)
    undone = "kept"
    try:
        problems = run_problems(args)
        if problems:
            raise TrainingInputError("\n".join(problems))
        check_args(args)
        dist_info = setup_distributed(args.device)
        lock = outputs.FolderLock(out_dir, "another training run")
        try:
            if dist_info.is_main:
                outputs.check_writable(out_dir, "--f_name")
                lock.acquire()
            if args.resume and os.path.isfile(os.path.join(out_dir, "config.json")):
                if method is not None:
                    check_trainer_of(out_dir, method)
                resume.take_run_settings(args, out_dir, epochs_done(out_dir, stage2_only=True))
            existed = os.path.isdir(out_dir)
            try:
                return train_fn(args, dist_info)
            except BaseException as err:
                close_logger(get_logger(out_dir))
                if dist_info.is_main:
                    undone = undo_failed_start(out_dir, existed, err)
                raise
        finally:
            close_logger(get_logger(out_dir))
            lock.release()
            cleanup_distributed(dist_info)
    except (ClipFHError, clip.ModelDownloadError, clip.CheckpointError) as err:
        raise SystemExit("\n".join(f"error: {line}" for line in one_line(err).splitlines())) from None
    except KeyboardInterrupt:
        done = epochs_done(out_dir) if undone == "kept" else 0
        trained = epochs_done(out_dir, stage2_only=True) if done else 0  # CLIP-ReID: stage 1 is not the last epochs
        if trained and trained >= (getattr(args, "epochs", None) or float("inf")):
            message = f"interrupted after the last epoch ({trained}), in the final test; finish it with --resume"
        elif done:
            message = f"interrupted in epoch {done + 1}; continue with --resume"
        else:
            message = "interrupted before the first checkpoint; nothing was kept" + (
                f" and the earlier run in {out_dir} is back as it was" if undone == "restored" else "")
        print(message, file=sys.stderr)
        raise SystemExit(130) from None


def one_line(err):
    """The message of an error; one re-raised from a DataLoader worker carries the worker's traceback,
    of which only the last line (the original message) is shown (train.log keeps all of it)."""
    text = str(err)
    if "Original Traceback" in text:
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return text


def epochs_done(out_dir, stage2_only=False):
    """Epochs finished so far: the rows of the metrics CSV (stage 2's, else stage 1's)."""
    for name in ("metrics.csv",) if stage2_only else ("metrics.csv", "stage1_metrics.csv"):
        path = os.path.join(out_dir, name)
        if os.path.isfile(path):
            with open(path) as f:
                return max(0, sum(1 for _ in f) - 1)
    return 0
