"""Backbone geometry read from the checkpoint, for tiny copies of every released geometry that
differs (patch 32 and 14, a 336 px grid, RN50x4's width and pool grid); positional-embedding
resizing; text towers whose vocabulary or context length does not match the tokenizer."""
import pytest
import torch
import torch.nn.functional as F

import clip
from clip.model import checkpoint_geometry, resize_pos_embed

pytestmark = pytest.mark.usefixtures("single_torch_thread")

# what each tiny kind must read back from its own state dict
EXPECTED = {
    "vit": dict(kind="vit", patch_size=16, input_size=(64, 64), grid=(4, 4), vision_width=64, vision_heads=1),
    "vit-b32": dict(kind="vit", patch_size=32, input_size=(64, 64), grid=(2, 2), vision_width=64, vision_heads=1),
    "vit-l14": dict(kind="vit", patch_size=14, input_size=(56, 56), grid=(4, 4), vision_width=128, vision_heads=2),
    "vit-l14-336": dict(kind="vit", patch_size=14, input_size=(84, 84), grid=(6, 6), vision_width=128,
                        vision_heads=2),
    "rn": dict(kind="resnet", patch_size=None, input_size=(64, 64), grid=(2, 2), vision_width=16, vision_heads=8),
    "rn50x4": dict(kind="resnet", patch_size=None, input_size=(96, 96), grid=(3, 3), vision_width=20,
                   vision_heads=10),
}


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("geometries")
    return {kind: clip.save_tiny_checkpoint(root / f"{kind}.pt", kind=kind) for kind in EXPECTED}


def test_tiny_kinds_copy_the_released_geometries():
    assert set(clip.TINY_KINDS) == set(EXPECTED)
    for kind, name in clip.TINY_KINDS.items():
        released, tiny = clip.MODEL_CONFIGS[name], clip.tiny_config(kind)
        assert tiny["vision_patch_size"] == released["vision_patch_size"]
        assert isinstance(tiny["vision_layers"], tuple) == isinstance(released["vision_layers"], tuple)
    ratio_336 = clip.tiny_config("vit-l14-336")["image_resolution"] / clip.tiny_config("vit-l14")["image_resolution"]
    assert ratio_336 == 336 / 224
    # RN50x4: a width that is no power of two (80; tiny 20) and a pool grid other than 7 (9; tiny 3)
    assert clip.MODEL_CONFIGS["RN50x4"]["vision_width"] % 64 and clip.tiny_config("rn50x4")["vision_width"] % 16


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_geometry_is_read_from_the_state_dict(kind, tiny_checkpoints):
    state_dict = clip.clip.read_state_dict(tiny_checkpoints[kind])
    geometry = checkpoint_geometry(state_dict)
    for key, value in EXPECTED[kind].items():
        assert geometry[key] == value, key
    assert geometry["vocab_size"] == 49408 and geometry["context_length"] == 77
    assert geometry["patch_stride"] == EXPECTED[kind]["patch_size"]  # no overlap unless asked
    assert geometry["last_stride"] == (None if kind.startswith("vit") else 2)
    # the same geometry without the metadata entries: it comes from the tensors alone
    bare = {k: v for k, v in state_dict.items() if k not in clip.model.METADATA_KEYS}
    assert checkpoint_geometry(bare) == geometry


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_each_geometry_builds_and_encodes(kind, tiny_checkpoints):
    model, preprocess = clip.load(tiny_checkpoints[kind], device="cpu")
    expected = EXPECTED[kind]
    assert model.visual.input_size == expected["input_size"]
    assert model.visual.grid_size == expected["grid"]
    if kind.startswith("vit"):
        assert model.visual.patch_stride == model.visual.patch_size == expected["patch_size"]
        assert model.visual.transformer.resblocks[0].attn.heads == expected["vision_heads"]
    else:
        assert model.visual.attnpool.num_heads == expected["vision_heads"]
    images = torch.randn(2, 3, *expected["input_size"])
    text = clip.tokenize(["a photo of a hand", "a palm"])
    with torch.no_grad():
        image_features, text_features = model.encode_image(images), model.encode_text(text)
    assert image_features.shape == text_features.shape == (2, model.embed_dim)
    assert torch.isfinite(image_features).all() and torch.isfinite(text_features).all()
    # a non-square input of another size: the positional embedding is resized, not refused
    unit = expected["patch_size"] or 32
    other = (3 * unit, 2 * unit)
    resized, _ = clip.load(tiny_checkpoints[kind], device="cpu", input_size=other)
    with torch.no_grad():
        assert resized.encode_image(torch.randn(1, 3, *other)).shape == (1, model.embed_dim)


