"""Fine-tune a CLIP image encoder for hand identification (CLIP-HandID's recipe by default).

Two BNNeck heads with label-smoothed ID losses on the pre-projection feature and on the CLIP
embedding; optional triplet / center losses, ArcFace heads and a PK sampler. fp32 and validation
every epoch, as the reference; validation uses only training identities (val images as queries
against the train images); net_best is the epoch with the best val mAP (--select_by val_acc: the
reference's rule). Writes <f_name>/<m_name>/: config.json, train.log, metrics.csv,
training_curve.png, net_last.pth, net_best.pth, net_<epoch>.pth, and final_test/ (the checkpoint
--protocol reports, net_best by default, on the test splits of --data_dir).

    python train_finetune.py --data_dir ./11k/train_val_test_split_dorsal_r --f_name ./model_11k_d_r \
        --m_name clip_hand_vit --backbone_name ViT-B/16
    torchrun --nproc_per_node 4 train_finetune.py ...   (DDP; --batch_size is per GPU)
"""
import os

import torch

import models
from utils import errors, interrupts, io, data, gpu_augment, evaluation, distributed, training, flags, runs
from losses import FinetuneLoss


def parse_args(argv=None):
    p = flags.trainer_parser(__doc__, m_name="clip_hand_vit")
    flags.add_batching_args(p, batch_size=20)
    flags.add_optimisation_args(p, lr=5e-6, epochs=70, warmup_epochs=10, milestones=[40, 60], gamma=0.5,
                               description="the image encoder learns at --lr, the new heads at 10 x --lr; "
                                           "warm-up starts from 0.01 x lr")
    g = flags.add_input_args(p)
    g.add_argument("--color_jitter", action="store_true", help="brightness/contrast/saturation jitter of 0.1")
    flags.add_gpu_augment_arg(g)
    g = p.add_argument_group("sampling and extra losses")
    flags.add_sampler_args(g, sampler="random")
    g.add_argument("--triplet_weight", type=float, default=0.0, help="batch-hard triplet (margin 0.3) weight")
    g.add_argument("--center_weight", type=float, default=0.0, help="center loss weight")
    g.add_argument("--arcface", action="store_true", help="ArcFace heads (s 30, m 0.5) instead of linear classifiers")
    g.add_argument("--feature", default=models.DEFAULT_FEATURE, choices=models.FEATURE_CHOICES,
                   help="retrieval feature of validation; the final test and the evaluator use the --protocol's "
                        "(clip-handid: concat_bn, after the BNNecks) unless the evaluator is given --feature")
    flags.add_selection_args(g, reference="CLIP-HandID")
    flags.add_run_control_args(p, resume_help="continue the run in <f_name>/<m_name> from net_last.pth",
                               final_test_help="evaluate the checkpoint --protocol reports on the query/gallery "
                                               "splits of --data_dir at the end", amp="none", eval_every=1)
    return p.parse_args(argv)


def check_args(args):
    flags.refuse_training_flags(flags.common_arg_problems(args)
                                + flags.bound_problems(args, at_least={"triplet_weight": 0, "center_weight": 0}))


@interrupts.sigterm_as_ctrl_c
def main(argv=None):
    return runs.run_training(parse_args(argv), check_args, train, method="finetune")


def build_model(args, out_dir, hands, dist_info):
    """(model, model_config, spec): pretrained weights for a new run, the run's own architecture when resuming."""
    if args.resume:
        spec, _ = models.resumed_run(out_dir, args, hands["class_names"])
        visual = models.load_backbone(spec, weights="empty")
    else:
        spec = models.backbone_spec(args.backbone_name, tuple(args.input_size), args.stride, args.last_stride, args.pos_interp)
        visual = models.load_pretrained(spec, args.download_root, dist_info, text_tower=False)
    model_config = models.finetune_model_config(spec, classifier="arcface" if args.arcface else "linear",
                                                feature=args.feature)
    return models.build_finetune_model(model_config, len(hands["class_names"]), visual=visual), model_config, spec


