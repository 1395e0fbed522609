"""Image corruptions at five severities, for robustness benchmarks (eval_robustness.py) and for
training with them: the photos casework gets (blurred, compressed, small, noisy, badly lit,
colour-cast, partly covered, turned), in the form of ImageNet-C (Hendrycks & Dietterich, ICLR 2019):
fixed families, severities 1-5 with the parameters of SEVERITIES, severity 0 = the clean image.

Images are uint8 tensors (B, H, W, 3), the layout of the resized-image cache and of
utils/gpu_augment.py, on any device; `corrupt` returns the same shape and dtype, on the same device.
They are the photos already decoded and resized to the model's input size (the test-time
preprocessing), before mean/std normalisation (`to_model_input` does that, bit for bit as
torchvision's ToTensor + Normalize).

Determinism. Every random choice of an image (noise field, motion direction, signs, occluder
placement) comes from its own numpy generator seeded by SHA-256(seed, family, identity), where the
identity names the image (eval_robustness.py: the split manifest's source path). So a degraded image
is a function of (seed, identity, family, severity, the pixels) alone, not of the batch it is in or
its position there; the batched arithmetic is elementwise, per image (sums of integers are exact,
no fused multiply-adds), so batch composition cannot change a pixel either. The draws do not depend
on the severity: severity k+1 is the same damage as k, stronger (the same noise field scaled up, the
same occluders grown), so the damage to an image grows with the severity. Pixels may differ by
rounding between a CPU and a GPU.

Pixel-valued parameters (blur sigma, streak length) are given for a 224-pixel shorter side and
scaled with the input's shorter side, so a severity removes the same share of the hand's detail at
any input size. The hand (occlusion) is estimated per image against its background (hand photos
are taken against a plain background, as 11k's are): the background is a smooth colour
field (a quadratic surface per channel fitted to the border frame, refitted without the border
pixels an arm or sleeve crosses); the hand is every pixel farther from it than Otsu's threshold on
a log scale of that distance (and than MIN_FOREGROUND_CONTRAST levels), cleaned by a 3x3 opening.
An image where that leaves under 2 % or over 90 % of the image has no clear foreground and counts
whole as the hand (eval_robustness.py reports how many). It is an estimate: on pale hands in front
of pale, uneven backgrounds it takes in patches of background. Occluders are mid-grey (128)
rectangles; rotation fills the corners with the border's median colour.
"""
import hashlib
import io
import math
import numbers
from collections import namedtuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

Family = namedtuple("Family", "label parameter short values")

# The one table of parameters (README "Robustness" mirrors it). short: the figure caption of a value.
SEVERITIES = {
    "gaussian_blur": Family("Gaussian blur", "Gaussian sigma, px at 224", "σ {} px", (1, 2, 3, 4, 6)),
    "motion_blur": Family("motion blur", "streak length, px at 224 (direction random)", "{} px streak",
                          (6, 10, 15, 20, 30)),
    "jpeg": Family("JPEG compression", "JPEG quality (libjpeg via PIL, 4:2:0)", "quality {}", (25, 18, 15, 10, 7)),
    "low_resolution": Family("low resolution", "scale of the side before upsampling back", "scale {}",
                             (0.6, 0.5, 0.4, 0.3, 0.25)),
    "gaussian_noise": Family("Gaussian noise", "noise sigma, fraction of 255", "σ {}", (0.08, 0.12, 0.18, 0.26, 0.38)),
    "brightness": Family("brightness", "exposure change in stops, darker or brighter at random", "±{} stops",
                         (0.25, 0.5, 0.75, 1.0, 1.5)),
    "contrast": Family("contrast", "contrast factor around each channel's mean", "×{}", (0.4, 0.3, 0.2, 0.1, 0.05)),
    "colour_cast": Family("colour cast", "largest change of a channel gain (direction random)", "gain ±{}",
                          (0.1, 0.2, 0.3, 0.4, 0.5)),
    "occlusion": Family("occlusion", "share of the hand covered by three grey rectangles", "{:.0%} of hand",
                        (0.1, 0.2, 0.3, 0.4, 0.5)),
    "rotation": Family("rotation", "in-plane rotation in degrees, either way at random", "±{}°", (10, 20, 30, 45, 60)),
}
FAMILIES = tuple(SEVERITIES)
MAX_SEVERITY = 5
REFERENCE_SIDE = 224  # pixel-valued parameters are for this shorter side
OCCLUDER_GREY, NUM_OCCLUDERS = 128.0, 3
BORDER_FRACTION = 0.05  # the border frame (share of the shorter side) the background is estimated from
MIN_FOREGROUND_CONTRAST, MIN_FOREGROUND_SHARE, MAX_FOREGROUND_SHARE = 12, 0.02, 0.9
MAX_DISTANCE = math.sqrt(3) * 255  # the largest RGB distance
BORDER_OUTLIERS = 0.2


