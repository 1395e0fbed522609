"""An evaluation's results.json (and the config.json of its run) read back and checked field by field
before a table is built from it: a value of the wrong type, a NaN, a fraction outside 0-1, split rows
that do not cover num_splits x gallery variants, an unknown mAP convention are each one line
(InputFileError) naming the file and the field.

    results = result_files.read_results(path, metrics)      # collect_results.py

Also what identifies the model and the split root a results.json was measured on (model_record, the
keys every evaluator records; split_root, the test set wherever its folder lies now).

Depends on utils/io, utils/errors and utils/splits (the manifest reader)."""
import hashlib
import json
import numbers
import os
import re

from .errors import ClipFHError, InputFileError
from .io import read_json
from .splits import read_manifest

TABLE_MAPS = ("mAP_hand", "mAP_standard")  # the conventions a protocol's "table_mAP" can name
FIX = "it was edited by hand or damaged: re-run its evaluation"


def split_rows_problem(results, num_splits):
    """Why results["rows"] do not hold one row per split and gallery variant (a sentence), or None
    (the check recipe_steps.evaluation_status makes too, with the split root's num_splits)."""
    variants = results["gallery_variants"]
    expected = num_splits * len(variants)
    if len(results["rows"]) != expected:
        return (f"holds {len(results['rows'])} split rows, not {num_splits} splits x {len(variants)} gallery "
                f"variant(s) = {expected}")
    return None


def is_robustness(results):
    """True for the results.json of eval_robustness.py (its rows are corruptions, not splits)."""
    return "families" in results and "degrade" in results


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _fraction(value):
    """A number between 0 and 1 (NaN is not: it fails both comparisons)."""
    return _is_number(value) and 0 <= value <= 1


def _text(value, limit=40):
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def read_results(path, metrics):
    """results.json of an evaluation, every field the tables use checked (check_results)."""
    return check_results(read_json(path), path, metrics)


def check_results(results, path, metrics):
    """`results` (read from `path`) with every field the tables use checked; `metrics`: the per-split
    metric keys that must be None or a fraction where a row has them. Returns `results`."""
    missing = [k for k in ("rows", "gallery_variants", "num_splits") if k not in results]
    if missing:
        raise InputFileError(f"{path} lacks {', '.join(repr(k) for k in missing)}; it is not the results.json of an "
                             f"evaluation of this repository, or {FIX}")

    def refuse(field, value, expected):
        raise InputFileError(f"{path}: {field} is {_text(value)}, not {expected}; {FIX}")

    variants = results["gallery_variants"]
    if (not isinstance(variants, list) or not variants or not all(isinstance(v, str) for v in variants)
            or len(set(variants)) < len(variants)):
        refuse('"gallery_variants"', variants, "a list of distinct gallery names")
    num_splits = results["num_splits"]
    if not isinstance(num_splits, int) or isinstance(num_splits, bool) or num_splits < 1:
        refuse('"num_splits"', num_splits, "a whole number of at least 1")
    for key in ("method", "model_kind", "backbone", "test_dir", "dataset", "run_dir"):
        if results.get(key) is not None and not isinstance(results[key], str):
            refuse(f'"{key}"', results[key], "a string")
    if results.get("split_seed") is not None and (not isinstance(results["split_seed"], int)
                                                  or isinstance(results["split_seed"], bool)):
        refuse('"split_seed"', results["split_seed"], "a whole number")
    if results.get("pretrained") not in (None, True, False):
        refuse('"pretrained"', results["pretrained"], "true, false or null")
    if results.get("table_mAP", TABLE_MAPS[0]) not in TABLE_MAPS:
        refuse('"table_mAP"', results["table_mAP"], " or ".join(TABLE_MAPS))
    check_protocol(results.get("protocol"), refuse)
    rows = results["rows"]
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        refuse('"rows"', rows, "a list of split rows (objects)")
    seen = set()
    for i, row in enumerate(rows):
        if row.get("gallery") not in variants:
            refuse(f'"gallery" of rows[{i}]', row.get("gallery"), f"one of gallery_variants ({', '.join(variants)})")
        split = row.get("split")
        if not isinstance(split, int) or isinstance(split, bool) or not 0 <= split < num_splits:
            refuse(f'"split" of rows[{i}]', split, f"a split number from 0 to {num_splits - 1}")
        if (split, row["gallery"]) in seen:
            raise InputFileError(f"{path}: rows[{i}] repeats split {split} of gallery {row['gallery']}; {FIX}")
        seen.add((split, row["gallery"]))
        for key in metrics:
            if row.get(key) is not None and not _fraction(row[key]):
                refuse(f'"{key}" of rows[{i}]', row[key], "a number between 0 and 1 (or null where unmeasured)")
        impostors = row.get("num_impostor_pairs")
        if impostors is not None and (not isinstance(impostors, int) or isinstance(impostors, bool) or impostors < 0):
            refuse(f'"num_impostor_pairs" of rows[{i}]', impostors, "a whole number")
    problem = split_rows_problem(results, num_splits)
    if problem:
        raise InputFileError(f"{path} {problem}; the evaluation was cut short or edited: re-run it")
    check_summary(results.get("summary"), variants, refuse)
    return results


