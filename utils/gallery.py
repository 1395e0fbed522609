"""Galleries of enrolled hand photos on disk, search against them in chunks, and decision thresholds
calibrated on their impostor pairs.

A gallery is a folder (identify_hands.py enroll writes it, all or nothing, through utils.outputs):

    <gallery>/gallery.json        header: {"format": "clip-fh-gallery", "version": 1, "dim", "dtype":
                                  "float16" (or "float32" on request), "num_entries", "shards": [{"file",
                                  "rows"}], "model" (the model's fingerprint), "settings" (the test-time
                                  settings), "history" (one record per enrolment)}
    <gallery>/features-00000.npy  L2-normalised features, one row per entry, (rows, dim) of the header's
    <gallery>/features-00001.npy  dtype, standard .npy files of at most SHARD_ROWS rows, read memory-mapped
    <gallery>/entries.csv         one row per entry, in feature order: index, path, identity (empty when
                                  unknown), sha256 (of the image file's bytes)

Any numpy user reads it with json, csv and np.load(file, mmap_mode="r"); rows follow the shards in
header order. 1,000,000 entries of 512-d features take 1.0 GB of float16 shards. float16 keeps a
cosine similarity within 2^-11 (< 5e-4) of its float32 value; float32 storage keeps it exact.

search() ranks every entry for a batch of queries by cosine similarity, a chunk of rows at a time
(on the GPU when asked), keeping a running top-k, so a gallery never has to fit in memory; ties are
broken by gallery order, as the evaluators rank.
"""
import csv
import json
import os
import re
import tempfile
import time

import numpy as np
import torch

from . import verification
from .errors import ClipFHError
from .io import atomic_write_json, run_info

FORMAT, VERSION = "clip-fh-gallery", 1
HEADER, ENTRIES = "gallery.json", "entries.csv"
ENTRY_COLUMNS = ("index", "path", "identity", "sha256")
SHARD_ROWS = 131072  # 128 MiB of 512-d float16 features per shard
DTYPES = ("float16", "float32")
SCORE_BYTES = 2 ** 28  # a search chunk's score matrix (queries x rows, float32) stays under 256 MiB
MAX_CALIBRATION_ENTRIES = 6000  # impostor pairs among at most this many entries (18 M pairs)


class GalleryError(ClipFHError, ValueError):
    """A gallery folder that cannot be read or does not fit the request; the message names it."""


def shard_name(index):
    return f"features-{index:05d}.npy"


def is_gallery(path):
    return os.path.isfile(os.path.join(path, HEADER))


def is_gallery_file(name):
    """A file a gallery folder consists of (anything else there is the user's and is kept out of it)."""
    return name in (HEADER, ENTRIES) or re.fullmatch(r"features-\d{5}\.npy", name) is not None


class Gallery:
    """An open gallery: `header`, `paths`, `labels` ("" = unknown identity), `hashes`, `shards`
    (read-only memory maps), `dim`, len()."""

    def __init__(self, folder):
        self.folder = os.path.abspath(folder)
        header_path = os.path.join(self.folder, HEADER)
        if not os.path.isfile(header_path):
            raise GalleryError(f"{folder} is not a gallery (no {HEADER}); make one with identify_hands.py enroll")
        try:
            with open(header_path) as f:
                self.header = json.load(f)
            if self.header.get("format") != FORMAT or self.header.get("version") != VERSION:
                raise ValueError(f"format {self.header.get('format')!r} version {self.header.get('version')!r}")
            self.dim, self.dtype = int(self.header["dim"]), np.dtype(self.header["dtype"])
            if self.header["dtype"] not in DTYPES:
                raise ValueError(f"dtype {self.header['dtype']!r}")
            with open(os.path.join(self.folder, ENTRIES), newline="") as f:
                rows = list(csv.DictReader(f))
            self.shards = [np.load(os.path.join(self.folder, s["file"]), mmap_mode="r") for s in self.header["shards"]]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise GalleryError(f"cannot read gallery {folder}: {err}; enrol it again") from None
        self.paths = [row["path"] for row in rows]
        self.labels = [row["identity"] for row in rows]
        self.hashes = [row["sha256"] for row in rows]
        sizes = [len(s) for s in self.shards]
        bad = [s["file"] for s, n in zip(self.header["shards"], sizes) if n != s["rows"]]
        if bad or sum(sizes) != len(rows) or len(rows) != self.header["num_entries"] or any(
                s.shape[1:] != (self.dim,) or s.dtype != self.dtype for s in self.shards):
            raise GalleryError(f"gallery {folder} is inconsistent ({ENTRIES}: {len(rows)} rows, shards: {sum(sizes)}, "
                               f"header: {self.header['num_entries']}); enrol it again")

    def __len__(self):
        return len(self.paths)

    def chunks(self, rows):
        """(first row, float16 array of at most `rows` rows) over the whole gallery, in order."""
        start = 0
        for shard in self.shards:
            for offset in range(0, len(shard), rows):
                block = shard[offset:offset + rows]
                yield start + offset, block
            start += len(shard)

    def features(self, indices):
        """float32 rows at `indices` (sorted reads of the memory maps)."""
        indices = np.asarray(indices, dtype=np.int64)
        bounds = np.cumsum([0] + [len(s) for s in self.shards])
        out = np.empty((len(indices), self.dim), dtype=np.float32)
        for k, shard in enumerate(self.shards):
            mine = np.flatnonzero((indices >= bounds[k]) & (indices < bounds[k + 1]))
            if len(mine):
                out[mine] = shard[indices[mine] - bounds[k]]
        return out


