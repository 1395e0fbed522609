"""Feature extraction, .mat result files, validation, and the query/gallery evaluation over the
Monte-Carlo splits that both evaluators and the trainers' final test share. The evaluation runs in
four steps: encode_split_images -> score_splits -> summarise -> write_results (+ print_results).
An evaluation's folder is written whole or not at all (utils.outputs): one evaluation at a time,
checked for space before the encoding, built beside the old one and swapped in at the end."""
import os
import struct
import time
import zlib
from contextlib import ExitStack

import numpy as np
import scipy.io
import torch
from tqdm import tqdm

from . import metrics, outputs, preprocessing as preprocessing_records, verification
from .errors import EvaluationInputError, InputFileError
from .io import (atomic_savemat, bars_off, atomic_write_json, autocast, format_results_table, resolve_amp,
                 write_metrics_csv, write_run_config)
from .splits import GALLERY_VARIANTS, gallery_set_name, read_split_layout, read_split_sets, result_mat_name
from .data import CLIP_MEAN, CLIP_STD, ImageListDataset, eval_transform

METRIC_CONVENTIONS = {
    "rank1..rank20, mAP_hand, mINP": "all queries count; a query without a true match counts 0 (MBA-Net / "
                                    "CLIP-HandID / CLIP-FH)",
    "mAP_hand": "trapezoid-rule AP (MBA-Net / CLIP-HandID tables)",
    "mAP_standard": "non-interpolated AP over queries with a match (torchreid / CLIP-ReID / fast-reid / CLIP-FH)",
    "std": "sample standard deviation over the splits (ddof 1)",
    "EER, AUC, TAR@<FAR>": "verification over every query x gallery pair (genuine = same identity), "
                           "see utils/verification.py; TAR None when FAR x impostor pairs < 10"}


def metric_names():
    """Every per-split metric of an evaluation, in table and CSV order: the retrieval metrics
    (metrics.METRIC_NAMES), then the verification ones. Rows also hold the "cmc" and "roc" curves."""
    return metrics.METRIC_NAMES + verification.VERIFICATION_NAMES


@torch.no_grad()
def extract_features(forward_fn, loader, device, amp="none", flip=False, progress=None, desc="features"):
    """forward_fn(images) over a loader of (images, labels), concatenated as fp32 on the CPU, and the
    labels: (outputs, labels). Runs under autocast `amp`. With flip the output is
    f(x) + f(mirror(x)), each term in fp32."""
    outputs, labels = [], []
    for images, batch_labels in tqdm(loader, desc=desc, unit="batch", leave=False, disable=bars_off(progress)):
        images = images.to(device, non_blocking=True)
        with autocast(amp, device):
            out = forward_fn(images).float()
            if flip:
                out = out + forward_fn(images.flip(3)).float()
        outputs.append(out.cpu())
        labels.append(torch.as_tensor(batch_labels))
    return torch.cat(outputs), torch.cat(labels)


def encode_images(encode_fn, paths, size=(224, 224), batch_size=64, num_workers=0, device="cpu", flip=False,
                  amp="none", mean=CLIP_MEAN, std=CLIP_STD, desc="encode", preprocessing=None):
    """L2-normalised features (N, D) float32 numpy of the images at `paths`, in order, resized
    (bicubic, no crop) to `size` and normalised with mean/std, or, with a `preprocessing` record
    (utils.preprocessing), as it says (see extract_features)."""
    if len(paths) == 0:
        raise EvaluationInputError("no images to encode")
    dataset = ImageListDataset(paths, size, eval_transform(size, mean, std), preprocessing=preprocessing)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         pin_memory=str(device).startswith("cuda"))
    features, _ = extract_features(encode_fn, loader, device, amp, flip, progress=None, desc=desc)
    return torch.nn.functional.normalize(features, dim=1).numpy()


def _labels_for_mat(labels):
    """Integer labels when every label is a number (CLIP-HandID's format), else strings."""
    if all(label.strip().lstrip("-").isdigit() for label in labels):
        return np.array([int(label) for label in labels], dtype=np.int64)
    return np.array(labels, dtype=object)


MAT_READ_ERRORS = (scipy.io.matlab.MatReadError, ValueError, TypeError, OSError, EOFError, IndexError,
                   KeyError, UnicodeDecodeError, zlib.error, struct.error)  # what scipy raises on a damaged file