@pytest.mark.parametrize("kind", ["vit", "rn"])
@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_pos_embed_resize_matches_f_interpolate(kind, mode, tiny_checkpoints):
    state_dict = clip.clip.read_state_dict(tiny_checkpoints[kind])
    key = "visual.positional_embedding" if kind == "vit" else "visual.attnpool.positional_embedding"
    pos = state_dict[key].float()
    old, new = EXPECTED[kind]["grid"], (5, 3)
    grid = pos[1:].reshape(1, *old, -1).permute(0, 3, 1, 2)
    direct = F.interpolate(grid, size=new, mode=mode, align_corners=False).permute(0, 2, 3, 1).reshape(15, -1)
    expected = torch.cat([pos[:1], direct])
    assert torch.equal(resize_pos_embed(pos, new, old, mode=mode), expected)
    # what build_model puts into the model: bilinear unless asked otherwise
    input_size = (5 * 16, 3 * 16) if kind == "vit" else (5 * 32, 3 * 32)
    kwargs = {} if mode == "bilinear" else {"pos_interp": mode}
    model, _ = clip.load(tiny_checkpoints[kind], device="cpu", input_size=input_size, **kwargs)
    loaded = model.visual.positional_embedding if kind == "vit" else model.visual.attnpool.positional_embedding
    assert torch.equal(loaded.detach(), expected)


def test_bilinear_and_bicubic_differ_and_unknown_mode_is_refused():
    pos = torch.randn(1 + 4 * 4, 8)
    assert not torch.allclose(resize_pos_embed(pos, (6, 3)), resize_pos_embed(pos, (6, 3), mode="bicubic"))
    with pytest.raises(ValueError, match="bilinear"):
        resize_pos_embed(pos, (6, 3), mode="nearest")


def test_tokenizer_vocab_size_constant_matches_the_tokenizer():
    assert clip.model.TOKENIZER_VOCAB_SIZE == clip.clip._get_tokenizer().vocab_size == 49408


def test_small_vocabulary_is_a_clear_error_naming_both_sizes(tmp_path):
    path = clip.save_tiny_checkpoint(tmp_path / "small_vocab.pt", kind="vit", vocab_size=1000)
    model, _ = clip.load(path, device="cpu")
    assert checkpoint_geometry(clip.clip.read_state_dict(path))["vocab_size"] == 1000
    with pytest.raises(clip.TokenizerMismatchError, match=r"1000 tokens.*49408"):
        clip.check_tokenizer(model)
    text = clip.tokenize(["a photo of a hand"])  # its EOT id 49407 is beyond 1000 rows
    with pytest.raises(clip.TokenizerMismatchError, match=r"1000 tokens.*49408"):
        model.encode_text(text)
    full, _ = clip.load(clip.save_tiny_checkpoint(tmp_path / "full.pt", kind="vit"), device="cpu")
    clip.check_tokenizer(full)  # the matching vocabulary passes


def test_short_context_is_a_clear_error_naming_both_sizes(tmp_path):
    model, _ = clip.load(clip.save_tiny_checkpoint(tmp_path / "short.pt", kind="vit", context_length=8),
                         device="cpu")
    with pytest.raises(clip.TokenizerMismatchError, match=r"context length of 8.*77 positions"):
        clip.check_tokenizer(model, context_length=77)
    clip.check_tokenizer(model, context_length=8)
    long_text = clip.tokenize(["a photo of the back of a left hand with rings"])
    with pytest.raises(clip.TokenizerMismatchError, match=r"needs 13 token positions.*context length is 8"):
        model.encode_text(long_text)
    with torch.no_grad():
        assert model.encode_text(clip.tokenize(["a hand"])).shape == (1, model.embed_dim)