class GalleryWriter:
    """Writes a gallery into an empty (staged) folder: link_shards(old) keeps an existing gallery's
    shards (hard links, copies where refused), add(features) appends rows, finish(...) writes
    entries.csv and gallery.json last."""

    def __init__(self, folder, dim, linker=None, dtype="float16"):
        if dtype not in DTYPES:
            raise GalleryError(f"gallery features are stored as {' or '.join(DTYPES)}, not {dtype!r}")
        self.folder, self.dim, self.linker, self.dtype = folder, dim, linker, dtype
        self.shards, self.pending = [], []

    def link_shards(self, old):
        for shard in old.header["shards"]:
            name = shard_name(len(self.shards))
            self.linker(os.path.join(old.folder, shard["file"]), os.path.join(self.folder, name))
            self.shards.append({"file": name, "rows": shard["rows"]})

    def add(self, features):
        """Append L2-normalised float32 rows (stored as self.dtype), a shard whenever SHARD_ROWS are pending."""
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise GalleryError(f"features of shape {features.shape} do not fit a {self.dim}-d gallery")
        self.pending.append(features.astype(self.dtype))
        while sum(len(p) for p in self.pending) >= SHARD_ROWS:
            self._flush(SHARD_ROWS)

    def _flush(self, rows):
        block = np.concatenate(self.pending)
        name = shard_name(len(self.shards))
        np.save(os.path.join(self.folder, name), block[:rows])
        self.shards.append({"file": name, "rows": int(min(rows, len(block)))})
        self.pending = [block[rows:]] if len(block) > rows else []

    def finish(self, entries, model, settings, history):
        """entries: [(path, identity or "", sha256)] of every row, old and new, in order."""
        if self.pending:
            self._flush(sum(len(p) for p in self.pending))
        if sum(s["rows"] for s in self.shards) != len(entries):
            raise GalleryError(f"{len(entries)} entries for {sum(s['rows'] for s in self.shards)} feature rows")
        with open(os.path.join(self.folder, ENTRIES), "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(ENTRY_COLUMNS)
            writer.writerows((i, path, label, sha) for i, (path, label, sha) in enumerate(entries))
        header = {"format": FORMAT, "version": VERSION, "dim": self.dim, "dtype": self.dtype,
                  "num_entries": len(entries), "shards": self.shards, "model": model, "settings": settings,
                  "history": history, **run_info()}
        atomic_write_json(os.path.join(self.folder, HEADER), header)
        return header


def gallery_bytes(num_entries, dim, dtype="float16", mean_path_length=100):
    """Disk space of a gallery of `num_entries` entries: the shards plus entries.csv."""
    return num_entries * (dim * np.dtype(dtype).itemsize + mean_path_length + 80)


def _merge_top_k(scores, indices, top_k):
    """The top_k of candidate (scores, gallery indices) per row, by score descending, ties by index."""
    by_index = torch.sort(indices, dim=1, stable=True)
    scores = torch.gather(scores, 1, by_index.indices)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :top_k]
    return torch.gather(scores, 1, order), torch.gather(by_index.values, 1, order)