def check(family, severity):
    if family not in SEVERITIES:
        raise ValueError(f"unknown corruption family {family!r}; choose from {', '.join(FAMILIES)}")
    if isinstance(severity, bool) or not (isinstance(severity, numbers.Integral) and 0 <= severity <= MAX_SEVERITY):
        raise ValueError(f"severity must be an integer 0..{MAX_SEVERITY}, got {severity!r}")


def parameter(family, severity):
    """The parameter of `family` at `severity` (1..5) as SEVERITIES lists it."""
    check(family, severity)
    return SEVERITIES[family].values[int(severity) - 1] if severity else None


def describe(family, severity):
    """Short caption: 'σ 2 px', 'quality 18', 'clean' for severity 0."""
    return "clean" if severity == 0 else SEVERITIES[family].short.format(parameter(family, severity))


def image_rng(seed, identity, family):
    """The numpy generator of one image's random choices for `family` (see the module docstring)."""
    digest = hashlib.sha256(f"{int(seed)}\x1f{family}\x1f{identity}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def corrupt(images, family, severity, identities, seed=0):
    """`images` uint8 (B, H, W, 3) under `family` at `severity` (0: returned as they are).
    identities: B names of the images (paths, manifest sources, or e.g. f"{epoch}:{index}" in a
    trainer); with `seed` they fix every random choice. Returns uint8 (B, H, W, 3)."""
    check(family, severity)
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (B, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    if len(identities) != images.shape[0]:
        raise ValueError(f"{len(identities)} identities for {images.shape[0]} images")
    if severity == 0 or images.shape[0] == 0:
        return images
    rngs = [image_rng(seed, identity, family) for identity in identities]
    value = parameter(family, severity)
    if family == "jpeg":
        return _jpeg(images, value)
    x = images.permute(0, 3, 1, 2).float()  # (B, 3, H, W), integer-valued
    if family == "occlusion":
        x = _occlusion(x, images, value, rngs)
    elif family == "rotation":
        x = _rotation(x, images, value, rngs)
    else:
        x = _OPS[family](x, value, rngs)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def to_model_input(images, mean, std):
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) normalised with mean/std, the same numbers as
    torchvision's ToTensor() + Normalize(mean, std) on each image."""
    x = images.permute(0, 3, 1, 2).float().div(255)
    mean = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return x.sub(mean).div(std)


def _per_image(values, x):
    """A (B,) list of numbers as a (B, 1, 1, 1) float tensor beside x."""
    return torch.tensor(np.asarray(values, dtype=np.float32), device=x.device).view(-1, 1, 1, 1)


def _pixel_scale(x):
    return min(x.shape[-2:]) / REFERENCE_SIDE


def _shift_sum(x, weights, dim):
    """Correlation of x with 1-D `weights` (odd length) along dim (2: rows, 3: columns), edges
    replicated; a sum of shifted copies, so each pixel's arithmetic is the same in any batch."""
    radius = len(weights) // 2
    pad = (0, 0, radius, radius) if dim == 2 else (radius, radius, 0, 0)
    padded = F.pad(x, pad, mode="replicate")
    size = x.shape[dim]
    out = torch.zeros_like(x)
    for k, w in enumerate(weights):
        out = out + padded.narrow(dim, k, size) * float(w)
    return out


def _gaussian_blur(x, sigma, rngs):
    sigma = sigma * _pixel_scale(x)
    radius = max(1, math.ceil(3 * sigma))
    weights = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma ** 2))
    weights = (weights / weights.sum()).astype(np.float32)
    return _shift_sum(_shift_sum(x, weights, 2), weights, 3)


