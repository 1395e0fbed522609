"""utils/corruptions.py: every family changes the image and harms it more at each severity, severity
0 is the identity, the degraded pixels depend only on (seed, identity, family, severity), and the
hand estimate the occluders are measured against."""
import numpy as np
import pytest
import torch
from PIL import Image

from utils import corruptions, data, preprocessing, splits

pytestmark = pytest.mark.usefixtures("single_torch_thread")
SIZE = (96, 96)  # Gaussian blur at severity 1 (sigma 1 px at 224) is below half a level at 64 px


@pytest.fixture(scope="module")
def hands(hand_data):
    """Six synthetic hands of the shared split root at 96 x 96, as the model would see them (uint8
    (6, 96, 96, 3)), and their manifest names."""
    entries = splits.read_split_sets(hand_data, ["gallery0"])["gallery0"][:6]
    images = [np.array(data.load_image(path, SIZE)) for path, _, _ in entries]
    return torch.from_numpy(np.stack(images)), [key for _, _, key in entries]


def psnr(degraded, clean):
    mse = ((degraded.double() - clean.double()) ** 2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(255.0 ** 2 / mse)


def test_the_parameter_table_is_complete():
    assert len(corruptions.FAMILIES) == 10
    for family, spec in corruptions.SEVERITIES.items():
        assert len(spec.values) == corruptions.MAX_SEVERITY and spec.label and spec.parameter
        assert corruptions.describe(family, 0) == "clean" and corruptions.describe(family, 3)


def test_severity_zero_is_the_clean_image(hands):
    images, names = hands
    for family in corruptions.FAMILIES:
        assert torch.equal(corruptions.corrupt(images, family, 0, names), images)


@pytest.mark.parametrize("family", corruptions.FAMILIES)
def test_each_family_changes_the_image_more_at_each_severity(hands, family):
    images, names = hands
    outs = [corruptions.corrupt(images, family, s, names, seed=0) for s in range(1, 6)]
    for out in outs:
        assert out.dtype == torch.uint8 and out.shape == images.shape
        assert (out != images).any(dim=(1, 2, 3)).all()  # every image changed
    quality = torch.stack([psnr(out, images) for out in outs], dim=1)  # (images, severities)
    # PSNR against the clean image falls at every step, for every image
    assert (quality[:, 1:] < quality[:, :-1]).all(), quality
    assert quality[:, -1].mean() < 35


def test_occluders_cover_the_share_of_the_hand_the_table_gives(hands):
    images, names = hands
    mask, found = corruptions.hand_mask(images)
    assert found.all()
    for severity, share in enumerate(corruptions.SEVERITIES["occlusion"].values, start=1):
        out = corruptions.corrupt(images, "occlusion", severity, names)
        grey = (out == corruptions.OCCLUDER_GREY).all(dim=-1) & (images != corruptions.OCCLUDER_GREY).any(dim=-1)
        covered = (grey & mask).sum(dim=(1, 2)).double() / mask.sum(dim=(1, 2))
        assert ((covered >= share - 0.01) & (covered <= share + 0.06)).all(), (share, covered)


def test_the_same_seed_gives_the_same_images_in_any_batch(hands):
    images, names = hands
    order = [4, 1, 5]
    for family in corruptions.FAMILIES:
        whole = corruptions.corrupt(images, family, 3, names, seed=7)
        assert torch.equal(corruptions.corrupt(images, family, 3, names, seed=7), whole)
        part = corruptions.corrupt(images[order], family, 3, [names[i] for i in order], seed=7)
        assert torch.equal(part, whole[order]), family  # batch composition and order do not matter
        alone = corruptions.corrupt(images[2:3], family, 3, names[2:3], seed=7)
        assert torch.equal(alone, whole[2:3]), family
    # the random families draw from (seed, identity): another seed or name, other pixels
    for family in ("gaussian_noise", "motion_blur", "occlusion", "colour_cast"):
        base = corruptions.corrupt(images[:1], family, 4, names[:1], seed=7)
        assert not torch.equal(corruptions.corrupt(images[:1], family, 4, names[:1], seed=8), base)
        assert not torch.equal(corruptions.corrupt(images[:1], family, 4, ["another name"], seed=7), base)


def test_to_model_input_equals_torchvision_to_tensor_and_normalize(hands):
    images, _ = hands
    rec = preprocessing.record(SIZE)
    expected = torch.stack([preprocessing.transform(rec)(Image.fromarray(image.numpy())) for image in images])
    assert torch.equal(corruptions.to_model_input(images, rec["mean"], rec["std"]), expected)


def test_hand_mask_on_a_drawn_shape_and_on_a_blank_image():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    background = 200 + 20 * (xx / 63)[..., None] + rng.normal(0, 3, (64, 64, 3))  # a gentle gradient and noise
    shape = ((yy - 40) / 22) ** 2 + ((xx - 30) / 12) ** 2 <= 1
    image = np.where(shape[..., None], np.array([170, 120, 95]), background)
    blank = background
    images = torch.from_numpy(np.clip(np.stack([image, blank]), 0, 255).astype(np.uint8))
    mask, found = corruptions.hand_mask(images)
    assert found.tolist() == [True, False]
    intersection = (mask[0].numpy() & shape).sum()
    assert intersection / (mask[0].numpy() | shape).sum() > 0.9
    assert mask[1].all()  # no foreground: the whole image counts


def test_rotation_fills_corners_with_the_background(hands):
    images, names = hands
    out = corruptions.corrupt(images, "rotation", 5, names)
    background = corruptions.background_colour(images)
    corner = out[:, 0, 0].float()
    assert (corner - background).abs().max() <= 2


def test_bad_arguments(hands):
    images, names = hands
    with pytest.raises(ValueError, match="unknown corruption family"):
        corruptions.corrupt(images, "fog", 1, names)
    with pytest.raises(ValueError, match="severity"):
        corruptions.corrupt(images, "jpeg", 6, names)
    with pytest.raises(ValueError, match="uint8"):
        corruptions.corrupt(images.float(), "jpeg", 1, names)
    with pytest.raises(ValueError, match="identities"):
        corruptions.corrupt(images, "jpeg", 1, names[:2])


def test_degraded_images_decode_through_the_preprocessing_record(tmp_path, hands):
    """The script's uint8 path (load_image + to_model_input) gives the same tensor as the
    evaluators' load_preprocessed for the same record."""
    images, _ = hands
    path = tmp_path / "hand.jpg"
    Image.fromarray(images[0].numpy()).resize((60, 80)).save(path, quality=95)
    rec = preprocessing.record(SIZE, decode="draft")
    pixels = torch.from_numpy(np.array(data.load_image(path, rec["size"], rec["resize"], rec["decode"],
                                                       rec["interpolation"])))[None]
    assert torch.equal(corruptions.to_model_input(pixels, rec["mean"], rec["std"])[0], data.load_preprocessed(path, rec))


def test_the_readme_table_mirrors_the_module():
    import os
    import re
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    found = {}
    for line in readme.splitlines():
        match = re.match(r"\| `(\w+)` \| [^|]+ \| [^|]+ \|((?: [0-9.]+ \|){5})$", line)
        if match and match.group(1) in corruptions.SEVERITIES:
            found[match.group(1)] = tuple(float(v) for v in match.group(2).strip(" |").split(" | "))
    assert found == {family: tuple(float(v) for v in spec.values) for family, spec in corruptions.SEVERITIES.items()}
