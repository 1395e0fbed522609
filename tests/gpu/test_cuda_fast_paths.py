"""The CUDA fast paths against the plain path, on one GPU.

Each trainer's model and objective, from the same weights and batches, trained one epoch and
evaluated with every fast path on (torch.compile of the image encoder, channels_last ResNets, cuDNN
autotuning, fused Adam; then bf16 autocast on top) and with every one off (eager, NCHW, no
autotuning, plain Adam, fp32): losses, gradients, weight updates and retrieval features agree to
fp32 rounding, and to bf16's with bf16; torch.compile builds one graph per pass kind and precision
(no graph break, no recompile on the last, smaller batch). Then the GPU-resident image cache with batch
augmentation (utils/gpu_augment.py) against the DataLoader workers' augmentation."""
import copy

import pytest
import torch

import losses
import models
import models_handid
from utils import data, distributed, evaluation, gpu_augment, runs, training

pytestmark = pytest.mark.gpu

NUM_CLASSES, SIZE, BATCH, LR = 4, (64, 64), 16, 1e-4
CASES = [("finetune", "vit"), ("finetune", "rn"), ("clipreid", "vit"), ("promptsg", "vit"), ("handid", "rn")]


def build_objective(method, checkpoint):
    """The model and objective of a trainer (CLIP-ReID: stage 2 with the side-information embedding,
    whose hook runs inside the compiled encoder)."""
    torch.manual_seed(0)
    spec = models.backbone_spec(checkpoint, SIZE)
    if method in ("finetune", "clipreid"):
        visual = models.load_backbone(spec)
    else:
        clip_model = models.load_clip_model(spec, weights="pretrained")
        visual = clip_model.visual
    for name, module in visual.named_modules():  # random CLIP ResNets start each residual branch at zero
        if name.endswith("bn3"):
            torch.nn.init.constant_(module.weight, 0.5)
    if method == "finetune":
        return losses.FinetuneLoss(models.HandReIDModel(visual, NUM_CLASSES), ls=0.1, triplet_weight=1.0)
    if method == "clipreid":
        model = models.ClipReIDModel(visual, NUM_CLASSES, sie_aspects=["dorsal right", "palmar right"],
                                     class_aspect=[i % 2 for i in range(NUM_CLASSES)])
        return losses.ClipReIDLoss(model, torch.randn(NUM_CLASSES, visual.feature_dims["proj"]))
    if method == "promptsg":
        model = models.build_promptsg_model(models.promptsg_model_config(spec), NUM_CLASSES, clip_model=clip_model)
        return losses.PromptSGLoss(model)
    model = models_handid.build_handid_model(models_handid.handid_model_config(spec), NUM_CLASSES,
                                             clip_model=clip_model)
    return losses.HandIDLoss(model)


def make_batches(count, device, seed):
    """Batches of 4 identities x 4 images: an identity's pattern plus noise, so that the triplet
    losses' hardest pairs are not near-ties that bf16 rounding would pick differently."""
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.randn(NUM_CLASSES, 3, *SIZE, generator=generator)
    labels = torch.arange(BATCH) % NUM_CLASSES
    return [((patterns[labels] + 0.5 * torch.randn(BATCH, 3, *SIZE, generator=generator)).to(device), labels.to(device))
            for _ in range(count)]


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def flat(tensors):
    return torch.cat([t.detach().flatten().double().cpu() for t in tensors])


def extract(model, device, amp):
    """The evaluators' feature extraction: 10 images in batches of 4 (the last one of 2), mirrored too."""
    images = torch.randn(10, 3, *SIZE, generator=torch.Generator().manual_seed(3))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.arange(10)), batch_size=4)
    return evaluation.extract_features(model, loader, device, amp, flip=True)[0]


def rows_cosine(got, expected):
    return torch.nn.functional.cosine_similarity(got.double(), expected.double(), dim=1).min().item()