def _pixel_grid(x):
    """(1, H, W, 2) grid_sample coordinates (x, y) of the pixel centres (align_corners=False)."""
    height, width = x.shape[-2:]
    ys = (torch.arange(height, device=x.device, dtype=torch.float32) * 2 + 1) / height - 1
    xs = (torch.arange(width, device=x.device, dtype=torch.float32) * 2 + 1) / width - 1
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None]


def _motion_blur(x, length, rngs):
    """The mean of the image shifted along a line through each pixel (a straight streak of `length`
    px, centred), in a random direction per image; bilinear samples one pixel apart."""
    length = length * _pixel_scale(x)
    angles = np.array([rng.uniform(0, math.pi) for rng in rngs])
    height, width = x.shape[-2:]
    dx = _per_image(np.cos(angles) * 2 / width, x).view(-1, 1, 1)
    dy = _per_image(np.sin(angles) * 2 / height, x).view(-1, 1, 1)
    grid = _pixel_grid(x)
    taps = np.linspace(-length / 2, length / 2, max(2, math.ceil(length) + 1))
    out = torch.zeros_like(x)
    for t in taps:
        shifted = torch.stack([grid[..., 0] + dx * float(t), grid[..., 1] + dy * float(t)], dim=-1)
        out = out + F.grid_sample(x, shifted, mode="bilinear", padding_mode="border", align_corners=False)
    return out / len(taps)


def _jpeg(images, quality):
    out = []
    for image in images.cpu().numpy():
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality))
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            out.append(np.asarray(decoded.convert("RGB")))
    return torch.from_numpy(np.stack(out)).to(images.device)


def _low_resolution(x, scale, rngs):
    height, width = x.shape[-2:]
    small = (max(1, round(height * scale)), max(1, round(width * scale)))
    x = F.interpolate(x, size=small, mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False)


def _gaussian_noise(x, sigma, rngs):
    height, width = x.shape[-2:]
    noise = np.stack([rng.standard_normal((3, height, width), dtype=np.float32) for rng in rngs])
    return x + torch.from_numpy(noise).to(x.device) * float(sigma * 255)


def _brightness(x, stops, rngs):
    signs = [1.0 if rng.random() < 0.5 else -1.0 for rng in rngs]
    return x * _per_image([2.0 ** (s * stops) for s in signs], x)


def _contrast(x, factor, rngs):
    # each channel's mean from the exact integer sum, so it is the same number in any batch
    sums = x.to(torch.int64).sum(dim=(2, 3), keepdim=True).double()
    mean = (sums / (x.shape[2] * x.shape[3])).float()
    return (x - mean) * float(factor) + mean


def _colour_cast(x, amount, rngs):
    """Channel gains 1 + amount * u, u a random direction in the chroma plane (orthogonal to grey,
    so the mean gain is 1) scaled so that its largest channel moves by exactly `amount`."""
    red_green, blue_yellow = np.array([1, -1, 0]) / math.sqrt(2), np.array([1, 1, -2]) / math.sqrt(6)
    gains = []
    for rng in rngs:
        angle = rng.uniform(0, 2 * math.pi)
        direction = math.cos(angle) * red_green + math.sin(angle) * blue_yellow
        gains.append(1 + amount * direction / np.abs(direction).max())
    return x * torch.tensor(np.array(gains, dtype=np.float32), device=x.device).view(-1, 3, 1, 1)


