"""Fine-tune a CLIP image encoder for hand identification (CLIP-HandID's recipe by default).

Two BNNeck heads with label-smoothed ID losses on the pre-projection feature and on the CLIP
embedding; optional triplet / center losses, ArcFace heads and a PK sampler. Validation uses only
training identities (val images as queries against the train images); net_best is the epoch with
the best val mAP. Writes <f_name>/<m_name>/: config.json, train.log, metrics.csv,
training_curve.png, net_last.pth, net_best.pth, net_<epoch>.pth, and final_test/ (net_best on the
test splits of --data_dir).

    python train_finetune.py --data_dir ./11k/train_val_test_split_dorsal_r --f_name ./model_11k_d_r \
        --m_name clip_hand_vit --backbone_name ViT-B/16
    torchrun --nproc_per_node 4 train_finetune.py ...   (DDP; --batch_size is per GPU)
"""
import argparse
import os
import sys

import torch
import torch.nn as nn

import models
import utils
from losses import CenterLoss, CrossEntropyLabelSmooth, TripletLoss

RUN_FILES = ("config.json", "train.log", "metrics.csv", "training_curve.png", "net_last.pth", "net_best.pth")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data and output")
    g.add_argument("--data_dir", default="./11k/train_val_test_split_dorsal_r",
                   help="split root holding train/ (or train_all/) and val/")
    g.add_argument("--f_name", default="./model_11k_d_r", help="output root")
    g.add_argument("--m_name", default="clip_hand_vit", help="run folder inside --f_name")
    g.add_argument("--data_type", default="11k", choices=["11k", "HD"], help="dataset kind (recorded in config.json)")
    g.add_argument("--backbone_name", default="ViT-B/16",
                   help="CLIP model name (ViT-B/16, RN50, ...) or path to an OpenAI-format checkpoint")
    g.add_argument("--train_all", action="store_true",
                   help="train on train_all (train + val); val then overlaps training, so net_best = last epoch")
    g.add_argument("--download_root", default=None, help="where pretrained CLIP weights are cached (~/.cache/clip)")
    g.add_argument("--force", action="store_true", help="overwrite an existing run folder")
    g = p.add_argument_group("batching")
    g.add_argument("--batch_size", type=int, default=20, help="images per batch (per process under DDP)")
    g.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=5e-6, help="learning rate of the image encoder; heads get 10x")
    g.add_argument("--optimizer", default="adam", choices=["adam", "adamw", "sgd"])
    g.add_argument("--weight_decay", type=float, default=5e-4)
    g.add_argument("--epochs", type=int, default=70)
    g.add_argument("--warmup_epochs", type=int, default=10, help="linear warm-up from 0.01 x lr")
    g.add_argument("--milestones", type=int, nargs="*", default=[40, 60],
                   help="epochs where lr is multiplied by --gamma")
    g.add_argument("--gamma", type=float, default=0.5)
    g.add_argument("--ls", type=float, default=0.1, help="label smoothing of the ID losses (0 disables)")
    g = p.add_argument_group("augmentation and input")
    g.add_argument("--erasing_p", type=float, default=0.0, help="random erasing probability")
    g.add_argument("--color_jitter", action="store_true")
    g.add_argument("--input_size", type=int, nargs=2, default=[224, 224], metavar=("H", "W"))
    g.add_argument("--stride", type=int, default=16, help="ViT patch stride (< patch size: overlapping patches)")
    g.add_argument("--last_stride", type=int, default=1, choices=[1, 2],
                   help="ResNet layer4 stride (1 as in CLIP-HandID: 14x14 map at 224)")
    g.add_argument("--cache_resized", nargs="?", const="", default=None, metavar="DIR",
                   help="decode and resize every photo once into a uint8 cache (default DIR: "
                        "<data_dir>/.cache_resized) so epochs skip JPEG decoding")
    g = p.add_argument_group("sampling and extra losses")
    g.add_argument("--sampler", default="random", choices=["random", "pk"])
    g.add_argument("--num_instances", type=int, default=4, help="K images per identity with --sampler pk")
    g.add_argument("--triplet_weight", type=float, default=0.0, help="batch-hard triplet (margin 0.3) weight")
    g.add_argument("--center_weight", type=float, default=0.0, help="center loss weight")
    g.add_argument("--arcface", action="store_true", help="ArcFace heads (s 30, m 0.5) instead of linear classifiers")
    g.add_argument("--feature", default=models.DEFAULT_FEATURE, choices=models.FEATURE_CHOICES,
                   help="retrieval feature for validation (and the default of the evaluator)")
    g = p.add_argument_group("run control")
    g.add_argument("--amp", default=None, choices=["none", "bf16", "fp16"], help="default: bf16 on CUDA, none on CPU")
    g.add_argument("--grad_clip", type=float, default=0.0, help="max gradient norm (0: off); applied before the step")
    g.add_argument("--resume", action="store_true", help="continue the run in <f_name>/<m_name> from net_last.pth")
    g.add_argument("--save_every", type=int, default=10, help="also keep net_<epoch>.pth every N epochs (0: never)")
    g.add_argument("--eval_every", type=int, default=5, help="validate every N epochs (and after the last)")
    g.add_argument("--final_test", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate net_best on the query/gallery splits of --data_dir at the end")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bars")
    utils.add_common_args(g)
    return p.parse_args(argv)