def check_protocol(record, refuse):
    """A protocol record is a name or an object whose "explicit" lists flag names and whose
    "preprocessing" is an object."""
    if record is None or isinstance(record, str):
        return
    if not isinstance(record, dict):
        refuse('"protocol"', record, "a protocol record (an object)")
    if record.get("protocol") is not None and not isinstance(record["protocol"], str):
        refuse('"protocol.protocol"', record["protocol"], "a protocol name")
    explicit = record.get("explicit")
    if explicit is not None and (not isinstance(explicit, list) or not all(isinstance(k, str) for k in explicit)):
        refuse('"protocol.explicit"', explicit, "a list of flag names")
    if record.get("preprocessing") is not None and not isinstance(record["preprocessing"], dict):
        refuse('"protocol.preprocessing"', record["preprocessing"], "a preprocessing record (an object)")


def check_summary(summary, variants, refuse):
    """summary: {variant: {"cmc_mean": [fraction per rank], "roc_mean": {"far": [...], "tar": [...]}}}."""
    if summary is None:
        return
    if not isinstance(summary, dict):
        refuse('"summary"', summary, "an object of gallery variants")
    for variant in variants:
        entry = summary.get(variant)
        if entry is None:
            continue
        if not isinstance(entry, dict):
            refuse(f'"summary.{variant}"', entry, "an object")
        cmc = entry.get("cmc_mean")
        if cmc is not None and (not isinstance(cmc, list) or not cmc or not all(map(_fraction, cmc))):
            refuse(f'"summary.{variant}.cmc_mean"', cmc, "a list of numbers between 0 and 1 (one per rank)")
        roc = entry.get("roc_mean")
        if roc is None:
            continue
        far = roc.get("far") if isinstance(roc, dict) else None
        tar = roc.get("tar") if isinstance(roc, dict) else None
        if not isinstance(far, list) or not far or not all(_fraction(f) and f > 0 for f in far):
            refuse(f'"summary.{variant}.roc_mean.far"', far, "a list of false accept rates in (0, 1]")
        if not isinstance(tar, list) or len(tar) != len(far) or not all(t is None or _fraction(t) for t in tar):
            refuse(f'"summary.{variant}.roc_mean.tar"', tar, f"a list of {len(far)} true accept rates (one per "
                                                             f"false accept rate; null where unmeasurable)")


def check_run_config(config, path):
    """The fields of a config.json the tables read: "method" a name, "args" an object whose "seed" is a
    whole number and whose "data_dir" is a folder or a list of folders."""
    def refuse(field, value, expected):
        raise InputFileError(f"{path}: {field} is {_text(value)}, not {expected}; it was edited by hand or "
                             f"damaged: restore it or run it again")
    if config.get("method") is not None and not isinstance(config["method"], str):
        refuse('"method"', config["method"], "a method name")
    args = config.get("args")
    if args is None:
        return config
    if not isinstance(args, dict):
        refuse('"args"', args, "an object of arguments")
    seed = args.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        refuse('"args.seed"', seed, "a whole number")
    data_dir = args.get("data_dir")
    if data_dir is not None and not isinstance(data_dir, str) and not (
            isinstance(data_dir, list) and all(isinstance(d, str) for d in data_dir)):
        refuse('"args.data_dir"', data_dir, "a folder or a list of folders")
    if args.get("data_type") is not None and not isinstance(args["data_type"], str):
        refuse('"args.data_type"', args["data_type"], "a dataset name")
    return config


def model_record(run_dir, config, split_seed):
    """The keys results.json records of a trained model and its test split root, the same for the
    evaluator (eval_query_gallery_finetune.py) and a trainer's final test (utils/runs.final_test), so
    that collect_results.py pairs the two: config is the run's config.json."""
    args = config.get("args") or {}
    return {"run_dir": os.path.abspath(run_dir), "model_kind": config["model"].get("kind", "finetune"),
            "backbone": config["model"]["backbone"]["name"], "trained_on": args.get("data_dir"),
            "pretrained": config.get("pretrained"), "split_seed": split_seed}