@pytest.mark.parametrize("method, kind", CASES)
def test_every_fast_path_against_the_plain_path(method, kind, fast_paths, tiny_vit_checkpoint, tiny_rn_checkpoint,
                                                monkeypatch):
    device, graphs = fast_paths
    # TF32 convolutions (torch's default) round differently for each cuDNN algorithm; the two paths pick
    # different ones (channels_last, autotuning), so fp32 is compared in full fp32
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    plain = build_objective(method, tiny_rn_checkpoint if kind == "rn" else tiny_vit_checkpoint).to(device)
    fast = copy.deepcopy(plain)
    note = models.speed_up_image_encoder(fast.model.visual, device, compile=True, for_training=True)
    assert note == ("channels_last, " if kind == "rn" else "") + "torch.compile of the image encoder (training passes)"
    optimizers = {  # make_optimizer's Adam, fused on CUDA; the plain one with the same settings, unfused
        "fast": training.make_optimizer("adam", training.param_groups(fast.model, LR, 5e-4), LR, 5e-4),
        "plain": torch.optim.Adam(training.param_groups(plain.model, LR, 5e-4), lr=LR, weight_decay=5e-4,
                                  fused=False, foreach=False)}

    def train_epoch(which, batches, epoch, amp="none"):
        torch.backends.cudnn.benchmark = which == "fast"
        torch.manual_seed(epoch)  # the same dropout masks (CLIP-HandID's and PromptSG's inversion networks)
        objective = fast if which == "fast" else plain
        result = training.train_one_epoch(objective, batches, training.module_loss, [optimizers[which]],
                                          training.make_grad_scaler(amp, device), amp, device, epoch, progress=False)
        return result.losses

    # fp32 (the reference's precision), epoch 1 of one batch from the same weights: loss and gradients
    first = make_batches(1, device, seed=1)
    loss_plain, loss_fast = train_epoch("plain", first, 1)["loss"], train_epoch("fast", first, 1)["loss"]
    assert loss_fast == pytest.approx(loss_plain, rel=1e-3)
    named_fast = dict(fast.named_parameters())
    with_grad = [name for name, p in plain.named_parameters() if p.grad is not None]
    assert with_grad and all(named_fast[name].grad is not None for name in with_grad)
    grads_plain = flat(dict(plain.named_parameters())[name].grad for name in with_grad)
    assert cosine(flat(named_fast[name].grad for name in with_grad), grads_plain) > 0.999

    # epoch 2 of three more batches: the losses and where the weights went
    before = {"plain": flat(plain.parameters()), "fast": flat(fast.parameters())}
    rest = make_batches(3, device, seed=2)
    loss_plain, loss_fast = train_epoch("plain", rest, 2)["loss"], train_epoch("fast", rest, 2)["loss"]
    assert loss_fast == pytest.approx(loss_plain, rel=1e-3)
    moved_plain, moved_fast = flat(plain.parameters()) - before["plain"], flat(fast.parameters()) - before["fast"]
    assert moved_plain.abs().max() > LR / 2 and cosine(moved_fast, moved_plain) > 0.99
    assert len(graphs) == 1  # every training batch ran one compiled graph

    # --amp bf16 on top (opt-in): one more graph (autocast is part of what a graph assumes), and a batch's
    # identity loss within bf16's rounding of the fp32 one (not the total: the triplet losses' hardest
    # pairs are near-ties that bf16 may pick otherwise, which moves them by several percent)
    last = make_batches(1, device, seed=3)
    loss_plain, loss_bf16 = train_epoch("plain", last, 3), train_epoch("fast", last, 3, amp="bf16")
    assert loss_bf16["loss_id"] == pytest.approx(loss_plain["loss_id"], rel=0.02)
    assert torch.isfinite(torch.tensor(list(loss_bf16.values()))).all()
    assert len(graphs) == 2

    # evaluation: the plain model's weights compiled for evaluation passes as an evaluator does, fp32 and bf16
    reference = plain.model.eval()
    if method == "clipreid":
        reference.set_test_aspect("palmar right")
    evaluated = copy.deepcopy(reference)
    models.speed_up_image_encoder(evaluated.visual, device, compile=True, for_training=False)
    torch.backends.cudnn.benchmark = False
    expected = extract(reference, device, "none")
    torch.backends.cudnn.benchmark = True
    assert rows_cosine(extract(evaluated, device, "none"), expected) > 0.9999
    assert len(graphs) == 3  # batches of 4, 4 and 2 (padded to 4), each also mirrored: one graph
    got = extract(evaluated, device, "bf16")
    assert rows_cosine(got, expected) > 0.99
    assert ((got - expected).norm(dim=1) / expected.norm(dim=1)).max() < 0.1
    assert len(graphs) == 4


def test_gpu_augmentation_has_the_dataloader_statistics(fast_paths, hand_data, tmp_path):
    """The trainers' two augmentation paths over three epochs of the same sampler batches: the same
    images in the same order, and the same pixel statistics (crop, flip, colour jitter, erasing); and
    the same parameters give the CPU's result on the GPU."""
    device, _ = fast_paths
    hands = data.load_train_val(hand_data)
    transform = data.build_train_transform(SIZE, color_jitter=True, erasing_p=0.5)
    train_set = runs.build_datasets(hands, transform, SIZE, False, str(tmp_path / "cache"),
                                    distributed.DistInfo(device=device))[0]
    cache = gpu_augment.DeviceImageCache(train_set, device)
    assert cache.images.device.type == torch.device(device).type and cache.images.dtype == torch.uint8
    augmenter = gpu_augment.BatchAugmenter(SIZE, color_jitter=True, erasing_p=0.5)
    sampler = data.ShuffleSampler(len(train_set), 8, seed=0)
    stats = {"device": [], "loader": []}
    labels = {"device": [], "loader": []}
    for epoch in range(3):
        sources = {"device": gpu_augment.EpochBatches(cache, sampler, 8, augmenter, seed=0, epoch=epoch),
                   "loader": data.epoch_loader(train_set, sampler, 8, 0, 0, epoch, device)}
        for path, batches in sources.items():
            for images, batch_labels in batches:
                images = images.to(device).float()
                assert images.shape == (8, 3, *SIZE)
                stats[path].append(torch.stack([images.mean(dim=(0, 2, 3)), images.std(dim=(0, 2, 3)),
                                                (images == 0).all(dim=1).float().mean().expand(3)]).cpu())
                labels[path] += batch_labels.tolist()
    assert labels["device"] == labels["loader"] and len(labels["device"]) >= 3 * 8
    device_stats, loader_stats = torch.stack(stats["device"]).mean(0), torch.stack(stats["loader"]).mean(0)
    torch.testing.assert_close(device_stats[0], loader_stats[0], rtol=0, atol=0.05)  # channel means
    torch.testing.assert_close(device_stats[1], loader_stats[1], rtol=0.05, atol=0)  # channel stds
    erased_device, erased_loader = device_stats[2, 0].item(), loader_stats[2, 0].item()
    assert 0.03 < erased_loader < 0.3 and erased_device == pytest.approx(erased_loader, abs=0.03)

    params = augmenter.draw(8, cache.images.shape[1:3], torch.Generator().manual_seed(5))
    on_device = augmenter.apply(cache.images[:8], params).cpu()
    on_cpu = augmenter.apply(cache.images[:8].cpu(), params)
    level = 1 / 255 / augmenter.std.min().item()  # colour jitter may round one grey level apart
    assert (on_device - on_cpu).abs().max() <= level + 1e-5