def check_args(args):
    problems = []
    if args.batch_size < 1:
        problems.append(f"--batch_size must be positive, got {args.batch_size}")
    if args.epochs < 1:
        problems.append(f"--epochs must be positive, got {args.epochs}")
    if args.lr <= 0:
        problems.append(f"--lr must be positive, got {args.lr}")
    if not 0 <= args.ls < 1:
        problems.append(f"--ls must be in [0, 1), got {args.ls}")
    if not 0 <= args.erasing_p <= 1:
        problems.append(f"--erasing_p must be in [0, 1], got {args.erasing_p}")
    if args.eval_every < 1:
        problems.append(f"--eval_every must be at least 1, got {args.eval_every}")
    if args.save_every < 0:
        problems.append(f"--save_every must be 0 (off) or positive, got {args.save_every}")
    if min(args.input_size) < 1 or args.stride < 1:
        problems.append(f"--input_size and --stride must be positive, got {args.input_size} and {args.stride}")
    if args.triplet_weight < 0 or args.center_weight < 0 or args.grad_clip < 0:
        problems.append("--triplet_weight, --center_weight and --grad_clip must not be negative")
    if args.warmup_epochs < 0:
        problems.append(f"--warmup_epochs must not be negative, got {args.warmup_epochs}")
    if problems:
        raise utils.TrainingInputError("; ".join(problems))


class FinetuneLoss(nn.Module):
    """The model plus its training objective, one module so DDP also syncs the center-loss centres:
    LS-CE on both heads (1:1) + triplet_weight * triplet + center_weight * center, the metric losses
    on both pre-BN features (pre_proj and proj)."""

    def __init__(self, model, ls=0.1, triplet_weight=0.0, center_weight=0.0, triplet_margin=0.3):
        super().__init__()
        self.model = model
        self.id_loss = CrossEntropyLabelSmooth(ls)
        self.triplet_weight, self.center_weight = triplet_weight, center_weight
        self.triplet = TripletLoss(triplet_margin) if triplet_weight > 0 else None
        self.centers = None
        if center_weight > 0:
            self.centers = nn.ModuleList([CenterLoss(model.num_classes, model.in_planes),
                                          CenterLoss(model.num_classes, model.in_planes_proj)])

    def forward(self, images, labels):
        scores, features = self.model(images, labels)
        metric_feats = (features["pre_proj"], features["proj"])
        terms = {"loss_id": self.id_loss(scores[0], labels), "loss_id_proj": self.id_loss(scores[1], labels)}
        total = terms["loss_id"] + terms["loss_id_proj"]
        if self.triplet is not None:
            terms["loss_triplet"] = sum(self.triplet(f, labels) for f in metric_feats)
            total = total + self.triplet_weight * terms["loss_triplet"]
        if self.centers is not None:
            terms["loss_center"] = sum(c(f, labels) for c, f in zip(self.centers, metric_feats))
            total = total + self.center_weight * terms["loss_center"]
        return total, terms, scores[1]


