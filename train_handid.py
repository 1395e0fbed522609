"""Train CLIP-HandID's own method (nathanlem1/CLIP-HandID, IPTA 2025): fine-tuning plus textual inversion.

The CLIP image encoder is fine-tuned with two BNNeck ID heads (as train_finetune.py); a 3-layer MLP
turns each image's CLIP embedding into a pseudo-word S*, the frozen text tower encodes "A photo of a
S* hand" (S* spliced in where the rare word "sks" stands), and image->text and text->image
supervised contrastive losses (temperature 1) tie each image to its identity's prompts. Loss: both
label-smoothed ID losses + i2t + t2i, unweighted. Adam, wd 5e-4, encoder 5e-6, new layers 10x,
warm-up 10 epochs from 0.01x, x0.5 at 40 and 60, 70 epochs, batch 20 (ViT-B/16) or 4 (RN50), fp32,
validation every epoch. Test feature: both BNNeck features concatenated (1280-d ViT-B/16, 3072-d
RN50), the mirrored image's added (the clip-handid protocol's defaults).

By default gradients flow through the frozen text tower into the inversion network, as the paper
describes; --reference_no_grad_text reproduces the released code, whose text path runs without
gradient (the inversion network then never learns).

    python train_handid.py --data_dir ./11k/train_val_test_split_dorsal_r --f_name ./model_11k_d_r \
        --m_name clip_handid_vit --backbone_name ViT-B/16
    python eval_query_gallery_finetune.py --f_name ./model_11k_d_r --m_name clip_handid_vit \
        --test_dir ./11k/train_val_test_split_dorsal_r
"""
import os

import models
import models_handid
from utils import errors, interrupts, io, data, evaluation, distributed, training, flags, runs
from losses import HandIDLoss

BATCH_SIZE = {"vit": 20, "rn": 4}  # the reference's batch sizes for ViT-B/16 and RN50


def parse_args(argv=None):
    p = flags.trainer_parser(__doc__, m_name="clip_handid_vit")
    flags.add_batching_args(p, batch_size=None)
    flags.add_optimisation_args(p, lr=5e-6, epochs=70, warmup_epochs=10, milestones=[40, 60], gamma=0.5,
                               description="the image encoder learns at --lr, the new layers (heads, BNNecks, "
                                           "inversion network) at 10 x --lr; warm-up starts from 0.01 x lr")
    g = flags.add_input_args(p)
    g.add_argument("--color_jitter", action="store_true", help="brightness/contrast/saturation jitter of 0.1")
    g.add_argument("--norm", default="clip", choices=models_handid.INPUT_NORMS,
                   help="input statistics: CLIP's mean/std (ours) or ImageNet's (the reference's)")
    g = p.add_argument_group("CLIP-HandID model")
    flags.add_sampler_args(g, sampler="random")
    g.add_argument("--prompt_template", default=models_handid.HANDID_TEMPLATE,
                   help="composed prompt; S* marks where the pseudo-word goes")
    g.add_argument("--reference_no_grad_text", action="store_true",
                   help="reproduce the released code's text path: under no_grad, S* receives the mean of the "
                        "inversion network's output (0) in every dimension, so every image gets the same text "
                        "feature and the inversion network never learns")
    g.add_argument("--interaction", action="store_true",
                   help="add the optional interaction network (the text feature attends over the image's token "
                        "sequence, global and patch tokens, as PromptSG's cross-attention; then transformer blocks) "
                        "with a third BNNeck head joining the test feature")
    g.add_argument("--interaction_blocks", type=int, default=2, help="transformer blocks of the interaction network")
    g.add_argument("--feature", default=models_handid.HANDID_FEATURE, choices=models.FEATURE_CHOICES,
                   help="retrieval feature of validation (concat_bn = both BNNeck features, the reference's); the "
                        "final test and the evaluator use the --protocol's unless the evaluator is given --feature")
    flags.add_selection_args(g, reference="CLIP-HandID")
    flags.add_run_control_args(p, resume_help="continue the run in <f_name>/<m_name> from net_last.pth",
                               final_test_help="evaluate the checkpoint --protocol reports on the query/gallery "
                                               "splits of --data_dir at the end", amp="none", eval_every=1)
    args = p.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = BATCH_SIZE["rn" if os.path.basename(args.backbone_name).startswith("RN") else "vit"]
    return args


def check_args(args):
    problems = flags.common_arg_problems(args)
    if args.interaction_blocks < 0:
        problems.append(f"--interaction_blocks must not be negative, got {args.interaction_blocks}")
    try:
        models_handid.placeholder_prompt_tokens(args.prompt_template)
    except errors.TrainingInputError as err:
        problems.append(str(err))
    flags.refuse_training_flags(problems)


@interrupts.sigterm_as_ctrl_c
def main(argv=None):
    return runs.run_training(parse_args(argv), check_args, train, method="handid")


def model_config_from_args(args, spec):
    return models_handid.handid_model_config(spec, args.prompt_template, args.feature, args.interaction,
                                             args.reference_no_grad_text, args.interaction_blocks, args.norm)


