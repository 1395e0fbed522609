"""Feature extraction, .mat result files, validation, and the query/gallery evaluation over the
Monte-Carlo splits that both evaluators and the trainers' final test share."""
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from .io import _metric_table, atomic_savemat, atomic_write_json, atomic_write_text, autocast, format_results_table, mean_std
from .splits import GALLERY_VARIANTS, gallery_set_name, read_split_layout, read_split_sets, result_mat_name
from .data import CLIP_MEAN, CLIP_STD, ImageListDataset, eval_transform
from .metrics import METRIC_NAMES, query_gallery_metrics, rank_metrics, re_ranking


def _autocast(device, amp):
    """torch.autocast for `amp` in {"fp16", "bf16"} on CUDA; a no-op context otherwise ("none", CPU)."""
    import contextlib
    if amp in (None, "none") or not str(device).startswith("cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype={"fp16": torch.float16, "bf16": torch.bfloat16}[amp])


@torch.no_grad()
def extract_features(encode_fn, paths, size=(224, 224), batch_size=64, num_workers=0, device="cpu",
                     flip=False, amp="bf16", mean=CLIP_MEAN, std=CLIP_STD, normalize=True, desc="encode"):
    """Features (N, D) float32 on CPU for `paths`, in order. `encode_fn(images)` maps a normalised
    batch (B, 3, H, W) on `device` to (B, D). With `flip` the feature is the sum of the image's and its
    mirror's features. L2-normalised when `normalize`."""
    from tqdm import tqdm
    if len(paths) == 0:
        raise ValueError("extract_features: no images to encode")
    dataset = ImageListDataset(paths, size, eval_transform(size, mean, std))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers,
                                         pin_memory=str(device).startswith("cuda"))
    chunks = []
    for images, _ in tqdm(loader, desc=desc, unit="batch", leave=False):
        images = images.to(device, non_blocking=True)
        with _autocast(device, amp):
            feats = encode_fn(images).float()
            if flip:
                feats = feats + encode_fn(images.flip(3)).float()
        chunks.append(feats.cpu())
    feats = torch.cat(chunks)
    if normalize:
        feats = torch.nn.functional.normalize(feats, dim=1)
    return feats


def _labels_for_mat(labels):
    """Integer labels when every label is a number (CLIP-HandID's format), else strings."""
    if all(label.strip().lstrip("-").isdigit() for label in labels):
        return np.array([int(label) for label in labels], dtype=np.int64)
    return np.array(labels, dtype=object)


def load_result_mat(path):
    """Read a result_split{i}.mat back: features float32 (N, D), labels and paths as 1-D arrays
    (paths None for files without them), rerank_dist (Q, G) or None."""
    import scipy.io
    if not os.path.isfile(path):
        raise ValueError(f"result file {path} does not exist; run an eval_query_gallery_*.py script first")
    mat = scipy.io.loadmat(path)
    missing = [k for k in ("query_f", "query_label", "gallery_f", "gallery_label") if k not in mat]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}; it is not a result file of our evaluators")

    def strings(key):
        if key not in mat:
            return None
        return np.array([str(np.asarray(v).reshape(-1)[0]) if np.size(v) else "" for v in mat[key].reshape(-1)])

    def labels(key):
        values = mat[key].reshape(-1)
        return values if values.dtype != object else strings(key)

    return {"query_f": mat["query_f"].astype(np.float32), "query_label": labels("query_label"),
            "query_path": strings("query_path"), "gallery_f": mat["gallery_f"].astype(np.float32),
            "gallery_label": labels("gallery_label"), "gallery_path": strings("gallery_path"),
            "rerank_dist": mat["rerank_dist"].astype(np.float32) if "rerank_dist" in mat else None}


