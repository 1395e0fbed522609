"""Train PromptSG (Yang et al., CVPR 2024) for hand identification, as the paper describes it.

An inversion network turns each image's global CLIP feature into a pseudo-word S*; the frozen text
tower encodes "A photo of a S* hand."; that text feature queries the image's global + patch tokens
(cross-attention, then 2 transformer blocks) to give the language-guided visual feature.
Loss: label-smoothed ID (BNNeck) + batch-hard triplet on the fused feature + lambda_sc x symmetric
supervised contrastive loss between image features and composed-prompt features. Adam, 5e-6 for
the image encoder and 10x for the new modules, x0.1 every 20 epochs, 60 epochs, PK 16 x 4.
At test time the attention is guided by the fixed prompt "A photo of a hand." (encoded once) or by
the composed prompt of each image (--inference_prompt).

Same run folder, flags, checkpoints, --resume, validation (val vs train only) and torchrun support
as train_finetune.py; evaluate with eval_query_gallery_finetune.py [--inference_prompt composed].

    python train_promptsg.py --data_dir ./11k/train_val_test_split_dorsal_r --f_name ./model_11k_d_r \
        --m_name clip_promptsg_vit --backbone_name ViT-B/16
"""
import argparse
import os
import sys

import torch.nn as nn
import torch.nn.functional as F

