"""Recipes: a published table written as data (recipes/<name>.json), read, checked and expanded into
runs for reproduce.py.

A recipe holds:
- "name" (optional; default: the file's stem): the folder of its table under reproduce.py's --out, a
  plain folder name;
- "data": {dataset folder: {"prepare": script}}: the raw data set of each split root's first path
  component and the script that prepares its splits;
- "methods": {name: {"train": trainer script (absent for zero-shot), "evaluate": evaluator script,
  "train_flags": [...], "evaluate_flags": [...]}};
- "protocol": the evaluation protocol every evaluation runs under (utils/protocols.py);
- "runs": a list of runs, each {"method", "backbone", "train" (a split root relative to the data
  root; not for methods without a trainer), "test" (split roots to evaluate on; default: the
  training root), "train_flags", "evaluate_flags"}; where "method", "backbone" or "train" holds a
  list, the entry stands for one run per combination (as a CI matrix does);
- "table": {"layout": "rows" | "grouped", "columns": [metric, ...]} (collect_results.py's choices).
Flags are the scripts' own command-line flags; a recipe names only what differs from their defaults.

The tiny profile (recipes/tiny.json) turns any recipe into a CPU test: synthetic data, tiny
OpenAI-format checkpoints in place of each backbone, and flags for few epochs and small inputs.

Depends on utils/io, utils/protocols and utils/tables (the column names)."""
import itertools
import json
import os

from . import protocols, tables
from .errors import RecipeError
from .io import REPO_DIR, is_plain_folder_name

RECIPE_DIR = os.path.join(REPO_DIR, "recipes")
TINY_PROFILE = os.path.join(RECIPE_DIR, "tiny.json")
RUN_KEYS = {"method", "backbone", "train", "test", "train_flags", "evaluate_flags"}
SPLIT_PREFIX = "train_val_test_split"
OUT_FOLDERS = ("runs", "zero-shot", "logs", "tiny_data")  # what reproduce.py keeps under --out besides <recipe name>/


def available():
    """Names of the recipes shipped in recipes/ (the tiny profile is not one)."""
    return sorted(os.path.splitext(n)[0] for n in os.listdir(RECIPE_DIR)
                  if n.endswith(".json") and n != os.path.basename(TINY_PROFILE))


def read_json(path, what):
    try:
        with open(path) as f:
            value = json.load(f)
    except OSError as err:
        raise RecipeError(f"cannot read {what} {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise RecipeError(f"{what} {path} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise RecipeError(f"{what} {path} must hold a JSON object")
    return value


def load(name):
    """A recipe by name (recipes/<name>.json) or path, checked; its "name" defaults to the file stem."""
    path = name if name.endswith(".json") or os.sep in name else os.path.join(RECIPE_DIR, f"{name}.json")
    if not os.path.isfile(path):
        raise RecipeError(f"--recipe {name}: no such recipe; choose one of {', '.join(available())} or give a "
                          f"recipe file (.json)")
    recipe = read_json(path, "recipe")
    recipe.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    recipe["path"] = os.path.abspath(path)
    check(recipe)
    return recipe


def _strings(value, where):
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RecipeError(f"{where} must be a list of strings (command-line tokens), got {value!r}")
    return value


def _script(name, where):
    if not isinstance(name, str) or not os.path.isfile(os.path.join(REPO_DIR, name)):
        raise RecipeError(f"{where}: {name!r} is not a script of this repository")
    return name


def check(recipe):
    """Every field a recipe needs, of the right kind, naming what is wrong."""
    where = recipe.get("path", recipe.get("name"))
    for key in ("data", "methods", "runs", "protocol", "table"):
        if key not in recipe:
            raise RecipeError(f"recipe {where} lacks \"{key}\"")
    check_folder_name(recipe["name"], f"recipe {where}: \"name\"")
    if recipe["name"] in OUT_FOLDERS:
        raise RecipeError(f"recipe {where}: \"name\" {recipe['name']!r} is a folder reproduce.py keeps under --out "
                          f"({', '.join(OUT_FOLDERS)}); choose another name")
    if not isinstance(recipe["protocol"], str) or recipe["protocol"] not in protocols.PROTOCOLS:
        raise RecipeError(f"recipe {where}: \"protocol\" must be one of {', '.join(protocols.PROTOCOLS)}, "
                          f"got {recipe['protocol']!r}")
    for folder, spec in _object(recipe["data"], f"recipe {where}: \"data\"", "{data folder: {\"prepare\": script}}"):
        check_folder_name(folder, f"recipe {where}: data folder")
        if not isinstance(spec, dict):
            raise RecipeError(f"recipe {where}: data.{folder} must be an object with \"prepare\"")
        _script(spec.get("prepare"), f"recipe {where}: data.{folder}.prepare")
    for name, spec in _object(recipe["methods"], f"recipe {where}: \"methods\"", "{method: {\"evaluate\": script, ...}}"):
        if not isinstance(spec, dict) or "evaluate" not in spec:
            raise RecipeError(f"recipe {where}: methods.{name} must be an object with \"evaluate\" (and \"train\")")
        _script(spec["evaluate"], f"recipe {where}: methods.{name}.evaluate")
        if "train" in spec:
            _script(spec["train"], f"recipe {where}: methods.{name}.train")
        for key in ("train_flags", "evaluate_flags"):
            _strings(spec.get(key, []), f"recipe {where}: methods.{name}.{key}")
    check_table(recipe["table"], where)
    if not isinstance(recipe["runs"], list) or not recipe["runs"]:
        raise RecipeError(f"recipe {where}: \"runs\" must be a non-empty list")
    expand(recipe)  # checks every run


def check_folder_name(name, where):
    """A name reproduce.py makes a folder of: one plain path component that stays where it is put."""
    if not is_plain_folder_name(name) or name.startswith("."):
        raise RecipeError(f"{where} must be a plain folder name (no / or \\, not starting with a dot), got {name!r}")


def _object(value, where, shape):
    """The items of a non-empty JSON object."""
    if not isinstance(value, dict) or not value:
        raise RecipeError(f"{where} must be a non-empty object {shape}, got {json.dumps(value)}")
    return value.items()


def check_table(table, where):
    if not isinstance(table, dict):
        raise RecipeError(f"recipe {where}: \"table\" must be an object {{\"layout\": rows | grouped, \"columns\": "
                          f"[metric, ...]}}, got {json.dumps(table)}")
    if table.get("layout", "rows") not in ("rows", "grouped"):
        raise RecipeError(f"recipe {where}: table.layout must be rows or grouped, got {table.get('layout')!r}")
    columns = table.get("columns", tables.DEFAULT_COLUMNS)
    if not isinstance(columns, list) or not columns or not all(isinstance(c, str) for c in columns):
        raise RecipeError(f"recipe {where}: table.columns must be a non-empty list of metrics, got {json.dumps(columns)}")
    bad = [c for c in columns if c not in tables.METRIC_HEADINGS]
    if bad:
        raise RecipeError(f"recipe {where}: table.columns {bad} are not metrics ({', '.join(tables.METRIC_HEADINGS)})")


def _one_or_more(entry, key, label):
    """A run field holding a string or a non-empty list of strings, as a list (one run per element)."""
    value = entry[key]
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) and v for v in values):
        raise RecipeError(f"{label}: \"{key}\" must be a string or a non-empty list of strings, got {json.dumps(value)}")
    return values