def split_root(results):
    """What tells the split root of a (checked) results.json from another, wherever its folder lies now:
    {"digest": SHA-256 of its splits.json content but the query/gallery splits (identities, train/test
    sets, seed), "split_digests": one per query/gallery split, both None when the recorded test_dir no
    longer holds the manifest it was measured on; "dataset", "split_seed", "num_splits": from the
    manifest, else as results.json records them; "sizes": {gallery variant: ((num_query, num_gallery)
    per split)}}."""
    test_dir = results.get("test_dir")
    try:
        manifest = read_manifest(test_dir) if isinstance(test_dir, str) and os.path.isdir(test_dir) else None
    except ClipFHError:
        manifest = None
    recorded = {"dataset": results.get("dataset"), "split_seed": results.get("split_seed")}
    found = {"dataset": (manifest or {}).get("dataset"), "split_seed": (manifest or {}).get("seed")}
    if any(recorded[k] is not None and recorded[k] != found[k] for k in recorded):
        manifest = None  # the folder was prepared again since: not the splits that were measured
    sizes = {}
    for row in sorted(results["rows"], key=lambda r: (str(r.get("gallery")), r.get("split") if isinstance(
            r.get("split"), int) else -1)):
        sizes.setdefault(row.get("gallery"), []).append((row.get("num_query"), row.get("num_gallery")))
    digest, split_digests = None, None
    if manifest:
        sets = manifest["sets"]
        numbered = {n for n in sets if re.fullmatch(r"(query|gallery)\d+(_all)?", n)}
        digest = _digest({k: v for k, v in manifest.items() if k != "num_splits"}, sets={
            n: rows for n, rows in sets.items() if n not in numbered})
        split_digests = []
        while f"query{len(split_digests)}" in sets:
            i = len(split_digests)
            split_digests.append(_digest({n: sets.get(n) for n in (f"query{i}", f"gallery{i}", f"gallery{i}_all")}))
    return {"digest": digest, "split_digests": split_digests, "num_splits": results.get("num_splits"),
            "sizes": {variant: tuple(pairs) for variant, pairs in sizes.items()},
            **{k: found[k] if manifest else recorded[k] for k in recorded}}


def _digest(record, **changes):
    return hashlib.sha256(json.dumps(dict(record, **changes), sort_keys=True).encode()).hexdigest()


def same_split_root(a, b):
    """True when two split_root records may describe one split root: the same manifest content where
    both are known, else the same description (an unrecorded dataset or seed matches any). A root with
    fewer splits of the same draw (prepared with a smaller --num_splits) is the same test set: its
    splits are the first ones of the other (utils/splits.make_split_sets)."""
    if a["digest"] and b["digest"]:
        common = min(len(a["split_digests"]), len(b["split_digests"]))
        return a["digest"] == b["digest"] and a["split_digests"][:common] == b["split_digests"][:common]
    if any(a[k] is not None and b[k] is not None and a[k] != b[k] for k in ("dataset", "split_seed")):
        return False
    return all(a["sizes"][v][:len(b["sizes"][v])] == b["sizes"][v][:len(a["sizes"][v])]
               for v in set(a["sizes"]) & set(b["sizes"]))


def split_root_names(roots):
    """Words that tell split roots of one test-set name apart: the fields that differ between them
    (the split seed, the number of splits, the gallery sizes), numbered where those are the same."""
    def described(root, key):
        if key == "split_seed":
            return f"split seed {root[key]}"
        if key == "num_splits":
            return f"{root[key]} splits"
        if key == "dataset":
            return f"dataset {root[key]}"
        gallery = next(iter(root["sizes"].values()), ((None, None),))[0][1]
        return f"{gallery} gallery images"
    differing = [k for k in ("split_seed", "num_splits", "dataset", "sizes")
                 if len({json.dumps(r[k], sort_keys=True) for r in roots}) > 1]
    names = [", ".join(described(r, k) for k in differing) for r in roots]
    numbered = []
    for name in names:  # the same description (other identities, another draw): numbered in reading order
        same = [n for n in names if n == name]
        numbered.append(name if len(same) == 1 else ", ".join(filter(None, [
            name, f"split root {names[:len(numbered) + 1].count(name)} of {len(same)}"])))
    return numbered