def train(args, dist_info):
    device, amp = dist_info.device, io.resolve_amp(args.amp, dist_info.device)
    hands = data.load_train_val(args.data_dir, args.train_all)
    runs.preflight(args, hands, args.data_dir)  # before the run folder is touched
    num_classes = len(hands["class_names"])
    out_dir, log = runs.start_run(args, dist_info)

    model, model_config, spec = build_model(args, out_dir, hands, dist_info)
    criterion = FinetuneLoss(model, args.ls, args.triplet_weight, args.center_weight).to(device)
    speed_note = models.speed_up_image_encoder(model.visual, device, args.compile, for_training=True)
    args.compile = models.use_compile(args.compile, device)  # config.json records what ran

    input_size = tuple(args.input_size)
    train_set, val_set, gallery_set = runs.build_datasets(
        hands, data.build_train_transform(input_size, args.color_jitter, args.erasing_p), input_size,
        args.train_all, runs.cache_dir(args, args.data_dir), dist_info, runs.decode_mode(args))
    device_images = gpu_augment.for_training(args.gpu_augment, train_set, device, log)
    args.gpu_augment = device_images is not None
    augmenter = gpu_augment.BatchAugmenter(input_size, args.color_jitter, args.erasing_p)
    sampler = runs.make_sampler(args, train_set, dist_info, log)
    optimizer = training.make_optimizer(args.optimizer, training.param_groups(model, args.lr, args.weight_decay),
                                        args.lr, args.weight_decay)
    optimizers = [optimizer]
    if criterion.centers is not None:  # plain SGD on the centres (lr 0.5, gradient / center_weight as in BoT)
        optimizers.append(torch.optim.SGD(criterion.centers.parameters(), lr=0.5 / args.center_weight))
    scheduler = training.WarmupMultiStepLR(optimizer, args.milestones, args.gamma, args.warmup_epochs, 0.01)
    scaler = training.make_grad_scaler(amp, device)

    last_path = os.path.join(out_dir, "net_last.pth")
    state, history, best, start_epoch = models.resume_from_last(args, out_dir, model, spec, dist_info, log,
                                                                optimizer, scheduler, scaler, sampler)
    runs.check_run_space(out_dir, args, model, args.data_dir, model.feature_dim())
    if state is not None and criterion.centers is not None:
        if "centers" not in state:
            raise errors.TrainingInputError(f"{last_path} has no center-loss state; resume with --center_weight 0")
        criterion.centers.load_state_dict(state["centers"])
        optimizers[1].load_state_dict(state["center_optimizer"])

    if dist_info.is_main:
        extra = runs.training_config(
            args, "finetune", hands, amp, dist_info, len(train_set), len(val_set), model=model_config,
            feature_dims=dict(model.visual.feature_dims), retrieval_feature_dim=model.feature_dim(),
            recipe_notes=["CLIP mean/std at train and test time (CLIP-HandID trains with ImageNet's)",
                          f"validation and net_best use only training identities (val vs train); net_best by "
                          f"{args.select_by} (CLIP-HandID: val_acc)"])
        runs.write_training_config(out_dir, args, extra, start_epoch)
    runs.warn_about_schedule(args, log)
    if args.train_all:
        log.warning("warning: --train_all: the val images are part of training, so val metrics are optimistic and "
                    "net_best is the last validated epoch")
    log.info(f"{num_classes} identities, {len(train_set)} train / {len(val_set)} val images; backbone "
             f"{models.describe_backbone(spec)}; retrieval feature {args.feature} ({model.feature_dim()}-d); "
             + runs.batch_summary(args, dist_info, amp, speed_note))

    train_module = distributed.wrap_ddp(criterion, dist_info)
    for epoch in range(start_epoch, args.epochs):
        number = epoch + 1  # epochs are numbered from 1 in logs and file names
        loader = gpu_augment.training_batches(device_images, augmenter, train_set, sampler, args.batch_size,
                                              args.num_workers, args.seed, epoch, device)
        lrs = [group["lr"] for group in optimizer.param_groups]
        with runs.stop_on_nonfinite_loss(log, last_path, history):
            result = training.train_one_epoch(train_module, loader, training.module_loss, optimizers, scaler, amp,
                                              device, number, args.grad_clip, dist_info,
                                              progress=args.progress if dist_info.is_main else False)
        scheduler.step()
        row = runs.epoch_row(number, lrs, result)
        validated = number % args.eval_every == 0 or number == args.epochs
        if validated and dist_info.is_main:  # val_acc: the projected-feature head, as the reference reports
            model.eval()
            row.update(evaluation.validate(model, lambda x: model.predict_logits(x)[1], val_set, gallery_set, device,
                                           amp, batch_size=max(args.batch_size, 64), num_workers=args.num_workers,
                                           acc_images=runs.val_acc_images(args, len(val_set), epoch)))
            model.train()
        centers = {} if criterion.centers is None else {"centers": criterion.centers.state_dict(),
                                                        "center_optimizer": optimizers[1].state_dict()}
        best = runs.end_of_epoch(
            out_dir, row, history, best, log, dist_info, args.epochs,
            state=runs.resume_state(optimizer, scheduler, scaler, sampler, dist_info, **centers),
            record=models.checkpoint_record("finetune", model, spec, number, row) if dist_info.is_main else None,
            train_all=args.train_all, save_every=args.save_every, plot=validated, select_by=args.select_by)
    runs.check_ranks_agree(model, dist_info, log)

    if dist_info.is_main:
        which, reported_path = runs.reported_checkpoint(out_dir, args.protocol)
        if args.final_test and os.path.isfile(reported_path):
            checkpoint = training.load_checkpoint(reported_path)
            models.load_model_weights(model, checkpoint["model"], reported_path)
            model.eval()
            runs.final_test(model, args, args.data_dir, out_dir, "final_test", f"{args.m_name} (net_{which})", amp,
                            device, log, extra={"which_epoch": which, "epoch": checkpoint["epoch"]},
                            what=f"net_{which}")
        log.info(f"Wrote the fine-tuned model (net_best: epoch {best['epoch']}) to {out_dir}")
    return {"out_dir": out_dir, "best": best, "history": history}


if __name__ == "__main__":
    main()
