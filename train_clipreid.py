"""CLIP-ReID for hands (Li et al., AAAI 2023): two-stage training of a CLIP image encoder.

Stage 1 learns per-identity text tokens: the X placeholders of --prompt_template become learnable
vectors, trained with image->text + text->image supervised contrastive losses against image
features computed once (no augmentation); both CLIP towers stay frozen. Stage 2 computes the text
features of every identity once, freezes them and fine-tunes the image encoder with ID losses on
two BNNeck heads, a triplet loss on three pre-BN features and an image->text cross entropy against
all identities' text features. Validation uses only training identities; net_best is the epoch with
the best val mAP. Images are normalised with CLIP's mean/std everywhere (the reference used 0.5/0.5
for ViT and ImageNet statistics for RN50, by accident).

Writes <f_name>/<m_name>/: config.json, train.log, stage1_metrics.csv, stage1_curve.png,
prompts.pth, metrics.csv, training_curve.png, net_last.pth, net_best.pth, net_<epoch>.pth and
final_test/ (net_best on the test splits of --data_dir).

    python train_clipreid.py --data_dir ./11k/train_val_test_split_dorsal_r --f_name ./model_11k_d_r \
        --m_name clipreid_vit --backbone_name ViT-B/16
    python train_clipreid.py ... --stage 1                  (stage 1 only: <run>/prompts.pth)
    python train_clipreid.py ... --stage 2 --prompts ./model_11k_d_r/clipreid_vit/prompts.pth --m_name s2
    python train_clipreid.py --data_dir ./11k/train_val_test_split_dorsal_r ./11k/train_val_test_split_dorsal_l \
        --sie ...                                           (several aspects, aspect embedding)
    torchrun --nproc_per_node 4 train_clipreid.py ...       (DDP in stage 2; --batch_size is per GPU)
"""
import os

import torch

import models
import prompt_models
from utils import errors, interrupts, io, splits, data, evaluation, distributed, training, flags, runs
from losses import ClipReIDLoss, ClipReIDPromptLoss

RUN_FILES = runs.RUN_FILES + ("stage1_metrics.csv", "stage1_curve.png", "stage1_last.pth", "stage1_features.pth",
                               "prompts.pth")

# Reference values per backbone (CLIP-ReID configs vit_clipreid.yml / cnn_clipreid.yml); a flag left
# at None takes the value of the backbone's kind.
BACKBONE_DEFAULTS = {
    "vit": dict(stage1_epochs=120, lr=5e-6, weight_decay=1e-4, epochs=60, warmup_factor=0.1,
                milestones=[30, 50], id_weight=0.25),
    "rn": dict(stage1_epochs=60, lr=3.5e-4, weight_decay=5e-4, epochs=120, warmup_factor=0.01,
               milestones=[40, 70], id_weight=1.0),
}