def load_result_mat(path):
    """Read a result_split{i}.mat back, checked as it is read: features float32 (N, D), labels and
    paths as 1-D arrays (paths None for files without them), rerank_dist (Q, G) or None. A truncated
    or foreign file, a missing key, shapes that disagree (feature rows vs labels or paths, query vs
    gallery feature size) or NaN/inf features raise InputFileError naming the file."""
    if not os.path.isfile(path):
        raise EvaluationInputError(f"result file {path} does not exist; run an eval_query_gallery_*.py script first")
    try:
        mat = scipy.io.loadmat(path)
    except MAT_READ_ERRORS as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputFileError(f"cannot read {path} ({first}); it is truncated or not a result file: evaluate "
                             f"again") from None
    missing = [k for k in ("query_f", "query_label", "gallery_f", "gallery_label") if k not in mat]
    if missing:
        raise InputFileError(f"{path} lacks {', '.join(missing)}; it is not a result file of our evaluators")

    def strings(key):
        if key not in mat:
            return None
        return np.array([str(np.asarray(v).reshape(-1)[0]) if np.size(v) else "" for v in mat[key].reshape(-1)])

    def labels(key):
        values = mat[key].reshape(-1)
        return values if values.dtype != object else strings(key)

    try:
        result = {"query_f": mat["query_f"].astype(np.float32), "query_label": labels("query_label"),
                  "query_path": strings("query_path"), "gallery_f": mat["gallery_f"].astype(np.float32),
                  "gallery_label": labels("gallery_label"), "gallery_path": strings("gallery_path"),
                  "rerank_dist": mat["rerank_dist"].astype(np.float32) if "rerank_dist" in mat else None}
    except (ValueError, TypeError) as err:
        raise InputFileError(f"{path} holds values of the wrong type ({err}); it is not a result file of our "
                             f"evaluators") from None
    check_result_arrays(result, path)
    return result


def check_result_arrays(result, path):
    """Shapes that agree and finite features, or InputFileError naming `path` and what is wrong."""
    def problem(text):
        return InputFileError(f"{path}: {text}; the file was damaged or edited: evaluate again")
    for side in ("query", "gallery"):
        features = result[f"{side}_f"]
        if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
            raise problem(f"{side}_f has shape {features.shape}, not (images, feature size)")
        for key in (f"{side}_label", f"{side}_path"):
            if result[key] is not None and len(result[key]) != len(features):
                raise problem(f"{side}_f has {len(features)} rows but {key} has {len(result[key])} entries")
        bad = int((~np.isfinite(features).all(axis=1)).sum())
        if bad:
            raise problem(f"{side}_f holds NaN or inf values in {bad} of {len(features)} rows")
    if result["query_f"].shape[1] != result["gallery_f"].shape[1]:
        raise problem(f"query_f has {result['query_f'].shape[1]}-d features but gallery_f "
                      f"{result['gallery_f'].shape[1]}-d")
    shape = (len(result["query_f"]), len(result["gallery_f"]))
    if result["rerank_dist"] is not None and (result["rerank_dist"].shape != shape
                                              or not np.isfinite(result["rerank_dist"]).all()):
        raise problem(f"rerank_dist has shape {result['rerank_dist'].shape} or non-finite values, expected {shape}")


def wanted_gallery_variants(layout, gallery, test_dir):
    """The gallery variants to evaluate: "own", "all", "both" or None (every variant the root has)."""
    available = layout["gallery_variants"]
    wanted = list(available) if gallery in (None, "both") else [gallery]
    if gallery == "both" and "all" not in available:
        wanted = ["own"]  # HD has no gallery{i}_all: 'both' means what there is
    for variant in wanted:
        if variant not in GALLERY_VARIANTS:
            raise EvaluationInputError(f"--gallery must be own, all or both, got {gallery!r}")
        if variant not in available:
            raise EvaluationInputError(f"{test_dir} has no gallery{{i}}_all sets (HD-style split root); "
                                       f"use --gallery own")
    return wanted