def _chunk_top_k(scores, top_k):
    """(values, column indices) of each row's top_k, ties at the k-th value resolved by column order."""
    values, columns = torch.topk(scores, top_k, dim=1)
    tied = ((scores >= values[:, -1:]).sum(1) > top_k).nonzero().flatten()
    if len(tied):  # more entries share the k-th score than fit: take the earliest ones, as a stable sort
        exact = torch.sort(scores[tied], dim=1, descending=True, stable=True)
        values[tied], columns[tied] = exact.values[:, :top_k], exact.indices[:, :top_k]
    return values, columns


@torch.no_grad()
def search(gallery, queries, top_k=10, device="cpu", chunk_rows=None):
    """Cosine similarities of L2-normalised `queries` (Q, D) against every entry of `gallery`, a chunk
    of rows at a time. Returns (scores (Q, k) float32, indices (Q, k) int64) numpy, each row by
    similarity descending, ties by gallery order; k = min(top_k, len(gallery))."""
    queries = np.asarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != gallery.dim:
        raise GalleryError(f"queries of shape {queries.shape} do not fit the {gallery.dim}-d gallery {gallery.folder}")
    top_k = min(int(top_k), len(gallery))
    chunk_rows = min(chunk_rows or max(1024, min(SHARD_ROWS, SCORE_BYTES // (4 * max(len(queries), 1)))),
                     max(len(gallery), 1))
    query = torch.from_numpy(queries).to(device)
    best_scores = torch.empty((len(queries), 0), device=device)
    best_indices = torch.empty((len(queries), 0), dtype=torch.int64, device=device)
    staging = np.empty((chunk_rows, gallery.dim), dtype=gallery.dtype)  # the chunk read from the memory map
    buffer = torch.empty((chunk_rows, gallery.dim), device=device)  # ... as float32 on the device
    for start, block in gallery.chunks(chunk_rows):
        np.copyto(staging[:len(block)], block)
        rows = buffer[:len(block)]
        rows.copy_(torch.from_numpy(staging[:len(block)]))
        values, columns = _chunk_top_k(query @ rows.T, min(top_k, len(block)))
        best_scores, best_indices = _merge_top_k(torch.cat([best_scores, values], 1),
                                                 torch.cat([best_indices, columns + start], 1), top_k)
    return best_scores.cpu().numpy(), best_indices.cpu().numpy()


def impostor_scores(gallery, max_entries=MAX_CALIBRATION_ENTRIES, seed=0):
    """Ascending similarities of the impostor pairs (two entries of different known identities) of
    the gallery: all pairs, or those among `max_entries` entries drawn at random (seeded) when it has
    more labelled entries. Returns (scores, {"entries_used", "labelled_entries", "identities", "sampled"})."""
    labelled = np.flatnonzero([label != "" for label in gallery.labels])
    info = {"labelled_entries": int(len(labelled)), "identities": len({gallery.labels[i] for i in labelled}),
            "sampled": len(labelled) > max_entries}
    if info["sampled"]:
        labelled = np.sort(np.random.default_rng(seed).choice(labelled, max_entries, replace=False))
    info["entries_used"] = int(len(labelled))
    if info["identities"] < 2:
        return np.empty(0, dtype=np.float32), info
    features = torch.from_numpy(gallery.features(labelled))
    _, codes = np.unique(np.array([gallery.labels[i] for i in labelled]), return_inverse=True)
    scores = []
    for first in range(0, len(labelled), 512):  # pairs (i, j > i), a block of rows i at a time
        block = (features[first:first + 512] @ features.T).numpy()
        rows = np.arange(first, first + len(block))[:, None]
        impostor = (np.arange(len(labelled))[None, :] > rows) & (codes[rows] != codes[None, :])
        scores.append(block[impostor])
    return np.sort(np.concatenate(scores)), info


def threshold_from_impostors(impostor, far):
    """{"far", "threshold", "num_impostor_pairs", "measurable", "expected_false_accepts"}: the threshold
    whose FAR on these impostor pairs is at most `far` (a match is a similarity strictly above it);
    measurable only when far x pairs >= verification.MIN_FALSE_ACCEPTS, the project's rule for
    reporting a TAR at a FAR (threshold None otherwise)."""
    pairs = len(impostor)
    measurable = pairs > 0 and far * pairs >= verification.MIN_FALSE_ACCEPTS
    threshold = float(verification.threshold_at_far(impostor, far)) if measurable else None
    return {"far": far, "threshold": threshold, "num_impostor_pairs": int(pairs), "measurable": bool(measurable),
            "expected_false_accepts": far * pairs}


def calibrate(gallery, far, max_entries=MAX_CALIBRATION_ENTRIES, seed=0):
    """The decision threshold for FAR `far` from the gallery's own impostor pairs (see impostor_scores
    and threshold_from_impostors), with "source": "gallery" and how the pairs were drawn."""
    scores, info = impostor_scores(gallery, max_entries, seed)
    return {**threshold_from_impostors(scores, far), "source": "gallery", **info}


def threshold_from_evaluation(rows, far):
    """The threshold for FAR `far` from the per-split rows of an evaluation's results.json (their ROC
    stores a threshold per FAR of verification.ROC_FAR_GRID): the mean of the splits' thresholds,
    measurable when every split has far x impostor pairs >= verification.MIN_FALSE_ACCEPTS."""
    rocs = [r.get("roc") or {} for r in rows]
    if not rows or any("threshold" not in roc for roc in rocs):
        raise GalleryError("it stores no ROC thresholds; re-run its evaluation with this version")
    grid = np.asarray(rocs[0]["far"])
    at = np.flatnonzero(np.isclose(grid, far, rtol=1e-6, atol=0))
    if not len(at):
        raise GalleryError(f"--far {far:g} is not one of the FARs it stores ({grid[0]:g} to {grid[-1]:g}, 8 a decade, "
                           f"e.g. 1e-3); pick one of them")
    pairs = [int(r["num_impostor_pairs"]) for r in rows]
    values = [roc["threshold"][at[0]] for roc in rocs]
    measurable = all(far * n >= verification.MIN_FALSE_ACCEPTS for n in pairs) and None not in values
    return {"far": far, "threshold": float(np.mean(values)) if measurable else None, "source": "results.json",
            "num_impostor_pairs": min(pairs), "num_splits": len(rows), "split_thresholds": values,
            "measurable": bool(measurable), "expected_false_accepts": far * min(pairs)}


# ---- benchmark.py --only search ----

def synthetic_gallery(folder, num_entries, dim, seed=0):
    """A gallery of random unit vectors (float16) without model or images, for timing."""
    writer = GalleryWriter(folder, dim)
    rng = np.random.default_rng(seed)
    for start in range(0, num_entries, SHARD_ROWS):
        block = rng.standard_normal((min(SHARD_ROWS, num_entries - start), dim), dtype=np.float32)
        writer.add(block / np.linalg.norm(block, axis=1, keepdims=True))
    entries = [(f"synthetic/{i}.jpg", str(i // 2), "") for i in range(num_entries)]
    writer.finish(entries, model={"kind": "synthetic"}, settings={}, history=[])
    return Gallery(folder)


def benchmark_search(sizes, dim=512, num_queries=256, top_k=10, device="cpu", seed=0, repeats=1, folder=None):
    """Queries/s of search() against synthetic galleries of each size, written to and memory-mapped from
    a temporary folder (deleted afterwards), and the shards' bytes per million entries."""
    rows = []
    rng = np.random.default_rng(seed + 1)
    queries = rng.standard_normal((num_queries, dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    with tempfile.TemporaryDirectory(prefix="clipfh_search_", dir=folder) as tmp:
        for size in sizes:
            path = os.path.join(tmp, f"gallery_{size}")
            os.makedirs(path)
            start = time.perf_counter()
            gallery = synthetic_gallery(path, size, dim, seed)
            write_s = time.perf_counter() - start
            shard_bytes = sum(os.path.getsize(os.path.join(path, s["file"])) for s in gallery.header["shards"])
            seconds = []
            for _ in range(repeats):
                start = time.perf_counter()
                search(gallery, queries, top_k, device)
                if str(device).startswith("cuda"):
                    torch.cuda.synchronize()
                seconds.append(time.perf_counter() - start)
            best = min(seconds)
            rows.append({"entries": size, "dim": dim, "queries": num_queries, "top_k": top_k, "device": str(device),
                         "seconds": best, "queries_per_s": num_queries / best, "write_seconds": write_s,
                         "shard_bytes": shard_bytes, "bytes_per_million_entries": shard_bytes * 1e6 / size})
            del gallery
            for name in os.listdir(path):  # free the disk before the next size
                os.remove(os.path.join(path, name))
    return rows
