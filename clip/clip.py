"""OpenAI-compatible entry points: available_models, load, tokenize (+ offline helpers)."""
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile

import torch
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor
from tqdm import tqdm

from .model import (MODEL_CONFIGS, POS_INTERPOLATIONS, TOKENIZER_VOCAB_SIZE, ModelBuildError, TokenizerMismatchError,
                    build_model, checkpoint_geometry, random_state_dict)
from .simple_tokenizer import SimpleTokenizer

__all__ = ["available_models", "load", "tokenize", "check_tokenizer", "checkpoint_geometry", "random_state_dict",
           "save_tiny_checkpoint", "tiny_config", "TINY_KINDS", "ModelDownloadError", "TokenizerMismatchError", "CheckpointError",
           "MODEL_CONFIGS", "POS_INTERPOLATIONS", "CLIP_MEAN", "CLIP_STD", "release_sha256", "native_input_size"]

_URL_ROOT = "https://openaipublic.azureedge.net/clip/models"
# name -> (SHA-256 of the released file, file name); the URL is <root>/<sha256>/<file name>
_RELEASES = {
    "RN50": ("afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762", "RN50.pt"),
    "RN101": ("8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599", "RN101.pt"),
    "RN50x4": ("7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd", "RN50x4.pt"),
    "RN50x16": ("52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa", "RN50x16.pt"),
    "RN50x64": ("be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c", "RN50x64.pt"),
    "ViT-B/32": ("40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt"),
    "ViT-B/16": ("5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt"),
    "ViT-L/14": ("b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt"),
    "ViT-L/14@336px": ("3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02", "ViT-L-14-336px.pt"),
}
_MODELS = {name: f"{_URL_ROOT}/{sha}/{file}" for name, (sha, file) in _RELEASES.items()}
# the input side each released model was trained at (its own preprocess resizes to it); 224 otherwise
_NATIVE_SIDE = {"RN50x4": 288, "RN50x16": 384, "RN50x64": 448, "ViT-L/14@336px": 336}

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_CHUNK = 1 << 20


class ModelDownloadError(RuntimeError):
    """The official weights could not be downloaded or failed verification."""


class CheckpointError(RuntimeError):
    """A name that is neither an official model nor a readable checkpoint file, or a checkpoint that
    cannot be built (not an OpenAI-layout CLIP, or not at the requested input geometry)."""


def available_models():
    """Names of the nine released CLIP models, in OpenAI's order."""
    return list(_MODELS)


def native_input_size(name_or_path):
    """(H, W) that CLIP's own preprocess gives `name_or_path`: the released model's resolution
    (288 for RN50x4, 336 for ViT-L/14@336px, ...), 224 x 224 for the others and for local files."""
    side = _NATIVE_SIDE.get(name_or_path, 224)
    return (side, side)


def release_sha256(name):
    """SHA-256 of the released file of an official model name (what load verifies), else None."""
    return _RELEASES[name][0] if name in _RELEASES else None


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _offline_hint(target, expected_sha):
    return (f"To use it without network access, download it elsewhere and place it at {target} "
            f"(expected SHA-256 {expected_sha}), or pass the path of a local checkpoint file as "
            f"--backbone_name instead of the model name.")


def _download(url, root):
    """Return the path of the verified file for `url` under `root`, downloading it if needed.

    The expected SHA-256 is the URL's folder name. The download goes to a temporary file in `root`
    that is renamed only after verification, so no unverified file is ever left under the final name.
    A cached file is hashed again before use; a mismatching one is deleted and downloaded again.
    """
    os.makedirs(root, exist_ok=True)
    expected_sha = url.split("/")[-2].lower()
    target = os.path.join(root, os.path.basename(url))
    if os.path.exists(target) and not os.path.isfile(target):
        raise RuntimeError(f"{target} exists and is not a regular file; remove it or use another download_root")
    note = ""
    if os.path.isfile(target):
        actual = sha256_file(target)
        if actual == expected_sha:
            return target
        warnings.warn(f"cached file {target} has SHA-256 {actual}, expected {expected_sha}; deleting it and "
                      f"downloading again")
        os.remove(target)
        note = " (the cached copy there was corrupt and has been deleted)"

    fd, tmp_path = tempfile.mkstemp(prefix=os.path.basename(url) + ".", suffix=".part", dir=root)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            try:
                source = urllib.request.urlopen(url, timeout=60)
            except (urllib.error.URLError, OSError, ValueError) as err:
                raise ModelDownloadError(f"could not download {url}: {err}. {_offline_hint(target, expected_sha)}"
                                         f"{note}") from err
            with source:
                size = source.headers.get("Content-Length")
                with tqdm(total=int(size) if size else None, unit="iB", unit_scale=True, unit_divisor=1024,
                          desc=os.path.basename(url), disable=None) as bar:
                    try:
                        for chunk in iter(lambda: source.read(_CHUNK), b""):
                            out.write(chunk)
                            digest.update(chunk)
                            bar.update(len(chunk))
                    except OSError as err:
                        raise ModelDownloadError(f"download of {url} was interrupted: {err}. "
                                                 f"{_offline_hint(target, expected_sha)}") from err
        if digest.hexdigest() != expected_sha:
            raise ModelDownloadError(f"the downloaded file from {url} has SHA-256 {digest.hexdigest()}, expected "
                                     f"{expected_sha}; it was discarded. Try again. "
                                     f"{_offline_hint(target, expected_sha)}")
        os.replace(tmp_path, target)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    return target