def encode_split_images(encode_fn, test_dir, num_splits, variants, **encode_args):
    """Encode every image of the query{i} and gallery sets once (the sets share images).
    Returns {"sets": {name: [(path, label, key)]}, "row_of_key", "paths", "features" (N, D), "seconds"}."""
    names = [f"query{i}" for i in range(num_splits)]
    names += [gallery_set_name(i, v) for i in range(num_splits) for v in variants]
    sets = read_split_sets(test_dir, names)
    row_of_key, paths = {}, []  # the union of all sets, each image once (first path seen for each key)
    for name in names:
        for path, _, key in sets[name]:
            if key not in row_of_key:
                row_of_key[key] = len(paths)
                paths.append(path)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise EvaluationInputError(f"{len(missing)} image(s) listed for {test_dir} are missing, e.g. {missing[0]}; "
                                   f"re-run the prepare script")
    start = time.time()
    features = encode_images(encode_fn, paths, desc=f"encode {len(paths)} images", **encode_args)
    seconds = time.time() - start
    bad = np.flatnonzero(~np.isfinite(features).all(axis=1))
    if len(bad):
        raise EvaluationInputError(f"the encoder produced NaN/inf features for {len(bad)} image(s), e.g. "
                                   f"{paths[bad[0]]}; try --amp none or check the checkpoint")
    return {"sets": sets, "row_of_key": row_of_key, "paths": paths, "features": features, "seconds": seconds}


def score_splits(encoded, num_splits, variants, max_rank=50, rerank=None):
    """Rank each split's gallery for its queries: cosine similarity of the features, or the
    k-reciprocal re-ranked distance when `rerank` is {"k1", "k2", "lambda_value"}. `encoded` may
    also hold "query_features" / "gallery_features" (rows as "features"): what the query / gallery
    sets take instead (eval_robustness.py: degraded queries against the clean gallery).
    Returns (rows: one metrics dict per split and variant, mats: {file name: .mat contents})."""
    sets = encoded["sets"]

    def set_arrays(name, role):
        entries, features = sets[name], encoded.get(f"{role}_features", encoded["features"])
        return (features[[encoded["row_of_key"][key] for _, _, key in entries]],
                [label for _, label, _ in entries], np.array([path for path, _, _ in entries], dtype=object))

    rows, mats = [], {}
    for i in range(num_splits):
        query_f, query_labels, query_paths = set_arrays(f"query{i}", "query")
        for variant in variants:
            gallery_name = gallery_set_name(i, variant)
            gallery_f, gallery_labels, gallery_paths = set_arrays(gallery_name, "gallery")
            mat = {"query_f": query_f, "query_label": _labels_for_mat(query_labels), "query_path": query_paths,
                   "gallery_f": gallery_f, "gallery_label": _labels_for_mat(gallery_labels),
                   "gallery_path": gallery_paths}
            if rerank:
                rerank_dist = metrics.re_ranking(query_f, gallery_f, **rerank)
                scores, mat["rerank_dist"] = -rerank_dist, rerank_dist.astype(np.float32)
            else:
                scores = query_f @ gallery_f.T
            found = metrics.query_gallery_metrics(scores, np.array(query_labels), np.array(gallery_labels),
                                                  max_rank=max_rank)
            found.update(verification.verification_metrics(scores, query_labels, gallery_labels))
            rows.append({"split": i, "gallery": variant, "query_set": f"query{i}", "gallery_set": gallery_name,
                         "num_query": len(query_labels), "num_gallery": len(gallery_labels), **found})
            mats[result_mat_name(i, variant)] = mat
    return rows, mats


def summarise(rows, variants):
    """{variant: {"mean": {metric: value}, "std": {...}, "cmc_mean": [...], "roc_mean": {"far", "tar", "threshold"}}}
    over the splits; a metric that some split could not measure (None) has mean and std None."""
    summary = {}
    for variant in variants:
        mine = [r for r in rows if r["gallery"] == variant]
        stats = {k: verification.mean_std_or_none([r[k] for r in mine]) for k in metric_names()}
        summary[variant] = {"mean": {k: m for k, (m, _) in stats.items()},
                            "std": {k: s for k, (_, s) in stats.items()},
                            "cmc_mean": np.mean([r["cmc"] for r in mine], axis=0).tolist(),
                            "roc_mean": verification.mean_roc([r["roc"] for r in mine])}
    return summary


RESULT_FILES = ("results.json", "results.csv", "config.json")


def is_result_file(name):
    """A file an evaluation writes into its folder (the rest of a folder is not ours to replace)."""
    return name in RESULT_FILES or (name.startswith("result_split") and name.endswith(".mat"))


