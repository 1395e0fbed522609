"""The steps of a recipe (utils/recipes.py) for reproduce.py: for each split preparation, training
and evaluation the command (script and flags), the folder it writes, what it needs first, and
whether it is finished, decided from what the folder holds:

- split roots: their splits.json exists;
- a training: config.json records the same flags and metrics.csv covers all its epochs, with
  net_last.pth ("resume" when a checkpoint of an unfinished run exists);
- an evaluation: results.json holds a row for every split and gallery of its split root, and
  config.json records the same flags.
"stale": the folder records other flags than the recipe asks for (redone only with --force). A path
below the plan's output or data folders counts as the same when it lies at the same place below a root
that was moved or copied (and, where the recorded one still exists, has the same content), so a copied
--out or data root keeps its finished work.

Depends on utils/recipes and utils/splits."""
import contextlib
import functools
import hashlib
import importlib
import io
import json
import os
import shlex

import clip
from . import recipes, splits
from .errors import ClipFHError, RecipeError
from .io import file_sha256

SCRIPT_ONLY_FLAGS = {"train": ["--no-progress"]}  # step output goes to log files, not a terminal
# flags that do not change what a step computes: never a reason to redo it
UNCOMPARED = {"force", "resume", "device", "num_workers", "progress", "compile", "download_root", "f_name", "m_name",
              "out_dir", "gpu_augment", "cache_resized"}
RESUMABLE = ("net_last.pth", "stage1_last.pth", "prompts.pth")  # checkpoints a trainer's --resume continues from


def parse_filters(only, recipe):
    """--only key=v1,v2 ... -> {key: {values}}; unknown keys and values are errors."""
    filters = {}
    for item in only:
        key, _, values = item.partition("=")
        if key not in ("method", "backbone", "train", "test", "seed") or not values:
            raise RecipeError(f"--only {item}: use method=, backbone=, train=, test= or seed= with comma-separated values")
        filters.setdefault(key, set()).update(v for v in values.split(",") if v)
    runs = recipes.expand(recipe)
    known = {"method": {r["method"] for r in runs}, "backbone": {r["backbone"] for r in runs},
             "train": {recipes.set_name(r["train"]) for r in runs if r["train"]},
             "test": {recipes.set_name(t) for r in runs for t in r["test"]}}
    for key, values in filters.items():
        unknown = values - known[key] if key in known else {v for v in values if not v.lstrip("-").isdigit()}
        if unknown:
            raise RecipeError(f"--only {key}={','.join(sorted(unknown))}: recipe {recipe['name']} has "
                              + (f"{', '.join(sorted(known[key]))}" if key in known else "integer seeds only"))
    return filters


def selected(filters, **labels):
    """Whether a step with these labels passes every --only filter (a label the step lacks fails it)."""
    for key, values in filters.items():
        value = labels.get(key)
        if value is None or str(value) not in values:
            return False
    return True


def prepare_id(root):
    """Id of the step that prepares a split root's data set ('11k/train_val_test_split_dorsal_r' -> prepare-11k)."""
    return f"prepare-{root.split('/')[0]}"


def step_label(step):
    """'train finetune ViT-B/16 on dorsal_r, seed 0' and the like, for the progress lines."""
    labels = step.get("labels", {})
    if step["kind"] == "prepare":
        return f"prepare the {step['folder']} splits"
    seed = f", seed {labels['seed']}" if labels.get("seed") is not None else ""
    if step["kind"] == "train":
        return f"train {labels['method']} {labels['backbone']} on {labels['train']}{seed}"
    trained = f" trained on {labels['train']}" if labels.get("train") else ""
    return f"evaluate {labels['method']} {labels['backbone']}{trained}{seed} on {labels['test']}"


def short_hash(tokens):
    return hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:8] if tokens else ""


def folder_name(*parts):
    return "_".join(str(p).replace("/", "-") for p in parts if p not in (None, ""))