_OPS = {"gaussian_blur": _gaussian_blur, "motion_blur": _motion_blur, "low_resolution": _low_resolution,
        "gaussian_noise": _gaussian_noise, "brightness": _brightness, "contrast": _contrast,
        "colour_cast": _colour_cast}


def _border(height, width, device):
    """(H, W) bool: the frame of BORDER_FRACTION of the shorter side."""
    frame = max(1, round(BORDER_FRACTION * min(height, width)))
    inside = torch.zeros(height, width, dtype=torch.bool, device=device)
    inside[frame:height - frame, frame:width - frame] = True
    return ~inside


def background_colour(images):
    """(B, 3) float: the median colour of each image's border frame (BORDER_FRACTION of the shorter side)."""
    border = _border(*images.shape[1:3], images.device)
    return images[:, border].median(dim=1).values.float()


def _background_field(images):
    """(B, H, W, 3) float: each image's background as a smooth colour field, a quadratic surface
    per channel fitted by least squares to the border frame, then refitted without the border pixels
    farthest from the first fit (BORDER_OUTLIERS of them: an arm or sleeve crossing the edge). Each
    image is fitted on its own, so the field is the same in any batch."""
    height, width = images.shape[1:3]
    device = images.device
    ys = torch.linspace(-1, 1, height, device=device, dtype=torch.float64)
    xs = torch.linspace(-1, 1, width, device=device, dtype=torch.float64)
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    border = _border(height, width, device)
    bx, by = x[border], y[border]
    design = torch.stack([torch.ones_like(bx), bx, by, bx * bx, bx * by, by * by], dim=1)  # (P, 6)
    keep = max(6, int(len(bx) * (1 - BORDER_OUTLIERS)))
    coefficients = []
    for values in images[:, border].double():  # (P, 3) per image
        kept = slice(None)
        for _ in range(2):
            coefficient = torch.linalg.lstsq(design[kept], values[kept]).solution
            residual = ((values - design @ coefficient) ** 2).sum(1)
            kept = residual.argsort(stable=True)[:keep]
        coefficients.append(coefficient)
    c = torch.stack(coefficients).float()[:, :, None, None, :]  # (B, 6, 1, 1, 3); the surface row by row
    x, y = xs.float().view(1, 1, -1, 1), ys.float().view(1, -1, 1, 1)
    return (c[:, 0] + y * c[:, 2] + y * y * c[:, 5]) + x * (c[:, 1] + y * c[:, 4]) + x * x * c[:, 3]


def hand_mask(images):
    """The hand of each uint8 (B, H, W, 3) image (see the module docstring): (mask (B, H, W) bool,
    found (B,) bool: False where no clear foreground was found and the whole image counts)."""
    batch = images.shape[0]
    distance = ((images.float() - _background_field(images)) ** 2).sum(-1).sqrt()
    # Otsu's threshold on a log scale of the distance: the background's small distances against the
    # rest (a linear scale lets a few far pixels, a ring or a watch band, pull the threshold up)
    bins = 256
    level = (torch.log1p(distance) * ((bins - 1) / math.log1p(MAX_DISTANCE))).floor().long().clamp(0, bins - 1)
    counts = torch.zeros(batch, bins, dtype=torch.float64, device=images.device)
    counts.scatter_add_(1, level.view(batch, -1), torch.ones_like(level.view(batch, -1), dtype=torch.float64))
    levels = torch.arange(bins, dtype=torch.float64, device=images.device)
    below, below_sum = counts.cumsum(1), (counts * levels).cumsum(1)  # exact integer sums
    total, total_sum = below[:, -1:], below_sum[:, -1:]
    above = total - below
    between = below * above * (below_sum / below.clamp(min=1) - (total_sum - below_sum) / above.clamp(min=1)) ** 2
    mask = (level > between.argmax(dim=1).view(-1, 1, 1)) & (distance > MIN_FOREGROUND_CONTRAST)
    opened = -F.max_pool2d(-mask[:, None].float(), 3, 1, 1)  # erosion then dilation removes speckles
    mask = F.max_pool2d(opened, 3, 1, 1)[:, 0] > 0
    share = mask.float().mean(dim=(1, 2))
    found = (share >= MIN_FOREGROUND_SHARE) & (share <= MAX_FOREGROUND_SHARE)
    return torch.where(found.view(-1, 1, 1), mask, torch.ones_like(mask)), found


