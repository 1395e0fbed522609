"""Procedurally drawn synthetic hands in 11k, HD and identity-folder layout, for tests and the demo."""
import csv
import io
import os
import shutil

import numpy as np
from PIL import Image, ImageDraw

from .io import atomic_write_json, atomic_write_text
from .splits import (ASPECTS_11K, HAND_INFO_COLUMNS, HD_DISTRACTOR_FOLDER, HD_IMAGE_DIR, HD_LAST_TRAIN_ID,
                     HD_SUBJECT_FOLDER, LAST_TRAIN_ID_11K)


SKIN_TONES = {"very fair": (236, 200, 178), "fair": (222, 176, 146), "medium": (190, 140, 106),
              "dark": (122, 84, 60)}


SYNTHETIC_MARKER = "SYNTHETIC_DATA.json"
PART_MASK_DIR = "Hands_parts"


def _random_person(rng):
    # skin colour: a point on the very fair -> dark line of SKIN_TONES, plus a little hue noise
    tone = float(np.clip(rng.normal(1.4, 0.9), 0, 3))
    anchors = np.array(list(SKIN_TONES.values()), float)
    lower = min(int(tone), 2)
    skin = anchors[lower] + (tone - lower) * (anchors[lower + 1] - anchors[lower])
    polish = rng.random() < 0.2
    return {
        "tone_name": list(SKIN_TONES)[int(round(tone))],
        "skin": skin * rng.uniform(0.95, 1.05) + rng.normal(0, 4, 3),
        "palm_w": rng.uniform(0.9, 1.1),
        "palm_h": rng.uniform(0.95, 1.3),
        "palm_taper": rng.uniform(-0.12, 0.12),
        "finger_len": np.array([0.92, 1.02, 0.96, 0.74]) * rng.uniform(0.8, 1.15) * rng.uniform(0.9, 1.1, 4),
        "finger_w": rng.uniform(0.17, 0.24) * rng.uniform(0.9, 1.1, 4),
        "finger_gap": rng.uniform(0.8, 1.05),
        "thumb_len": rng.uniform(0.55, 0.8),
        "thumb_w": rng.uniform(0.22, 0.3),
        "thumb_angle": rng.uniform(30, 60),
        "thumb_pos": rng.uniform(-0.3, 0.05),
        "nail_color": (np.array([200, 40, 70]) + rng.normal(0, 40, 3)) if polish else None,
        "nail_len": rng.uniform(0.2, 0.38),
        "crease_dark": rng.uniform(0.72, 0.88),
        "palm_lines": rng.uniform(-1, 1, 8),
        "age": int(rng.integers(18, 76)),
        "gender": "female" if rng.random() < 0.6 else "male",
        "polish": int(polish),
    }


def _random_hand_side(rng):
    """What differs between a person's left and right hand, and between its back and palm."""
    ring = None
    if rng.random() < 0.35:
        metal = [(212, 175, 55), (196, 196, 206), (60, 60, 70)][rng.integers(3)]  # gold, silver, black
        ring = (int(rng.integers(4)), np.array(metal, float))
    return {"len_jitter": rng.uniform(0.96, 1.04, 4), "ring": ring,
            "moles": [(rng.uniform(-0.4, 0.4), rng.uniform(-0.4, 0.4), rng.uniform(0.025, 0.045))
                      for _ in range(int(rng.integers(0, 4)))]}


def _capsule(base, angle, length, width, tip_ratio=0.85, n_tip=7):
    """Polygon of a rounded finger starting at `base`, pointing `angle` radians from +y."""
    d = np.array([np.sin(angle), np.cos(angle)])
    n = np.array([d[1], -d[0]])
    r0, r1 = width / 2, width * tip_ratio / 2
    tip = base + d * (length - r1)
    t = np.linspace(0, np.pi, n_tip)[:, None]
    arc = tip + r1 * (np.cos(t) * n + np.sin(t) * d)
    return np.concatenate([[base + r0 * n], arc, [base - r0 * n]])


def _ellipse(center, rx, ry, angle=0.0, n=12):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    pts = np.stack([rx * np.cos(t), ry * np.sin(t)], 1)
    c, s = np.cos(angle), np.sin(angle)
    return pts @ np.array([[c, s], [-s, c]]) + center


def _bezier(p0, p1, p2, n=10):
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2