def prepare_run_folder(out_dir, args):
    """Refuse to overwrite a run without --force; --resume needs net_last.pth."""
    last = os.path.join(out_dir, "net_last.pth")
    if args.resume:
        if not os.path.isfile(last):
            raise utils.TrainingInputError(f"--resume: {last} does not exist; start the run without --resume")
        return
    existing = [f for f in RUN_FILES if os.path.exists(os.path.join(out_dir, f))]
    if existing and not args.force:
        raise utils.TrainingInputError(f"{out_dir} already holds a run ({', '.join(existing)}); pass --resume to "
                                       f"continue it, --force to overwrite it, or choose another --m_name")


def clear_run_folder(out_dir):
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        if name in RUN_FILES or (name.startswith("net_") and name.endswith(".pth")):
            os.remove(path)
    final = os.path.join(out_dir, "final_test")
    if os.path.isdir(final):
        import shutil
        shutil.rmtree(final)


def read_config(out_dir):
    import json
    with open(os.path.join(out_dir, "config.json")) as f:
        return json.load(f)


def resumed_spec(out_dir, args):
    """The backbone of the run being resumed; refuses a different --backbone_name / geometry."""
    config = read_config(out_dir)
    spec = config["model"]["backbone"]
    wanted = models.backbone_spec(args.backbone_name, args.input_size, args.stride, args.last_stride)
    same = (spec["name"] == wanted["name"] and spec["input_size"] == wanted["input_size"]
            and models.backbone_signature(dict(spec, arch=None)) == models.backbone_signature(wanted))
    if not same:
        raise utils.TrainingInputError(
            f"{os.path.join(out_dir, 'net_last.pth')} was trained with backbone {models.describe_backbone(spec)} "
            f"but this command asks for {models.describe_backbone(wanted)}; resume with the run's own settings "
            f"or start a new --m_name")
    return spec, config


def build_datasets(args, data, input_size, dist_info):
    load_size = utils.train_load_size(input_size)
    gallery_items = data["train"]
    if args.train_all:  # train_all contains the val images: keep them out of the val gallery
        val_files = {(os.path.basename(p), label) for p, label in data["val"]}
        gallery_items = [(p, label) for p, label in data["train"] if (os.path.basename(p), label) not in val_files]
    caches = {"train": None, "val": None, "gallery": None}
    if args.cache_resized is not None:
        cache_dir = args.cache_resized or os.path.join(args.data_dir, ".cache_resized")
        wanted = {"train": (data["train"], load_size), "val": (data["val"], input_size),
                  "gallery": (gallery_items, input_size)}
        for turn in ("main", "others"):  # rank 0 builds the cache files, the other ranks then open them
            if (turn == "main") == dist_info.is_main:
                for name, (items, size) in wanted.items():
                    caches[name] = utils.ResizedImageCache([p for p, _ in items], size, cache_dir,
                                                           desc=f"caching {name} images at {size[0]}x{size[1]}")
            utils.barrier(dist_info)
    eval_tf = utils.eval_transform(input_size)
    train_set = utils.LabeledImageDataset(
        data["train"], load_size, utils.build_train_transform(input_size, args.color_jitter, args.erasing_p),
        caches["train"])
    val_set = utils.LabeledImageDataset(data["val"], input_size, eval_tf, caches["val"])
    gallery_set = utils.LabeledImageDataset(gallery_items, input_size, eval_tf, caches["gallery"])
    return train_set, val_set, gallery_set


def make_sampler(args, train_set, dist_info, log):
    if args.sampler == "pk":
        sampler = utils.PKSampler(train_set.labels, args.batch_size, args.num_instances, seed=args.seed,
                                  rank=dist_info.rank, world_size=dist_info.world_size)
        if sampler.rare_labels:
            log.warning(f"warning: --sampler pk: {len(sampler.rare_labels)} identities have fewer than --num_instances "
                        f"{args.num_instances} training images; their images are drawn again (with replacement) "
                        f"to fill {args.num_instances} instances per batch")
    else:
        sampler = utils.ShuffleSampler(len(train_set), args.batch_size, seed=args.seed, rank=dist_info.rank,
                                       world_size=dist_info.world_size)
    if len(sampler) == 0:
        raise utils.TrainingInputError(
            f"the training set ({len(train_set)} images) does not fill one batch of {args.batch_size} per process "
            f"x {dist_info.world_size} process(es) with --sampler {args.sampler}; lower --batch_size")
    return sampler