def evaluate_query_gallery(encode_fn, test_dir, out_dir, *, gallery=None, method_name="model",
                           input_size=(224, 224), batch_size=64, num_workers=0, device="cpu", flip=False,
                           amp="bf16", max_rank=50, mean=CLIP_MEAN, std=CLIP_STD, rerank=None,
                           overwrite=False, extra=None, verbose=True, table_mAP="mAP_hand"):
    """The query/gallery evaluation shared by the zero-shot and fine-tuned evaluators.

    encode_fn(images) -> (B, D) features for a normalised batch (B, 3, H, W) already on `device`
    (called under torch.no_grad and, on CUDA, autocast `amp`). Every image of every query{i},
    gallery{i} and gallery{i}_all of the split root `test_dir` is encoded exactly once (the sets
    share images); with `flip` the feature is f(x) + f(mirror(x)); features are L2-normalised and
    ranked by cosine similarity, or by the k-reciprocal re-ranked distance when `rerank` is a dict
    {"k1", "k2", "lambda_value"} (then the .mat files also hold it as `rerank_dist`).
    gallery: "own", "all", "both" or None (every variant the split root has: 11k own + all, HD own).
    Writes to `out_dir`: result_split{i}.mat (own gallery) and result_split{i}_all.mat
    (gallery{i}_all) with query_f, query_label, query_path, gallery_f, gallery_label, gallery_path;
    results.json; results.csv (a row per split and variant, then mean and std rows). Prints the
    paper-style table. Returns the results dict (as in results.json)."""
    layout = read_split_layout(test_dir)
    available = layout["gallery_variants"]
    wanted = list(available) if gallery in (None, "both") else [gallery]
    if gallery == "both" and "all" not in available:
        wanted = ["own"]  # HD has no gallery{i}_all: 'both' means what there is
    for variant in wanted:
        if variant not in GALLERY_VARIANTS:
            raise ValueError(f"--gallery must be own, all or both, got {gallery!r}")
        if variant not in available:
            raise ValueError(f"{test_dir} has no gallery{{i}}_all sets (HD-style split root); use --gallery own")
    results_path = os.path.join(out_dir, "results.json")
    if os.path.exists(results_path) and not overwrite:
        raise FileExistsError(f"{results_path} already exists; pass --force to overwrite it or choose "
                              f"another --f_name")
    splits = list(range(layout["num_splits"]))
    names = [f"query{i}" for i in splits] + [gallery_set_name(i, v) for i in splits for v in wanted]
    sets = read_split_sets(test_dir, names)

    # the union of all sets, each image once (first path seen for each key)
    index_of_key, unique_paths = {}, []
    for name in names:
        for path, _, key in sets[name]:
            if key not in index_of_key:
                index_of_key[key] = len(unique_paths)
                unique_paths.append(path)
    missing = [p for p in unique_paths if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"{len(missing)} image(s) listed for {test_dir} are missing, e.g. {missing[0]}; "
                         f"re-run the prepare script")
    start = time.time()
    features = extract_features(encode_fn, unique_paths, size=input_size, batch_size=batch_size,
                                num_workers=num_workers, device=device, flip=flip, amp=amp, mean=mean,
                                std=std, desc=f"encode {len(unique_paths)} images").numpy()
    encode_seconds = time.time() - start
    bad = np.flatnonzero(~np.isfinite(features).all(axis=1))
    if len(bad):
        raise ValueError(f"the encoder produced NaN/inf features for {len(bad)} image(s), e.g. "
                         f"{unique_paths[bad[0]]}; try --amp off or check the checkpoint")

    if overwrite:  # leftovers of an earlier run (e.g. with more splits) would not match this one
        for file in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
            if file.startswith("result_split") and file.endswith(".mat"):
                os.remove(os.path.join(out_dir, file))
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for i in splits:
        query = sets[f"query{i}"]
        query_f = features[[index_of_key[key] for _, _, key in query]]
        query_labels = [label for _, label, _ in query]
        for variant in wanted:
            gallery_set = sets[gallery_set_name(i, variant)]
            gallery_f = features[[index_of_key[key] for _, _, key in gallery_set]]
            gallery_labels = [label for _, label, _ in gallery_set]
            mat_extra = {}
            if rerank:
                rerank_dist = re_ranking(query_f, gallery_f, **rerank)
                scores, mat_extra["rerank_dist"] = -rerank_dist, rerank_dist.astype(np.float32)
            else:
                scores = query_f @ gallery_f.T
            metrics = query_gallery_metrics(scores, np.array(query_labels), np.array(gallery_labels),
                                            max_rank=max_rank)
            rows.append({"split": i, "gallery": variant, "query_set": f"query{i}",
                         "gallery_set": gallery_set_name(i, variant), "num_query": len(query),
                         "num_gallery": len(gallery_set), **metrics})
            atomic_savemat(os.path.join(out_dir, result_mat_name(i, variant)), {
                "query_f": query_f, "query_label": _labels_for_mat(query_labels),
                "query_path": np.array([p for p, _, _ in query], dtype=object),
                "gallery_f": gallery_f, "gallery_label": _labels_for_mat(gallery_labels),
                "gallery_path": np.array([p for p, _, _ in gallery_set], dtype=object), **mat_extra})

    summary = {}
    for variant in wanted:
        mine = [r for r in rows if r["gallery"] == variant]
        summary[variant] = {"mean": {k: mean_std([r[k] for r in mine])[0] for k in METRIC_NAMES},
                            "std": {k: mean_std([r[k] for r in mine])[1] for k in METRIC_NAMES},
                            "cmc_mean": np.mean([r["cmc"] for r in mine], axis=0).tolist()}
    results = {"method": method_name, "test_dir": os.path.abspath(test_dir), "dataset": layout["dataset"],
               "num_splits": len(splits), "gallery_variants": wanted, "metrics": list(METRIC_NAMES),
               "metric_conventions": {
                   "rank1..rank20, mAP_hand, mINP": "all queries count; a query without a true match "
                                                   "counts 0 (MBA-Net / CLIP-HandID / CLIP-FH)",
                   "mAP_hand": "trapezoid-rule AP (MBA-Net / CLIP-HandID tables)",
                   "mAP_standard": "non-interpolated AP over queries with a match (torchreid / "
                                   "CLIP-ReID / fast-reid / CLIP-FH)",
                   "std": "sample standard deviation over the splits (ddof 1)", "table_mAP": table_mAP},
               "input_size": list(input_size), "flip": bool(flip), "rerank": dict(rerank) if rerank else None,
               "feature_dim": int(features.shape[1]),
               "num_images_encoded": len(unique_paths), "encode_seconds": round(encode_seconds, 3),
               "rows": rows, "summary": summary, **(extra or {})}
    atomic_write_json(results_path, results)
    csv_columns = ["split", "gallery", "num_query", "num_gallery", *METRIC_NAMES]
    lines = [",".join(csv_columns)]
    for row in rows:
        lines.append(",".join(str(row[c]) if c in ("split", "gallery", "num_query", "num_gallery")
                              else f"{row[c]:.6f}" for c in csv_columns))
    for variant in wanted:
        for stat in ("mean", "std"):
            values = summary[variant][stat]
            lines.append(",".join([stat, variant, "", ""] + [f"{values[k]:.6f}" for k in METRIC_NAMES]))
    atomic_write_text(os.path.join(out_dir, "results.csv"), "\n".join(lines) + "\n")

    if verbose:
        table_rows = []
        for variant in wanted:
            mine = [r for r in rows if r["gallery"] == variant]
            per_split = {k: [r[k] for r in mine] for k in METRIC_NAMES}
            per_split["mAP"] = per_split[table_mAP]
            table_rows.append((f"{method_name} [gallery {variant}]", per_split))
        print(format_results_table(table_rows, title=f"{test_dir}: mean ± std over {len(splits)} "
                                                     f"split(s), percent; mAP = hand convention"))
        print(_metric_table(table_rows, [("Rank-20", "rank20"), ("mAP (standard)", "mAP_standard"),
                                         ("mINP", "mINP")]))
    return results