class Plan:
    """The steps of a recipe: where each one writes, its command, and whether it is finished."""

    def __init__(self, recipe, args, profile=None):
        self.recipe, self.args, self.profile = recipe, args, profile
        self.out = os.path.abspath(args.out)
        self.data_root = os.path.abspath(os.path.join(self.out, "tiny_data") if args.tiny else args.data_root)
        self.data_dirs = {k: os.path.abspath(v) for k, v in (item.split("=", 1) for item in args.data)}
        unknown = set(self.data_dirs) - set(recipe["data"])
        if unknown:
            raise RecipeError(f"--data {', '.join(sorted(unknown))}: recipe {recipe['name']} uses {', '.join(recipe['data'])}")
        self.location_roots = [self.out, self.data_root, *self.data_dirs.values()]
        self.filters = parse_filters(args.only, recipe)
        self.check_backbones()
        self.steps = []
        self._build()

    # ---- paths and flags ----
    def data_dir(self, folder):
        return self.data_dirs.get(folder) or os.path.join(self.data_root, folder)

    def root(self, root):
        folder, split_root = root.split("/")
        return os.path.join(self.data_dir(folder), split_root)

    def backbone(self, name):
        if not self.args.tiny:
            return name
        return os.path.join(self.data_root, "checkpoints", f"{name.replace('/', '-')}-tiny.pt")

    def check_backbones(self):
        """Every backbone of the recipe, --only or not (the table is built from the whole recipe): one of
        CLIP's models or a checkpoint file; under --tiny one the tiny profile has a tiny model for."""
        where = self.recipe.get("path", self.recipe["name"])
        for name in dict.fromkeys(run["backbone"] for run in recipes.expand(self.recipe)):
            if self.args.tiny and name not in self.profile["backbones"]:
                raise RecipeError(f"recipe {where}: the tiny profile has no tiny model for backbone {name!r} (it has "
                                  f"{', '.join(self.profile['backbones'])}); add it to {recipes.TINY_PROFILE} "
                                  f"\"backbones\"")
            if not self.args.tiny and name not in clip.available_models() and not os.path.isfile(name):
                raise RecipeError(f"recipe {where}: backbone {name!r} is neither one of CLIP's models nor a checkpoint "
                                  f"file; use one of {', '.join(clip.available_models())} or a checkpoint's path")

    def extra_flags(self, role, script, backbone=None):
        """The tiny profile's flags of a step (role: prepare, train or evaluate) and the --device /
        --num_workers given to reproduce."""
        flags = []
        if self.args.tiny:
            flags += self.profile["flags"].get(role, []) + self.profile["flags"].get(script, [])
            if backbone:
                flags += self.profile.get("backbone_flags", {}).get(self.profile["backbones"][backbone], [])
        if role != "prepare":
            if self.args.device:
                flags += ["--device", self.args.device]
            if self.args.num_workers is not None:
                flags += ["--num_workers", str(self.args.num_workers)]
        return flags + SCRIPT_ONLY_FLAGS.get(role, [])

    # ---- the steps ----
    def _build(self):
        protocol = self.recipe["protocol"]
        trainings, evaluations, roots = {}, {}, set()
        for run in recipes.expand(self.recipe):
            labels = {"method": run["method"], "backbone": run["backbone"],
                      "train": recipes.set_name(run["train"]) if run["train"] else None}
            for seed in self.args.seeds if run["train"] else [None]:
                tests = [t for t in run["test"] if selected(self.filters, **labels, test=recipes.set_name(t), seed=seed)]
                if not tests:
                    continue
                training = None
                if run["train"]:
                    name = folder_name(run["method"], run["backbone"], labels["train"], short_hash(run["train_flags"]),
                                       f"seed{seed}")
                    training = trainings.setdefault(name, self._training(run, name, seed, labels))
                    roots.add(run["train"])
                for test in tests:
                    roots.add(test)
                    step = self._evaluation(run, test, training, protocol, dict(labels, seed=seed))
                    evaluations.setdefault(step["out"], step)
        prepares = [self._prepare(folder, sorted(r for r in roots if r.startswith(folder + "/")))
                    for folder in self.recipe["data"] if any(r.startswith(folder + "/") for r in roots)]
        self.steps = prepares + list(trainings.values()) + list(evaluations.values())
        for step in self.steps:
            check_command(step["script"], step["argv"], self.recipe["name"])

    def _prepare(self, folder, roots):
        script = self.recipe["data"][folder]["prepare"]
        return {"kind": "prepare", "id": prepare_id(folder + "/"), "script": script, "folder": folder,
                "data_dir": self.data_dir(folder), "roots": [self.root(r) for r in roots], "needs": [],
                "argv": ["--data_dir", self.data_dir(folder), *self.extra_flags("prepare", script)]}

    def _training(self, run, name, seed, labels):
        script = run["train_script"]
        f_name = os.path.join(self.out, "runs")
        argv = ["--data_dir", self.root(run["train"]), "--f_name", f_name, "--m_name", name,
                "--backbone_name", self.backbone(run["backbone"]), "--seed", str(seed), *run["train_flags"],
                *self.extra_flags("train", script, run["backbone"])]
        return {"kind": "train", "id": f"train-{name}", "script": script, "argv": argv, "out": os.path.join(f_name, name),
                "labels": dict(labels, seed=seed), "needs": [prepare_id(run["train"])],
                "location_roots": self.location_roots}

    def _evaluation(self, run, test, training, protocol, labels):
        script, test_name = run["evaluate_script"], recipes.set_name(test)
        flags = [*run["evaluate_flags"], *self.extra_flags("evaluate", script, None if training else run["backbone"])]
        common = ["--test_dir", self.root(test), "--protocol", protocol]
        if training:
            out = os.path.join(training["out"], folder_name("eval", protocol, test_name, short_hash(run["evaluate_flags"])))
            argv = [*common, "--f_name", os.path.dirname(training["out"]), "--m_name",
                    os.path.basename(training["out"]), "--out_dir", out, *flags]
            step_id = f"evaluate-{os.path.basename(training['out'])}-on-{test_name}"
        else:  # the zero-shot evaluator names its own folders below --f_name: one --f_name per evaluation
            out = os.path.join(self.out, "zero-shot", folder_name(protocol, short_hash(run["evaluate_flags"])),
                               folder_name(run["backbone"], test_name))
            argv = [*common, "--f_name", out, "--backbone_name", self.backbone(run["backbone"]), *flags]
            step_id = f"evaluate-{folder_name(run['method'], run['backbone'])}-on-{test_name}"
        return {"kind": "evaluate", "id": step_id, "script": script, "argv": argv, "out": out, "training": training,
                "test_dir": self.root(test), "labels": dict(labels, test=test_name),
                "needs": [prepare_id(test)] + ([training["id"]] if training else []),
                "location_roots": self.location_roots}


