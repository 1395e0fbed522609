"""How a photo becomes a model input at test time, as a record that results carry.

A preprocessing record is a plain dict (it goes into config.json and results.json as it is):

    {"size": [H, W], "resize": "squash" | "crop", "interpolation": "bicubic",
     "mean": [r, g, b], "std": [r, g, b], "decode": "full" | "draft"}

- resize "squash": the whole photo resized to exactly H x W (aspect ratio not kept, nothing cut
  off: the CLIP-FH thesis and our fine-tuned models); "crop": shorter side to the input size, then a
  centre crop of H x W (CLIP's own `preprocess`, which CLIP-HandID's zero-shot evaluation uses).
- decode "full": the JPEG decoded at full size, then resized (what the references do); "draft":
  PIL's DCT-scaled decoding at the smallest scale still at least as large as the target (several
  times faster on large photos, pixels differ slightly; for training caches and speed runs).

`load(path, record)` gives the resized PIL image, `transform(record)` the tensor transform after it.
"""
from PIL import Image

from clip import CLIP_MEAN, CLIP_STD

RESIZE_MODES = ("squash", "crop")
DECODE_MODES = ("full", "draft")
INTERPOLATIONS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def record(size, resize="squash", interpolation="bicubic", mean=CLIP_MEAN, std=CLIP_STD, decode="full"):
    """A checked preprocessing record (see the module docstring)."""
    out = {"size": [int(s) for s in size], "resize": resize, "interpolation": interpolation,
           "mean": [float(m) for m in mean], "std": [float(s) for s in std], "decode": decode}
    return check(out)


def check(rec, source="preprocessing"):
    """The record itself when it is complete and valid, else ValueError naming `source` and the entry."""
    if not isinstance(rec, dict):
        raise ValueError(f"{source} must be a dict, got {type(rec).__name__}")
    missing = [k for k in ("size", "resize", "interpolation", "mean", "std", "decode") if k not in rec]
    if missing:
        raise ValueError(f"{source} lacks {', '.join(missing)}")
    if len(rec["size"]) != 2 or min(rec["size"]) < 1:
        raise ValueError(f"{source}: size must be two positive numbers [H, W], got {rec['size']}")
    for key, allowed in (("resize", RESIZE_MODES), ("decode", DECODE_MODES), ("interpolation", INTERPOLATIONS)):
        if rec[key] not in allowed:
            raise ValueError(f"{source}: {key} must be one of {', '.join(allowed)}, got {rec[key]!r}")
    if len(rec["mean"]) != 3 or len(rec["std"]) != 3 or min(rec["std"]) <= 0:
        raise ValueError(f"{source}: mean and std must be three numbers each (std positive)")
    return rec


def resize_target(image_size, rec):
    """(width, height) the decoded photo is resized to before any crop."""
    height, width = rec["size"]
    if rec["resize"] == "squash":
        return width, height
    w, h = image_size
    if (height, width) == (min(height, width),) * 2:  # square: shorter side to the size, as torchvision's Resize(n)
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = height, int(height * long / short)
        return (new_short, new_long) if w <= h else (new_long, new_short)
    scale = max(height / h, width / w)  # cover H x W, then crop
    return max(width, round(w * scale)), max(height, round(h * scale))


def load(path, rec):
    """The photo at `path` as an RGB PIL image of exactly rec["size"] (H, W), decoded, resized and
    (resize "crop") centre-cropped as the record says. Raises the errors of PIL.Image.open/convert
    (the caller turns them into ImageLoadError)."""
    height, width = rec["size"]
    with Image.open(path) as img:
        if rec["decode"] == "draft" and img.format == "JPEG":
            img.draft("RGB", resize_target(img.size, rec))
        img = img.convert("RGB")  # decodes now, so truncated files fail here
    target = resize_target(img.size, rec)
    if img.size != target:
        img = img.resize(target, INTERPOLATIONS[rec["interpolation"]])
    if rec["resize"] == "crop" and img.size != (width, height):
        # torchvision's CenterCrop arithmetic, so the pixels equal Resize(n) + CenterCrop(n)
        left, top = int(round((img.size[0] - width) / 2.0)), int(round((img.size[1] - height) / 2.0))
        img = img.crop((left, top, left + width, top + height))
    return img


def transform(rec):
    """PIL image already of rec["size"] -> normalised float tensor (3, H, W)."""
    from torchvision import transforms
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(rec["mean"], rec["std"])])


def describe(rec):
    """One line for logs and figure captions."""
    height, width = rec["size"]
    how = (f"resize to {height}x{width}" if rec["resize"] == "squash"
           else f"shorter side to {min(height, width)}, centre crop {height}x{width}")
    norm = ("CLIP" if tuple(rec["mean"]) == tuple(CLIP_MEAN) else
            "ImageNet" if tuple(rec["mean"]) == IMAGENET_MEAN else "custom")
    return f"{how} ({rec['interpolation']}), {norm} mean/std, {rec['decode']} JPEG decode"