def _draw_hand(draw, person, side, aspect, rng, to_pixels, line_px, accessory, parts=None):
    """Draw one hand with ImageDraw `draw`; `to_pixels` maps local (N,2) points to pixel (N,2).
    `parts`: an optional ImageDraw of a mode "L" canvas on which the identity's distinguishing parts
    (see render_synthetic_hand) are drawn in 255; it uses no random numbers."""
    palmar = aspect.startswith("palmar")
    # Thumb on the image-left for the back of a right hand and the palm of a left hand.
    mirror = 1.0 if aspect in ("dorsal right", "palmar left") else -1.0
    skin = person["skin"] * (np.array([1.06, 1.0, 0.98]) if palmar else 1.0)
    fill = tuple(int(v) for v in np.clip(skin, 0, 255))
    edge = tuple(int(v) for v in np.clip(skin * 0.75, 0, 255))
    crease = tuple(int(v) for v in np.clip(skin * person["crease_dark"], 0, 255))

    def poly(points, color, outline=None, part=None):
        pts = [tuple(p) for p in to_pixels(np.asarray(points) * np.array([mirror, 1.0]))]
        draw.polygon(pts, fill=color, outline=outline)
        if parts is not None and part == "area":
            parts.polygon(pts, fill=255)
        elif parts is not None and part == "outline":  # finger shape: a band along the contour
            parts.line(pts + pts[:1], fill=255, width=max(1, int(round(2 * line_px))))

    def line(points, color, width=1, part=None):
        pts = [tuple(p) for p in to_pixels(np.asarray(points) * np.array([mirror, 1.0]))]
        draw.line(pts, fill=color, width=max(1, int(round(width * line_px))))
        if parts is not None and part:
            parts.line(pts, fill=255, width=max(1, int(round(width * line_px))))

    pw, ph = person["palm_w"], person["palm_h"]
    top, bottom = ph / 2, -ph / 2
    taper = person["palm_taper"]
    # wrist and forearm run off the bottom of the image
    poly([(-0.42 * pw, bottom + 0.1), (0.42 * pw, bottom + 0.1), (0.4 * pw, bottom - 2.5),
          (-0.4 * pw, bottom - 2.5)], fill)
    if accessory:  # a watch band on the wrist (rows with accessories == 1)
        poly([(-0.45 * pw, bottom - 0.25), (0.45 * pw, bottom - 0.25), (0.45 * pw, bottom - 0.45),
              (-0.45 * pw, bottom - 0.45)], (40, 40, 48))
    palm = [(-0.5 * pw * (1 - taper), top), (0.5 * pw * (1 + taper), top), (0.52 * pw, 0.0),
            (0.47 * pw, bottom), (-0.47 * pw, bottom), (-0.53 * pw, 0.0)]
    poly(palm, fill, edge)
    # fingers: index (thumb side, x < 0 before mirroring) to little
    spread = rng.normal(0, 0.06, 4) + rng.uniform(0.0, 0.12) * np.array([-1.5, -0.5, 0.5, 1.5])
    lengths = person["finger_len"] * side["len_jitter"]
    xs = np.array([-0.36, -0.12, 0.12, 0.35]) * pw * person["finger_gap"]
    tips = []
    for k in range(4):
        base = np.array([xs[k], top - 0.12 * (k == 3) - 0.05])
        width, length = person["finger_w"][k], lengths[k]
        poly(_capsule(base, spread[k], length, width), fill, edge, part="outline")
        d = np.array([np.sin(spread[k]), np.cos(spread[k])])
        nrm = np.array([d[1], -d[0]])
        for frac in ((0.38, 0.7) if palmar else (0.45, 0.72)):
            c = base + d * length * frac
            line([c - nrm * width * 0.35, c + nrm * width * 0.35], crease, 1)
        tips.append((base, d, nrm, width, length))
    thumb_angle = -np.deg2rad(person["thumb_angle"] + rng.normal(0, 6))
    thumb_base = np.array([-0.45 * pw, person["thumb_pos"] * ph])
    poly(_capsule(thumb_base, thumb_angle, person["thumb_len"] + 0.25, person["thumb_w"]), fill, edge,
         part="outline")
    td = np.array([np.sin(thumb_angle), np.cos(thumb_angle)])
    tips.append((thumb_base, td, np.array([td[1], -td[0]]), person["thumb_w"], person["thumb_len"] + 0.25))

    if palmar:
        a = person["palm_lines"]
        heart = _bezier(np.array([0.5 * pw, 0.22 * ph]), np.array([0.1 * pw, (0.32 + 0.1 * a[0]) * ph]),
                        np.array([(-0.2 + 0.1 * a[1]) * pw, (0.38 + 0.06 * a[2]) * ph]))
        head = _bezier(np.array([-0.5 * pw, 0.12 * ph]), np.array([0.0, (0.1 + 0.1 * a[3]) * ph]),
                       np.array([(0.35 + 0.1 * a[4]) * pw, (-0.05 + 0.12 * a[5]) * ph]))
        life = _bezier(np.array([-0.48 * pw, 0.1 * ph]), np.array([(-0.15 + 0.1 * a[6]) * pw, -0.05 * ph]),
                       np.array([(-0.2 + 0.1 * a[7]) * pw, -0.5 * ph]))
        for curve in (heart, head, life):
            line(curve, crease, 1.5, part=True)
    else:
        nail_color = person["nail_color"]
        if nail_color is None:  # unpolished: a little pinker and lighter than the skin
            nail_color = skin * np.array([1.08, 0.95, 0.95]) + 12
        nail_fill = tuple(int(v) for v in np.clip(nail_color, 0, 255))
        for base, d, nrm, width, length in tips:
            nail_len = person["nail_len"] * length * 0.6
            center = base + d * (length - nail_len / 2 - 0.02)
            poly(_ellipse(center, width * 0.32, nail_len / 2, np.arctan2(d[0], d[1])), nail_fill, edge,
                 part="area")
        for x, y, r in side["moles"]:
            poly(_ellipse(np.array([x * pw, y * ph]), r, r, 0, 8), tuple(int(v) for v in skin * 0.45),
                 part="area")
        for base, d, nrm, width, _ in tips[:4]:  # knuckle folds just below each finger
            line([base - nrm * width * 0.3 - d * 0.04, base + nrm * width * 0.3 - d * 0.04], crease, 1)
    if side["ring"] is not None:
        k, color = side["ring"]
        base, d, nrm, width, length = tips[k]
        c = base + d * length * 0.2
        band = [c - nrm * width * 0.56, c + nrm * width * 0.56, c + nrm * width * 0.56 + d * 0.08,
                c - nrm * width * 0.56 + d * 0.08]
        poly(band, tuple(int(v) for v in color), (30, 30, 30), part="area")


