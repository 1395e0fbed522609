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
import os

import models
import prompt_models
from utils import errors, interrupts, io, data, gpu_augment, evaluation, distributed, training, flags, runs
from losses import PromptSGLoss


def parse_args(argv=None):
    p = flags.trainer_parser(__doc__, m_name="clip_promptsg_vit")
    flags.add_batching_args(p, batch_size=64)
    flags.add_optimisation_args(p, lr=5e-6, epochs=60, warmup_epochs=0, milestones=[20, 40], gamma=0.1,
                               description="the image encoder learns at --lr, the new modules (inversion, "
                                           "interaction, head) at 10 x --lr; warm-up (0: the paper's plain step "
                                           "schedule) starts from 0.01 x lr")
    g = flags.add_input_args(p)
    g.add_argument("--color_jitter", action="store_true", help="brightness/contrast/saturation jitter of 0.1")
    flags.add_gpu_augment_arg(g)
    g = p.add_argument_group("sampling and losses")
    flags.add_sampler_args(g, sampler="pk")
    g.add_argument("--triplet_weight", type=float, default=1.0, help="batch-hard triplet (margin 0.3) weight")
    g.add_argument("--lambda_sc", type=float, default=0.5,
                   help="weight of the symmetric image<->composed-prompt supervised contrastive loss")
    g.add_argument("--sc_temperature", type=float, default=None,
                   help="temperature of that loss on cosine similarities (default: the CLIP checkpoint's own, "
                        "1 / exp(logit_scale), 0.01 for OpenAI's models)")
    g = p.add_argument_group("PromptSG model")
    g.add_argument("--prompt_template", default=prompt_models.PROMPTSG_TEMPLATE,
                   help="composed prompt; S* marks where the pseudo-word goes")
    g.add_argument("--fixed_prompt", default=prompt_models.PROMPTSG_FIXED_PROMPT,
                   help="the prompt that guides the attention at inference with --inference_prompt fixed")
    g.add_argument("--inference_prompt", default="fixed", choices=models.INFERENCE_PROMPTS,
                   help="which prompt guides the attention in validation (the evaluator uses it unless told otherwise)")
    g.add_argument("--interaction_blocks", type=int, default=2,
                   help="transformer blocks after the cross-attention (residual branches zero at the start, so "
                        "they begin as the identity)")
    g.add_argument("--pool", default="global", choices=prompt_models.INTERACTION_POOLS,
                   help="language-guided feature: the blocks' output at the global token (starts as CLIP's own "
                        "feature) or the mean over every token (the earlier behaviour)")
    g.add_argument("--feature", default="fused", choices=models.PROMPTSG_FEATURES,
                   help="retrieval feature of validation: fused (language-guided feature before BN), fused_bn, "
                        "concat (global CLIP feature + fused) or proj (global CLIP feature alone); the final test and "
                        "the evaluator use the --protocol's unless the evaluator is given --feature")
    flags.add_run_control_args(p, resume_help="continue the run in <f_name>/<m_name> from net_last.pth",
                               final_test_help="evaluate the checkpoint --protocol reports on the query/gallery "
                                               "splits of --data_dir at the end (fixed and composed prompt)")
    return p.parse_args(argv)


def check_args(args):
    problems = flags.common_arg_problems(args)
    if args.triplet_weight < 0:
        problems.append(f"--triplet_weight must not be negative, got {args.triplet_weight}")
    if args.lambda_sc < 0:
        problems.append(f"--lambda_sc must not be negative, got {args.lambda_sc}")
    if args.sc_temperature is not None and args.sc_temperature <= 0:
        problems.append(f"--sc_temperature must be positive, got {args.sc_temperature}")
    if args.interaction_blocks < 0:
        problems.append(f"--interaction_blocks must not be negative, got {args.interaction_blocks}")
    if args.batch_size < 2:
        problems.append("--batch_size must be at least 2 (the inversion network ends with a BatchNorm)")
    try:
        prompt_models.composed_prompt_tokens(args.prompt_template)
    except errors.TrainingInputError as err:
        problems.append(str(err))
    flags.refuse_training_flags(problems)


def model_config_from_args(args, spec):
    return models.promptsg_model_config(spec, prompt_template=args.prompt_template, fixed_prompt=args.fixed_prompt,
                                        feature=args.feature, inference_prompt=args.inference_prompt,
                                        num_blocks=args.interaction_blocks, pool=args.pool)