@torch.no_grad()
def collect_outputs(forward_fn, loader, device, amp="none", flip=False, progress=False, desc="features"):
    """Concatenated outputs of forward_fn(images) over a loader of (images, labels), as fp32 on the
    CPU. flip=True adds the output for the horizontally flipped images. Returns (outputs, labels)."""
    outputs, labels = [], []
    for images, batch_labels in tqdm(loader, desc=desc, leave=False, disable=not progress):
        images = images.to(device, non_blocking=True)
        with autocast(amp, device):
            out = forward_fn(images)
            if flip:
                out = out + forward_fn(torch.flip(images, dims=[3]))
        outputs.append(out.float().cpu())
        labels.append(torch.as_tensor(batch_labels))
    return torch.cat(outputs), torch.cat(labels)


def validate(feature_fn, logits_fn, val_set, gallery_set, device, amp="none", batch_size=64, num_workers=0):
    """Validation on training identities only: closed-set accuracy of logits_fn(images) on the val
    images, and retrieval with the val images as queries against the gallery (train) images by
    cosine similarity of L2-normalised feature_fn(images). Returns {"val_acc", "val_rank1", "val_mAP"}
    (standard non-interpolated AP: every gallery image of the identity is a true match)."""
    def loader(dataset):
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                           pin_memory=str(device).startswith("cuda"))
    val_loader = loader(val_set)
    logits, val_labels = collect_outputs(logits_fn, val_loader, device, amp)
    query_f, _ = collect_outputs(feature_fn, val_loader, device, amp)
    gallery_f, gallery_labels = collect_outputs(feature_fn, loader(gallery_set), device, amp)
    similarity = torch.nn.functional.normalize(query_f, dim=1) @ torch.nn.functional.normalize(gallery_f, dim=1).t()
    metrics = rank_metrics(similarity, val_labels.numpy(), gallery_labels.numpy(), convention="standard")
    return {"val_acc": (logits.argmax(dim=1) == val_labels).float().mean().item(),
            "val_rank1": float(metrics["cmc"][0]), "val_mAP": float(metrics["mAP"])}