def estimate_result_bytes(test_dir, num_splits, variants, feature_dim=None, rerank=False):
    """About what write_results writes for an evaluation of test_dir: per split and gallery, the .mat
    (features: images x feature_dim x 4 bytes; labels, paths; rerank_dist: queries x gallery x 4) and
    its rows in results.json / .csv. feature_dim None: 3072, the widest retrieval feature we build."""
    names = [f"query{i}" for i in range(num_splits)] + [gallery_set_name(i, v) for i in range(num_splits)
                                                         for v in variants]
    sets = read_split_sets(test_dir, names)

    def mat_bytes(entries):
        return sum(4 * (feature_dim or 3072) + 8 + 2 * len(path) + 64 for path, _, _ in entries)
    total = 0
    for i in range(num_splits):
        for variant in variants:
            queries, gallery = sets[f"query{i}"], sets[gallery_set_name(i, variant)]
            total += mat_bytes(queries) + mat_bytes(gallery) + 64 * 1024
            total += 4 * len(queries) * len(gallery) if rerank else 0
    return total


def write_results(out_dir, results, mats):
    """result_split*.mat, results.json and results.csv (a row per split and variant, then the mean
    and std rows of each variant) into the folder out_dir (a staged one: see evaluate_query_gallery)."""
    os.makedirs(out_dir, exist_ok=True)
    for name, mat in mats.items():
        atomic_savemat(os.path.join(out_dir, name), mat)
    atomic_write_json(os.path.join(out_dir, "results.json"), results)
    csv_rows = list(results["rows"])
    for variant in results["gallery_variants"]:
        csv_rows += [{"split": stat, "gallery": variant, **results["summary"][variant][stat]}
                     for stat in ("mean", "std")]
    write_metrics_csv(os.path.join(out_dir, "results.csv"), csv_rows, float_format=".6f",
                      columns=["split", "gallery", "num_query", "num_gallery", *metric_names()])


def open_output(out_dir, overwrite):
    """The OutputFolder of an evaluation: locked against a second evaluation into out_dir, refused
    when it holds results and `overwrite` (--force) is not given, or files that are not ours."""
    return outputs.OutputFolder(out_dir, overwrite=overwrite, flag="--force", what="another evaluation",
                                ours=is_result_file)


def print_results(results, test_dir):
    """The paper-style table (Rank-1/5/10 and the protocol's mAP), one of the other retrieval metrics
    and one of the verification metrics, mean ± std in percent."""
    table_mAP = results.get("table_mAP", "mAP_hand")
    paper = ("rank1", "rank5", "rank10", table_mAP)
    table_rows = []
    for variant in results["gallery_variants"]:
        mine = [r for r in results["rows"] if r["gallery"] == variant]
        table_rows.append((f"{results['method']} [gallery {variant}]",
                           {k: [r[k] for r in mine] for k in metric_names()}))
    others = [k for k in metrics.METRIC_NAMES if k not in paper]
    labels = {**metrics.METRIC_LABELS, **verification.VERIFICATION_LABELS}
    for keys, title in ((paper, f"{test_dir}: mean ± std over {results['num_splits']} split(s), percent; "
                         f"mAP = {table_mAP}"), (others, None),
                        (verification.VERIFICATION_NAMES, "verification (every query x gallery pair; n/a: "
                                                          "too few impostor pairs for that FAR)")):
        columns = [("mAP" if k == table_mAP else labels.get(k, k), k) for k in keys]
        print(format_results_table(table_rows, title=title, columns=columns))


