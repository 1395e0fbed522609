"""Test-time preprocessing records (utils/preprocessing.py) and the protocols' use of them: CLIP's own
preprocess (shorter side + centre crop) equals torchvision's bit for bit on full-decoded JPEGs,
draft decoding is opt-in, and the zero-shot evaluator reads the images as its protocol says."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import clip
from utils import data, evaluation, preprocessing, protocols


def write_jpeg(path, size, seed=0):
    """A smooth random photo of size (W, H) with fine texture, saved as a JPEG (quality 90)."""
    rng = np.random.default_rng(seed)
    width, height = size
    coarse = rng.uniform(0, 255, (height // 40 + 2, width // 40 + 2, 3)).astype(np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize(size, Image.BICUBIC), dtype=np.float32)
    image += rng.normal(0, 12, image.shape)
    Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return str(path)


def torchvision_clip_preprocess(n):
    """CLIP's `preprocess` as openai/CLIP builds it from torchvision (the reference's zero-shot input)."""
    return T.Compose([T.Resize(n, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(n),
                      lambda image: image.convert("RGB"), T.ToTensor(), T.Normalize(clip.CLIP_MEAN, clip.CLIP_STD)])


@pytest.mark.parametrize("photo_size", [(400, 300), (300, 400), (333, 251), (224, 224)])
@pytest.mark.parametrize("n", [224, 64])
def test_crop_equals_torchvision_resize_and_centre_crop_bit_for_bit(tmp_path, photo_size, n):
    path = write_jpeg(tmp_path / "photo.jpg", photo_size)
    rec = preprocessing.record((n, n), "crop")
    assert rec["decode"] == "full" and rec["interpolation"] == "bicubic"
    ours = data.load_preprocessed(path, rec)
    with Image.open(path) as image:  # torchvision on the fully decoded photo
        reference = torchvision_clip_preprocess(n)(image.convert("RGB"))
    assert ours.shape == (3, n, n) and torch.equal(ours, reference)
    with Image.open(path) as image:  # and so our clip package's own preprocess
        assert torch.equal(ours, clip.clip._transform(n)(image))


def test_squash_keeps_the_whole_photo(tmp_path):
    path = write_jpeg(tmp_path / "photo.jpg", (400, 300))
    rec = preprocessing.record((64, 48), "squash")
    with Image.open(path) as image:
        reference = T.Compose([T.Resize((64, 48), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                               T.Normalize(clip.CLIP_MEAN, clip.CLIP_STD)])(image.convert("RGB"))
    assert torch.equal(data.load_preprocessed(path, rec), reference)


def test_full_decoding_is_the_default_and_draft_differs_slightly(tmp_path):
    path = write_jpeg(tmp_path / "big.jpg", (1600, 1200))
    full = np.asarray(data.load_image(path, (224, 224), decode="full"), dtype=np.int16)
    draft = np.asarray(data.load_image(path, (224, 224), decode="draft"), dtype=np.int16)
    assert np.array_equal(np.asarray(data.load_image(path, (224, 224)), dtype=np.int16), full)  # the default
    difference = np.abs(full - draft)
    assert 0 < difference.mean() < 3 and difference.max() > 0  # a few levels of 255 at most, on average


def test_resized_cache_is_keyed_by_the_decoding(tmp_path):
    paths = [write_jpeg(tmp_path / f"p{i}.jpg", (1600, 1200), seed=i) for i in range(2)]
    caches = {mode: data.ResizedImageCache(paths, (32, 32), str(tmp_path / "cache"), decode=mode)
              for mode in ("full", "draft")}
    assert caches["full"].file != caches["draft"].file and "_draft_" in caches["draft"].file
    for mode, cache in caches.items():
        assert np.array_equal(np.asarray(cache.image(1)), np.asarray(data.load_image(paths[1], (32, 32), decode=mode)))
    with pytest.raises(Exception, match="decoding"):
        data.LabeledImageDataset([(paths[0], 0), (paths[1], 1)], (32, 32), None, cache=caches["draft"])


def test_records_are_checked_and_described():
    rec = preprocessing.record((224, 224), "crop")
    assert preprocessing.describe(rec) == ("shorter side to 224, centre crop 224x224 (bicubic), CLIP mean/std, "
                                           "full JPEG decode")
    for bad in (dict(rec, resize="letterbox"), dict(rec, decode="fast"), dict(rec, size=[0, 224])):
        with pytest.raises(ValueError):
            preprocessing.check(bad)


# ---- the protocols' preprocessing -------------------------------------------------------------------

def test_each_protocol_names_its_test_time_preprocessing():
    zero_shot = {name: protocols.test_settings(name, None, input_size=(224, 224))["preprocessing"]
                 for name in protocols.PROTOCOLS}
    assert zero_shot["clip-handid"] == preprocessing.record((224, 224), "crop")  # CLIP's own preprocess
    assert zero_shot["clip-reid"]["resize"] == zero_shot["clip-fh"]["resize"] == "squash"
    assert all(rec["decode"] == "full" and rec["mean"] == list(clip.CLIP_MEAN) for rec in zero_shot.values())
    # a trained model: what it was trained with, whatever the protocol (runs before the record: squash)
    run = {"model": {"kind": "finetune", "backbone": {"input_size": [256, 128]}}}
    for name in protocols.PROTOCOLS:
        assert protocols.test_settings(name, run)["preprocessing"] == preprocessing.record((256, 128), "squash")
    recorded = dict(run, preprocessing=preprocessing.record((64, 64), "squash"))
    assert protocols.test_settings("clip-handid", recorded)["preprocessing"]["size"] == [64, 64]
    fast = protocols.test_settings("clip-fh", run, fast_decode=True)
    assert fast["preprocessing"]["decode"] == "draft" and "decode" in fast["explicit"]
    explicit = protocols.test_settings("clip-handid", None, resize="squash")
    assert explicit["preprocessing"]["resize"] == "squash" and explicit["explicit"] == ["resize"]
    with pytest.raises(ValueError, match="--resize"):
        protocols.test_settings("clip-handid", run, resize="crop")


def test_zero_shot_evaluator_follows_the_protocol_preprocessing(synthetic_11k, tiny_vit_checkpoint, tmp_path):
    import eval_query_gallery_clip_zeroshot as zero_shot
    test_dir = os.path.join(synthetic_11k, "train_val_test_split_dorsal_r")
    base = ["--test_dir", test_dir, "--backbone_name", tiny_vit_checkpoint, "--input_size", "32", "32",
            "--num_workers", "0", "--device", "cpu", "--gallery", "own"]
    results = zero_shot.main([*base, "--f_name", str(tmp_path / "handid")])
    assert results["preprocessing"] == preprocessing.record((32, 32), "crop")
    folder = os.path.join(str(tmp_path / "handid"), "clip_zero_shot", "tiny_vit", "dorsal_r")
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f)["preprocessing"] == results["preprocessing"]  # config.json records it too
    mat = evaluation.load_result_mat(os.path.join(folder, "result_split0.mat"))
    model, _ = clip.load(tiny_vit_checkpoint, device="cpu", input_size=(32, 32))
    with Image.open(mat["query_path"][0]) as image:
        x = torchvision_clip_preprocess(32)(image)[None]
    with torch.no_grad():  # the clip-handid feature: f(x) + f(mirror(x)), L2-normalised
        expected = torch.nn.functional.normalize(model.encode_image(x) + model.encode_image(x.flip(3)), dim=1)[0]
    np.testing.assert_allclose(mat["query_f"][0], expected.numpy(), rtol=1e-4, atol=1e-5)
    squashed = zero_shot.main([*base, "--f_name", str(tmp_path / "fh"), "--protocol", "clip-fh"])
    assert squashed["preprocessing"]["resize"] == "squash" and squashed["protocol"]["explicit"] == ["gallery"]
    draft = zero_shot.main([*base, "--f_name", str(tmp_path / "draft"), "--fast_decode"])
    assert draft["preprocessing"]["decode"] == "draft" and "decode" in draft["protocol"]["explicit"]


def test_zero_shot_input_size_defaults_to_the_backbones_own():
    # CLIP's preprocess resizes to the model's own resolution; the evaluators' default follows it
    assert clip.native_input_size("ViT-B/16") == clip.native_input_size("RN50") == (224, 224)
    assert clip.native_input_size("RN50x4") == (288, 288) and clip.native_input_size("ViT-L/14@336px") == (336, 336)
    assert clip.native_input_size("/some/local/checkpoint.pt") == (224, 224)
    import eval_query_gallery_clip_zeroshot as evaluator
    assert evaluator.parse_args(["--backbone_name", "RN50x16"]).input_size == [384, 384]
    assert evaluator.parse_args(["--backbone_name", "RN50x16", "--input_size", "224", "224"]).input_size == [224, 224]