def parse_args(argv=None):
    p = flags.trainer_parser(__doc__, m_name="clipreid_vit", several_roots=True)
    g = p.add_argument_group("method")
    g.add_argument("--stage", default="both", choices=["1", "2", "both"],
                   help="1: learn and save the prompts only; 2: fine-tune from --prompts; both: 1 then 2")
    g.add_argument("--prompts", default=None, help="prompts.pth of a stage-1 run (with --stage 2)")
    g.add_argument("--prompt_template", default=prompt_models.DEFAULT_PROMPT_TEMPLATE,
                   help="each standalone X becomes one learnable token per identity")
    g.add_argument("--sie", action="store_true",
                   help="side-information embedding of the hand aspect (split root) added to the ViT class token")
    g.add_argument("--sie_coe", type=float, default=1.0, help="scale of the side-information embedding")
    g.add_argument("--full_text_length", action="store_true",
                   help="run the text tower on all 77 positions as the reference does (same result, slower; "
                        "for timing comparisons)")
    g = p.add_argument_group("stage 1 (prompt learning on cached image features)")
    g.add_argument("--stage1_epochs", type=int, default=None, help="default 120 (ViT) / 60 (ResNet)")
    g.add_argument("--stage1_lr", type=float, default=3.5e-4, help="Adam learning rate of the prompt tokens")
    g.add_argument("--stage1_batch_size", type=int, default=64, help="cached image features per stage-1 batch")
    g.add_argument("--stage1_weight_decay", type=float, default=1e-4, help="stage-1 weight decay")
    g.add_argument("--stage1_warmup_epochs", type=int, default=5, help="linear warm-up from --stage1_warmup_lr")
    g.add_argument("--stage1_warmup_lr", type=float, default=1e-5, help="stage-1 lr at the start of its warm-up")
    g.add_argument("--stage1_min_lr", type=float, default=1e-6, help="end of the cosine decay")
    g = flags.add_batching_args(p, batch_size=64, title="stage 2: batching")
    flags.add_sampler_args(g, sampler="pk")
    g = flags.add_optimisation_args(
        p, lr=None, epochs=None, warmup_epochs=10, milestones=None, gamma=0.1, weight_decay=None,
        title="stage 2: optimisation",
        description="every weight learns at --lr, biases at --bias_lr_factor x --lr; warm-up starts from "
                    "--warmup_factor x lr; --ls also smooths the image->text loss. Left unset, --lr, "
                    "--weight_decay, --epochs, --milestones, --warmup_factor and --id_weight take the reference "
                    "values of the backbone: ViT 5e-6, 1e-4, 60, [30 50], 0.1, 0.25; ResNet 3.5e-4, 5e-4, 120, "
                    "[40 70], 0.01, 1.0")
    g.add_argument("--bias_lr_factor", type=float, default=2.0, help="learning-rate multiplier of biases")
    g.add_argument("--warmup_factor", type=float, default=None, help="warm-up start factor")
    g.add_argument("--id_weight", type=float, default=None, help="ID loss weight")
    g.add_argument("--triplet_weight", type=float, default=1.0, help="triplet loss weight")
    g.add_argument("--i2t_weight", type=float, default=1.0, help="image->text cross-entropy weight")
    g.add_argument("--margin", type=float, default=0.3, help="triplet margin")
    g = flags.add_input_args(p, erasing_p=0.5, cache_root="<first data_dir>")
    g.add_argument("--padding", type=int, default=10, help="zero padding before the random crop")
    g.add_argument("--feature", default=models.DEFAULT_FEATURE, choices=models.FEATURE_CHOICES,
                   help="retrieval feature of validation; the final test and the evaluator use the --protocol's")
    flags.add_run_control_args(
        p, resume_help="continue the run in <f_name>/<m_name> (in stage 1 or stage 2, wherever it stopped)",
        final_test_help="evaluate the checkpoint --protocol reports on the query/gallery splits of --data_dir")
    return p.parse_args(argv)


def check_args(args):
    problems = flags.common_arg_problems(args)
    if args.stage1_epochs is not None and args.stage1_epochs < 1:
        problems.append(f"--stage1_epochs must be positive, got {args.stage1_epochs}")
    if args.stage1_batch_size < 2:
        problems.append(f"--stage1_batch_size must be at least 2 for the contrastive loss, got "
                        f"{args.stage1_batch_size}")
    problems += flags.bound_problems(args, at_least={"padding": 0, "stage1_warmup_epochs": 0, "id_weight": 0,
                                                     "triplet_weight": 0, "i2t_weight": 0, "margin": 0,
                                                     "stage1_weight_decay": 0, "stage1_warmup_lr": 0,
                                                     "stage1_min_lr": 0, "sie_coe": 0},
                                     positive=("stage1_lr", "bias_lr_factor"))
    if args.warmup_factor is not None and not 0 < args.warmup_factor <= 1:
        problems.append(f"--warmup_factor must be in (0, 1] (the warm-up starts at that fraction of --lr), got "
                        f"{args.warmup_factor}")
    if args.stage == "2" and not args.prompts and not args.resume:
        problems.append("--stage 2 needs --prompts PATH (the prompts.pth of a stage-1 run)")
    if args.prompts and args.stage != "2":
        problems.append(f"--prompts is only used with --stage 2 (got --stage {args.stage})")
    if args.prompts and not os.path.isfile(args.prompts):
        problems.append(f"--prompts {args.prompts} does not exist; give the prompts.pth of a stage-1 run")
    roots = [os.path.abspath(d) for d in args.data_dir]
    if len(set(roots)) != len(roots):
        problems.append(f"--data_dir lists a split root twice: {args.data_dir}")
    flags.refuse_training_flags(problems)


def resolve_backbone_defaults(args, spec):
    """Fill the flags left at None with the reference values of the backbone's kind."""
    kind = "rn" if models.is_resnet_arch(spec["arch"]) else "vit"
    for name, value in BACKBONE_DEFAULTS[kind].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if list(args.milestones) != sorted(args.milestones):
        raise errors.TrainingInputError(f"--milestones must be increasing, got {args.milestones}")
    if args.sie and kind == "rn":
        raise errors.TrainingInputError("--sie needs a ViT backbone: the side-information embedding is added to the "
                                       "class token, which ResNets do not have")
    return kind