def render_synthetic_hand(person, side, aspect, rng, image_size=(160, 120), accessory=False, supersample=2,
                          with_parts=False):
    """One synthetic hand photo (PIL RGB image of size image_size=(W, H)) with random pose and lighting.
    with_parts=True returns (photo, mask): a mode "L" image, 255 on the parts that tell identities
    apart (nails, rings, moles, palm lines and a band along each finger's and the thumb's contour,
    i.e. finger shape), 0 elsewhere. The photo is the same either way (the mask draws no random numbers)."""
    W, H = image_size
    w2, h2 = W * supersample, H * supersample
    base_bg = rng.uniform(195, 245) + rng.normal(0, 6, 3)
    blotches = base_bg + rng.normal(0, 7, (3, 4, 3))
    background = Image.fromarray(np.clip(blotches, 0, 255).astype(np.uint8)).resize((W, H), Image.BILINEAR)
    canvas = background.resize((w2, h2), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    mask = Image.new("L", canvas.size, 0) if with_parts else None
    scale = rng.uniform(0.3, 0.36) * h2 * rng.uniform(0.9, 1.1)
    angle = np.deg2rad(rng.uniform(-25, 25))
    center = np.array([w2 * rng.uniform(0.42, 0.58), h2 * rng.uniform(0.58, 0.7)])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])

    def to_pixels(points):
        p = points @ rot.T * scale
        return p * np.array([1.0, -1.0]) + center

    _draw_hand(draw, person, side, aspect, rng, to_pixels, supersample * max(1.0, H / 120), accessory,
               ImageDraw.Draw(mask) if with_parts else None)
    img = np.asarray(canvas.reduce(supersample), dtype=np.float32)
    # lighting: overall gain, colour cast and a linear gradient in a random direction
    direction = rng.normal(size=2)
    ramp = ((np.arange(W, dtype=np.float32) / W - 0.5) * direction[0]
            + (np.arange(H, dtype=np.float32)[:, None] / H - 0.5) * direction[1])
    gain = np.float32(rng.uniform(0.86, 1.1)) * (1 + np.float32(rng.uniform(0, 0.25)) * ramp)
    img *= gain[..., None] * rng.uniform(0.96, 1.04, 3).astype(np.float32)
    img += np.float32(rng.uniform(4, 12)) * (rng.random(img.shape, dtype=np.float32) - 0.5)  # sensor noise
    photo = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    if not with_parts:
        return photo
    return photo, mask.reduce(supersample).point(lambda v: 255 if v >= 128 else 0)