def build_model(args, out_dir, hands, dist_info):
    """(model, model_config, spec): pretrained CLIP for a new run, the run's own model when resuming."""
    if args.resume:
        spec, old_config = models.resumed_run(out_dir, args, hands["class_names"])
        model_config = model_config_from_args(args, spec)
        if old_config["model"] != model_config:
            raise errors.TrainingInputError(f"{out_dir} was trained with other CLIP-HandID model flags "
                                           f"({old_config['model']}); resume with the run's own settings")
        return models_handid.build_handid_model(model_config, len(hands["class_names"])), model_config, spec
    spec = models.backbone_spec(args.backbone_name, tuple(args.input_size), args.stride, args.last_stride)
    clip_model = models.load_pretrained(spec, args.download_root, dist_info)
    model_config = model_config_from_args(args, spec)
    model = models_handid.build_handid_model(model_config, len(hands["class_names"]), clip_model=clip_model)
    return model, model_config, spec


def train(args, dist_info):
    device, amp = dist_info.device, io.resolve_amp(args.amp, dist_info.device)
    hands = data.load_train_val(args.data_dir, args.train_all)
    runs.preflight(args, hands, args.data_dir)  # before the run folder is touched
    num_classes = len(hands["class_names"])
    out_dir, log = runs.start_run(args, dist_info)

    model, model_config, spec = build_model(args, out_dir, hands, dist_info)
    model.to(device)
    speed_note = models.speed_up_image_encoder(model.visual, device, args.compile, for_training=True)
    args.compile = models.use_compile(args.compile, device)  # config.json records what ran
    criterion = HandIDLoss(model, args.ls)

    input_size = tuple(args.input_size)
    train_set, val_set, gallery_set = runs.build_datasets(
        hands, data.build_train_transform(input_size, args.color_jitter, args.erasing_p), input_size,
        args.train_all, runs.cache_dir(args, args.data_dir), dist_info, runs.decode_mode(args))
    sampler = runs.make_sampler(args, train_set, dist_info, log)
    # "visual." = the pretrained image encoder at --lr; heads, BNNecks, inversion (and interaction) network at 10x;
    # the text tower is frozen (requires_grad False) and left out
    optimizer = training.make_optimizer(args.optimizer, training.param_groups(model, args.lr, args.weight_decay),
                                        args.lr, args.weight_decay)
    scheduler = training.WarmupMultiStepLR(optimizer, args.milestones, args.gamma, args.warmup_epochs, 0.01)
    scaler = training.make_grad_scaler(amp, device)

    last_path = os.path.join(out_dir, "net_last.pth")
    _, history, best, start_epoch = models.resume_from_last(args, out_dir, model, spec, dist_info, log,
                                                            optimizer, scheduler, scaler, sampler)
    runs.check_run_space(out_dir, args, model, args.data_dir, model.feature_dim())
    text_path = ("reference_no_grad_text: as the released code, S* is the mean of the inversion output broadcast "
                 "(one constant text feature for every image, no gradient)" if args.reference_no_grad_text else
                 "gradients flow through the frozen text tower into the inversion network (the paper; the released "
                 "code encodes the prompts without gradient)")
    if dist_info.is_main:
        extra = runs.training_config(
            args, "handid", hands, amp, dist_info, len(train_set), len(val_set), model=model_config,
            feature_dims=dict(model.visual.feature_dims), retrieval_feature_dim=model.feature_dim(),
            recipe_notes=[f"{args.norm} mean/std at train and test time (CLIP-HandID trains with ImageNet's)",
                          f"validation uses only training identities (val vs train); net_best by {args.select_by} "
                          "(CLIP-HandID: val_acc)", text_path, "checkpoints hold the frozen text tower too"])
        runs.write_training_config(out_dir, args, extra, start_epoch)
    runs.warn_about_schedule(args, log)
    log.info(f"{num_classes} identities, {len(train_set)} train / {len(val_set)} val images; backbone "
             f"{models.describe_backbone(spec)}; prompt {args.prompt_template!r}; {text_path}; retrieval feature "
             f"{args.feature} ({model.feature_dim()}-d); " + runs.batch_summary(args, dist_info, amp, speed_note))

    train_module = distributed.wrap_ddp(criterion, dist_info)
    for epoch in range(start_epoch, args.epochs):
        number = epoch + 1  # epochs are numbered from 1 in logs and file names
        loader = data.epoch_loader(train_set, sampler, args.batch_size, args.num_workers, args.seed, epoch, device)
        lrs = [group["lr"] for group in optimizer.param_groups]
        with runs.stop_on_nonfinite_loss(log, last_path, history):
            result = training.train_one_epoch(train_module, loader, training.module_loss, [optimizer], scaler, amp,
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
        best = runs.end_of_epoch(
            out_dir, row, history, best, log, dist_info, args.epochs,
            state=runs.resume_state(optimizer, scheduler, scaler, sampler, dist_info),
            record=models.checkpoint_record("handid", model, spec, number, row) if dist_info.is_main else None,
            train_all=args.train_all, save_every=args.save_every, plot=validated, select_by=args.select_by)
    runs.check_ranks_agree(model, dist_info, log)

    final = None
    if dist_info.is_main:
        which, reported_path = runs.reported_checkpoint(out_dir, args.protocol)
        if args.final_test and os.path.isfile(reported_path):
            checkpoint = training.load_checkpoint(reported_path)
            models.load_model_weights(model, checkpoint["model"], reported_path)
            model.eval()
            final = runs.final_test(model, args, args.data_dir, out_dir, "final_test", f"{args.m_name} (net_{which})",
                                    amp, device, log, extra={"which_epoch": which, "epoch": checkpoint["epoch"]},
                                    what=f"net_{which}")
        log.info(f"Wrote the CLIP-HandID model (net_best: epoch {best['epoch']}) to {out_dir}")
    return {"out_dir": out_dir, "best": best, "history": history, "final_test": final}


if __name__ == "__main__":
    main()
