"""collect_results.py: one table (Markdown, LaTeX, CSV) and overlaid CMC/ROC plots from results.json files."""
import csv
import json
import os

import numpy as np
import pytest

import collect_results
from utils import verification


def write_results(folder, method, seed, protocol=None, variants=("own", "all"), with_verification=True):
    """A results.json in the evaluators' layout with random per-split metrics; returns it as a dict."""
    rng = np.random.default_rng(seed)
    rows = []
    for variant in variants:
        for split in range(3):
            row = {"split": split, "gallery": variant}
            row.update({k: float(rng.uniform(0.1, 0.9)) for k in ("rank1", "rank5", "rank10", "mAP_hand",
                                                                  "mAP_standard", "mINP")})
            if with_verification:
                row.update(EER=float(rng.uniform(0.05, 0.3)), **{"TAR@1e-3": float(rng.uniform(0.2, 0.6))})
            rows.append(row)
    far = verification.ROC_FAR_GRID.tolist()
    summary = {v: {"cmc_mean": sorted(rng.uniform(0, 1, 50).tolist()),
                   "roc_mean": {"far": far, "tar": [None] * 10 + sorted(rng.uniform(0, 1, len(far) - 10).tolist())}}
               for v in variants}
    results = {"method": method, "backbone": "ViT-B/16", "dataset": "11k",
               "test_dir": "/data/11k/train_val_test_split_dorsal_r", "gallery_variants": list(variants),
               "rows": rows, "summary": summary, "pretrained": True}
    if protocol:
        results["protocol"] = protocol
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(results, f)
    return results


def expected_cell(results, variant, key):
    values = [100 * r[key] for r in results["rows"] if r["gallery"] == variant]
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"  # sample std over the splits


def test_table_from_globs_and_run_folders(tmp_path):
    zero_shot = write_results(tmp_path / "runs" / "clip_zero_shot" / "ViT-B-16", "zero-shot", 0)
    tuned = write_results(tmp_path / "runs" / "finetune" / "eval_best", "fine-tuned", 1, with_verification=False)
    out = tmp_path / "tables" / "t"
    rows = collect_results.main([str(tmp_path / "runs" / "clip_*" / "*"), str(tmp_path / "runs" / "finetune"),
                                 "--out", str(out)])
    assert [(r["method"], r["gallery"]) for r in rows] == [("zero-shot", "own"), ("zero-shot", "all"),
                                                           ("fine-tuned", "own"), ("fine-tuned", "all")]
    markdown = (tmp_path / "tables" / "t.md").read_text().splitlines()
    assert "| method | backbone | test set | gallery | protocol | Rank-1 |" in markdown[0]
    zero_shot_all = markdown[3].split(" | ")
    assert zero_shot_all[1:5] == ["ViT-B/16", "11k train_val_test_split_dorsal_r", "all", "unspecified"]
    assert zero_shot_all[5] == expected_cell(zero_shot, "all", "rank1")
    assert zero_shot_all[8] == expected_cell(zero_shot, "all", "mAP_hand")
    assert zero_shot_all[11] == expected_cell(zero_shot, "all", "EER")
    assert markdown[4].split(" | ")[11:] == ["n/a", "n/a |"]  # no verification metrics in that results.json
    latex = (tmp_path / "tables" / "t.tex").read_text()
    assert "\\toprule" in latex and "\\midrule" in latex and "\\bottomrule" in latex
    assert expected_cell(tuned, "own", "mINP").replace("±", "$\\pm$") in latex and "ViT-B/16" in latex
    with open(tmp_path / "tables" / "t.csv") as f:
        records = list(csv.DictReader(f))
    values = [100 * r["rank10"] for r in tuned["rows"] if r["gallery"] == "own"]
    assert float(records[2]["rank10_mean"]) == pytest.approx(np.mean(values), abs=1e-4)
    assert float(records[2]["rank10_std"]) == pytest.approx(np.std(values, ddof=1), abs=1e-4)
    assert records[2]["EER_mean"] == ""
    with pytest.raises(SystemExit, match="t.md already exists.*--force"):
        collect_results.main([str(tmp_path / "runs"), "--out", str(out)])
    only_own = collect_results.main([str(tmp_path / "runs"), "--out", str(out), "--gallery", "own", "--force"])
    assert {r["gallery"] for r in only_own} == {"own"} and len(only_own) == 2


def test_protocols_are_not_mixed_without_flag(tmp_path):
    write_results(tmp_path / "a", "zero-shot", 0, protocol="clip-handid")
    write_results(tmp_path / "b", "fine-tuned", 1, protocol="clip-reid")
    with pytest.raises(SystemExit, match="different protocols \\(clip-handid, clip-reid\\).*--mixed"):
        collect_results.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "t")])
    rows = collect_results.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "t"), "--mixed"])
    assert [r["protocol"] for r in rows] == ["clip-handid"] * 2 + ["clip-reid"] * 2
    with pytest.raises(SystemExit, match="nothing.*does not exist"):
        collect_results.main([str(tmp_path / "nothing"), "--out", str(tmp_path / "t2")])


def test_plots(tmp_path):
    write_results(tmp_path / "a", "zero-shot", 0)
    write_results(tmp_path / "b", "fine-tuned", 1, variants=("own",))
    collect_results.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "t"), "--plot"])
    for kind in ("cmc", "roc"):
        assert (tmp_path / f"t_{kind}.png").stat().st_size > 10_000
        assert (tmp_path / f"t_{kind}.pdf").read_bytes().startswith(b"%PDF")
