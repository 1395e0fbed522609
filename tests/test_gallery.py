"""utils/gallery.py: the on-disk gallery format, the chunked search with a running top-k, and the
decision threshold calibrated on impostor pairs."""
import csv
import json
import os

import numpy as np
import pytest

from utils import gallery, splits, verification


def unit(rows):
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def write(folder, features, labels=None, shard_rows=None, monkeypatch=None):
    if shard_rows and monkeypatch:
        monkeypatch.setattr(gallery, "SHARD_ROWS", shard_rows)
    os.makedirs(folder)
    writer = gallery.GalleryWriter(str(folder), features.shape[1], splits.FileLinker("hardlink"))
    for start in range(0, len(features), 7):  # rows arrive in small batches, as enrolment encodes them
        writer.add(features[start:start + 7])
    labels = labels if labels is not None else [""] * len(features)
    entries = [(f"/photos/{i}.jpg", str(label), f"{i:064x}") for i, label in enumerate(labels)]
    writer.finish(entries, model={"kind": "test"}, settings={"flip": False}, history=[])
    return gallery.Gallery(str(folder))


def test_format_round_trip_with_shards_read_by_standard_tools(tmp_path, monkeypatch):
    features = unit(np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32))
    labels = [i // 3 for i in range(50)]
    g = write(tmp_path / "g", features, labels, shard_rows=20, monkeypatch=monkeypatch)
    with open(tmp_path / "g" / gallery.HEADER) as f:
        header = json.load(f)
    assert header["num_entries"] == 50 and header["dtype"] == "float16" and header["dim"] == 16
    assert [s["rows"] for s in header["shards"]] == [20, 20, 10]
    stacked = np.concatenate([np.load(tmp_path / "g" / s["file"]) for s in header["shards"]])
    np.testing.assert_allclose(stacked.astype(np.float32), features, atol=1e-3)
    with open(tmp_path / "g" / gallery.ENTRIES, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["identity"] for r in rows] == [str(label) for label in labels] and rows[7]["index"] == "7"
    assert isinstance(g.shards[0], np.memmap) and len(g) == 50
    np.testing.assert_array_equal(g.features([45, 3, 21]), stacked[[45, 3, 21]].astype(np.float32))


def test_chunked_search_equals_a_full_sort_including_ties(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    features = unit(rng.standard_normal((300, 8)).astype(np.float32))
    features[[40, 120, 250, 299]] = features[7]  # exact ties across chunks and shards
    g = write(tmp_path / "g", features, shard_rows=64, monkeypatch=monkeypatch)
    queries = np.concatenate([features[[7]], unit(rng.standard_normal((5, 8)).astype(np.float32))])
    stored = g.features(np.arange(len(g)))
    for chunk_rows in (16, 50, 1000):
        scores, indices = gallery.search(g, queries, top_k=10, chunk_rows=chunk_rows)
        for q in range(len(queries)):
            similarity = stored @ queries[q]
            expected = np.argsort(-similarity, kind="stable")[:10]
            np.testing.assert_array_equal(indices[q], expected)
            np.testing.assert_allclose(scores[q], similarity[expected], rtol=0, atol=1e-5)
    assert list(indices[0][:5]) == [7, 40, 120, 250, 299]  # the tied copies by gallery order
    assert gallery.search(g, queries, top_k=1000)[1].shape == (6, 300)


def test_unreadable_or_inconsistent_gallery_is_refused(tmp_path):
    with pytest.raises(gallery.GalleryError, match="not a gallery"):
        gallery.Gallery(str(tmp_path))
    features = unit(np.random.default_rng(2).standard_normal((10, 4)).astype(np.float32))
    write(tmp_path / "g", features)
    with open(tmp_path / "g" / gallery.ENTRIES, "a") as f:
        f.write("10,/x.jpg,,00\n")
    with pytest.raises(gallery.GalleryError, match="inconsistent"):
        gallery.Gallery(str(tmp_path / "g"))


def clustered(rng, identities, per_identity, dim=32, spread=0.9):
    centres = unit(rng.standard_normal((identities, dim)))
    labels = np.repeat(np.arange(identities), per_identity)
    return unit(centres[labels] + spread * rng.standard_normal((len(labels), dim)) / np.sqrt(dim)), labels


@pytest.mark.parametrize("far", [1e-2, 1e-3])
def test_calibrated_threshold_holds_its_far_on_held_out_impostor_pairs(tmp_path, far):
    rng = np.random.default_rng(3)
    features, labels = clustered(rng, 800, 3)
    g = write(tmp_path / f"g{far}", features.astype(np.float32), labels)
    found = gallery.calibrate(g, far)
    n_cal = found["num_impostor_pairs"]
    assert found["source"] == "gallery" and not found["sampled"] and n_cal == 2400 * 2399 // 2 - 800 * 3
    assert found["measurable"] and found["expected_false_accepts"] == pytest.approx(far * n_cal)
    held_out, held_labels = clustered(rng, 800, 3)  # other people, same distribution
    similarity = held_out @ held_out.T
    upper = np.triu_indices(len(held_out), k=1)
    impostor = similarity[upper][held_labels[upper[0]] != held_labels[upper[1]]]
    observed = float(np.mean(impostor > found["threshold"]))
    error = np.sqrt(far * (1 - far) * (1 / n_cal + 1 / len(impostor)))  # binomial error of both estimates
    print(f"far {far}: threshold {found['threshold']:.4f}, held-out FAR {observed:.5f} on {len(impostor)} pairs, "
          f"binomial error {error:.2e}")
    assert abs(observed - far) <= 3 * error


def test_threshold_is_flagged_when_too_few_impostor_pairs():
    impostor = np.sort(np.random.default_rng(4).normal(size=1000))
    low = gallery.threshold_from_impostors(impostor, 1e-3)
    assert not low["measurable"] and low["threshold"] is None and low["expected_false_accepts"] == 1.0
    ok = gallery.threshold_from_impostors(impostor, 1e-2)
    assert ok["measurable"] and np.sum(impostor > ok["threshold"]) <= 10 < np.sum(impostor >= ok["threshold"])


def test_sampled_calibration_on_large_gallery(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    features, labels = clustered(rng, 100, 4, dim=8)
    g = write(tmp_path / "g", features.astype(np.float32), labels)
    found = gallery.calibrate(g, 1e-2, max_entries=150)
    assert found["sampled"] and found["entries_used"] == 150 and found["labelled_entries"] == 400
    assert found["num_impostor_pairs"] < 150 * 149 // 2
    unlabelled = write(tmp_path / "u", features.astype(np.float32))
    assert gallery.calibrate(unlabelled, 1e-2)["num_impostor_pairs"] == 0


def test_roc_thresholds_give_the_stored_tar():
    rng = np.random.default_rng(6)
    labels = np.arange(60) % 20
    scores = rng.normal(size=(60, 60)) + 2.0 * (labels[:, None] == labels[None, :])
    got = verification.verification_metrics(scores, labels, labels)
    genuine, impostor = verification.pair_scores(scores, labels, labels)
    for far, tar, threshold in zip(got["roc"]["far"], got["roc"]["tar"], got["roc"]["threshold"]):
        if threshold is None:
            assert tar is None or far == 1.0
            continue
        assert np.mean(impostor > threshold) <= far
        assert np.mean(genuine > threshold) == pytest.approx(tar)


def test_benchmark_rows_and_cleanup(tmp_path):
    rows = gallery.benchmark_search([1000, 3000], dim=16, num_queries=8, folder=str(tmp_path))
    assert [r["entries"] for r in rows] == [1000, 3000] and all(r["queries_per_s"] > 0 for r in rows)
    assert rows[1]["shard_bytes"] >= 3000 * 16 * 2 and rows[1]["bytes_per_million_entries"] == pytest.approx(
        rows[1]["shard_bytes"] * 1e6 / 3000)
    assert os.listdir(tmp_path) == []  # the temporary galleries are gone


def test_benchmark_search_part_writes_its_rows(tmp_path):
    import benchmark
    out = tmp_path / "bench.json"
    benchmark.main(["--only", "search", "--tiny", "--device", "cpu", "--out", str(out), "--repeats", "1"])
    rows = json.loads(out.read_text())["search"]["rows"]
    assert [r["entries"] for r in rows] == [1000, 5000] and all(r["dim"] == 512 for r in rows)
    assert rows[0]["bytes_per_million_entries"] == pytest.approx(1.024e9, rel=1e-3)  # 512 float16 + .npy headers