import models
import train_finetune
import utils
from losses import CrossEntropyLabelSmooth, TripletLoss, supcon_loss


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data and output")
    g.add_argument("--data_dir", default="./11k/train_val_test_split_dorsal_r",
                   help="split root holding train/ (or train_all/) and val/")
    g.add_argument("--f_name", default="./model_11k_d_r", help="output root")
    g.add_argument("--m_name", default="clip_promptsg_vit", help="run folder inside --f_name")
    g.add_argument("--data_type", default="11k", choices=["11k", "HD"], help="dataset kind (recorded in config.json)")
    g.add_argument("--backbone_name", default="ViT-B/16",
                   help="CLIP model name (ViT-B/16, RN50, ...) or path to an OpenAI-format checkpoint")
    g.add_argument("--train_all", action="store_true",
                   help="train on train_all (train + val); val then overlaps training, so net_best = last epoch")
    g.add_argument("--download_root", default=None, help="where pretrained CLIP weights are cached (~/.cache/clip)")
    g.add_argument("--force", action="store_true", help="overwrite an existing run folder")
    g = p.add_argument_group("batching")
    g.add_argument("--batch_size", type=int, default=64, help="images per batch (per process under DDP)")
    g.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=5e-6,
                   help="learning rate of the image encoder; the new modules (inversion, interaction, head) get 10x")
    g.add_argument("--optimizer", default="adam", choices=["adam", "adamw", "sgd"])
    g.add_argument("--weight_decay", type=float, default=5e-4)
    g.add_argument("--epochs", type=int, default=60)
    g.add_argument("--warmup_epochs", type=int, default=0,
                   help="linear warm-up from 0.01 x lr (0: the paper's plain step schedule)")
    g.add_argument("--milestones", type=int, nargs="*", default=[20, 40],
                   help="epochs where lr is multiplied by --gamma")
    g.add_argument("--gamma", type=float, default=0.1)
    g.add_argument("--ls", type=float, default=0.1, help="label smoothing of the ID loss (0 disables)")
    g = p.add_argument_group("augmentation and input")
    g.add_argument("--erasing_p", type=float, default=0.0, help="random erasing probability")
    g.add_argument("--color_jitter", action="store_true")
    g.add_argument("--input_size", type=int, nargs=2, default=[224, 224], metavar=("H", "W"))
    g.add_argument("--stride", type=int, default=16, help="ViT patch stride (< patch size: overlapping patches)")
    g.add_argument("--last_stride", type=int, default=1, choices=[1, 2],
                   help="ResNet layer4 stride (1: 14x14 map at 224)")
    g.add_argument("--cache_resized", nargs="?", const="", default=None, metavar="DIR",
                   help="decode and resize every photo once into a uint8 cache (default DIR: "
                        "<data_dir>/.cache_resized) so epochs skip JPEG decoding")
    g = p.add_argument_group("sampling and losses")
    g.add_argument("--sampler", default="pk", choices=["random", "pk"])
    g.add_argument("--num_instances", type=int, default=4, help="K images per identity with --sampler pk")
    g.add_argument("--triplet_weight", type=float, default=1.0, help="batch-hard triplet (margin 0.3) weight")
    g.add_argument("--lambda_sc", type=float, default=0.5,
                   help="weight of the symmetric image<->composed-prompt supervised contrastive loss")
    g.add_argument("--sc_temperature", type=float, default=None,
                   help="temperature of that loss on cosine similarities (default: the CLIP checkpoint's own, "
                        "1 / exp(logit_scale), 0.01 for OpenAI's models)")
    g = p.add_argument_group("PromptSG model")
    g.add_argument("--prompt_template", default=models.PROMPTSG_TEMPLATE,
                   help="composed prompt; S* marks where the pseudo-word goes")
    g.add_argument("--fixed_prompt", default=models.PROMPTSG_FIXED_PROMPT,
                   help="the prompt that guides the attention at inference with --inference_prompt fixed")
    g.add_argument("--inference_prompt", default="fixed", choices=models.INFERENCE_PROMPTS,
                   help="which prompt guides the attention in validation (and by default in the evaluator)")
    g.add_argument("--interaction_blocks", type=int, default=2, help="transformer blocks after the cross-attention")
    g.add_argument("--feature", default="fused", choices=models.PROMPTSG_FEATURES,
                   help="retrieval feature: fused (language-guided feature before BN), fused_bn, concat "
                        "(global CLIP feature + fused) or proj (global CLIP feature alone)")
    g = p.add_argument_group("run control")
    g.add_argument("--amp", default=None, choices=["none", "bf16", "fp16"], help="default: bf16 on CUDA, none on CPU")
    g.add_argument("--grad_clip", type=float, default=0.0, help="max gradient norm (0: off); applied before the step")
    g.add_argument("--resume", action="store_true", help="continue the run in <f_name>/<m_name> from net_last.pth")
    g.add_argument("--save_every", type=int, default=10, help="also keep net_<epoch>.pth every N epochs (0: never)")
    g.add_argument("--eval_every", type=int, default=5, help="validate every N epochs (and after the last)")
    g.add_argument("--final_test", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate net_best on the query/gallery splits of --data_dir at the end (fixed and "
                        "composed prompt)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bars")
    utils.add_common_args(g)
    return p.parse_args(argv)


def check_args(args):
    train_finetune.check_args(argparse.Namespace(**vars(args), center_weight=0.0))
    problems = []
    if args.lambda_sc < 0:
        problems.append(f"--lambda_sc must not be negative, got {args.lambda_sc}")
    if args.sc_temperature is not None and args.sc_temperature <= 0:
        problems.append(f"--sc_temperature must be positive, got {args.sc_temperature}")
    if args.interaction_blocks < 0:
        problems.append(f"--interaction_blocks must not be negative, got {args.interaction_blocks}")
    if args.batch_size < 2:
        problems.append("--batch_size must be at least 2 (the inversion network ends with a BatchNorm)")
    try:
        models.composed_prompt_tokens(args.prompt_template)
    except ValueError as err:
        problems.append(str(err))
    if problems:
        raise utils.TrainingInputError("; ".join(problems))


def symmetric_supcon(image_features, text_features, labels, temperature):
    """i2t + t2i supervised contrastive loss on cosine similarities: every same-identity pair of the
    batch (the own pair included) is a positive."""
    image_features = F.normalize(image_features.float(), dim=1)
    text_features = F.normalize(text_features.float(), dim=1)
    i2t = supcon_loss(image_features, labels, text_features, labels, temperature)
    t2i = supcon_loss(text_features, labels, image_features, labels, temperature)
    return i2t + t2i


class PromptSGLoss(nn.Module):
    """The model plus its objective (one module, so DDP wraps both): ID (label-smoothed CE on
    BN(fused)) + triplet_weight x batch-hard triplet on fused + lambda_sc x symmetric SupCon between
    the global image features and the composed-prompt features."""

    def __init__(self, model, ls=0.1, triplet_weight=1.0, lambda_sc=0.5, sc_temperature=None, triplet_margin=0.3):
        super().__init__()
        self.model = model
        self.id_loss = CrossEntropyLabelSmooth(ls)
        self.triplet = TripletLoss(triplet_margin)
        self.triplet_weight, self.lambda_sc = float(triplet_weight), float(lambda_sc)
        self.fixed_temperature = sc_temperature

    def temperature(self):
        """--sc_temperature, else the checkpoint's own (read each time: a resumed model gets its weights late)."""
        if self.fixed_temperature:
            return float(self.fixed_temperature)
        return self.model.clip_temperature()

    def forward(self, images, labels):
        scores, features = self.model(images, labels)
        temperature = self.fixed_temperature or self.model.clip_temperature(as_tensor=True)
        terms = {"loss_id": self.id_loss(scores[0], labels),
                 "loss_triplet": self.triplet(features["fused"], labels),
                 "loss_supcon": symmetric_supcon(features["image"], features["text"], labels, temperature)}
        total = terms["loss_id"] + self.triplet_weight * terms["loss_triplet"] + self.lambda_sc * terms["loss_supcon"]
        return total, terms, scores[0]


def model_config_from_args(args, spec):
    return models.promptsg_model_config(spec, prompt_template=args.prompt_template, fixed_prompt=args.fixed_prompt,
                                        feature=args.feature, inference_prompt=args.inference_prompt,
                                        num_blocks=args.interaction_blocks)


def check_resumable(old_model_config, args, path):
    """A resumed run keeps its model; refuse flags that would change it."""
    for key, flag, value in (("prompt_template", "--prompt_template", args.prompt_template),
                             ("fixed_prompt", "--fixed_prompt", args.fixed_prompt),
                             ("num_blocks", "--interaction_blocks", args.interaction_blocks)):
        if old_model_config.get(key) != value:
            raise utils.TrainingInputError(f"{path} was trained with {flag} {old_model_config.get(key)!r}, "
                                           f"not {value!r}; resume with the run's own settings or start a new --m_name")
    if old_model_config.get("kind") != "promptsg":
        raise utils.TrainingInputError(f"{path} holds a {old_model_config.get('kind')} run, not a PromptSG run")


def checkpoint_record(model, spec, epoch, metrics):
    return {"format": 1, "kind": "promptsg", "epoch": epoch, "backbone": spec,
            "model": models.image_side_state_dict(model), "metrics": metrics}


def run_final_tests(model, args, out_dir, best_path, amp, device, log):
    """net_best on the query/gallery splits of --data_dir, guided by each inference prompt:
    final_test/ (the run's --inference_prompt) and final_test_<other prompt>/."""
    try:
        utils.read_split_layout(args.data_dir)
    except ValueError as err:
        log.info(f"final test skipped: {err}")
        return {}
    checkpoint = utils.load_checkpoint(best_path)
    models.load_model_weights(model, checkpoint["model"], best_path)
    model.eval()
    prompts = [args.inference_prompt] + [p for p in models.INFERENCE_PROMPTS if p != args.inference_prompt]
    results = {}
    for prompt in prompts:
        model.inference_prompt = prompt
        folder = "final_test" if prompt == args.inference_prompt else f"final_test_{prompt}"
        results[prompt] = utils.evaluate_query_gallery(
            model, args.data_dir, os.path.join(out_dir, folder),
            method_name=f"{args.m_name} (net_best, {prompt} prompt)", input_size=tuple(args.input_size),
            batch_size=max(args.batch_size, 64), num_workers=args.num_workers, device=device,
            amp="off" if amp == "none" else amp, overwrite=True,
            extra={"which_epoch": "best", "epoch": checkpoint["epoch"], "feature": model.feature,
                   "inference_prompt": prompt})
        variant = results[prompt]["gallery_variants"][-1]
        mean = results[prompt]["summary"][variant]["mean"]
        log.info(f"final test (net_best, {prompt} prompt, gallery {variant}): Rank-1 {100 * mean['rank1']:.2f} "
                 f"mAP {100 * mean['mAP_hand']:.2f} -> {os.path.join(out_dir, folder)}")
    model.inference_prompt = args.inference_prompt
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
        utils.cleanup_distributed(dist_info)


def build_model(args, out_dir, num_classes, class_names, dist_info):
    """(model, model_config, spec): pretrained CLIP for a new run, the run's own model when resuming."""
    if args.resume:
        spec, old_config = train_finetune.resumed_spec(out_dir, args)
        if old_config["num_classes"] != num_classes or old_config.get("class_names") != class_names:
            raise utils.TrainingInputError(f"{args.data_dir} has other training identities than the run being resumed "
                                           f"in {out_dir}")
        check_resumable(old_config["model"], args, os.path.join(out_dir, "net_last.pth"))
        model_config = model_config_from_args(args, spec)
        return models.build_promptsg_model(model_config, num_classes), model_config, spec
    spec = models.backbone_spec(args.backbone_name, tuple(args.input_size), args.stride, args.last_stride)
    for turn in ("main", "others"):  # rank 0 downloads first
        if (turn == "main") == dist_info.is_main:
            clip_model = models.load_clip_model(spec, weights="pretrained", download_root=args.download_root)
        utils.barrier(dist_info)
    model_config = model_config_from_args(args, spec)
    return models.build_promptsg_model(model_config, num_classes, clip_model=clip_model), model_config, spec


def _train(args, dist_info):
    device = dist_info.device
    amp = utils.resolve_amp(args.amp, device)
    input_size = tuple(args.input_size)
    out_dir = os.path.join(args.f_name, args.m_name)
    data = utils.load_train_val(args.data_dir, args.train_all)
    num_classes = len(data["class_names"])
    train_finetune.prepare_run_folder(out_dir, args)
    utils.barrier(dist_info)
    if dist_info.is_main:
        os.makedirs(out_dir, exist_ok=True)
        if args.force and not args.resume:
            train_finetune.clear_run_folder(out_dir)
    utils.barrier(dist_info)
    log = utils.setup_logger(out_dir, dist_info.is_main)
    log.info("command: " + " ".join(sys.argv))
    utils.set_seed(args.seed)

    model, model_config, spec = build_model(args, out_dir, num_classes, data["class_names"], dist_info)
    model.to(device)
    criterion = PromptSGLoss(model, args.ls, args.triplet_weight, args.lambda_sc, args.sc_temperature)

    train_set, val_set, gallery_set = train_finetune.build_datasets(args, data, input_size, dist_info)
    sampler = train_finetune.make_sampler(args, train_set, dist_info, log)
    # "visual." = the pretrained image encoder at --lr; inversion, interaction, BNNeck and classifier at 10x;
    # the text tower is frozen (requires_grad False) and left out
    optimizer = utils.make_optimizer(args.optimizer, utils.param_groups(model, args.lr, args.weight_decay),
                                     args.lr, args.weight_decay)
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
        sampler.load_state_dict(state["sampler"])
        utils.restore_rng_state(state["rng"])
        history, best, start_epoch = list(state["history"]), dict(state["best"]), int(state["epoch"])
        log.info(f"resumed from {last_path} after epoch {start_epoch}")

    if dist_info.is_main:
        extra = {"method": "promptsg", "model": model_config, "num_classes": num_classes,
                 "class_names": data["class_names"], "feature_dims": dict(model.visual.feature_dims),
                 "retrieval_feature_dim": model.feature_dim(), "sc_temperature_used": criterion.temperature(),
                 "amp": amp, "world_size": dist_info.world_size, "effective_batch_size": effective_batch,
                 "train_split": data["train_split"], "num_train_images": len(train_set),
                 "num_val_images": len(val_set),
                 "recipe_notes": ["CLIP mean/std at train and test time",
                                  "validation and net_best use only training identities (val vs train), guided "
                                  f"by the {args.inference_prompt} prompt",
                                  "checkpoints hold the frozen text tower too (needed by --inference_prompt "
                                  "composed)"]}
        if args.resume:
            extra["resumed_after_epochs"] = train_finetune.read_config(out_dir).get("resumed_after_epochs", []) + [
                start_epoch]
        utils.write_run_config(out_dir, args, extra=extra)
    log.info(f"{num_classes} identities, {len(train_set)} train / {len(val_set)} val images; backbone "
             f"{models.describe_backbone(spec)}; prompt {args.prompt_template!r}, inference prompt "
             f"{args.inference_prompt}; retrieval feature {args.feature} ({model.feature_dim()}-d); batch "
             f"{args.batch_size} x {dist_info.world_size} process(es) = effective batch {effective_batch}; "
             f"amp {amp}; device {device}")

    train_module = criterion
    if dist_info.distributed:
        train_module = nn.parallel.DistributedDataParallel(
            criterion, device_ids=[dist_info.local_rank] if device.startswith("cuda") else None)

    def compute_loss(module, images, labels):
        return module(images, labels)

    def logits_fn(images):
        return model.predict_logits(images)[0]

    for epoch in range(start_epoch, args.epochs):
        number = epoch + 1  # epochs are numbered from 1 in logs and file names
        utils.set_seed(utils.epoch_seed(args.seed, epoch))
        sampler.set_epoch(epoch)
        loader = utils.make_loader(train_set, args.batch_size, sampler, args.num_workers, args.seed, epoch, device,
                                   drop_last=True)
        lrs = [group["lr"] for group in optimizer.param_groups]
        try:
            result = utils.train_one_epoch(train_module, loader, compute_loss, [optimizer], scaler, amp, device,
                                           number, grad_clip=args.grad_clip, dist_info=dist_info,
                                           progress=args.progress and dist_info.is_main)
        except utils.NonFiniteLossError as err:
            kept = f"{last_path} (after epoch {start_epoch if not history else history[-1]['epoch']})" \
                if os.path.exists(last_path) else "none (no epoch finished)"
            log.error(f"{err}; stopped. Last good checkpoint: {kept}")
            raise utils.NonFiniteLossError(f"{err}; training stopped, last good checkpoint: {kept}") from None
        scheduler.step()
        row = {"epoch": number, "lr": lrs[0], "lr_heads": lrs[-1], **result.losses, "train_acc": result.accuracy,
               "val_acc": None, "val_rank1": None, "val_mAP": None,
               "images_per_s": result.images_per_s, "epoch_seconds": result.seconds}
        improved = False
        if (number % args.eval_every == 0 or number == args.epochs) and dist_info.is_main:
            model.eval()
            row.update(utils.validate(model, logits_fn, val_set, gallery_set, device, amp,
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
            utils.save_checkpoint(last_path, dict(
                record, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                rng=utils.capture_rng_state(), sampler=sampler.state_dict(), history=history, best=best,
                world_size=dist_info.world_size))
            utils.write_metrics_csv(os.path.join(out_dir, "metrics.csv"), history)
            utils.plot_training_curve(os.path.join(out_dir, "training_curve.png"), history)
            losses = ", ".join(f"{k} {v:.4f}" for k, v in result.losses.items())
            val = (f" | val acc {row['val_acc']:.4f} Rank-1 {row['val_rank1']:.4f} mAP {row['val_mAP']:.4f}"
                   + (" (best)" if improved else "")) if row["val_mAP"] is not None else ""
            log.info(f"epoch {number}/{args.epochs} lr {lrs[0]:.3g} | {losses} | train acc {result.accuracy:.4f}"
                     f"{val} | {result.images_per_s:.1f} img/s")
        utils.barrier(dist_info)

    final = {}
    if dist_info.is_main:
        if args.final_test and os.path.isfile(best_path):
            final = run_final_tests(model, args, out_dir, best_path, amp, device, log)
        log.info(f"Wrote the PromptSG model (net_best: epoch {best['epoch']}) to {out_dir}")
        utils.close_logger(log)
    return {"out_dir": out_dir, "best": best, "history": history, "final_test": final}


if __name__ == "__main__":
    main()