# ---- data ----

def split_root_key(data_dir):
    """Name of a split root's aspect: splits.json "aspect" (11k), else its dataset (HD), else the folder."""
    manifest = splits.read_manifest(data_dir) or {}
    return manifest.get("aspect") or manifest.get("dataset") or os.path.basename(os.path.normpath(data_dir))


def load_training_data(data_dirs, train_all):
    """Train/val items of one or several split roots. With several roots each (root, identity) is a
    class of its own, named "<aspect>/<identity>". Returns the load_train_val dict plus "roots":
    [{"dir", "key", "train", "val"}] (items with global labels) and "class_aspect"."""
    parts = [data.load_train_val(d, train_all) for d in data_dirs]
    keys = [split_root_key(d) for d in data_dirs]
    if len(set(keys)) != len(keys):
        raise errors.TrainingInputError(f"--data_dir roots {data_dirs} do not have distinct aspects ({keys}); "
                                       f"train on one root per aspect")
    class_names, class_aspect, roots = [], [], []
    for index, (data_dir, key, part) in enumerate(zip(data_dirs, keys, parts)):
        offset = len(class_names)
        if len(parts) == 1:
            class_names += part["class_names"]
        else:
            class_names += [f"{key}/{name}" for name in part["class_names"]]
        class_aspect += [index] * len(part["class_names"])
        roots.append({"dir": data_dir, "key": key,
                      "train": [(p, label + offset) for p, label in part["train"]],
                      "val": [(p, label + offset) for p, label in part["val"]]})
    return {"train": [item for root in roots for item in root["train"]],
            "val": [item for root in roots for item in root["val"]],
            "class_names": class_names, "class_aspect": class_aspect, "aspects": keys, "roots": roots,
            "train_split": parts[0]["train_split"]}


def cross_root_identity_overlap(data_dirs):
    """Identities that are training identities of one root and test identities of another (11k
    thresholds differ per aspect); evaluating on such a root's test set is not identity-disjoint."""
    overlaps = []
    for a in data_dirs:
        train = {identity for _, identity in data.scan_identity_folder(os.path.join(a, "train_all"))} \
            if os.path.isdir(os.path.join(a, "train_all")) else set()
        for b in data_dirs:
            test_dir = os.path.join(b, "test")
            if a == b or not os.path.isdir(test_dir):
                continue
            shared = train & {identity for _, identity in data.scan_identity_folder(test_dir)}
            if shared:
                overlaps.append((a, b, sorted(shared)))
    return overlaps


def clipreid_train_transform(input_size, padding=10, erasing_p=0.5):
    """CLIP-ReID's augmentation on an image already resized (bicubic) to input_size: horizontal flip,
    zero padding + random crop back to input_size, CLIP mean/std, random erasing with per-pixel
    N(0, 1) noise (timm's 'pixel' mode: area 2-33 %, aspect 0.3-3.3)."""
    import torchvision.transforms as T
    ops = [T.RandomHorizontalFlip()]
    if padding:
        ops += [T.Pad(padding), T.RandomCrop(tuple(input_size))]
    ops += [T.ToTensor(), T.Normalize(data.CLIP_MEAN, data.CLIP_STD)]
    if erasing_p > 0:
        ops.append(T.RandomErasing(p=erasing_p, scale=(0.02, 1 / 3), ratio=(0.3, 3.3), value="random"))
    return T.Compose(ops)


def build_datasets(args, hands, input_size, dist_info):
    """Stage-2 train set, stage-1 feature set (train images, no augmentation) and per-root (aspect,
    val set, gallery set) for validation; every image is read at input_size."""
    eval_tf = data.eval_transform(input_size)
    sets = {"train": (hands["train"], input_size, clipreid_train_transform(input_size, args.padding, args.erasing_p)),
            "features": (hands["train"], input_size, eval_tf)}
    for i, root in enumerate(hands["roots"]):
        sets[f"val{i}"] = (root["val"], input_size, eval_tf)
        sets[f"gallery{i}"] = (runs.val_gallery_items(root["train"], root["val"], args.train_all), input_size, eval_tf)
    built = runs.image_datasets(sets, runs.cache_dir(args, args.data_dir[0]), dist_info, runs.decode_mode(args))
    val_sets = [(root["key"], built[f"val{i}"], built[f"gallery{i}"]) for i, root in enumerate(hands["roots"])]
    return built["train"], built["features"], val_sets


