"""Tests of the clip/ package: parity with OpenAI's outputs, tokenizer, resizing, features, downloads."""
import hashlib
import io
import json
import os
import urllib.error
import warnings

import pytest
import torch
from PIL import Image

import clip
from clip import clip as clip_module
from clip.model import infer_config, resize_pos_embed

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
VECTORS_DIR = (os.path.join(os.environ["CLIPFH_VECTORS"], "clip") if os.environ.get("CLIPFH_VECTORS")
               else os.path.join(TESTS_DIR, "vectors", "clip"))
if not os.path.isfile(os.path.join(VECTORS_DIR, "expected.json")):
    raise FileNotFoundError(f"no expected.json in {VECTORS_DIR} (CLIPFH_VECTORS must point at a vectors root "
                            f"that holds clip/expected.json)")
with open(os.path.join(VECTORS_DIR, "expected.json")) as _f:
    CASES = json.load(_f)["cases"]
CASE_IDS = [case["name"] for case in CASES]
OUTPUT_NAMES = ("encode_image", "encode_text", "logits_per_image", "logits_per_text")
ATOL = 1e-5


def case_path(case, key):
    return os.path.join(VECTORS_DIR, case[key])


def load_expected(case):
    return torch.load(case_path(case, "expected"), map_location="cpu", weights_only=True)


_LOADED = {}


def load_case_model(case):
    """clip.load of a case's state dict, loaded once per test session (tests only read the model)."""
    if case["name"] not in _LOADED:
        _LOADED[case["name"]], _ = clip.load(case_path(case, "state_dict"), device="cpu")
    return _LOADED[case["name"]]


def model_outputs(model, images, tokens):
    with torch.no_grad():
        logits_per_image, logits_per_text = model(images, tokens)
        return {"encode_image": model.encode_image(images), "encode_text": model.encode_text(tokens),
                "logits_per_image": logits_per_image, "logits_per_text": logits_per_text}


def assert_outputs_match(outputs, expected):
    for name in OUTPUT_NAMES:
        assert outputs[name].shape == expected[name].shape, name
        diff = (outputs[name] - expected[name]).abs().max().item()
        assert diff <= ATOL, f"{name} differs by {diff}"


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def vit_model():
    return load_case_model(next(c for c in CASES if c["config"]["vision_patch_size"] is not None))


@pytest.fixture(scope="module")
def vit_state_dict():
    case = next(c for c in CASES if c["config"]["vision_patch_size"] is not None)
    return clip_module.read_state_dict(case_path(case, "state_dict"))


@pytest.fixture(scope="module")
def rn_state_dict():
    case = next(c for c in CASES if c["config"]["vision_patch_size"] is None)
    return clip_module.read_state_dict(case_path(case, "state_dict"))


# ---- parity with the reference outputs ------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_load_state_dict_parity(case):
    model = load_case_model(case)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    state_dict = clip_module.read_state_dict(case_path(case, "state_dict"))
    config = infer_config(state_dict)
    for key, value in case["config"].items():
        assert config[key] == (tuple(value) if isinstance(value, list) else value), key
    expected = load_expected(case)
    assert_outputs_match(model_outputs(model, expected["images"], expected["text_tokens"]), expected)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_torchscript_archive_parity(case, tmp_path):
    expected = load_expected(case)
    model = load_case_model(case)
    archive = tmp_path / "traced.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (expected["images"], expected["text_tokens"]), check_trace=False)
        torch.jit.save(traced, str(archive))
    assert clip_module.is_torchscript_archive(str(archive))
    loaded, _ = clip.load(str(archive), device="cpu")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert_outputs_match(model_outputs(loaded, expected["images"], expected["text_tokens"]), expected)


def test_plain_state_dict_is_not_read_with_torch_jit(monkeypatch, tmp_path):
    path = clip.save_tiny_checkpoint(tmp_path / "plain.pt", kind="vit")
    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit.load called for a plain state dict")
    monkeypatch.setattr(torch.jit, "load", refuse)
    assert not clip_module.is_torchscript_archive(str(path))
    model, _ = clip.load(str(path), device="cpu")
    assert model.visual.output_dim == clip_module.tiny_config("vit")["embed_dim"]


