"""Names as papers print them: methods, backbones, test sets and settings, for the tables
(collect_results.py) and the figures (utils/figures.py, the ranking and explanation figures).

Depends on nothing in the package."""
import os

# model kind (results.json "model_kind", a run's config.json "method") -> display name
METHOD_NAMES = {"zero-shot": "Zero-shot", "finetune": "Fine-tuned", "clipreid": "CLIP-ReID",
                "promptsg": "PromptSG", "handid": "CLIP-HandID"}
# the order in which methods are listed in tables and legends
METHOD_ORDER = tuple(METHOD_NAMES.values())
# 11k split-root suffix -> aspect in words
ASPECT_NAMES = {"dorsal_r": "dorsal right", "dorsal_l": "dorsal left", "palmar_r": "palmar right",
                "palmar_l": "palmar left"}
SPLIT_ROOT_PREFIX = "train_val_test_split"
# the order of the published tables' column groups
TEST_SET_ORDER = ("11k dorsal right", "11k dorsal left", "11k palmar right", "11k palmar left", "HD")


def method_name(kind):
    """'finetune' -> 'Fine-tuned'; an unknown kind is shown as it is."""
    return METHOD_NAMES.get(kind, str(kind))


def set_rank(name):
    """Sort key of a test or training set: the published tables' order, any other set after them."""
    return TEST_SET_ORDER.index(name) if name in TEST_SET_ORDER else len(TEST_SET_ORDER)


def backbone_name(backbone):
    """An official name as it is ('ViT-B/16'); a checkpoint path by its file stem."""
    if not backbone:
        return "unknown"
    backbone = str(backbone)
    if backbone.endswith((".pt", ".pth")):
        return os.path.splitext(os.path.basename(backbone))[0]
    return backbone


def test_set_name(split_root, dataset=None):
    """A split root as a reader knows it: '11k dorsal right', 'HD', else its folder name."""
    if dataset == "HD":
        return "HD"
    folder = os.path.basename(os.path.normpath(str(split_root)))
    suffix = folder[len(SPLIT_ROOT_PREFIX):].lstrip("_") if folder.startswith(SPLIT_ROOT_PREFIX) else None
    if suffix in ASPECT_NAMES and dataset in (None, "11k"):
        return f"11k {ASPECT_NAMES[suffix]}"
    return folder


def training_set_name(data_dirs, dataset=None):
    """The training split root(s) of a run ('11k dorsal right', or several joined by ' + ')."""
    if not data_dirs:
        return None
    data_dirs = [data_dirs] if isinstance(data_dirs, str) else list(data_dirs)
    return " + ".join(test_set_name(d, dataset) for d in data_dirs)


def gallery_name(variant):
    """Gallery variant in words: 'all' -> 'with distractors', 'own' -> 'own'."""
    return {"all": "with distractors", "own": "own"}.get(variant, str(variant))


def setting_value(value):
    """A setting's value in a label: on/off for booleans, short floats, lists space-separated."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return " ".join(setting_value(v) for v in value) or "none"
    if isinstance(value, dict):
        return " ".join(f"{k} {setting_value(v)}" for k, v in sorted(value.items()))
    return str(value)


def settings_label(settings):
    """[(name, value), ...] -> 'name value, name value'."""
    return ", ".join(f"{name} {setting_value(value)}" for name, value in settings)
