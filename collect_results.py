"""One results table from many evaluations, as papers print it: Rank-1/5/10 and mAP in percent
(--columns for others, verification included), display names (Fine-tuned, CLIP-ReID, PromptSG,
CLIP-HandID, Zero-shot; 11k dorsal right, HD), the best value of each column in bold, written as
Markdown, booktabs LaTeX, CSV and JSON; with --plot the CMC and ROC curves (and, for a cross-aspect
matrix, its Rank-1 heat maps) as vector PDF and PNG.

    python collect_results.py ./results/clip_zero_shot/*/* './model_11k_d_r/*/eval_*' --out table
    python collect_results.py ./reproduce/runs/*/eval_* --layout grouped --plot --out table

Each argument is a results.json, a folder holding one, or a run folder (every results.json below it
is collected); glob patterns are expanded.

Rows. Evaluations that differ only in the training --seed form one row: mean ± std over the seeds,
the std over the Monte-Carlo splits beside it in brackets (one seed: mean ± std over the splits).
Every setting that differs between rows of one method (a training flag, the checkpoint, re-ranking,
...) is named in the method's label, and a protocol whose settings were overridden is marked, e.g.
"clip-handid (flip off)". Labels every row shares are said once under the table.

Significance. In each column, every row is compared with the best row of its test set by a
two-sided Wilcoxon signed-rank test (scipy.stats.wilcoxon), paired on the same splits and seeds
(utils/significance.py says what "paired" means); the p-values are in the CSV and JSON, and rows not
significantly below the best (p >= 0.05) carry a dagger.
"""
import argparse
import glob
import json
import os
import shutil
from contextlib import contextmanager

from utils import (display, figures, interrupts, outputs, protocols, result_files, significance, splits, tables,
                   verification)
from utils.errors import ClipFHError, EvaluationInputError, InputFileError, OutputExistsError, OutputWriteError
from utils.io import atomic_write_json, read_json

CMC_RANKS = 20
COLUMN_CHOICES = tuple(tables.METRIC_HEADINGS)
SPLIT_METRICS = tuple(k for k in tables.METRIC_HEADINGS if k != "mAP")  # the per-split keys of results.json
FIGURES = ("cmc", "roc", "matrix")
SET_MANIFEST = "set.json"  # in a staged set: the names of the files it holds
# arguments that do not change a number (paths, workers, devices, bookkeeping): never a row's setting
IGNORED_ARGS = frozenset({
    "seed", "f_name", "m_name", "data_dir", "test_dir", "out_dir", "num_workers", "device", "progress", "force",
    "resume", "compile", "gpu_augment", "download_root", "cache_resized", "save_every", "allow_mixed_seeds",
    "final_test", "backbone_name", "data_type", "deterministic", "batch_size", "max_rank", "protocol", "flip",
    "gallery", "amp", "feature"})
# a recorded test setting -> the protocol entry that implies it, where a protocol names it itself
PROTOCOL_ENTRIES = {"which_epoch": "checkpoint", "resize": "zero_shot_resize"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="results.json files, result folders or run folders (globs welcome)")
    p.add_argument("--out", default="results_table",
                   help="output prefix (a file name without extension, not a folder): writes PREFIX.md, .tex, .csv, "
                        ".json (and PREFIX_cmc/_roc/_matrix.pdf/.png), all replaced together")
    p.add_argument("--columns", nargs="+", default=list(tables.DEFAULT_COLUMNS), choices=COLUMN_CHOICES,
                   metavar="METRIC", help=f"metric columns (default: %(default)s; mAP is each row's protocol "
                                          f"convention); choices: {', '.join(COLUMN_CHOICES)}")
    p.add_argument("--layout", default="rows", choices=["rows", "grouped"],
                   help="rows: a row per method x backbone x test set; grouped: test sets as column groups "
                        "(the MBA-Net / CLIP-HandID tables)")
    p.add_argument("--gallery", default="both", choices=["own", "all", "both"], help="gallery variants to list")
    p.add_argument("--plot", action="store_true", help="also draw CMC (ranks 1-20) and ROC curves")
    p.add_argument("--figure_width", default="auto", choices=["auto", "single", "double"],
                   help="figure width: a journal's single column (3.5 in) or double column (7 in); auto: single for one "
                        "panel, double for several")
    p.add_argument("--mixed", action="store_true", help="allow rows evaluated under different protocols")
    p.add_argument("--force", action="store_true",
                   help="replace an existing table of --out, its figures included (kept until the new set is complete)")
    return p.parse_args(argv)