def test_jit_true_and_unknown_name_are_clear_errors(tmp_path):
    with pytest.raises(NotImplementedError, match="jit=True"):
        clip.load(case_path(CASES[0], "state_dict"), device="cpu", jit=True)
    with pytest.raises(RuntimeError, match="not found"):
        clip.load(str(tmp_path / "missing.pt"), device="cpu")
    bad = tmp_path / "not_a_checkpoint.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="not_a_checkpoint.pt"):
        clip.load(str(bad), device="cpu")


def test_available_models_and_urls():
    assert clip.available_models() == ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B/32", "ViT-B/16",
                                       "ViT-L/14", "ViT-L/14@336px"]
    url = clip_module._MODELS["ViT-B/16"]
    assert url == ("https://openaipublic.azureedge.net/clip/models/"
                   "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt")
    assert set(clip.MODEL_CONFIGS) == set(clip.available_models())


# ---- tokenizer ---------------------------------------------------------------------------------------

def test_tokenizer_cases():
    with open(os.path.join(VECTORS_DIR, "tokenizer.json")) as f:
        spec = json.load(f)
    context_length = spec["context_length"]
    tokenizer = clip_module._get_tokenizer()
    for case in spec["cases"]:
        too_long = len(tokenizer.encode(case["text"])) + 2 > context_length
        tokens = clip.tokenize(case["text"], context_length=context_length, truncate=too_long)
        assert tokens.dtype == torch.long and tokens.shape == (1, context_length)
        assert tokens[0].tolist() == case["tokens"], case["text"]
        if too_long:
            with pytest.raises(RuntimeError, match="too long"):
                clip.tokenize(case["text"], context_length=context_length)
    if spec.get("too_long_without_truncate_raises"):
        with pytest.raises(RuntimeError, match="too long for context length"):
            clip.tokenize(spec["too_long_text"], context_length=context_length)
    batch = clip.tokenize([c["text"] for c in spec["cases"]], context_length=context_length, truncate=True)
    assert batch.tolist() == [c["tokens"] for c in spec["cases"]]


# ---- input sizes, overlapping patches, last stride ----------------------------------------------------

def test_resize_pos_embed_is_a_2d_grid_resize():
    pos = torch.randn(1 + 4 * 4, 8)
    assert torch.equal(resize_pos_embed(pos, (4, 4)), pos)
    rows = torch.arange(4.0).repeat_interleave(4)  # value depends on the row only
    ramp = torch.cat([torch.full((1, 3), -1.0), rows[:, None].expand(16, 3)])
    resized = resize_pos_embed(ramp, (6, 3), mode="bilinear")
    assert resized.shape == (1 + 6 * 3, 3)
    grid = resized[1:].reshape(6, 3, 3)
    assert torch.equal(resized[0], ramp[0])  # class row kept
    assert torch.allclose(grid, grid[:, :1].expand_as(grid))  # rows stay constant along a row
    assert (grid[1:, 0, 0] > grid[:-1, 0, 0]).all()  # and increase downwards