def check_resumable(old_model_config, args, path):
    """A resumed run keeps its model; refuse flags that would change it."""
    old_model_config = dict(old_model_config)
    old_model_config.setdefault("pool", "mean")  # runs from before --pool existed
    for key, flag, value in (("prompt_template", "--prompt_template", args.prompt_template),
                             ("fixed_prompt", "--fixed_prompt", args.fixed_prompt),
                             ("num_blocks", "--interaction_blocks", args.interaction_blocks),
                             ("pool", "--pool", args.pool)):
        if old_model_config.get(key) != value:
            raise errors.TrainingInputError(f"{path} was trained with {flag} {old_model_config.get(key)!r}, "
                                           f"not {value!r}; resume with the run's own settings or start a new --m_name")
    if old_model_config.get("kind") != "promptsg":
        raise errors.TrainingInputError(f"{path} holds a {old_model_config.get('kind')} run, not a PromptSG run")


def run_final_tests(model, args, out_dir, amp, device, log):
    """The checkpoint --protocol reports on the query/gallery splits of --data_dir, guided by each
    inference prompt: final_test/ (the run's --inference_prompt) and final_test_<other prompt>/."""
    which, path = runs.reported_checkpoint(out_dir, args.protocol)
    if not os.path.isfile(path):
        return {}
    checkpoint = training.load_checkpoint(path)
    models.load_model_weights(model, checkpoint["model"], path)
    model.eval()
    prompts = [args.inference_prompt] + [p for p in models.INFERENCE_PROMPTS if p != args.inference_prompt]
    results = {}
    for prompt in prompts:
        model.inference_prompt = prompt
        folder = "final_test" if prompt == args.inference_prompt else f"final_test_{prompt}"
        found = runs.final_test(model, args, args.data_dir, out_dir, folder,
                                 f"{args.m_name} (net_{which}, {prompt} prompt)", amp, device, log,
                                 extra={"which_epoch": which, "epoch": checkpoint["epoch"], "inference_prompt": prompt},
                                 what=f"net_{which}, {prompt} prompt")
        if found is None:
            break
        results[prompt] = found
    model.inference_prompt = args.inference_prompt
    return results


@interrupts.sigterm_as_ctrl_c
def main(argv=None):
    return runs.run_training(parse_args(argv), check_args, train, method="promptsg")


def build_model(args, out_dir, num_classes, class_names, dist_info):
    """(model, model_config, spec): pretrained CLIP for a new run, the run's own model when resuming."""
    if args.resume:
        spec, old_config = models.resumed_run(out_dir, args, class_names)
        check_resumable(old_config["model"], args, os.path.join(out_dir, "net_last.pth"))
        model_config = model_config_from_args(args, spec)
        return models.build_promptsg_model(model_config, num_classes), model_config, spec
    spec = models.backbone_spec(args.backbone_name, tuple(args.input_size), args.stride, args.last_stride, args.pos_interp)
    clip_model = models.load_pretrained(spec, args.download_root, dist_info)
    model_config = model_config_from_args(args, spec)
    return models.build_promptsg_model(model_config, num_classes, clip_model=clip_model), model_config, spec


