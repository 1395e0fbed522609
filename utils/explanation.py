"""Explanation maps of a similarity and their faithfulness, model-agnostic: gradient-weighted
attention rollout (ViT), Grad-CAM (CNN), maps at image size, the deletion test and its area under
the curve, the mass of a map on a mask, and heat-map overlays. Depends on nothing in the package;
the model-specific part (which tensors to record) lives in explain_matches.py."""
import numpy as np
import torch
import torch.nn.functional as F

DELETION_FRACTIONS = tuple(i / 10 for i in range(11))  # 0 %, 10 %, ..., 100 % of the pixels removed


def attention_rollout(attention_probs, attention_grads, token_relevance):
    """Gradient-weighted attention rollout (Chefer et al., CVPR 2021) over every block.

    attention_probs, attention_grads: one (N, heads, L, L) tensor per block, first block first.
    token_relevance: (N, L) how much each output token of the last block drives the score (for a
    CLS-only feature, nonzero at the class token only). Returns (N, L) relevance of the input tokens:
    relevance @ R with R = prod over blocks of (I + mean over heads of (grad * attention)^+)."""
    probs = attention_probs[0]
    batch, _, length, _ = probs.shape
    R = torch.eye(length, device=probs.device, dtype=torch.float32).expand(batch, length, length)
    for probs, grads in zip(attention_probs, attention_grads):
        weighted = (grads.float() * probs.float()).clamp(min=0).mean(dim=1)
        R = R + weighted @ R
    return (token_relevance.float()[:, None] @ R)[:, 0]


def grad_cam(activations, gradients):
    """Grad-CAM (Selvaraju et al., ICCV 2017) of (N, C, h, w) activations and the score's gradients:
    ReLU of the channel sum weighted by each channel's mean gradient. Returns (N, h, w)."""
    weights = gradients.float().mean(dim=(2, 3), keepdim=True)
    return (weights * activations.float()).sum(dim=1).clamp(min=0)


def to_image_size(grid_maps, size):
    """(N, h, w) maps -> (N, H, W): bilinear upsampling, then each map scaled to [0, 1] (a map that
    is zero everywhere stays zero)."""
    maps = F.interpolate(grid_maps[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    maps = maps - maps.flatten(1).min(dim=1).values[:, None, None]
    peak = maps.flatten(1).max(dim=1).values[:, None, None]
    return torch.where(peak > 0, maps / peak.clamp(min=1e-12), torch.zeros_like(maps))


def random_maps(grid_size, image_size, count, seed):
    """`count` random maps drawn on the explained model's own grid and upsampled like a real map, so
    a random ordering removes pixels in blobs of the same size as the map's (pixel-wise noise would
    hit every patch at once and make any map look good)."""
    generator = torch.Generator().manual_seed(seed)
    return to_image_size(torch.rand(count, *grid_size, generator=generator), image_size)


def deletion_batch(image, maps, fractions=DELETION_FRACTIONS, fill=0.0):
    """For each map (M, H, W) and fraction: `image` (C, H, W) with the map's highest-ranked pixels
    (that fraction of H*W, ties by position) set to `fill`. Returns (M * len(fractions), C, H, W),
    map by map."""
    num_pixels = image.shape[1] * image.shape[2]
    order = torch.argsort(-maps.flatten(1), dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(num_pixels, device=order.device).expand_as(order))
    counts = torch.tensor([round(f * num_pixels) for f in fractions], device=image.device)
    deleted = rank[:, None, :] < counts[None, :, None]  # (M, F, H*W)
    deleted = deleted.reshape(-1, 1, *image.shape[1:])
    return torch.where(deleted, torch.as_tensor(fill, dtype=image.dtype, device=image.device), image[None])


def area_under_curve(values, fractions=DELETION_FRACTIONS):
    """Trapezoidal area under a deletion curve sampled at `fractions` (x from 0 to 1)."""
    values, fractions = np.asarray(values, float), np.asarray(fractions, float)
    return float(np.sum((values[1:] + values[:-1]) / 2 * np.diff(fractions)))


@torch.no_grad()
def deletion_test(score_fn, image, saliency, grid_size, num_random=5, seed=0, fractions=DELETION_FRACTIONS,
                  fill=0.0, batch_size=64):
    """The deletion test of one map: the score of `image` (C, H, W) as its pixels are removed in the
    order of `saliency` (H, W), of its reverse and of `num_random` random maps (seeds seed ...
    seed + num_random - 1). score_fn(images (B, C, H, W)) -> (B,) scores. Every step of every
    ordering runs in batches of batch_size. Returns {"fractions", "curves": {"map", "reverse",
    "random" (mean curve)}, "auc": {"map", "reverse", "random" (mean of the seeds' AUCs),
    "random_std"}}."""
    randoms = [random_maps(grid_size, saliency.shape, 1, seed + i)[0] for i in range(num_random)]
    maps = torch.stack([saliency, -saliency] + [m.to(saliency.device) for m in randoms])
    batch = deletion_batch(image, maps, fractions, fill)
    scores = torch.cat([score_fn(chunk).float().cpu() for chunk in batch.split(batch_size)])
    curves = scores.view(len(maps), len(fractions)).numpy()
    random_aucs = [area_under_curve(c, fractions) for c in curves[2:]]
    return {"fractions": list(fractions),
            "curves": {"map": curves[0].tolist(), "reverse": curves[1].tolist(),
                       "random": curves[2:].mean(axis=0).tolist()},
            "auc": {"map": area_under_curve(curves[0], fractions), "reverse": area_under_curve(curves[1], fractions),
                    "random": float(np.mean(random_aucs)), "random_std": float(np.std(random_aucs))}}


def mass_on_mask(saliency, mask):
    """(fraction of the map's total mass inside `mask`, fraction of the image the mask covers);
    saliency and mask are (H, W) arrays of the same size, mask boolean. None for an all-zero map."""
    saliency, mask = np.asarray(saliency, float), np.asarray(mask, bool)
    total = saliency.sum()
    return (float(saliency[mask].sum() / total) if total > 0 else None), float(mask.mean())


def overlay(photo, saliency, alpha=0.5, colormap="jet"):
    """RGB uint8 (h, w, 3) photo blended with the [0, 1] map (any size; resized bilinearly to the
    photo) in `colormap`."""
    import matplotlib
    maps = torch.as_tensor(np.asarray(saliency, np.float32))[None, None]
    resized = F.interpolate(maps, size=photo.shape[:2], mode="bilinear", align_corners=False)[0, 0].clamp(0, 1)
    heat = matplotlib.colormaps[colormap](resized.numpy())[..., :3] * 255
    return (photo.astype(np.float32) * (1 - alpha) + heat * alpha).clip(0, 255).astype(np.uint8)