def check_command(script, argv, recipe_name):
    """A step's flags must be ones its script accepts: argparse's complaint as one line, before anything runs."""
    complaint = io.StringIO()
    try:
        with contextlib.redirect_stderr(complaint):
            load_script(script).parse_args(argv)
    except SystemExit:
        lines = [line for line in complaint.getvalue().splitlines() if line.strip()]
        raise RecipeError(f"recipe {recipe_name}: {script} refuses the flags {' '.join(argv)}: "
                          f"{lines[-1].split(': error: ', 1)[-1] if lines else 'see --help'}") from None


# ---- what is finished ----

def results_file(step):
    """The results.json an evaluation step writes (the zero-shot evaluator's lies one folder deeper)."""
    if step["training"] is not None:
        return os.path.join(step["out"], "results.json")
    found = []
    for folder, subfolders, files in os.walk(step["out"]):
        subfolders[:] = [f for f in subfolders if not f.startswith(".")]  # an evaluator's staging folder
        found += [os.path.join(folder, f) for f in files if f == "results.json"]
    return found[0] if len(found) == 1 else os.path.join(step["out"], "clip_zero_shot", "results.json")


def read_json_or_none(path):
    try:
        with open(path) as f:
            value = json.load(f)
        return value if isinstance(value, dict) else None
    except (OSError, ValueError):
        return None


def flag_differences(script, argv, recorded, location_roots=()):
    """The flags of `argv` whose value differs from what a config.json recorded ("--lr: 1e-05, recorded 5e-06");
    paths below one of `location_roots` are compared with same_location."""
    module = load_script(script)
    given = vars(module.parse_args(argv))
    names = {token[2:].removeprefix("no-").replace("-", "_") for token in argv if token.startswith("--")}
    found = []
    for name in sorted(names - UNCOMPARED):
        if name not in recorded or name not in given:
            continue
        if not same_value(given[name], recorded[name], location_roots):
            found.append(f"--{name}: {display_value(given[name])}, recorded {display_value(recorded[name])}")
    return found


def same_value(want, have, location_roots):
    if isinstance(want, str) and isinstance(have, str) and os.path.isabs(want):
        return same_location(want, have, location_roots)
    return normalise(want) == normalise(have)


def same_location(want, have, location_roots):
    """Whether a recorded path names what the path `want` names: the same path, or the same place below
    the innermost of `location_roots` holding `want` (an --out or data root moved or copied since), with
    the same content where the recorded one still exists."""
    want, have = os.path.normpath(want), os.path.abspath(have)
    if want == have:
        return True
    roots = [r for r in location_roots if os.path.commonpath([want, r]) == r and want != r]
    if not roots:
        return False
    below = os.path.relpath(want, max(roots, key=len))
    if not have.endswith(os.sep + below):
        return False
    return not os.path.exists(have) or fingerprint(have) == fingerprint(want)