def _convert_image_to_rgb(image):
    return image.convert("RGB")


class _ResizeToCover:
    """Bicubic resize keeping the aspect ratio so that the image covers (H, W) (then center-crop)."""

    def __init__(self, size):
        self.size = size

    def __call__(self, image):
        height, width = self.size
        scale = max(height / image.height, width / image.width)
        new_size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        return image.resize(new_size, Image.Resampling.BICUBIC)


def _transform(input_size):
    """OpenAI's preprocessing: resize the short side (bicubic), center crop, RGB, CLIP mean/std.

    For a non-square input size (H, W) the image is resized to cover (H, W) and center-cropped.
    """
    height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
    if height == width:
        resize = Resize(height, interpolation=InterpolationMode.BICUBIC)
    else:
        resize = _ResizeToCover((height, width))
    return Compose([resize, CenterCrop((height, width)), _convert_image_to_rgb, ToTensor(),
                    Normalize(CLIP_MEAN, CLIP_STD)])


def is_torchscript_archive(path):
    """True for files written by torch.jit.save (the format of the released checkpoints)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(name.endswith("/constants.pkl") or "/code/" in name for name in names)


def read_state_dict(path):
    """State dict from a TorchScript archive or a plain torch.save'd state dict (weights_only)."""
    try:
        if is_torchscript_archive(path):
            with warnings.catch_warnings():
                # torch.jit is deprecated but is the only reader of the released archives
                warnings.filterwarnings("ignore", message=r".*torch\.jit", category=DeprecationWarning)
                warnings.filterwarnings("ignore", message=r".*torch\.jit", category=FutureWarning)
                archive = torch.jit.load(path, map_location="cpu")
            return dict(archive.state_dict())
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        # a file that is not a checkpoint makes the readers fail in many ways (UnpicklingError, KeyError on
        # a text file, RuntimeError on a torn zip...); torch's messages would advise weights_only=False,
        # which we never do
        raise CheckpointError(f"{path} is not a CLIP checkpoint ({type(err).__name__} reading it as a TorchScript "
                              f"archive or state dict file); pass an official model name {available_models()} "
                              f"or an OpenAI-format checkpoint file as --backbone_name") from err
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors); pass an "
                              f"OpenAI-format checkpoint file as --backbone_name")
    return obj


def load(name_or_path, device=None, jit=False, download_root="~/.cache/clip", input_size=None, patch_stride=None,
         last_stride=None, pos_interp="bilinear"):
    """Load a CLIP model; returns (model, preprocess).

    name_or_path: one of available_models() (downloaded and SHA-256-verified into download_root) or
    a local checkpoint (TorchScript archive or state-dict file). The model has fp32 weights, is in
    eval mode and sits on `device` (default: cuda when available). input_size / patch_stride /
    last_stride: see clip.model.build_model (None = what the checkpoint was made for: the
    pre-training size, stride = patch size, last_stride 2 for the released files). pos_interp:
    how a positional embedding is resized for another token grid ("bilinear", as CLIP-ReID and
    CLIP-HandID, or "bicubic").
    jit=True is not supported (NotImplementedError).
    """
    if jit:
        raise NotImplementedError("jit=True is not supported: CLIP-FH always returns the Python model with fp32 "
                                  "weights (the weights of TorchScript archives are read into it). Use jit=False, "
                                  "and torch.compile(model) if you want a compiled model.")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if name_or_path in _MODELS:
        path = _download(_MODELS[name_or_path], os.path.expanduser(download_root or "~/.cache/clip"))
    elif os.path.isfile(os.path.expanduser(str(name_or_path))):
        path = os.path.expanduser(str(name_or_path))
    else:
        raise CheckpointError(f"Model {name_or_path} not found: it is neither an official name "
                              f"{available_models()} nor an existing checkpoint file (--backbone_name)")
    try:
        model = build_model(read_state_dict(path), input_size=input_size, patch_stride=patch_stride,
                            last_stride=last_stride, interpolation=pos_interp).to(device)
    except ModelBuildError as err:
        raise CheckpointError(f"cannot build CLIP from {name_or_path}: {err} (--backbone_name, --input_size, "
                              f"--stride, --last_stride)") from None
    return model, _transform(model.visual.input_size)


_tokenizer = None


def _get_tokenizer():
    global _tokenizer
    if _tokenizer is None:
        _tokenizer = SimpleTokenizer()
    return _tokenizer