def find_results(patterns):
    """Every results.json the arguments name, in argument order, each once."""
    found = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) or [pattern]
        for path in matches:
            if os.path.isfile(path):
                files = [path]
            elif os.path.isfile(os.path.join(path, "results.json")):
                files = [os.path.join(path, "results.json")]
            elif os.path.isdir(path):
                files = sorted(glob.glob(os.path.join(path, "**", "results.json"), recursive=True))
            else:
                raise EvaluationInputError(f"{path} does not exist; give results.json files, result folders or run folders")
            if not files:
                raise EvaluationInputError(f"{path} holds no results.json; run an eval_query_gallery_*.py script on it first")
            found += [f for f in files if os.path.abspath(f) not in map(os.path.abspath, found)]
    return found


def optional_config(folder, strict=True):
    """config.json of a folder (checked: utils/result_files), or {} when it has none; one that cannot
    be read is an error, or {} when not `strict` (a folder that may not be ours)."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return {}
    try:
        return result_files.check_run_config(read_json(path), path)
    except InputFileError:
        if strict:
            raise
        return {}


def dataset_of(split_root, recorded=None):
    """'11k' or 'HD': as recorded, else from the split root's manifest when it is still there."""
    if recorded in ("11k", "HD") or not isinstance(split_root, str):
        return recorded
    try:
        manifest = splits.read_manifest(split_root) if os.path.isdir(split_root) else None
    except ClipFHError:
        manifest = None
    return (manifest or {}).get("dataset", recorded)