# ---- stage 1 ----

def stage1_batches(features, labels, batch_size, seed, epoch):
    """A random permutation of the cached features per (seed, epoch), in chunks of batch_size; the
    last, smaller chunk is kept when there is one (never an empty batch)."""
    generator = torch.Generator().manual_seed(data.epoch_seed(seed, epoch))
    order = torch.randperm(len(labels), generator=generator).to(labels.device)
    return [(features[idx], labels[idx]) for idx in order.split(batch_size)]


@torch.no_grad()
def cache_image_features(visual, feature_set, args, device, amp):
    """Projected CLIP embeddings (== encode_image) of every training image, with the eval transform,
    the encoder in eval mode; (N, embed) fp32 and labels (N,), on `device`."""
    loader = torch.utils.data.DataLoader(feature_set, batch_size=max(args.batch_size, 64), shuffle=False,
                                         num_workers=args.num_workers, pin_memory=str(device).startswith("cuda"))
    was_training = visual.training
    visual.eval()
    features, labels = evaluation.extract_features(visual, loader, device, amp, progress=args.progress,
                                                   desc="stage 1: caching image features")
    visual.train(was_training)
    return features.to(device), labels.to(device)


@torch.no_grad()
def text_accuracy(text_encoder, features, labels):
    """Fraction of cached image features whose most similar identity text is their own."""
    text = text_encoder.all_class_features()
    return ((features.float() @ text.t()).argmax(dim=1) == labels).float().mean().item()


def prompts_record(text_encoder, class_names, spec, epoch, text_features):
    learner = text_encoder.prompt_learner
    return {"format": 1, "kind": "clipreid_prompts", "template": learner.template,
            "cls_ctx": learner.cls_ctx.detach().cpu().float(), "class_names": list(class_names),
            "backbone": spec, "epoch": epoch, "text_features": text_features.detach().cpu().float()}