def checkpoint_record(model, spec, epoch, metrics):
    return {"format": 1, "kind": "finetune", "epoch": epoch, "backbone": spec,
            "model": models.image_side_state_dict(model), "metrics": metrics}


def run_final_test(model, args, out_dir, best_path, amp, device, log):
    """net_best on the query/gallery splits of --data_dir, with the shared evaluation pipeline."""
    try:
        utils.read_split_layout(args.data_dir)
    except ValueError as err:
        log.info(f"final test skipped: {err}")
        return None
    checkpoint = utils.load_checkpoint(best_path)
    models.load_model_weights(model, checkpoint["model"], best_path)
    model.eval()
    results = utils.evaluate_query_gallery(
        model, args.data_dir, os.path.join(out_dir, "final_test"), method_name=f"{args.m_name} (net_best)",
        input_size=tuple(args.input_size), batch_size=max(args.batch_size, 64), num_workers=args.num_workers,
        device=device, amp="off" if amp == "none" else amp, overwrite=True,
        extra={"which_epoch": "best", "epoch": checkpoint["epoch"], "feature": model.feature})
    return results


def main(argv=None):
    args = parse_args(argv)
    try:
        return train(args)
    except (utils.TrainingInputError, utils.NonFiniteLossError) as err:
        raise SystemExit(f"error: {err}") from None
    except ValueError as err:  # from clip / models / image loading: always a message naming the cause
        raise SystemExit(f"error: {err}") from None


def train(args):
    check_args(args)
    dist_info = utils.setup_distributed(args.device)
    try:
        return _train(args, dist_info)
    finally:
        utils.close_logger(utils.get_logger(os.path.join(args.f_name, args.m_name)))
        utils.cleanup_distributed(dist_info)