def train(args, dist_info):
    device, amp = dist_info.device, io.resolve_amp(args.amp, dist_info.device)
    hands = data.load_train_val(args.data_dir, args.train_all)
    runs.preflight(args, hands, args.data_dir)  # before the run folder is touched
    num_classes = len(hands["class_names"])
    out_dir, log = runs.start_run(args, dist_info)

    model, model_config, spec = build_model(args, out_dir, num_classes, hands["class_names"], dist_info)
    model.to(device)
    speed_note = models.speed_up_image_encoder(model.visual, device, args.compile, for_training=True)
    args.compile = models.use_compile(args.compile, device)  # config.json records what ran
    criterion = PromptSGLoss(model, args.ls, args.triplet_weight, args.lambda_sc, args.sc_temperature)

    input_size = tuple(args.input_size)
    train_set, val_set, gallery_set = runs.build_datasets(
        hands, data.build_train_transform(input_size, args.color_jitter, args.erasing_p), input_size,
        args.train_all, runs.cache_dir(args, args.data_dir), dist_info, runs.decode_mode(args))
    device_images = gpu_augment.for_training(args.gpu_augment, train_set, device, log)
    args.gpu_augment = device_images is not None
    augmenter = gpu_augment.BatchAugmenter(input_size, args.color_jitter, args.erasing_p)
    sampler = runs.make_sampler(args, train_set, dist_info, log)
    # "visual." = the pretrained image encoder at --lr; inversion, interaction, BNNeck and classifier at 10x;
    # the text tower is frozen (requires_grad False) and left out
    optimizer = training.make_optimizer(args.optimizer, training.param_groups(model, args.lr, args.weight_decay),
                                        args.lr, args.weight_decay)
    scheduler = training.WarmupMultiStepLR(optimizer, args.milestones, args.gamma, args.warmup_epochs, 0.01)
    scaler = training.make_grad_scaler(amp, device)

    last_path = os.path.join(out_dir, "net_last.pth")
    _, history, best, start_epoch = models.resume_from_last(args, out_dir, model, spec, dist_info, log,
                                                            optimizer, scheduler, scaler, sampler)
    runs.check_run_space(out_dir, args, model, args.data_dir, 2 * model.feature_dim())  # two final tests

    if dist_info.is_main:
        extra = runs.training_config(
            args, "promptsg", hands, amp, dist_info, len(train_set), len(val_set), model=model_config,
            feature_dims=dict(model.visual.feature_dims), retrieval_feature_dim=model.feature_dim(),
            sc_temperature_used=criterion.temperature(),
            recipe_notes=["CLIP mean/std at train and test time",
                          "validation and net_best use only training identities (val vs train), guided by the "
                          f"{args.inference_prompt} prompt",
                          "checkpoints hold the frozen text tower too (needed by --inference_prompt composed)"])
        runs.write_training_config(out_dir, args, extra, start_epoch)
    runs.warn_about_schedule(args, log)
    log.info(f"{num_classes} identities, {len(train_set)} train / {len(val_set)} val images; backbone "
             f"{models.describe_backbone(spec)}; prompt {args.prompt_template!r}, inference prompt "
             f"{args.inference_prompt}; retrieval feature {args.feature} ({model.feature_dim()}-d); "
             + runs.batch_summary(args, dist_info, amp, speed_note))

    train_module = distributed.wrap_ddp(criterion, dist_info)
    for epoch in range(start_epoch, args.epochs):
        number = epoch + 1  # epochs are numbered from 1 in logs and file names
        loader = gpu_augment.training_batches(device_images, augmenter, train_set, sampler, args.batch_size,
                                              args.num_workers, args.seed, epoch, device)
        lrs = [group["lr"] for group in optimizer.param_groups]
        with runs.stop_on_nonfinite_loss(log, last_path, history):
            result = training.train_one_epoch(train_module, loader, training.module_loss, [optimizer], scaler, amp,
                                              device, number, args.grad_clip, dist_info,
                                              progress=args.progress if dist_info.is_main else False)
        scheduler.step()
        row = runs.epoch_row(number, lrs, result)
        validated = number % args.eval_every == 0 or number == args.epochs
        if validated and dist_info.is_main:  # guided by the --inference_prompt prompt
            model.eval()
            row.update(evaluation.validate(model, lambda x: model.predict_logits(x)[0], val_set, gallery_set, device,
                                           amp, batch_size=max(args.batch_size, 64), num_workers=args.num_workers))
            model.train()
        best = runs.end_of_epoch(
            out_dir, row, history, best, log, dist_info, args.epochs,
            state=runs.resume_state(optimizer, scheduler, scaler, sampler, dist_info),
            record=models.checkpoint_record("promptsg", model, spec, number, row) if dist_info.is_main else None,
            train_all=args.train_all, save_every=args.save_every, plot=validated)
    runs.check_ranks_agree(model, dist_info, log)

    final = {}
    if dist_info.is_main:
        if args.final_test:
            final = run_final_tests(model, args, out_dir, amp, device, log)
        log.info(f"Wrote the PromptSG model (net_best: epoch {best['epoch']}) to {out_dir}")
    return {"out_dir": out_dir, "best": best, "history": history, "final_test": final}


if __name__ == "__main__":
    main()