def test_vit_input_size_and_overlapping_stride(vit_state_dict, vit_model):
    patch = vit_model.visual.patch_size
    native = vit_model.visual.input_size
    same = clip.build_model(vit_state_dict, input_size=native)
    assert torch.equal(same.visual.positional_embedding, vit_model.visual.positional_embedding)

    height, width = 2 * native[0], native[1]  # non-square
    tall = clip.build_model(vit_state_dict, input_size=(height, width))
    grid = ((height - patch) // patch + 1, (width - patch) // patch + 1)
    assert tall.visual.grid_size == grid
    assert tall.visual.positional_embedding.shape[0] == 1 + grid[0] * grid[1]
    feats = tall.visual.forward_features(torch.randn(2, 3, height, width))
    assert feats["tokens"].shape == (2, 1 + grid[0] * grid[1], vit_model.visual.feature_dims["pre_proj"])

    stride = patch // 2
    overlap = clip.build_model(vit_state_dict, patch_stride=stride)
    grid = ((native[0] - patch) // stride + 1, (native[1] - patch) // stride + 1)
    assert overlap.visual.conv1.stride == (stride, stride) and overlap.visual.grid_size == grid
    assert overlap.encode_image(torch.randn(2, 3, *native)).shape == (2, vit_model.embed_dim)
    assert overlap.visual.forward_features(torch.randn(1, 3, *native))["tokens"].shape[1] == 1 + grid[0] * grid[1]

    with pytest.raises(ValueError, match="input size"):
        vit_model.encode_image(torch.randn(1, 3, height, width))
    with pytest.raises(ValueError, match="ResNet"):
        clip.build_model(vit_state_dict, last_stride=1)


def test_resnet_input_size_and_last_stride(rn_state_dict):
    base = clip.build_model(rn_state_dict)
    side = base.visual.input_size[0]
    assert base.visual.grid_size == (side // 32, side // 32)
    pos = base.visual.attnpool.positional_embedding
    assert torch.equal(pos, rn_state_dict["visual.attnpool.positional_embedding"].float())

    stride1 = clip.build_model(rn_state_dict, last_stride=1)
    assert stride1.visual.grid_size == (side // 16, side // 16)
    feats = stride1.visual.forward_features(torch.randn(2, 3, side, side))
    assert feats["tokens"].shape == (2, 1 + (side // 16) ** 2, base.visual.feature_dims["pre_proj"])
    assert feats["proj"].shape == (2, base.embed_dim)

    wide = clip.build_model(rn_state_dict, input_size=(side + 32, side))
    assert wide.visual.grid_size == ((side + 32) // 32, side // 32)
    assert wide.encode_image(torch.randn(1, 3, side + 32, side)).shape == (1, base.embed_dim)
    with pytest.raises(ValueError, match="ViT"):
        clip.build_model(rn_state_dict, patch_stride=8)


def test_checkpoint_state_dict_round_trips_sizes_and_strides(vit_state_dict, rn_state_dict, tmp_path):
    variants = [(vit_state_dict, dict(input_size=(64, 32), patch_stride=8)),
                (rn_state_dict, dict(input_size=(96, 64), last_stride=1))]
    for index, (state_dict, kwargs) in enumerate(variants):
        model = clip.build_model(state_dict, **kwargs)
        path = tmp_path / f"finetuned{index}.pt"
        torch.save(model.checkpoint_state_dict(), path)
        loaded, preprocess = clip.load(str(path), device="cpu")  # no size arguments needed
        assert loaded.visual.input_size == kwargs["input_size"]
        assert loaded.visual.grid_size == model.visual.grid_size
        images = torch.randn(2, 3, *kwargs["input_size"])
        with torch.no_grad():
            assert torch.equal(loaded.encode_image(images), model.encode_image(images))
        assert preprocess(Image.new("RGB", (50, 70))).shape == (3, *kwargs["input_size"])
        resized = clip.build_model(torch.load(path, weights_only=True), input_size=64)  # non-square grid -> square
        assert resized.encode_image(torch.randn(1, 3, 64, 64)).shape == (1, model.embed_dim)


# ---- intermediate features -------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_features(case):
    model = load_case_model(case)
    images = load_expected(case)["images"]
    visual = model.visual
    with torch.no_grad():
        feats = visual.forward_features(images)
        image_features = model.encode_image(images)
    first = "penultimate" if "penultimate" in visual.feature_dims else "layer3"
    assert set(feats) == {first, "pre_proj", "proj", "tokens"}
    for name, dim in visual.feature_dims.items():
        assert feats[name].shape == (len(images), dim), name
    assert torch.allclose(feats["proj"], image_features, atol=1e-6)
    assert torch.equal(feats["pre_proj"], feats["tokens"][:, 0])
    grid = visual.grid_size
    assert feats["tokens"].shape == (len(images), 1 + grid[0] * grid[1], visual.feature_dims["pre_proj"])
    with torch.no_grad():
        if first == "penultimate":
            x = visual.embed(images)
            for block in visual.transformer.resblocks[:-1]:
                x = block(x)
            assert torch.allclose(feats["penultimate"], x[:, 0], atol=1e-6)
            assert torch.allclose(feats["pre_proj"] @ visual.proj, feats["proj"], atol=1e-6)
        else:
            x3 = visual.layer3(visual.layer2(visual.layer1(visual.stem(images))))
            assert torch.allclose(feats["layer3"], x3.mean(dim=(2, 3)), atol=1e-6)
            assert torch.allclose(feats["pre_proj"], visual.layer4(x3).mean(dim=(2, 3)), atol=1e-6)


# ---- text tower -----------------------------------------------------------------------------------------------

def full_length_text_features(model, tokens):
    """The text tower as OpenAI runs it: all context_length positions, then pooling at EOT."""
    x = model.token_embedding(tokens) + model.positional_embedding[:tokens.shape[1]]
    x = model.ln_final(model.transformer(x))
    return x[torch.arange(len(tokens)), tokens.argmax(dim=-1)] @ model.text_projection


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_truncated_text_tower_equals_full_length(case):
    model = load_case_model(case)
    tokens = load_expected(case)["text_tokens"]
    short = tokens[tokens.argmax(-1) < 20]  # all rows end early: the tower runs on < 77 positions
    with torch.no_grad():
        for batch in (tokens, short):
            full = full_length_text_features(model, batch)
            assert torch.allclose(model.encode_text(batch), full, atol=1e-5)
        embeds = model.token_embedding(tokens)
        via_embeddings = model.encode_text_embeddings(embeds, tokens.argmax(-1))
    assert torch.allclose(via_embeddings, model.encode_text(tokens), atol=1e-6)


def test_encode_text_embeddings_gradients_reach_embeddings(vit_state_dict):
    model = clip.build_model(vit_state_dict)
    tokens = torch.tensor([[5, 6, 7, 999, 0, 0], [5, 999, 0, 0, 0, 0]])
    embeds = model.token_embedding(tokens).detach().requires_grad_(True)
    model.encode_text_embeddings(embeds, tokens.argmax(-1)).sum().backward()
    assert embeds.grad[0, :4].abs().sum() > 0
    assert embeds.grad[:, 4:].abs().sum() == 0  # causal: positions after EOT never matter


# ---- random weights and tiny checkpoints -----------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_random_state_dict_matches_layout(case):
    reference = clip_module.read_state_dict(case_path(case, "state_dict"))
    state_dict = clip.random_state_dict(case["config"], seed=1)
    assert {k: tuple(v.shape) for k, v in state_dict.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    conv = state_dict["visual.conv1.weight"]
    assert torch.equal(conv, clip.random_state_dict(case["config"], seed=1)["visual.conv1.weight"])
    assert not torch.equal(conv, clip.random_state_dict(case["config"], seed=2)["visual.conv1.weight"])
    model = clip.build_model(state_dict)
    assert infer_config(state_dict)["embed_dim"] == case["config"]["embed_dim"]
    assert model.encode_text(torch.tensor([[998, 5, 999]])).isfinite().all()


@pytest.mark.parametrize("name", clip.available_models())
def test_official_config_table_round_trips(name):
    with torch.device("meta"):  # shapes only, no memory
        model = clip.model.CLIP(**clip.MODEL_CONFIGS[name])
    config = infer_config(model.state_dict())
    assert {k: config[k] for k in clip.MODEL_CONFIGS[name]} == clip.MODEL_CONFIGS[name]
    visual_params = sum(p.numel() for p in model.visual.parameters())
    total_params = sum(p.numel() for p in model.parameters())
    published = {"ViT-B/16": (86_192_640, 149_620_737), "RN50": (38_316_896, 102_007_137)}
    if name in published:
        assert (visual_params, total_params) == published[name]


@pytest.mark.parametrize("kind", ["vit", "rn"])
def test_save_tiny_checkpoint(kind, tmp_path):
    path = clip.save_tiny_checkpoint(tmp_path / f"tiny_{kind}.pt", kind=kind, seed=0)
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    assert all(v.dtype == torch.float16 for v in state_dict.values() if v.is_floating_point())
    assert int(state_dict["vocab_size"]) == 49408 and int(state_dict["context_length"]) == 77
    model, preprocess = clip.load(str(path), device="cpu")
    resolution = int(state_dict["input_resolution"])
    assert model.visual.input_size == (resolution, resolution)
    image = preprocess(Image.new("RGB", (2 * resolution + 7, resolution + 3), (200, 120, 90)))
    assert image.shape == (3, resolution, resolution)
    with torch.no_grad():
        logits, _ = model(image[None], clip.tokenize(["a photo of a hand", "a dorsal right hand"]))
    assert logits.shape == (1, 2) and logits.isfinite().all()
    assert [p for p in tmp_path.iterdir()] == [tmp_path / f"tiny_{kind}.pt"]  # no temp file left


def test_preprocess_non_square_input_size(tmp_path):
    path = clip.save_tiny_checkpoint(tmp_path / "tiny.pt", kind="vit", image_resolution=32)
    model, preprocess = clip.load(str(path), device="cpu", input_size=(48, 32))
    image = Image.new("RGB", (300, 200), (10, 20, 30))
    tensor = preprocess(image)
    assert tensor.shape == (3, 48, 32)
    mean = torch.tensor(clip.CLIP_MEAN)[:, None, None]
    std = torch.tensor(clip.CLIP_STD)[:, None, None]
    expected_pixel = (torch.tensor([10, 20, 30.0])[:, None, None] / 255 - mean) / std
    assert torch.allclose(tensor[:, 5:6, 5:6], expected_pixel, atol=1e-5)
    assert model.encode_image(tensor[None]).shape == (1, model.embed_dim)


# ---- downloads (offline: file:// URLs and a patched urlopen) -------------------------------------------------

def _file_url(tmp_path, content, folder=None):
    folder = folder or hashlib.sha256(content).hexdigest()
    source = tmp_path / "server" / folder
    source.mkdir(parents=True)
    (source / "model.pt").write_bytes(content)
    return (source / "model.pt").as_uri()


def test_download_verifies_and_caches(tmp_path):
    content = b"pretend weights" * 1000
    root = tmp_path / "cache"
    path = clip_module._download(_file_url(tmp_path, content), str(root))
    assert path == str(root / "model.pt") and open(path, "rb").read() == content
    assert sorted(os.listdir(root)) == ["model.pt"]
    assert clip_module._download(_file_url(tmp_path / "again", content), str(root)) == path


def test_download_sha_mismatch_leaves_no_file(tmp_path):
    root = tmp_path / "cache"
    url = _file_url(tmp_path, b"tampered", folder="0" * 64)
    with pytest.raises(RuntimeError, match="SHA-256") as err:
        clip_module._download(url, str(root))
    assert str(root / "model.pt") in str(err.value)
    assert os.listdir(root) == []


def test_cached_corrupt_file_is_detected_and_replaced(tmp_path):
    content = b"good weights"
    root = tmp_path / "cache"
    root.mkdir()
    (root / "model.pt").write_bytes(b"corrupt")
    with pytest.warns(UserWarning, match="SHA-256"):
        path = clip_module._download(_file_url(tmp_path, content), str(root))
    assert open(path, "rb").read() == content

    (root / "model.pt").write_bytes(b"corrupt again")
    unreachable = (tmp_path / "nowhere" / hashlib.sha256(content).hexdigest() / "model.pt").as_uri()
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="corrupt"):
        clip_module._download(unreachable, str(root))
    assert os.listdir(root) == []  # the corrupt copy can never be used later


def test_interrupted_download_leaves_no_file(tmp_path, monkeypatch):
    class BrokenStream(io.BytesIO):
        headers = {"Content-Length": "100000"}

        def read(self, size=-1):
            if self.tell() > 10:
                raise ConnectionResetError("connection reset")
            return super().read(8)

    monkeypatch.setattr(clip_module.urllib.request, "urlopen", lambda url, timeout=None: BrokenStream(b"x" * 100))
    root = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="interrupted"):
        clip_module._download("https://example.invalid/" + "a" * 64 + "/model.pt", str(root))
    assert os.listdir(root) == []


def test_no_network_error_names_path_and_sha(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(clip_module.urllib.request, "urlopen", offline)
    with pytest.raises(clip.ModelDownloadError) as err:
        clip.load("ViT-B/16", device="cpu", download_root=str(tmp_path))
    message = str(err.value)
    assert os.path.join(str(tmp_path), "ViT-B-16.pt") in message
    assert "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f" in message
    assert "local" in message and "path" in message
    assert os.listdir(tmp_path) == []