def _train(args, dist_info):
    device = dist_info.device
    amp = utils.resolve_amp(args.amp, device)
    input_size = tuple(args.input_size)
    out_dir = os.path.join(args.f_name, args.m_name)
    data = utils.load_train_val(args.data_dir, args.train_all)
    num_classes = len(data["class_names"])
    prepare_run_folder(out_dir, args)
    utils.barrier(dist_info)
    if dist_info.is_main:
        os.makedirs(out_dir, exist_ok=True)
        if args.force and not args.resume:
            clear_run_folder(out_dir)
    utils.barrier(dist_info)
    log = utils.setup_logger(out_dir, dist_info.is_main)
    log.info("command: " + " ".join(sys.argv))
    utils.set_seed(args.seed)
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels

    # model: pretrained weights for a new run, the run's own architecture when resuming
    if args.resume:
        spec, old_config = resumed_spec(out_dir, args)
        if old_config["num_classes"] != num_classes or old_config.get("class_names") != data["class_names"]:
            raise utils.TrainingInputError(f"{args.data_dir} has other training identities than the run being resumed "
                                           f"in {out_dir}")
        visual = models.load_backbone(spec, weights="empty")
    else:
        spec = models.backbone_spec(args.backbone_name, input_size, args.stride, args.last_stride)
        for turn in ("main", "others"):  # rank 0 downloads first
            if (turn == "main") == dist_info.is_main:
                visual = models.load_backbone(spec, weights="pretrained", download_root=args.download_root)
            utils.barrier(dist_info)
    model_config = models.finetune_model_config(spec, classifier="arcface" if args.arcface else "linear",
                                                feature=args.feature)
    model = models.build_finetune_model(model_config, num_classes, visual=visual)
    criterion = FinetuneLoss(model, args.ls, args.triplet_weight, args.center_weight).to(device)

    train_set, val_set, gallery_set = build_datasets(args, data, input_size, dist_info)
    sampler = make_sampler(args, train_set, dist_info, log)
    optimizer = utils.make_optimizer(args.optimizer, utils.param_groups(model, args.lr, args.weight_decay),
                                     args.lr, args.weight_decay)
    optimizers = [optimizer]
    if criterion.centers is not None:  # plain SGD on the centres (lr 0.5, gradient / center_weight as in BoT)
        optimizers.append(torch.optim.SGD(criterion.centers.parameters(), lr=0.5 / args.center_weight))
    scheduler = utils.WarmupMultiStepLR(optimizer, args.milestones, args.gamma, args.warmup_epochs, 0.01)
    scaler = utils.make_grad_scaler(amp, device)
    effective_batch = args.batch_size * dist_info.world_size

    history, best, start_epoch = [], {"epoch": None, "val_mAP": -1.0}, 0
    last_path, best_path = os.path.join(out_dir, "net_last.pth"), os.path.join(out_dir, "net_best.pth")
    if args.resume:
        state = utils.load_checkpoint(last_path)
        models.check_same_backbone(spec, state["backbone"], last_path)
        models.load_model_weights(model, state["model"], last_path)
        if state.get("world_size", 1) != dist_info.world_size:
            raise utils.TrainingInputError(f"{last_path} was written by a run with {state.get('world_size', 1)} "
                                           f"process(es); resume it with the same number ({dist_info.world_size} now)")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if criterion.centers is not None:
            if "centers" not in state:
                raise utils.TrainingInputError(f"{last_path} has no center-loss state; resume with --center_weight 0")
            criterion.centers.load_state_dict(state["centers"])
            optimizers[1].load_state_dict(state["center_optimizer"])
        sampler.load_state_dict(state["sampler"])
        utils.restore_rng_state(state["rng"])
        history, best, start_epoch = list(state["history"]), dict(state["best"]), int(state["epoch"])
        log.info(f"resumed from {last_path} after epoch {start_epoch}")

    if dist_info.is_main:
        extra = {"method": "finetune", "model": model_config, "num_classes": num_classes,
                 "class_names": data["class_names"], "feature_dims": dict(model.visual.feature_dims),
                 "retrieval_feature_dim": model.feature_dim(), "amp": amp, "world_size": dist_info.world_size,
                 "effective_batch_size": effective_batch, "train_split": data["train_split"],
                 "num_train_images": len(train_set), "num_val_images": len(val_set),
                 "recipe_notes": ["CLIP mean/std at train and test time (CLIP-HandID trains with ImageNet's)",
                                  "validation and net_best use only training identities (val vs train)"]}
        if args.resume:
            extra["resumed_after_epochs"] = read_config(out_dir).get("resumed_after_epochs", []) + [start_epoch]
        utils.write_run_config(out_dir, args, extra=extra)
    if args.train_all:
        log.warning("warning: --train_all: the val images are part of training, so val metrics are optimistic and "
                    "net_best is the last validated epoch")
    log.info(f"{num_classes} identities, {len(train_set)} train / {len(val_set)} val images; backbone "
             f"{models.describe_backbone(spec)}; retrieval feature {args.feature} ({model.feature_dim()}-d); "
             f"batch {args.batch_size} x {dist_info.world_size} process(es) = effective batch {effective_batch}; "
             f"amp {amp}; device {device}")

    train_module = criterion
    if dist_info.distributed:
        train_module = nn.parallel.DistributedDataParallel(
            criterion, device_ids=[dist_info.local_rank] if device.startswith("cuda") else None)

    def compute_loss(module, images, labels):
        return module(images, labels)

    def feature_fn(images):
        return model(images)

    def logits_fn(images):
        return model.predict_logits(images)[1]

    for epoch in range(start_epoch, args.epochs):
        number = epoch + 1  # epochs are numbered from 1 in logs and file names
        utils.set_seed(utils.epoch_seed(args.seed, epoch))
        sampler.set_epoch(epoch)
        loader = utils.make_loader(train_set, args.batch_size, sampler, args.num_workers, args.seed, epoch, device,
                                   drop_last=True)
        lrs = [group["lr"] for group in optimizer.param_groups]
        try:
            result = utils.train_one_epoch(train_module, loader, compute_loss, optimizers, scaler, amp, device, number,
                                           grad_clip=args.grad_clip, dist_info=dist_info,
                                           progress=args.progress and dist_info.is_main)
        except utils.NonFiniteLossError as err:
            kept = f"{last_path} (after epoch {start_epoch if not history else history[-1]['epoch']})" \
                if os.path.exists(last_path) else "none (no epoch finished)"
            log.error(f"error: {err}; stopped. Last good checkpoint: {kept}")
            raise utils.NonFiniteLossError(f"{err}; training stopped, last good checkpoint: {kept}") from None
        scheduler.step()
        row = {"epoch": number, "lr": lrs[0], "lr_heads": lrs[-1], **result.losses, "train_acc": result.accuracy,
               "val_acc": None, "val_rank1": None, "val_mAP": None,
               "images_per_s": result.images_per_s, "epoch_seconds": result.seconds}
        validate_now = number % args.eval_every == 0 or number == args.epochs
        improved = False
        if validate_now and dist_info.is_main:
            model.eval()
            row.update(utils.validate(feature_fn, logits_fn, val_set, gallery_set, device, amp,
                                      batch_size=max(args.batch_size, 64), num_workers=args.num_workers))
            model.train()
            # ties go to the later epoch; with --train_all val is seen in training, so the last epoch wins
            improved = args.train_all or row["val_mAP"] >= best["val_mAP"]
            if improved:
                best = {"epoch": number, "val_mAP": row["val_mAP"], "val_rank1": row["val_rank1"]}
        history.append(row)
        if dist_info.is_main:
            record = checkpoint_record(model, spec, number, row)
            if improved:
                utils.save_checkpoint(best_path, record)
            if args.save_every and number % args.save_every == 0:
                utils.save_checkpoint(os.path.join(out_dir, f"net_{number}.pth"), record)
            state = dict(record, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                         scaler=scaler.state_dict(), rng=utils.capture_rng_state(), sampler=sampler.state_dict(),
                         history=history, best=best, world_size=dist_info.world_size)
            if criterion.centers is not None:
                state.update(centers=criterion.centers.state_dict(), center_optimizer=optimizers[1].state_dict())
            utils.save_checkpoint(last_path, state)
            utils.write_metrics_csv(os.path.join(out_dir, "metrics.csv"), history)
            if validate_now:  # drawing costs seconds: only when new val points arrive
                utils.plot_training_curve(os.path.join(out_dir, "training_curve.png"), history)
            losses = ", ".join(f"{k} {v:.4f}" for k, v in result.losses.items())
            val = (f" | val acc {row['val_acc']:.4f} Rank-1 {row['val_rank1']:.4f} mAP {row['val_mAP']:.4f}"
                   + (" (best)" if improved else "")) if row["val_mAP"] is not None else ""
            log.info(f"epoch {number}/{args.epochs} lr {lrs[0]:.3g} | {losses} | train acc {result.accuracy:.4f}"
                     f"{val} | {result.images_per_s:.1f} img/s")
        utils.barrier(dist_info)

    if dist_info.distributed:
        agree = utils.ranks_agree(model, dist_info)
        log.info(f"model weights {'identical' if agree else 'DIFFERENT'} on all {dist_info.world_size} ranks")
        if not agree:
            raise RuntimeError("DDP ranks ended with different weights; the saved checkpoint is rank 0's")
    summary = f"Wrote the fine-tuned model (net_best: epoch {best['epoch']}) to {out_dir}"
    if dist_info.is_main:
        if args.final_test and os.path.isfile(best_path):
            results = run_final_test(model, args, out_dir, best_path, amp, device, log)
            if results is not None:
                variant = results["gallery_variants"][-1]
                mean = results["summary"][variant]["mean"]
                log.info(f"final test (net_best, gallery {variant}): Rank-1 {100 * mean['rank1']:.2f} "
                         f"mAP {100 * mean['mAP_hand']:.2f} -> {os.path.join(out_dir, 'final_test')}")
        log.info(summary)
    return {"out_dir": out_dir, "best": best, "history": history}


if __name__ == "__main__":
    main()
