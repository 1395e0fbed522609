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


def results_method(results, run_config=None):
    """The model kind of an evaluation's results.json ("zero-shot", "finetune", ...): its model_kind,
    else the training run's config.json method, else zero-shot when it names itself so."""
    run_config = run_config or {}
    if results.get("model_kind"):
        return results["model_kind"]
    if run_config.get("method") in METHOD_NAMES:
        return run_config["method"]
    if not results.get("run_dir") and ("zero-shot" in str(results.get("method", "")).lower()
                                       or results.get("feature") == "CLIP encode_image"):
        return "zero-shot"
    return str(results.get("method", "?"))


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


def gallery_name(variant, dataset=None):
    """A gallery variant in words: 11k gallery{i}_all 'with distractors' (the other aspects), 11k
    gallery{i} 'without distractors'; HD's gallery{i} holds the 502-712 subjects: 'with distractors'."""
    if variant == "all" or (variant == "own" and dataset == "HD"):
        return "with distractors"
    return "without distractors" if variant == "own" else str(variant)


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