def expand(recipe):
    """The recipe's runs, one dict per combination: {"method", "backbone", "train" (or None), "test":
    [roots], "train_flags", "evaluate_flags"} (the method's flags first, then the run's)."""
    where = recipe.get("path", recipe.get("name"))
    runs = []
    for index, entry in enumerate(recipe["runs"]):
        label = f"recipe {where}: runs[{index}]"
        if not isinstance(entry, dict) or not {"method", "backbone"} <= set(entry):
            raise RecipeError(f"{label} must be an object with \"method\" and \"backbone\"")
        unknown = set(entry) - RUN_KEYS
        if unknown:
            raise RecipeError(f"{label}: unknown field(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(RUN_KEYS))})")
        trains = [None] if entry.get("train") is None else _one_or_more(entry, "train", label)
        for method, backbone, train in itertools.product(_one_or_more(entry, "method", label),
                                                         _one_or_more(entry, "backbone", label), trains):
            spec = recipe["methods"].get(method)
            if spec is None:
                raise RecipeError(f"{label}: method {method!r} is not in \"methods\" ({', '.join(recipe['methods'])})")
            if ("train" in spec) != (train is not None):
                raise RecipeError(f"{label}: method {method} " + ("trains: give \"train\" (a split root)" if "train" in spec
                                                                 else "has no trainer: drop \"train\""))
            tests = [train] if entry.get("test") is None else _one_or_more(entry, "test", label)
            if tests == [None]:
                raise RecipeError(f"{label}: method {method} needs \"test\" (split roots to evaluate on)")
            for root in [train, *tests]:
                if root is not None:
                    check_root(root, recipe, label)
            runs.append({"method": method, "backbone": backbone, "train": train, "test": tests,
                         "train_flags": _strings(spec.get("train_flags", []), label)
                         + _strings(entry.get("train_flags", []), label),
                         "evaluate_flags": _strings(spec.get("evaluate_flags", []), label)
                         + _strings(entry.get("evaluate_flags", []), label),
                         "train_script": spec.get("train"), "evaluate_script": spec["evaluate"]})
    return runs


def check_root(root, recipe, label):
    parts = root.split("/") if isinstance(root, str) else []
    if len(parts) != 2 or os.path.isabs(root) or {"", ".", ".."} & set(parts):
        raise RecipeError(f"{label}: split root {root!r} must be '<data folder>/<split root>' relative to --data_root")
    if parts[0] not in recipe["data"]:
        raise RecipeError(f"{label}: split root {root} lies in {parts[0]}/, which \"data\" does not list "
                          f"({', '.join(recipe['data'])})")


def set_name(root):
    """Short name of a split root for folder names and --only: 'dorsal_r' for
    11k/train_val_test_split_dorsal_r, 'HD' for HD/train_val_test_split."""
    folder, split = root.split("/")
    suffix = split[len(SPLIT_PREFIX):].lstrip("_") if split.startswith(SPLIT_PREFIX) else split
    return suffix or folder


def load_tiny_profile(path=None):
    path = path or TINY_PROFILE
    profile = read_json(path, "tiny profile")
    for key in ("synthetic", "backbones", "flags"):
        if key not in profile:
            raise RecipeError(f"tiny profile {path} lacks \"{key}\"")
    return profile