def run_stage1(args, run, visual, clip_model, feature_set, log):
    """Learn the identity prompts; writes prompts.pth and returns the text features of every
    identity (computed once here, frozen for all of stage 2)."""
    out_dir, device, amp = run["out_dir"], run["device"], run["amp"]
    hands = run["data"]
    alone = distributed.DistInfo(device=device)  # stage 1 runs in rank 0 only
    last_path = os.path.join(out_dir, "stage1_last.pth")
    features_path = os.path.join(out_dir, "stage1_features.pth")
    resuming = args.resume and os.path.isfile(last_path)
    visual.to(device)
    if resuming and os.path.isfile(features_path):
        cached = training.load_checkpoint(features_path, map_location=device)
        features, labels = cached["features"].to(device), cached["labels"].to(device)
    else:
        features, labels = cache_image_features(visual, feature_set, args, device, amp)
        training.save_checkpoint(features_path, {"features": features.cpu(), "labels": labels.cpu()})
    if len(labels) != len(hands["train"]):
        raise errors.TrainingInputError(f"{features_path} holds {len(labels)} cached features but the training set "
                                        f"has {len(hands['train'])} images; start a new run")

    io.set_seed(args.seed)  # the same prompt initialisation whether or not the run resumes
    text_encoder = prompt_models.PromptTextEncoder(clip_model, len(hands["class_names"]), args.prompt_template,
                                            full_length=args.full_text_length).to(device)
    criterion = ClipReIDPromptLoss(text_encoder)
    prompts = text_encoder.prompt_learner.cls_ctx
    optimizer = training.make_optimizer("adam", [{"params": [prompts], "lr": args.stage1_lr,
                                                  "weight_decay": args.stage1_weight_decay, "name": "prompts"}],
                                        args.stage1_lr, args.stage1_weight_decay)
    scheduler = training.Stage1CosineLR(optimizer, args.stage1_epochs, args.stage1_warmup_epochs,
                                        args.stage1_warmup_lr, args.stage1_min_lr)
    scaler = training.make_grad_scaler(amp, device)
    history, start_epoch = [], 0
    if resuming:
        state = training.load_checkpoint(last_path)
        if state.get("template") != args.prompt_template or tuple(state["cls_ctx_shape"]) != tuple(prompts.shape):
            raise errors.TrainingInputError(f"{last_path} was written with another --prompt_template or other "
                                            f"identities; resume with the run's own settings")
        text_encoder.prompt_learner.load_state_dict(state["prompt_learner"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        history, start_epoch = list(state["history"]), int(state["epoch"])
        log.info(f"stage 1: resumed from {last_path} after epoch {start_epoch}")

    log.info(f"stage 1: {len(labels)} cached image features, {len(hands['class_names'])} identities x "
             f"{prompts.shape[1]} tokens of width {prompts.shape[2]} ({args.prompt_template!r}); text tower "
             f"on {text_encoder.prompt_learner.template_embeds.shape[1]} positions; {args.stage1_epochs} epochs, "
             f"batch {args.stage1_batch_size}")
    for epoch in range(start_epoch, args.stage1_epochs):
        number = epoch + 1
        lr = optimizer.param_groups[0]["lr"]
        batches = stage1_batches(features, labels, args.stage1_batch_size, args.seed, epoch)
        with runs.stop_on_nonfinite_loss(log, last_path, history, "stage 1"):
            result = training.train_one_epoch(criterion, batches, training.module_loss, [optimizer], scaler, amp,
                                              device, number, args.grad_clip, progress=False)
        scheduler.step()
        row = {"epoch": number, "lr": lr, **result.losses, "train_acc": None,
               "features_per_s": result.images_per_s, "epoch_seconds": result.seconds}
        if number % args.eval_every == 0 or number == args.stage1_epochs:
            row["train_acc"] = text_accuracy(text_encoder, features, labels)
        state = {"epoch": number, "template": args.prompt_template, "cls_ctx_shape": list(prompts.shape),
                 "prompt_learner": text_encoder.prompt_learner.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()}
        runs.end_of_epoch(out_dir, row, history, None, log, alone, args.stage1_epochs, state,
                          plot=row["train_acc"] is not None, stage="stage 1", accuracy_name="text acc",
                          last_file="stage1_last.pth", metrics_file="stage1_metrics.csv",
                          curve_file="stage1_curve.png")
    text_encoder.eval()
    text_features = text_encoder.all_class_features()
    record = prompts_record(text_encoder, hands["class_names"], run["spec"], args.stage1_epochs, text_features)
    training.save_checkpoint(os.path.join(out_dir, "prompts.pth"), record)
    log.info(f"stage 1: wrote the prompts of {len(hands['class_names'])} identities to "
             f"{os.path.join(out_dir, 'prompts.pth')}")
    return text_features.cpu()


def read_prompts(path, class_names):
    """The record of a stage-1 prompts.pth, checked against this run's training identities."""
    record = training.load_checkpoint(path)
    if not isinstance(record, dict) or record.get("kind") != "clipreid_prompts":
        raise errors.TrainingInputError(f"{path} is not a prompts file written by train_clipreid.py stage 1")
    if record["class_names"] != list(class_names):
        raise errors.TrainingInputError(
            f"{path} holds prompts of {len(record['class_names'])} other identities than the {len(class_names)} of "
            f"--data_dir; stage 2 needs the prompts learned on the same training identities")
    return record


def prompt_text_encoder(record, path, spec, clip_model, device):
    """PromptTextEncoder holding the prompts of a stage-1 record, on the same backbone's text tower."""
    if record["backbone"]["name"] != spec["name"] or record["backbone"].get("arch") != spec.get("arch"):
        raise errors.TrainingInputError(f"{path} was learned with the text tower of {record['backbone']['name']}, "
                                       f"not {spec['name']}; use the prompts of a run with the same --backbone_name")
    text_encoder = prompt_models.PromptTextEncoder(clip_model, len(record["class_names"]), record["template"])
    if tuple(record["cls_ctx"].shape) != tuple(text_encoder.prompt_learner.cls_ctx.shape):
        raise errors.TrainingInputError(f"{path}: prompt tokens of shape {tuple(record['cls_ctx'].shape)} do not "
                                       f"fit template {record['template']!r}")
    text_encoder.prompt_learner.cls_ctx.data.copy_(record["cls_ctx"])
    return text_encoder.to(device).eval()


# ---- stage 2 ----

def stage2_param_groups(model, lr, weight_decay, bias_lr_factor=2.0):
    """Every trainable parameter at lr, biases (names containing "bias") at bias_lr_factor x lr, as in
    CLIP-ReID's make_optimizer_2stage; frozen parameters (the BNNeck biases) are left out."""
    weights, biases = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (biases if "bias" in name else weights).append(param)
    groups = [{"params": weights, "lr": lr, "weight_decay": weight_decay, "name": "weights"},
              {"params": biases, "lr": lr * bias_lr_factor, "weight_decay": weight_decay, "name": "biases"}]
    return [g for g in groups if g["params"]]


def validate(model, val_sets, args, device, amp):
    """Per split root (with its SIE aspect): val images as queries against that root's train images;
    the metrics are averaged over roots weighted by their number of val images."""
    totals, count = {}, 0
    for key, val_set, gallery_set in val_sets:
        model.set_test_aspect(key)
        metrics = evaluation.validate(lambda x: model(x), lambda x: model.predict_logits(x)[1], val_set, gallery_set,
                                 device, amp, batch_size=max(args.batch_size, 64), num_workers=args.num_workers)
        for name, value in metrics.items():
            totals[name] = totals.get(name, 0.0) + value * len(val_set)
        count += len(val_set)
    model.set_test_aspect(None)
    return {name: value / count for name, value in totals.items()}


def run_final_test(model, args, out_dir, amp, device, log):
    """The checkpoint --protocol reports on the query/gallery splits of every --data_dir (shared pipeline)."""
    which, path = runs.reported_checkpoint(out_dir, args.protocol)
    checkpoint = training.load_checkpoint(path)
    models.load_model_weights(model, checkpoint["model"], path)
    model.eval()
    results = {}
    for data_dir in args.data_dir:
        note = model.set_test_dir(data_dir)
        if note:
            log.info(note)
        folder = "final_test" if len(args.data_dir) == 1 else os.path.join(
            "final_test", os.path.basename(os.path.normpath(data_dir)))
        results[data_dir] = runs.final_test(
            model, args, data_dir, out_dir, folder, f"{args.m_name} (CLIP-ReID, net_{which})", amp, device, log,
            extra={"which_epoch": which, "epoch": checkpoint["epoch"]}, what=f"net_{which} on {data_dir}")
    model.set_test_aspect(None)
    return results


def run_stage2(args, run, model, text_features, train_set, sampler, val_sets, log):
    out_dir, device, amp, dist_info = run["out_dir"], run["device"], run["amp"], run["dist_info"]
    criterion = ClipReIDLoss(model, text_features, args.ls, args.id_weight, args.triplet_weight, args.i2t_weight,
                             args.margin).to(device)
    optimizer = training.make_optimizer(args.optimizer, stage2_param_groups(model, args.lr, args.weight_decay,
                                                                            args.bias_lr_factor),
                                        args.lr, args.weight_decay)
    scheduler = training.WarmupMultiStepLR(optimizer, args.milestones, args.gamma, args.warmup_epochs,
                                           args.warmup_factor, first_epoch=1)
    scaler = training.make_grad_scaler(amp, device)

    last_path = os.path.join(out_dir, "net_last.pth")
    history, best, start_epoch = [], None, 0
    if run["stage2_state"] is not None:
        history, best, start_epoch = runs.restore_training_state(run["stage2_state"], optimizer, scheduler, scaler,
                                                                 sampler, log, last_path, "stage 2")

    log.info(f"stage 2: {len(train_set)} images, {args.epochs} epochs, lr {args.lr:g} "
             f"(biases x{args.bias_lr_factor:g}), weight decay {args.weight_decay:g}, warm-up {args.warmup_epochs} "
             f"epochs from x{args.warmup_factor:g}, x{args.gamma:g} at {args.milestones}; loss {args.id_weight:g} ID "
             f"+ {args.triplet_weight:g} triplet + {args.i2t_weight:g} image->text")
    train_module = distributed.wrap_ddp(criterion, dist_info)
    for epoch in range(start_epoch, args.epochs):
        number = epoch + 1  # epochs are numbered from 1 in logs and file names
        loader = data.epoch_loader(train_set, sampler, args.batch_size, args.num_workers, args.seed, epoch, device)
        lrs = [group["lr"] for group in optimizer.param_groups]
        with runs.stop_on_nonfinite_loss(log, last_path, history, "stage 2"):
            result = training.train_one_epoch(train_module, loader, training.module_loss, [optimizer], scaler, amp,
                                              device, number, args.grad_clip, dist_info,
                                              progress=args.progress if dist_info.is_main else False)
        scheduler.step()
        row = runs.epoch_row(number, lrs, result, lr_names=("lr", "lr_bias"))
        validated = number % args.eval_every == 0 or number == args.epochs
        if validated and dist_info.is_main:
            model.eval()
            row.update(validate(model, val_sets, args, device, amp))
            model.train()
        best = runs.end_of_epoch(
            out_dir, row, history, best, log, dist_info, args.epochs,
            state=runs.resume_state(optimizer, scheduler, scaler, sampler, dist_info,
                                    text_features=criterion.text_features.cpu()),
            record=models.checkpoint_record("clipreid", model, run["spec"], number, row) if dist_info.is_main else None,
            train_all=args.train_all, save_every=args.save_every, plot=validated, stage="stage 2",
            accuracy_name="i2t acc")
    runs.check_ranks_agree(model, dist_info, log)
    return best


# ---- run folder ----

def resume_point(out_dir, args):
    """Where a resumed run continues: "stage2" (net_last.pth), "stage2_start" (prompts.pth, stage 2 not
    begun) or "stage1" (stage1_last.pth or nothing yet)."""
    if not os.path.isfile(os.path.join(out_dir, "config.json")):
        raise errors.TrainingInputError(f"--resume: {os.path.join(out_dir, 'config.json')} does not exist; start "
                                        f"the run without --resume")
    if os.path.isfile(os.path.join(out_dir, "net_last.pth")):
        point = "stage2"
    elif os.path.isfile(os.path.join(out_dir, "prompts.pth")):
        point = "stage2_start"
    else:
        point = "stage1"
    if args.stage == "1" and point != "stage1":
        raise errors.TrainingInputError(f"--resume --stage 1: stage 1 of {out_dir} is finished (prompts.pth exists); "
                                       f"resume with --stage both to run stage 2")
    if args.stage == "2" and point == "stage1":
        raise errors.TrainingInputError(f"--resume --stage 2: {out_dir} has no prompts.pth; resume stage 1 with "
                                       f"--stage both or --stage 1")
    return point


def check_resumed_run(out_dir, args, hands):
    """The run being resumed must have the same backbone, geometry and identities as this command."""
    spec, config = models.resumed_run(out_dir, args, hands["class_names"])
    if bool(config["model"].get("sie")) != args.sie:
        raise errors.TrainingInputError(f"{out_dir} was trained {'with' if config['model'].get('sie') else 'without'} "
                                       f"--sie; resume with the same setting")
    return spec


# ---- main ----

@interrupts.sigterm_as_ctrl_c
def main(argv=None):
    return runs.run_training(parse_args(argv), check_args, train, method="clipreid")


def train(args, dist_info):
    device, amp = dist_info.device, io.resolve_amp(args.amp, dist_info.device)
    input_size = tuple(args.input_size)
    out_dir = os.path.join(args.f_name, args.m_name)
    hands = load_training_data(args.data_dir, args.train_all)
    runs.preflight(args, hands, args.data_dir)  # before the run folder is touched
    num_classes = len(hands["class_names"])
    point = resume_point(out_dir, args) if args.resume else "stage1" if args.stage != "2" else "stage2_start"
    prompts_path = (os.path.join(out_dir, "prompts.pth") if args.resume else args.prompts) \
        if point == "stage2_start" else None
    if prompts_path:
        if not args.resume and os.path.abspath(prompts_path) == os.path.abspath(os.path.join(out_dir, "prompts.pth")):
            raise errors.TrainingInputError(f"--prompts {prompts_path} is the prompts.pth of this run folder; continue "
                                           f"the run with --resume --stage both, or choose another --m_name")
        prompts = read_prompts(prompts_path, hands["class_names"])
        if prompts["template"] != args.prompt_template:
            args.prompt_template = prompts["template"]  # recorded in config.json as used
    out_dir, log = runs.start_run(args, dist_info, RUN_FILES, resume_file="config.json")

    # the image encoder (and the text tower when prompts must be learned or read)
    clip_model, stage2_state = None, None
    if args.resume:
        spec = check_resumed_run(out_dir, args, hands)
    else:
        spec = models.backbone_spec(args.backbone_name, input_size, args.stride, args.last_stride, args.pos_interp)
    if point == "stage2":
        last_path = os.path.join(out_dir, "net_last.pth")
        stage2_state = models.read_run_checkpoint(spec, last_path, dist_info)
        visual = models.load_backbone(spec, weights="empty")
    else:
        clip_model = models.load_pretrained(spec, args.download_root, dist_info)
        visual = clip_model.visual
    kind = resolve_backbone_defaults(args, spec)  # (a resumed run has its own values: utils/resume.py)

    train_set, feature_set, val_sets = build_datasets(args, hands, input_size, dist_info)
    # stage 2's sampler before stage 1, so that a batch the data cannot fill is refused at once
    sampler = runs.make_sampler(args, train_set, dist_info, log) if args.stage != "1" else None
    sie_aspects = hands["aspects"] if args.sie else None
    model_config = models.clipreid_model_config(spec, args.feature, sie_aspects, hands["class_aspect"], args.sie_coe)
    run = {"out_dir": out_dir, "device": device, "amp": amp, "dist_info": dist_info, "spec": spec, "data": hands,
           "stage2_state": stage2_state}
    dims = visual.feature_dims
    retrieval_dim = (dims["pre_proj"] + dims["proj"] if args.feature.startswith("concat")
                     else dims["proj"] if args.feature.startswith("proj") else dims["pre_proj"])
    args.compile = models.use_compile(args.compile, device)  # config.json records what stage 2 runs
    runs.check_run_space(out_dir, args, visual, args.data_dir[0], len(args.data_dir) * retrieval_dim)
    if dist_info.is_main:
        extra = runs.training_config(
            args, "clipreid", hands, amp, dist_info, len(train_set), len(hands["val"]), model=model_config,
            aspects=hands["aspects"], backbone_kind=kind, feature_dims=dict(visual.feature_dims),
            retrieval_feature_dim=retrieval_dim,
            recipe_notes=["CLIP mean/std in both stages and at test time (the reference used 0.5/0.5 for ViT and "
                          "ImageNet statistics for RN50, by accident)",
                          "stage-1 text tower runs only up to the end token (identical output)",
                          "validation and net_best use only training identities (val vs train)"])
        runs.write_training_config(out_dir, args, extra, None, continued_from=point)
    runs.warn_about_schedule(args, log, first_epoch=1)
    for a, b, shared in cross_root_identity_overlap(args.data_dir) if len(args.data_dir) > 1 else []:
        log.warning(f"{len(shared)} training identities of {a} are test identities of {b} (e.g. {shared[:3]}); "
                    f"results of this model on {b}'s test splits are not identity-disjoint")
    log.info(f"{num_classes} identities from {len(args.data_dir)} split root(s) {hands['aspects']}, "
             f"{len(train_set)} train / {len(hands['val'])} val images; backbone {models.describe_backbone(spec)}; "
             f"stage {args.stage}; amp {amp}; device {device}")

    # stage 1 (rank 0 only; the other ranks get the text features by broadcast)
    text_features = None
    if point == "stage1":
        if dist_info.is_main:
            text_features = run_stage1(args, run, visual, clip_model, feature_set, log)
        if args.stage == "1":
            summary = f"Wrote the stage-1 prompts of {num_classes} identities to {os.path.join(out_dir, 'prompts.pth')}"
            log.info(summary)
            return {"out_dir": out_dir, "prompts": os.path.join(out_dir, "prompts.pth")}
    elif point == "stage2_start":
        if dist_info.is_main:
            text_encoder = prompt_text_encoder(prompts, prompts_path, spec, clip_model, device)
            text_features = text_encoder.all_class_features().cpu()  # once, frozen for all of stage 2
            del text_encoder
            if not args.resume:
                training.save_checkpoint(os.path.join(out_dir, "prompts.pth"), prompts)
            log.info(f"stage 2 starts from the prompts in {prompts_path}")
    else:
        text_features = stage2_state["text_features"]
    clip_model = None  # the text tower is not needed any more
    text_features = distributed.broadcast_object(text_features, dist_info)

    # stage 2 (seeded here, so the heads start alike after stage 1, from --prompts or on resume)
    io.set_seed(args.seed)
    model = models.build_clipreid_model(model_config, num_classes, visual=visual)
    if stage2_state is not None:
        models.load_model_weights(model, stage2_state["model"], os.path.join(out_dir, "net_last.pth"))
    model.to(device)
    speed_note = models.speed_up_image_encoder(model.visual, device, args.compile, for_training=True)
    if speed_note:
        log.info(f"stage 2 image encoder: {speed_note}")
    best = run_stage2(args, run, model, text_features, train_set, sampler, val_sets, log)

    summary = f"Wrote the CLIP-ReID model (net_best: epoch {best['epoch']}) to {out_dir}"
    if dist_info.is_main:
        if args.final_test and os.path.isfile(runs.reported_checkpoint(out_dir, args.protocol)[1]):
            run_final_test(model, args, out_dir, amp, device, log)
        log.info(summary)
    return {"out_dir": out_dir, "best": best}


if __name__ == "__main__":
    main()