def fingerprint(path):
    """SHA-256 of a file (a checkpoint), or of a folder's splits.json (a split root); None when absent."""
    target = os.path.join(path, splits.SPLITS_MANIFEST) if os.path.isdir(path) else path
    try:
        stat = os.stat(target)
        return cached_sha256(target, stat.st_size, stat.st_mtime_ns)
    except OSError:
        return None


@functools.lru_cache(maxsize=64)
def cached_sha256(path, size, mtime_ns):  # size and mtime in the key: a file that changed is hashed again
    return file_sha256(path)


def normalise(value):
    if isinstance(value, (list, tuple)):
        return [normalise(v) for v in value]
    if isinstance(value, str) and (os.sep in value or os.path.exists(value)):
        return os.path.abspath(value)
    return value


def display_value(value):
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def metrics_rows(run_dir):
    try:
        with open(os.path.join(run_dir, "metrics.csv")) as f:
            return max(0, sum(1 for _ in f) - 1)
    except OSError:
        return 0


def training_status(step):
    """('done' | 'resume' | 'run' | 'stale', why)."""
    run_dir = step["out"]
    config = read_json_or_none(os.path.join(run_dir, "config.json"))
    if config is None:
        return ("run", "") if not os.path.isdir(run_dir) else ("run", "a run folder without config.json")
    differences = flag_differences(step["script"], step["argv"], config.get("args") or {}, step["location_roots"])
    if differences:
        return "stale", "; ".join(differences)
    epochs = (config.get("args") or {}).get("epochs")
    finished = os.path.isfile(os.path.join(run_dir, "net_last.pth")) and epochs and metrics_rows(run_dir) >= epochs
    if finished:
        return "done", f"{epochs} epochs"
    if any(os.path.isfile(os.path.join(run_dir, f)) for f in RESUMABLE):
        return "resume", f"{metrics_rows(run_dir)} of {epochs} epochs"
    return "run", "a run folder without a checkpoint"


def evaluation_status(step):
    results = read_json_or_none(results_file(step))
    if results is None:
        return "run", ""
    if not isinstance(results.get("rows"), list) or not isinstance(results.get("gallery_variants"), list):
        return "run", "an incomplete results.json"
    try:
        num_splits = splits.read_split_layout(step["test_dir"])["num_splits"]
    except ClipFHError:
        num_splits = results.get("num_splits")
    if len(results["rows"]) != num_splits * len(results["gallery_variants"]) or results.get("num_splits") != num_splits:
        return "run", f"results.json holds {len(results['rows'])} split rows, the split root has {num_splits} splits"
    config = read_json_or_none(os.path.join(os.path.dirname(results_file(step)), "config.json")) or {}
    differences = flag_differences(step["script"], step["argv"], config.get("args") or {}, step["location_roots"])
    if differences:
        return "stale", "; ".join(differences)
    return "done", f"{num_splits} splits"


def prepare_status(step):
    missing = [r for r in step["roots"] if splits.read_manifest(r) is None]
    if not missing:
        return "done", f"{len(step['roots'])} split root(s)"
    present = [r for r in step["roots"] if r not in missing]
    if present:
        return "stale", (f"{', '.join(present)} exist(s) but {', '.join(missing)} not; prepare them together: run "
                         f"{step['script']} --data_dir {step['data_dir']} --force with the seed of the existing ones")
    return "run", ""


def status(step, trained_now=()):
    if step["kind"] == "prepare":
        return prepare_status(step)
    if step["kind"] == "train":
        return training_status(step)
    if step["training"] is not None and step["training"]["id"] in trained_now:
        return "run", "its model trained in this call"
    return evaluation_status(step)


def command(step, state):
    """The step's argv as it will run: --resume for an interrupted training, --force where output is redone."""
    argv = list(step["argv"])
    if step["kind"] == "train" and state == "resume":
        argv.append("--resume")
    elif step["kind"] in ("train", "evaluate") and (state == "stale" or os.path.exists(step["out"])):
        argv.append("--force")
    return argv


def shell_line(step, argv):
    return " ".join(shlex.quote(t) for t in ["python", step["script"], *argv])


def load_script(script):
    """A repository script as a module (its main(argv) and parse_args(argv))."""
    return importlib.import_module(os.path.splitext(script)[0])