def check_tokenizer(model, context_length=77):
    """Raise TokenizerMismatchError unless `model`'s text tower embeds what tokenize(..., context_length)
    produces: a vocabulary of exactly the tokenizer's size (another size means another tokenizer)
    and at least context_length positions. The message names both sizes."""
    vocab_size = _get_tokenizer().vocab_size
    if model.vocab_size != vocab_size:
        raise TokenizerMismatchError(f"the checkpoint's text tower has a vocabulary of {model.vocab_size} tokens but "
                                     f"CLIP's tokenizer has {vocab_size}; use a checkpoint made for CLIP's tokenizer")
    if model.context_length < context_length:
        raise TokenizerMismatchError(f"the checkpoint's text tower has a context length of {model.context_length} "
                                     f"but the text is tokenized to {context_length} positions; tokenize with "
                                     f"context_length={model.context_length}")


def tokenize(texts, context_length=77, truncate=False):
    """Token ids (N, context_length) LongTensor: SOT, BPE ids, EOT, zero padding.

    Too-long texts raise RuntimeError unless truncate=True, which cuts them and ends them with EOT.
    """
    if isinstance(texts, str):
        texts = [texts]
    tokenizer = _get_tokenizer()
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [tokenizer.sot_id] + tokenizer.encode(text) + [tokenizer.eot_id]
        if len(ids) > context_length:
            if not truncate:
                raise RuntimeError(f"Input {text} is too long for context length {context_length}")
            ids = ids[:context_length]
            ids[-1] = tokenizer.eot_id
        result[row, :len(ids)] = torch.tensor(ids)
    return result


# Tiny test models with the geometries of the released ones that differ: patch size, the pre-training
# grid (224 / patch, 336 / 14), and the RN50x4 width (80: not a power of two, 40 heads of 64) with its
# 9x9 attention-pool grid (288 / 32), each scaled down. Text towers: width 64, 2 layers.
_TINY_CONFIGS = {
    "vit": dict(embed_dim=32, image_resolution=64, vision_layers=2, vision_width=64, vision_patch_size=16),
    "vit-b32": dict(embed_dim=32, image_resolution=64, vision_layers=2, vision_width=64, vision_patch_size=32),
    "vit-l14": dict(embed_dim=48, image_resolution=56, vision_layers=2, vision_width=128, vision_patch_size=14),
    "vit-l14-336": dict(embed_dim=48, image_resolution=84, vision_layers=2, vision_width=128, vision_patch_size=14),
    "rn": dict(embed_dim=32, image_resolution=64, vision_layers=(1, 1, 1, 1), vision_width=16, vision_patch_size=None),
    "rn50x4": dict(embed_dim=40, image_resolution=96, vision_layers=(1, 1, 1, 1), vision_width=20,
                   vision_patch_size=None),
}
# the released model whose geometry each tiny kind copies
TINY_KINDS = {"vit": "ViT-B/16", "vit-b32": "ViT-B/32", "vit-l14": "ViT-L/14", "vit-l14-336": "ViT-L/14@336px",
              "rn": "RN50", "rn50x4": "RN50x4"}


def tiny_config(kind="vit", image_resolution=None, vocab_size=49408, context_length=77):
    """Config of a tiny test model (see TINY_KINDS); the real 49,408-token vocabulary by default, so
    clip.tokenize ids work. A smaller vocab_size or context_length makes a mismatching text tower."""
    if kind not in _TINY_CONFIGS:
        raise ValueError(f"kind must be one of {list(_TINY_CONFIGS)}, got {kind!r}")
    config = dict(_TINY_CONFIGS[kind], context_length=int(context_length), vocab_size=int(vocab_size),
                  transformer_width=64, transformer_heads=1, transformer_layers=2)
    if image_resolution is not None:
        config["image_resolution"] = int(image_resolution)
    return config


def save_tiny_checkpoint(path, kind="vit", seed=0, image_resolution=None, vocab_size=49408, context_length=77):
    """Write a tiny OpenAI-format fp16 state dict (.pt) to `path` and return the path.

    kind "vit": ViT with patch 16, width 64, 2 layers, default 64 px; kind "rn": ModifiedResNet with
    layers (1, 1, 1, 1), width 16, default 64 px; the other kinds copy the geometry of the released
    model TINY_KINDS names (patch 32 or 14, a 336 px-style grid, RN50x4's width and pool grid).
    image_resolution must be a multiple of the patch size (ViT) or of 32 (ResNet).
    """
    config = tiny_config(kind, image_resolution, vocab_size, context_length)
    unit = config["vision_patch_size"] or 32
    if config["image_resolution"] % unit:
        raise ValueError(f"image_resolution must be a multiple of {unit} for kind {kind!r}")
    state_dict = {k: v.half() if v.is_floating_point() else v for k, v in random_state_dict(config, seed).items()}
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        torch.save(state_dict, tmp_path)
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    return path