def _rectangles(height, width, centres, halves):
    """(B, H, W) bool union of K axis-aligned rectangles per image: centres (B, K, 2) pixel (y, x),
    half sizes (B, K, 2)."""
    rows = torch.arange(height, device=centres.device, dtype=torch.float32)[None, None, :] + 0.5
    cols = torch.arange(width, device=centres.device, dtype=torch.float32)[None, None, :] + 0.5
    in_rows = (rows - centres[..., :1]).abs() <= halves[..., :1]  # (B, K, H)
    in_cols = (cols - centres[..., 1:]).abs() <= halves[..., 1:]  # (B, K, W)
    return (in_rows[..., :, None] & in_cols[..., None, :]).any(dim=1)


def _occlusion(x, images, share, rngs):
    """NUM_OCCLUDERS grey rectangles centred on random hand pixels (random aspect 1:2 to 2:1 and
    relative size), grown together (bisection on a common scale) until they cover `share` of the hand."""
    mask, _ = hand_mask(images)
    batch, height, width = mask.shape
    centres, shapes = [], []
    for b, rng in enumerate(rngs):
        hand = mask[b].nonzero().cpu().numpy()  # row-major order: the same for the same image
        picks = hand[rng.integers(0, len(hand), NUM_OCCLUDERS)] + 0.5
        aspect = np.exp(rng.uniform(math.log(0.5), math.log(2.0), NUM_OCCLUDERS))
        size = rng.uniform(0.5, 1.0, NUM_OCCLUDERS)
        centres.append(picks)
        shapes.append(np.stack([size * np.sqrt(aspect), size / np.sqrt(aspect)], axis=1) / 2)
    centres = torch.tensor(np.array(centres, dtype=np.float32), device=x.device)
    shapes = torch.tensor(np.array(shapes, dtype=np.float32), device=x.device)
    hand_pixels = mask.sum(dim=(1, 2))
    low = torch.zeros(batch, device=x.device)
    high = torch.full((batch,), 4.0 * max(height, width), device=x.device)
    for _ in range(20):  # the smallest scale (to float precision) whose rectangles cover the share
        middle = (low + high) / 2
        covered = (_rectangles(height, width, centres, shapes * middle.view(-1, 1, 1)) & mask).sum(dim=(1, 2))
        enough = covered >= share * hand_pixels
        high, low = torch.where(enough, middle, high), torch.where(enough, low, middle)
    occluded = _rectangles(height, width, centres, shapes * high.view(-1, 1, 1))
    return torch.where(occluded[:, None], torch.full_like(x, OCCLUDER_GREY), x)


def _rotation(x, images, degrees, rngs):
    """Rotation about the image centre (bilinear); corners filled with the border's median colour."""
    angles = np.radians([degrees if rng.random() < 0.5 else -degrees for rng in rngs])
    height, width = x.shape[-2:]
    cos, sin = _per_image(np.cos(angles), x).view(-1, 1, 1), _per_image(np.sin(angles), x).view(-1, 1, 1)
    grid = _pixel_grid(x)
    px, py = grid[..., 0] * (width / 2), grid[..., 1] * (height / 2)  # pixels from the centre
    source = torch.stack([(cos * px + sin * py) / (width / 2), (cos * py - sin * px) / (height / 2)], dim=-1)
    with_ones = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    sampled = F.grid_sample(with_ones, source, mode="bilinear", padding_mode="zeros", align_corners=False)
    inside = sampled[:, 3:]
    return sampled[:, :3] + (1 - inside) * background_colour(images).to(x.device).view(-1, 3, 1, 1)