def _prepare_synthetic_root(root, names):
    """Refuse to write into a folder that holds real data (no marker); clear old synthetic output."""
    os.makedirs(root, exist_ok=True)
    marker = os.path.join(root, SYNTHETIC_MARKER)
    if not os.path.exists(marker):
        present = [n for n in names if os.path.lexists(os.path.join(root, n))]
        if present:
            raise FileExistsError(f"{os.path.join(root, present[0])} exists and {root} has no {SYNTHETIC_MARKER}; "
                                  f"refusing to overwrite what looks like real data. Choose an empty folder.")
    for name in names:
        path = os.path.join(root, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


def _images_per_id(rng, images_per_id):
    lo, hi = images_per_id
    if lo < 2 or hi < lo:
        raise ValueError(f"images_per_id must be (min, max) with 2 <= min <= max, got {images_per_id}")
    return int(rng.integers(lo, hi + 1))


def make_synthetic_11k(root, num_ids_per_aspect=8, images_per_id=(3, 5), image_size=(160, 120), seed=0,
                       accessory_fraction=0.1, part_masks=False):
    """Write a small 11k-format dataset: <root>/HandInfo.csv (the real columns) and
    <root>/Hands/Hand_XXXXXXX.jpg. Each aspect gets num_ids_per_aspect identities, half of them at or
    below its train threshold and half above, drawn from one pool of people so a person appears in
    several aspects (as in 11k). About accessory_fraction of the identities get one extra image with a
    watch (accessories = 1, filtered out by the protocol; at least one per aspect). One row of the last
    dorsal-right test id carries a trailing space, as "1200000 " does in the real file.
    Also writes SYNTHETIC_DATA.json (arguments and ids); refuses a folder that holds real data.
    part_masks=True also writes <root>/Hands_parts/Hand_XXXXXXX.png, each photo's mask of its
    distinguishing parts (render_synthetic_hand with_parts); the photos are the same either way.
    Same arguments -> byte-identical files. Returns that info dict ("num_images", "ids": {aspect: [id]})."""
    rng = np.random.default_rng(seed)
    n_test = num_ids_per_aspect // 2
    n_train = num_ids_per_aspect - n_test
    lo = min(LAST_TRAIN_ID_11K.values()) - 2 * n_train - 2
    hi = max(LAST_TRAIN_ID_11K.values()) + 2 * n_test + 2
    persons = {pid: _random_person(rng) for pid in range(lo, hi + 1)}
    sides = {(pid, aspect): _random_hand_side(rng) for pid in persons for aspect in ASPECTS_11K}
    ids = {}
    for aspect in ASPECTS_11K:
        last = LAST_TRAIN_ID_11K[aspect]
        below = [p for p in persons if p <= last]
        above = [p for p in persons if p > last]
        ids[aspect] = sorted(rng.choice(below, n_train, replace=False).tolist()
                             + rng.choice(above, n_test, replace=False).tolist())
    _prepare_synthetic_root(root, ["Hands", "HandInfo.csv", PART_MASK_DIR])
    os.makedirs(os.path.join(root, "Hands"))
    if part_masks:
        os.makedirs(os.path.join(root, PART_MASK_DIR))
    rows, number = [], 0
    spaced_id = ids["dorsal right"][-1]  # a test id: one of its rows is written as "<id> "
    for aspect in ASPECTS_11K:
        for position, pid in enumerate(ids[aspect]):
            person = persons[pid]
            count = _images_per_id(rng, images_per_id)
            with_watch = rng.random() < accessory_fraction or position == 0  # every aspect has some
            accessories = [0] * count + [1] * int(with_watch)
            for k, accessory in enumerate(accessories):
                number += 1
                name = f"Hand_{number:07d}.jpg"
                img = render_synthetic_hand(person, sides[(pid, aspect)], aspect, rng, image_size, bool(accessory),
                                            with_parts=part_masks)
                if part_masks:
                    img, mask = img
                    mask.save(os.path.join(root, PART_MASK_DIR, f"{name[:-4]}.png"))
                img.save(os.path.join(root, "Hands", name), quality=int(rng.integers(85, 96)))
                id_text = f"{pid:07d}" + (" " if pid == spaced_id and aspect == "dorsal right" and k == 1 else "")
                rows.append([id_text, person["age"], person["gender"], person["tone_name"], accessory,
                             person["polish"], aspect, name, 0])
    buffer = io.StringIO()
    buffer.write(",".join(HAND_INFO_COLUMNS) + "\r\n")  # like the real file: bare header, quoted text values
    csv.writer(buffer, quoting=csv.QUOTE_NONNUMERIC).writerows(rows)
    atomic_write_text(os.path.join(root, "HandInfo.csv"), buffer.getvalue())
    info = {"dataset": "11k", "seed": seed, "num_ids_per_aspect": num_ids_per_aspect,
            "images_per_id": list(images_per_id), "image_size": list(image_size), "num_images": len(rows),
            "ids": {aspect: [f"{p:07d}" for p in ids[aspect]] for aspect in ASPECTS_11K}}
    atomic_write_json(os.path.join(root, SYNTHETIC_MARKER), info)
    return info


def make_synthetic_hd(root, num_train_ids=6, num_test_ids=6, num_distractor_ids=4, images_per_id=(3, 5),
                      image_size=(160, 120), seed=0):
    """Write a small HD-format tree: <root>/Original Images/1-501/<id>_<n>.jpg (train ids sampled from
    1..447, test ids from 448..501) and <root>/Original Images/502-712/<id>_<n>.jpg (distractor ids from
    502..712). Dorsal right hands. Same arguments -> byte-identical files."""
    if not (0 < num_train_ids <= HD_LAST_TRAIN_ID and 0 < num_test_ids <= 501 - HD_LAST_TRAIN_ID
            and 0 <= num_distractor_ids <= 211):
        raise ValueError("make_synthetic_hd: need 1..447 train ids, 1..54 test ids and 0..211 distractor ids")
    rng = np.random.default_rng(seed)
    def sample(first, last, count):
        return rng.choice(np.arange(first, last + 1), count, replace=False).tolist()

    groups = {HD_SUBJECT_FOLDER: sorted(sample(1, HD_LAST_TRAIN_ID, num_train_ids)
                                        + sample(HD_LAST_TRAIN_ID + 1, 501, num_test_ids)),
              HD_DISTRACTOR_FOLDER: sorted(sample(502, 712, num_distractor_ids))}
    _prepare_synthetic_root(root, [HD_IMAGE_DIR])
    num_images = 0
    for folder, subject_ids in groups.items():
        out = os.path.join(root, HD_IMAGE_DIR, folder)
        os.makedirs(out)
        for sid in subject_ids:
            person, side = _random_person(rng), _random_hand_side(rng)
            for n in range(1, _images_per_id(rng, images_per_id) + 1):
                img = render_synthetic_hand(person, side, "dorsal right", rng, image_size)
                img.save(os.path.join(out, f"{sid}_{n}.jpg"), quality=int(rng.integers(85, 96)))
                num_images += 1
    info = {"dataset": "HD", "seed": seed, "images_per_id": list(images_per_id), "image_size": list(image_size),
            "num_images": num_images, "ids": {k: [str(v) for v in ids] for k, ids in groups.items()}}
    atomic_write_json(os.path.join(root, SYNTHETIC_MARKER), info)
    return info


def make_synthetic_folder(root, num_ids=8, images_per_id=(3, 5), image_size=(80, 60), seed=0, distractor_dir=None,
                          num_distractors=3, single_image_ids=0):
    """Write an identity-folder data set: <root>/person_<k>/<n>.jpg (dorsal right hands), with
    `single_image_ids` extra identities of one photo each and, with `distractor_dir`, that many flat
    photos of other people in <distractor_dir>/stranger_<k>.jpg. Same arguments -> same files."""
    rng = np.random.default_rng(seed)
    folders = [f"person_{k:03d}" for k in range(num_ids + single_image_ids)]
    _prepare_synthetic_root(root, folders)
    for k, folder in enumerate(folders):
        person, side = _random_person(rng), _random_hand_side(rng)
        os.makedirs(os.path.join(root, folder))
        count = _images_per_id(rng, images_per_id) if k < num_ids else 1
        for n in range(1, count + 1):
            img = render_synthetic_hand(person, side, "dorsal right", rng, image_size)
            img.save(os.path.join(root, folder, f"{n}.jpg"), quality=int(rng.integers(85, 96)))
    if distractor_dir:
        os.makedirs(distractor_dir, exist_ok=True)
        for k in range(num_distractors):
            img = render_synthetic_hand(_random_person(rng), _random_hand_side(rng), "dorsal right", rng, image_size)
            img.save(os.path.join(distractor_dir, f"stranger_{k}.jpg"), quality=90)
    info = {"dataset": "folder", "seed": seed, "num_ids": num_ids, "images_per_id": list(images_per_id),
            "image_size": list(image_size), "single_image_ids": single_image_ids, "identities": folders}
    atomic_write_json(os.path.join(root, SYNTHETIC_MARKER), info)
    return info