def evaluate_query_gallery(encode_fn, test_dir, out_dir, *, gallery=None, method_name="model",
                           input_size=(224, 224), batch_size=64, num_workers=0, device="cpu", flip=False,
                           amp="none", max_rank=50, mean=CLIP_MEAN, std=CLIP_STD, rerank=None,
                           overwrite=False, extra=None, verbose=True, table_mAP="mAP_hand", preprocessing=None,
                           run_args=None, output=None, feature_dim=None):
    """The query/gallery evaluation shared by the zero-shot and fine-tuned evaluators.

    encode_fn(images) -> (B, D) features for a normalised batch (B, 3, H, W) already on `device`
    (called under torch.no_grad and autocast `amp`; default fp32). Every image
    of every query{i}, gallery{i} and gallery{i}_all of the split root `test_dir` is encoded exactly
    once; with `flip` the feature is f(x) + f(mirror(x)); features are L2-normalised and ranked by
    cosine similarity, or by the k-reciprocal re-ranked distance when `rerank` is a dict
    {"k1", "k2", "lambda_value"} (then the .mat files also hold it as `rerank_dist`).
    gallery: "own", "all", "both" or None (every variant the split root has: 11k own + all, HD own).
    Writes to `out_dir`: result_split{i}.mat (own gallery) and result_split{i}_all.mat
    (gallery{i}_all) with query_f, query_label, query_path, gallery_f, gallery_label, gallery_path;
    results.json; results.csv; with `run_args` also config.json (the arguments, `extra`, the commit).
    The folder is written whole (open_output(out_dir, overwrite), or `output` when the caller holds it
    already): its location is checked for the space of the results (feature_dim: the feature size,
    None = an upper bound) before the encoding; the files are built beside it and swapped in at the
    end, so an error, Ctrl-C or full disk leaves an earlier evaluation exactly as it was. Prints the
    paper-style tables when `verbose`, whose mAP column is `table_mAP` (the protocol's convention).
    preprocessing: the utils.preprocessing record the images are read with (protocols.test_settings
    gives it); None: the whole photo resized (bicubic) to input_size, normalised with mean/std, full
    JPEG decoding. results.json records it as "preprocessing". Returns the results dict (as in
    results.json)."""
    layout = read_split_layout(test_dir)
    variants = wanted_gallery_variants(layout, gallery, test_dir)
    num_splits = layout["num_splits"]
    if preprocessing is None:
        preprocessing = preprocessing_records.record(input_size, "squash", mean=mean, std=std)
    preprocessing_records.check(preprocessing)
    input_size = tuple(preprocessing["size"])
    with ExitStack() as stack:
        out = output or stack.enter_context(open_output(out_dir, overwrite))
        out.check_space(estimate_result_bytes(test_dir, num_splits, variants, feature_dim, bool(rerank)))
        encoded = encode_split_images(encode_fn, test_dir, num_splits, variants, batch_size=batch_size,
                                      num_workers=num_workers, device=device, flip=flip,
                                      amp=resolve_amp(amp, device), preprocessing=preprocessing)
        rows, mats = score_splits(encoded, num_splits, variants, max_rank, rerank)
        results = {"method": method_name, "test_dir": os.path.abspath(test_dir), "dataset": layout["dataset"],
                   "num_splits": num_splits, "gallery_variants": variants, "metrics": list(metric_names()),
                   "metric_conventions": METRIC_CONVENTIONS, "table_mAP": table_mAP, "input_size": list(input_size),
                   "preprocessing": preprocessing,
                   "preprocessing_text": preprocessing_records.describe(preprocessing),
                   "flip": bool(flip), "amp": resolve_amp(amp, device),
                   "rerank": dict(rerank) if rerank else None, "feature_dim": int(encoded["features"].shape[1]),
                   "num_images_encoded": len(encoded["paths"]), "encode_seconds": round(encoded["seconds"], 3),
                   "rows": rows, "summary": summarise(rows, variants), **(extra or {})}
        with out.staged() as staged:
            write_results(staged, results, mats)
            if run_args is not None:
                write_run_config(staged, run_args, extra=extra)
    if verbose:
        print_results(results, test_dir)
    return results


def validate(feature_fn, logits_fn, val_set, gallery_set, device, amp="none", batch_size=64, num_workers=0,
             acc_images=None):
    """Validation on training identities only: closed-set accuracy of logits_fn(images) on the val
    images, and retrieval with the val images as queries against the gallery (train) images by
    cosine similarity of L2-normalised feature_fn(images). Returns {"val_acc", "val_rank1", "val_mAP"}
    (standard non-interpolated AP: every gallery image of the identity is a true match).
    acc_images: indices of the val images val_acc counts, divided by all val images all the same
    (CLIP-HandID's released code: a shuffled loader that drops the incomplete batch; --reference_val_acc);
    None: every val image."""
    def loader(dataset):
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                           pin_memory=str(device).startswith("cuda"))
    val_loader = loader(val_set)
    logits, val_labels = extract_features(logits_fn, val_loader, device, amp)
    query_f, _ = extract_features(feature_fn, val_loader, device, amp)
    gallery_f, gallery_labels = extract_features(feature_fn, loader(gallery_set), device, amp)
    similarity = torch.nn.functional.normalize(query_f, dim=1) @ torch.nn.functional.normalize(gallery_f, dim=1).t()
    found = metrics.rank_metrics(similarity, val_labels.numpy(), gallery_labels.numpy(), convention="standard")
    correct = logits.argmax(dim=1) == val_labels
    if acc_images is not None:
        correct = correct[torch.as_tensor(list(acc_images), dtype=torch.long)]
    return {"val_acc": correct.sum().item() / len(val_labels),
            "val_rank1": float(found["cmc"][0]), "val_mAP": float(found["mAP"])}