def hashable(value):
    if isinstance(value, list):
        return tuple(hashable(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return value


def protocol_label(record, kind, variants, cuda):
    """'clip-handid', or 'clip-handid (flip off, feature concat)' when settings given explicitly differ
    from what the protocol implies (the gallery is its own column, so it is not listed)."""
    if not isinstance(record, dict):
        return str(record) if record else "unspecified"
    name = record.get("protocol") or "unspecified"
    if name not in protocols.PROTOCOLS:
        return str(name)
    implied = protocols.settings(name, None if kind == "zero-shot" else kind, available=variants, cuda=cuda)
    reference = protocols.PROTOCOLS[name]
    for key, entry in PROTOCOL_ENTRIES.items():  # settings a protocol names directly (the checkpoint, ...)
        if key not in implied and entry in reference and not (key == "resize" and kind != "zero-shot"):
            implied[key] = reference[entry]
    implied.setdefault("decode", "full")
    overrides = [(k, recorded_setting(record, k)) for k in record.get("explicit") or []
                 if k != "gallery" and k in implied and str(recorded_setting(record, k)) != str(implied[k])]
    return f"{name} ({display.settings_label(overrides)})" if overrides else name


def recorded_setting(record, key):
    """A test setting as results.json's protocol record holds it (resize and decode inside its
    preprocessing record)."""
    if key in ("resize", "decode"):
        return (record.get("preprocessing") or {}).get(key)
    return record.get(key)


def protocol_covered(record):
    """The evaluator flags an explicit protocol override stands for: named in the protocol label, so
    not again in the method's."""
    explicit = set(record.get("explicit") or []) if isinstance(record, dict) else set()
    return explicit | ({"fast_decode"} if "decode" in explicit else set())


def evaluation_entries(path, galleries, results=None):
    """One entry per gallery variant of a results.json (read and checked unless given): labels, seed,
    settings and per-split values."""
    if results is None:
        results = result_files.read_results(path, SPLIT_METRICS)
    folder = os.path.dirname(os.path.abspath(path))
    eval_config = optional_config(folder)
    run_dir = results.get("run_dir")
    run_config = optional_config(run_dir) if run_dir else {}
    if not run_config and not run_dir:  # a trainer's final_test/ folder: the run is its parent
        parent = optional_config(os.path.dirname(folder), strict=False)
        run_config = parent if parent.get("method") in display.METHOD_NAMES else {}
    kind = display.results_method(results, run_config)
    train_args = run_config.get("args", {}) if isinstance(run_config.get("args"), dict) else {}
    eval_args = eval_config.get("args", {}) if isinstance(eval_config.get("args"), dict) else {}
    covered = protocol_covered(results.get("protocol"))
    settings = {k: hashable(v) for k, v in eval_args.items() if k not in IGNORED_ARGS and k not in covered}
    settings.update({k: hashable(v) for k, v in train_args.items() if k not in IGNORED_ARGS})
    cuda = str(eval_args.get("device", "")).startswith("cuda")
    protocol = protocol_label(results.get("protocol"), kind, results["gallery_variants"], cuda)
    test_dataset = dataset_of(results.get("test_dir"), results.get("dataset"))
    test_set = display.test_set_name(results.get("test_dir", "?"), test_dataset)
    train_dirs = train_args.get("data_dir")
    first_train_dir = train_dirs[0] if isinstance(train_dirs, list) and train_dirs else train_dirs
    train_set = display.training_set_name(train_dirs, dataset_of(first_train_dir, train_args.get("data_type")))
    root = result_files.split_root(results)
    entries = []
    for variant in results["gallery_variants"]:
        if galleries != "both" and variant != galleries:
            continue
        splits = [r for r in results["rows"] if r["gallery"] == variant]
        summary = (results.get("summary") or {}).get(variant) or {}
        impostors = [r.get("num_impostor_pairs") for r in splits]
        entries.append({
            "labels": {"method": display.method_name(kind), "backbone": display.backbone_name(results.get("backbone")),
                       "train_set": train_set, "test_set": test_set, "gallery": display.gallery_name(variant, test_dataset),
                       "protocol": protocol},
            "protocol_name": protocol.split(" (")[0], "kind": kind, "settings": settings,
            "final_test": not eval_config and bool(run_config),
            "seed": train_args.get("seed") if train_args else None,
            "split_root": root, "split_id": (0, variant),  # (the split root's number under its name, see below)
            "splits": splits, "table_mAP": results.get("table_mAP", "mAP_hand"),
            "cmc": summary.get("cmc_mean"), "roc": summary.get("roc_mean"),
            "min_impostors": None if not impostors or None in impostors else min(impostors),
            "pretrained": results.get("pretrained"), "source": folder})
    return entries


def label_settings(entries):
    """Name in each entry's method label every setting that differs between entries of its method and
    backbone (a setting that changes only with the backbone, e.g. RN50's input size, is the backbone's).
    A trainer's final test records no evaluator flags (such as the re-ranking's): a setting it lacks
    is not a difference of its own."""
    by_method = {}
    for entry in entries:
        by_method.setdefault((entry["labels"]["method"], entry["labels"]["backbone"]), []).append(entry)
    for (method, _), group in by_method.items():
        keys = sorted({k for e in group for k in e["settings"]})
        differing = [k for k in keys if len({e["settings"].get(k) for e in group
                                             if k in e["settings"] or not e["final_test"]}) > 1]
        for entry in group:
            entry["settings_label"] = display.settings_label([(k, entry["settings"].get(k)) for k in differing])
            if entry["settings_label"]:
                entry["labels"]["method"] = f"{method} ({entry['settings_label']})"


def row_key(entry):
    return tuple(entry["labels"].get(k) for k in tables.LABEL_HEADINGS) + (entry["split_id"],)


def group_rows(entries):
    """Entries that differ only in their seed -> rows. Two evaluations of one setting and seed (e.g.
    a run's final_test/ and eval_best/) stay apart, labelled by their folder."""
    by_key = {}
    for entry in entries:
        by_key.setdefault(row_key(entry), []).append(entry)
    for key, group in list(by_key.items()):
        seeds = [e["seed"] for e in group]
        if len(set(seeds)) < len(seeds):
            del by_key[key]
            for entry in group:
                entry["labels"]["method"] += f" [{os.sep.join(entry['source'].split(os.sep)[-2:])}]"
                by_key[row_key(entry)] = [entry]
    return list(by_key.values())


def distinguish_split_roots(entries):
    """Entries measured on one split root (the same splits.json content wherever its folder lies now,
    result_files.same_split_root) share a test set; split roots that really differ under one test-set
    name are told apart in its label by what differs ("split seed 1", "5 splits", ...)."""
    by_name = {}
    for entry in entries:
        roots = by_name.setdefault(entry["labels"]["test_set"], [])
        number = next((i for i, r in enumerate(roots) if result_files.same_split_root(r, entry["split_root"])), None)
        if number is None:
            number = len(roots)
            roots.append(entry["split_root"])
        elif entry["split_root"]["digest"] and not roots[number]["digest"]:
            roots[number] = entry["split_root"]  # the one whose manifest is still there describes it best
        entry["split_id"] = (number, entry["split_id"][1])
    for name, roots in by_name.items():
        if len(roots) > 1:
            names = result_files.split_root_names(roots)
            for entry in entries:
                if entry["labels"]["test_set"] == name:
                    entry["labels"]["test_set"] = f"{name} ({names[entry['split_id'][0]]})"


def metric_values(entry, column):
    """{split index: value} of one metric (column "mAP": the entry's protocol convention)."""
    key = entry["table_mAP"] if column == "mAP" else column
    return {r.get("split", i): r.get(key) for i, r in enumerate(entry["splits"])}


def build_row(group, columns):
    group = sorted(group, key=lambda e: (e["seed"] is None, str(e["seed"])))
    first = group[0]
    row = {"labels": dict(first["labels"]), "seeds": [e["seed"] for e in group if e["seed"] is not None],
           "num_splits": len(first["splits"]), "settings": first.get("settings_label") or "",
           "sources": [e["source"] for e in group], "table_mAP": first["table_mAP"], "kind": first["kind"],
           "pretrained": first["pretrained"], "metrics": {},
           "group": (first["labels"]["test_set"], first["labels"]["gallery"], first["protocol_name"],
                     first["split_id"])}
    for column in columns:
        values = {e["seed"]: metric_values(e, column) for e in group}
        stats = significance.aggregate({s: [v[i] for i in sorted(v)] for s, v in values.items()})
        row["metrics"][column] = dict(stats, values=values)
    cmcs = [e["cmc"][:CMC_RANKS] for e in group if e["cmc"]]
    row["cmc"] = [sum(c[i] for c in cmcs) / len(cmcs) for i in range(min(map(len, cmcs)))] if cmcs else None
    row["roc"] = measurable_roc([e for e in group if e["roc"]])
    return row


def measurable_roc(entries):
    """The mean ROC of the entries where FAR x impostor pairs >= verification.MIN_FALSE_ACCEPTS in
    every split (the rule of the TAR columns); None when no point is measurable."""
    if not entries or any(e["min_impostors"] is None for e in entries):
        return None
    impostors = min(e["min_impostors"] for e in entries)
    far = entries[0]["roc"]["far"]
    points = []
    for i, f in enumerate(far):
        tars = [e["roc"]["tar"][i] for e in entries]
        if f * impostors >= verification.MIN_FALSE_ACCEPTS and None not in tars:
            points.append((f, sum(tars) / len(tars)))
    return points or None


def compare(rows, columns):
    """Fill best / p / pairs / tied of every metric, each test set's rows compared among themselves."""
    groups = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    for group in groups.values():
        for column in columns:
            found = significance.compare_with_best([row["metrics"][column] for row in group], column)
            for row, result in zip(group, found):
                row["metrics"][column].update(result)


def collect(paths, columns, galleries="both", mixed=False):
    """The table's rows from the results.json files the paths name (robustness benchmarks skipped)."""
    files, entries = find_results(paths), []
    for path in files:
        results = read_json(path)
        if result_files.is_robustness(results):
            print(f"skipped {path}: a robustness benchmark (eval_robustness.py), not an evaluation")
            continue
        entries += evaluation_entries(path, galleries, result_files.check_results(results, path, SPLIT_METRICS))
    if not entries:
        raise EvaluationInputError(f"no rows for --gallery {galleries} in {len(files)} results.json file(s)"
                                   + (" (robustness benchmarks do not go in this table)" if files else ""))
    names = sorted({e["protocol_name"] for e in entries})
    if len(names) > 1 and not mixed:
        raise EvaluationInputError(f"the results were evaluated under different protocols ({', '.join(names)}); "
                                   f"collect one protocol per table or pass --mixed")
    distinguish_split_roots(entries)
    label_settings(entries)
    rows = [build_row(group, columns) for group in group_rows(entries)]
    compare(rows, columns)
    return sorted(rows, key=row_order(rows))


def row_order(rows):
    """Sort key: methods in the tables' order (Zero-shot, Fine-tuned, ...), backbones and galleries
    as they first appear, training and test sets in the published tables' order."""
    methods = {name: i for i, name in enumerate(display.METHOD_ORDER)}
    seen = {}
    for row in rows:
        for key in ("method", "backbone", "gallery", "protocol"):
            seen.setdefault((key, row["labels"][key]), len(seen))

    def key(row):
        labels = row["labels"]
        base = labels["method"].split(" (")[0].split(" [")[0]
        return (methods.get(base, len(methods)), seen[("method", labels["method"])], seen[("backbone", labels["backbone"])],
                display.set_rank(labels["train_set"]), str(labels["train_set"]), display.set_rank(labels["test_set"]),
                str(labels["test_set"]), seen[("gallery", labels["gallery"])], seen[("protocol", labels["protocol"])])
    return key


def curve_label(row, shown):
    label = figures.label_for(row["labels"]["method"], row["labels"]["backbone"])
    extra = [row["labels"][k] for k in shown if row["labels"].get(k)]
    return label + (f", {', '.join(extra)}" if extra else "")


def plot(rows, prefix, columns, width=None):
    """PREFIX_cmc (and _roc where measurable, _matrix for a training x test set matrix) .pdf/.png."""
    written = []
    varying = tables.varying_labels(rows)
    panel_keys = ["test_set"] + [k for k in ("gallery", "protocol") if k in varying and not tables.follows_group(rows, k)]
    in_label = [k for k in ("train_set",) if k in varying]

    def panel(row):
        return ", ".join(str(row["labels"][k]) for k in panel_keys) or row["labels"]["test_set"]

    train_sets = list(dict.fromkeys(r["labels"]["train_set"] for r in rows if r["labels"]["train_set"]))

    def marker(row):  # the training set, when it varies within a panel (cross-aspect)
        if not in_label or not row["labels"]["train_set"]:
            return None
        return figures.MARKERS[train_sets.index(row["labels"]["train_set"]) % len(figures.MARKERS)]

    cmc = [{"panel": panel(r), "label": curve_label(r, in_label), "method": r["labels"]["method"].split(" (")[0],
            "backbone": r["labels"]["backbone"], "x": list(range(1, len(r["cmc"]) + 1)),
            "y": [100 * v for v in r["cmc"]], "marker": marker(r)} for r in rows if r["cmc"]]
    fig = figures.curve_figure(cmc, "rank", "identification rate (%)", xlim=(0.5, CMC_RANKS + 0.5), integer_x=True,
                               width=width)
    written += figures.save(fig, f"{prefix}_cmc")
    roc = [{"panel": panel(r), "label": curve_label(r, in_label), "method": r["labels"]["method"].split(" (")[0],
            "backbone": r["labels"]["backbone"], "x": [f for f, _ in r["roc"]], "y": [100 * t for _, t in r["roc"]],
            "marker": marker(r)} for r in rows if r["roc"]]
    if roc:
        fig = figures.curve_figure(roc, "false accept rate", "true accept rate (%)", xscale="log", width=width)
        written += figures.save(fig, f"{prefix}_roc")
    if "train_set" in varying and len({r["labels"]["test_set"] for r in rows}) > 1:
        written += figures.save(matrix(rows, columns[0], width), f"{prefix}_matrix")
    return written


def matrix(rows, column, width=None):
    """Heat maps of one metric, training set x test set, one per trained method and backbone, with the
    zero-shot row of the same backbone on top as the untrained reference."""
    zero_shot = "none (zero-shot)"
    models = {}
    for row in rows:
        models.setdefault((row["labels"]["method"], row["labels"]["backbone"]), []).append(row)
    trained = {k: v for k, v in models.items() if any(r["labels"]["train_set"] for r in v)}
    train_sets = list(dict.fromkeys(r["labels"]["train_set"] for r in rows if r["labels"]["train_set"]))
    train_sets.sort(key=display.set_rank)
    test_sets = sorted(dict.fromkeys(r["labels"]["test_set"] for r in rows), key=display.set_rank)
    matrices = []
    for (method, backbone), group in (trained or models).items():
        cells = {(r["labels"]["train_set"] or zero_shot, r["labels"]["test_set"]): r for r in group}
        baseline = [r for (m, b), g in models.items() if b == backbone and (m, b) not in trained for r in g]
        cells.update({(zero_shot, r["labels"]["test_set"]): r for r in baseline if not r["labels"]["train_set"]})
        mine = [t for t in [zero_shot] + train_sets if any(k[0] == t for k in cells)]
        values = [[None if (t, s) not in cells or cells[(t, s)]["metrics"][column]["mean"] is None
                   else 100 * cells[(t, s)]["metrics"][column]["mean"] for s in test_sets] for t in mine]
        matrices.append({"title": figures.label_for(method, backbone), "rows": mine, "columns": test_sets,
                         "values": values})
    return figures.matrix_figure(matrices, tables.METRIC_HEADINGS.get(column, column), width or figures.DOUBLE_COLUMN)


def set_names(base):
    """Every file of the table set with prefix name `base`, figures included."""
    return [f"{base}.{ext}" for ext in ("md", "tex", "csv", "json")] + [
        f"{base}_{kind}.{ext}" for kind in FIGURES for ext in ("pdf", "png")]


def check_out(out):
    """--out is a file prefix in a folder that exists or can be made (nothing is written here)."""
    base = os.path.basename(out)
    if not base or base in (".", "..") or os.path.isdir(out):
        example = os.path.join(out or ".", "table")
        raise EvaluationInputError(f"--out {out!r} is a folder; --out takes a file prefix: --out {example} writes "
                                   f"table.md, table.tex, table.csv and table.json in it")
    outputs.check_writable(os.path.dirname(os.path.abspath(out)), "--out")


def check_existing(out, force):
    """Under the lock: an earlier set with this prefix is kept unless --force, and --force replaces only
    a set this program wrote (its PREFIX.json says so: tables.is_table_json); a set name taken by a
    folder or by another program's file is refused either way."""
    folder, base = os.path.split(os.path.abspath(out))
    existing = [os.path.join(folder, n) for n in set_names(base) if os.path.lexists(os.path.join(folder, n))]
    for path in existing:
        if not os.path.isfile(path) or os.path.islink(path):
            raise OutputExistsError(f"{path} is not a file this program wrote; move it away or choose another --out")
    if not existing:
        return
    marker = os.path.join(folder, f"{base}.json")
    try:
        ours = os.path.isfile(marker) and tables.is_table_json(read_json(marker))
    except ClipFHError:
        ours = False
    if not ours:
        raise OutputExistsError(f"{existing[0]} is not part of a table written by collect_results.py, so --force does "
                                f"not replace it; move it away or choose another --out")
    if not force:
        raise OutputExistsError(f"{existing[0]} already exists; pass --force to replace the table and figures of "
                                f"--out {out} (kept until the new ones are complete) or choose another --out")


def check_out_place(out, paths):
    """Before the lock (its file goes beside the outputs): --out lies neither in an evaluation or run
    folder nor in or below a folder whose results.json this call reads."""
    folder = os.path.realpath(os.path.dirname(os.path.abspath(out)))
    for results in find_results(paths):
        source = os.path.realpath(os.path.dirname(os.path.abspath(results)))
        if folder == source or folder.startswith(source + os.sep):
            raise EvaluationInputError(f"--out {out} lies in an evaluation folder it reads ({source}); its files "
                                       f"would mix with the evaluation's: choose another folder")
    held = evaluation_files(folder)
    if held:
        raise EvaluationInputError(f"--out {out} lies in an evaluation or run folder ({folder} holds {held}); its "
                                   f"files would mix with that folder's: choose another folder")


def evaluation_files(folder):
    """The first file that makes `folder` an evaluation folder (results.json, result_split*.mat, an
    evaluator's config.json) or a run folder (net_*.pth, a trainer's config.json), or None."""
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    for name in names:
        if name == "results.json" or (name.startswith("result_split") and name.endswith(".mat")) or (
                name.startswith("net_") and name.endswith(".pth")):
            return name
    if "config.json" in names and "args" in optional_config(folder, strict=False):
        return "config.json"
    return None


@contextmanager
def staged_set(out):
    """Yield a prefix inside `.<name>.tmp-<pid>/` beside the outputs; when the block ends normally its
    files replace the whole set of --out (swap_set). An error or interrupt removes the staging folder
    and leaves the old set as it was."""
    folder, base = os.path.split(os.path.abspath(out))
    tmp = outputs.staging_name(out, "tmp")
    with outputs.output_errors(tmp):
        if os.path.lexists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    try:
        with outputs.output_errors(out):
            yield os.path.join(tmp, base)
        atomic_write_json(os.path.join(tmp, SET_MANIFEST), sorted(set(os.listdir(tmp)) & set(set_names(base))))
    except OutputWriteError as err:  # name the output, not its staged twin
        with outputs.signals_deferred():
            shutil.rmtree(tmp, ignore_errors=True)
        raise OutputWriteError(str(err).replace(tmp, folder)) from err
    except BaseException:
        with outputs.signals_deferred():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    new = outputs.staging_name(out, "new")
    with outputs.signals_deferred(), outputs.output_errors(out):
        os.rename(tmp, new)  # the new set is complete: from here on a crash is finished by the next run
        swap_set(new, out)


def swap_set(new, out):
    """Put the staged set `new` in place of the set of --out: first remove the old files the new set
    does not have, then rename each new file over its old one, then remove `new`. Idempotent, so that
    the next holder of the lock can finish a swap a killed process began (recover_set)."""
    folder, base = os.path.split(os.path.abspath(out))
    with open(os.path.join(new, SET_MANIFEST)) as f:
        written = json.load(f)
    for name in set(set_names(base)) - set(written):
        if os.path.lexists(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
    for name in written:
        if os.path.lexists(os.path.join(new, name)):
            os.replace(os.path.join(new, name), os.path.join(folder, name))
    shutil.rmtree(new)


def recover_set(out):
    """Under the lock: remove a staging folder a dead process left, and finish a swap it began."""
    folder, base = os.path.split(os.path.abspath(out))
    for entry in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        for kind in ("tmp", "new"):
            start = f".{base}.{kind}-"
            if entry.startswith(start) and entry[len(start):].isdigit():
                path = os.path.join(folder, entry)
                with outputs.signals_deferred(), outputs.output_errors(out):
                    if kind == "new" and os.path.isfile(os.path.join(path, SET_MANIFEST)):
                        swap_set(path, out)
                    else:
                        shutil.rmtree(path, ignore_errors=True)


def run(args):
    """Check --out (refused in an evaluation or run folder, or in a folder it reads), lock it, read and
    check every results.json, refuse an existing set without --force (or one not ours), build the table
    set (and figures) in a staging folder and swap it in whole."""
    check_out(args.out)
    check_out_place(args.out, args.paths)
    with outputs.FolderLock(args.out, "another collect_results.py"):
        recover_set(args.out)
        rows = collect(args.paths, args.columns, args.gallery, args.mixed)
        check_existing(args.out, args.force)
        if args.plot and not all(row["cmc"] for row in rows):
            missing = next(row["sources"][0] for row in rows if not row["cmc"])
            raise EvaluationInputError(f"{missing}/results.json holds no mean CMC curve; re-run its evaluation to "
                                       f"plot it")
        with staged_set(args.out) as staged:
            written, markdown = tables.write(staged, rows, args.columns, args.layout)
            if args.plot:
                width = {"single": figures.SINGLE_COLUMN, "double": figures.DOUBLE_COLUMN}.get(args.figure_width)
                written += plot(rows, staged, args.columns, width)
    print(markdown)
    return rows, [os.path.join(os.path.dirname(args.out), os.path.basename(p)) for p in written]


def main(argv=None):
    args = parse_args(argv)
    try:
        rows, written = run(args)
    except ClipFHError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"Wrote a table of {len(rows)} row(s) to {', '.join(written)}")
    return rows


if __name__ == "__main__":
    interrupts.sigterm_as_ctrl_c(main)()  # as a script only: reproduce.py and demo.py see the KeyboardInterrupt
