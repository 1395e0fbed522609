"""collect_results.py: rows with display names, seeds aggregated, the Wilcoxon test against the best row,
labels that tell rows apart, the table in Markdown / LaTeX / CSV / JSON, and the CMC/ROC figures."""
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import collect_results
from utils import figures, outputs, protocols, significance, splits, verification

METRICS = ("rank1", "rank5", "rank10", "mAP_hand", "mAP_standard", "mINP")
TEST_DIR = "/data/11k/train_val_test_split_dorsal_r"


def write_results(folder, method="zero-shot", seed=0, protocol="clip-handid", variants=("own", "all"),
                  with_verification=True, num_splits=3, run_dir=None, kind=None, explicit=None, shift=0.0,
                  backbone="ViT-B/16", eval_args=None, split_seed=0, test_dir=TEST_DIR, spread=0.4):
    """A results.json in the evaluators' layout with random per-split metrics (and config.json beside it);
    returns the results dict."""
    rng = np.random.default_rng(seed + int(1000 * shift))
    rows = []
    for variant in variants:
        for split in range(num_splits):
            row = {"split": split, "gallery": variant, "num_query": 50, "num_gallery": 20,
                   "num_genuine_pairs": 50, "num_impostor_pairs": 950}
            row.update({k: float(np.clip(0.5 + shift + rng.uniform(-spread, spread), 0, 1)) for k in METRICS})
            if with_verification:
                row.update(EER=float(rng.uniform(0.05, 0.3)), **{"TAR@1e-3": None, "TAR@1e-2": float(rng.uniform(0.2, 0.6))})
            rows.append(row)
    far = verification.ROC_FAR_GRID.tolist()
    summary = {v: {"cmc_mean": sorted(rng.uniform(0, 1, 50).tolist()),
                   "roc_mean": {"far": far, "tar": [None] * 10 + sorted(rng.uniform(0, 1, len(far) - 10).tolist())}}
               for v in variants}
    setting = protocols.settings(protocol, kind, available=variants, cuda=False, **(explicit or {}))
    results = {"method": method, "backbone": backbone, "dataset": "11k", "test_dir": test_dir,
               "num_splits": num_splits, "gallery_variants": list(variants), "rows": rows, "summary": summary, "pretrained": True,
               "protocol": setting, "table_mAP": setting["mAP"], "split_seed": split_seed}
    if run_dir:
        results.update(run_dir=str(run_dir), model_kind=kind, which_epoch="best")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(results, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"args": {"test_dir": test_dir, "device": "cpu", "seed": 0, **(eval_args or {})}}, f)
    return results


def write_run(root, name, kind="finetune", seed=0, lr=5e-6, data_dir=TEST_DIR, **kwargs):
    """A trained run's config.json and one evaluation of it in <run>/eval_best; returns the results."""
    run_dir = os.path.join(root, name)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({"method": kind, "args": {"seed": seed, "lr": lr, "epochs": 70, "data_dir": data_dir,
                                            "m_name": name, "num_workers": 4}}, f)
    return write_results(os.path.join(run_dir, "eval_best"), method=f"{name} ({kind}, net_best)", seed=seed,
                         run_dir=run_dir, kind=kind, **kwargs)


def split_values(results, variant, key):
    return [r[key] for r in results["rows"] if r["gallery"] == variant]


def expected_cell(results, variant, key):
    values = [100 * v for v in split_values(results, variant, key)]
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"  # sample std over the splits


def same_value(read, written):
    """A CSV cell as pandas read it equals the JSON value it was written from."""
    if written is None:
        return pd.isna(read)
    if isinstance(written, list):  # the seeds: a JSON list in both files
        return json.loads(read) == written
    if isinstance(written, bool) or isinstance(read, (bool, np.bool_)):
        return bool(read) == written
    if isinstance(written, (int, float)) or isinstance(read, (int, float, np.number)):
        return float(read) == pytest.approx(float(written), rel=1e-12, abs=0)
    return str(read) == str(written)


def table_lines(path):
    return [line for line in path.read_text().splitlines() if line.startswith("|")]


def test_table_names_cells_and_files_agree(tmp_path):
    zero_shot = write_results(tmp_path / "runs" / "clip_zero_shot" / "ViT-B-16", "CLIP ViT-B/16 zero-shot", 0)
    tuned = write_run(tmp_path / "runs", "finetune", seed=1, with_verification=False, shift=0.05)
    out = tmp_path / "tables" / "t"
    rows = collect_results.main([str(tmp_path / "runs" / "clip_*" / "*"), str(tmp_path / "runs" / "finetune"),
                                 "--out", str(out), "--columns", "rank1", "rank5", "rank10", "mAP", "EER"])
    assert [(r["labels"]["method"], r["labels"]["gallery"]) for r in rows] == [
        ("Zero-shot", "without distractors"), ("Zero-shot", "with distractors"), ("Fine-tuned", "without distractors"),
        ("Fine-tuned", "with distractors")]
    markdown = table_lines(tmp_path / "tables" / "t.md")
    assert markdown[0] == "| Method | Gallery | Rank-1 | Rank-5 | Rank-10 | mAP | EER |"
    cells = [c.strip() for c in markdown[3].split("|")[1:-1]]  # zero-shot, gallery{i}_all
    assert cells[:2] == ["Zero-shot", "with distractors"]
    assert cells[2].strip("*† ") == expected_cell(zero_shot, "all", "rank1")
    assert cells[5].strip("*† ") == expected_cell(zero_shot, "all", "mAP_hand")  # clip-handid's mAP
    assert table_lines(tmp_path / "tables" / "t.md")[4].split(" | ")[-1] == "n/a |"  # no EER in that results.json
    notes = (tmp_path / "tables" / "t.md").read_text()
    assert "trained on: 11k dorsal right" in notes and "backbone: ViT-B/16" in notes and "test set: 11k dorsal right" in notes and "protocol: clip-handid" in notes
    latex = (tmp_path / "tables" / "t.tex").read_text()
    assert "\\toprule" in latex and "\\midrule" in latex and "\\bottomrule" in latex and "Fine-tuned" in latex
    assert expected_cell(tuned, "own", "mINP").replace("±", "$\\pm$") not in latex  # mINP is not a default column
    # the CSV (pandas) equals the JSON it comes from, and both equal the per-split numbers
    frame = pd.read_csv(tmp_path / "tables" / "t.csv")
    with open(tmp_path / "tables" / "t.json") as f:
        records = json.load(f)["rows"]
    assert list(frame["method"]) == [r["method"] for r in records]
    for column in frame.columns:
        for value, record in zip(frame[column], records):
            assert same_value(value, record[column]), (column, value, record[column])
    values = [100 * v for v in split_values(tuned, "own", "rank10")]
    assert frame.loc[2, "rank10_mean"] == pytest.approx(np.mean(values), abs=1e-4)
    assert frame.loc[2, "rank10_std_splits"] == pytest.approx(np.std(values, ddof=1), abs=1e-4)
    assert [r["seeds"] for r in records] == [[], [], [1], [1]]  # whole numbers (zero-shot has no training seed)
    assert list(frame["seeds"]) == ["[]", "[]", "[1]", "[1]"]
    per_split = records[2]["per_split"]["rank10"]["1"]  # seed 1: {split: value}
    assert [per_split[str(i)] for i in range(3)] == split_values(tuned, "own", "rank10")
    with pytest.raises(SystemExit, match="t.md already exists.*--force"):
        collect_results.main([str(tmp_path / "runs"), "--out", str(out)])
    only_own = collect_results.main([str(tmp_path / "runs"), "--out", str(out), "--gallery", "own", "--force"])
    assert {r["labels"]["gallery"] for r in only_own} == {"without distractors"} and len(only_own) == 2


def test_seeds_form_one_row_with_mean_and_stds(tmp_path):
    seeded = [write_run(tmp_path, f"ft_seed{s}", seed=s, variants=("all",)) for s in (0, 1, 2)]
    other_lr = write_run(tmp_path, "ft_lr", seed=0, lr=1e-5, variants=("all",))
    rows = collect_results.main([str(tmp_path), "--out", str(tmp_path / "t")])
    assert [r["labels"]["method"] for r in rows] == ["Fine-tuned (lr 1e-05)", "Fine-tuned (lr 5e-06)"]  # as found
    row = next(r for r in rows if r["labels"]["method"] == "Fine-tuned (lr 5e-06)")
    assert row["seeds"] == [0, 1, 2]
    per_seed = np.array([split_values(r, "all", "rank1") for r in seeded])  # (seeds, splits)
    stats_ = row["metrics"]["rank1"]
    assert stats_["mean"] == pytest.approx(per_seed.mean())
    assert stats_["std_seeds"] == pytest.approx(np.std(per_seed.mean(axis=1), ddof=1))
    assert stats_["std_splits"] == pytest.approx(np.mean(np.std(per_seed, axis=1, ddof=1)))
    single = next(r for r in rows if r is not row)
    assert single["seeds"] == [0] and single["metrics"]["rank1"]["std_seeds"] is None
    assert single["metrics"]["rank1"]["mean"] == pytest.approx(np.mean(split_values(other_lr, "all", "rank1")))
    text = (tmp_path / "t.md").read_text()
    cell = (f"{100 * stats_['mean']:.2f} ± {100 * stats_['std_seeds']:.2f} [{100 * stats_['std_splits']:.2f}]")
    assert cell in text and "in brackets the std over the 3 splits" in text


def test_wilcoxon_p_values_equal_scipy(tmp_path):
    """Each row against the best: pairs by (seed, split) for rows with the same seeds, by split of the
    seed means otherwise; the p-values are scipy's on those numbers."""
    kwargs = dict(variants=("all",), num_splits=10)
    zero_shot = write_results(tmp_path / "zs", "CLIP ViT-B/16 zero-shot", 7, **kwargs)
    good = [write_run(tmp_path, f"good{s}", seed=s, shift=0.3, **kwargs) for s in (0, 1)]
    rows = collect_results.main([str(tmp_path), "--out", str(tmp_path / "t"), "--columns", "rank1", "mAP"])
    by_name = {r["labels"]["method"]: r for r in rows}
    best, zs = by_name["Fine-tuned"], by_name["Zero-shot"]
    for column, key in (("rank1", "rank1"), ("mAP", "mAP_hand")):
        assert best["metrics"][column]["best"] and best["metrics"][column]["p"] is None
        seed_means = np.mean([split_values(r, "all", key) for r in good], axis=0)  # zero-shot has no seeds
        expected = stats.wilcoxon(split_values(zero_shot, "all", key), seed_means).pvalue
        assert zs["metrics"][column]["p"] == pytest.approx(expected, rel=1e-12)
        assert zs["metrics"][column]["pairs"] == 10
        assert zs["metrics"][column]["tied"] == (expected >= 0.05)
    # rows trained with the same seeds pair on (seed, split): 2 x 10 pairs
    worse = [write_run(tmp_path, f"worse{s}", seed=s, lr=1e-5, **kwargs) for s in (0, 1)]
    rows = collect_results.main([str(tmp_path), "--out", str(tmp_path / "t"), "--columns", "rank1", "--force"])
    row = next(r for r in rows if r["labels"]["method"] == "Fine-tuned (lr 1e-05)")
    expected = stats.wilcoxon(np.concatenate([split_values(r, "all", "rank1") for r in worse]),
                              np.concatenate([split_values(r, "all", "rank1") for r in good]))
    assert row["metrics"]["rank1"]["p"] == pytest.approx(expected.pvalue, rel=1e-12)
    assert row["metrics"]["rank1"]["pairs"] == 20
    assert expected.pvalue < 0.05 and not row["metrics"]["rank1"]["tied"]
    frame = pd.read_csv(tmp_path / "t.csv")
    assert frame.loc[frame["method"] == "Fine-tuned (lr 1e-05)", "rank1_p_vs_best"].item() == \
        pytest.approx(expected.pvalue, rel=1e-12)


def test_few_pairs_are_said_and_identical_rows_tie():
    x = np.array([0.5, 0.6, 0.7])
    assert significance.wilcoxon_p(x, x) == 1.0
    assert significance.wilcoxon_p(x, x + 0.1) == pytest.approx(0.25)  # the smallest p with 3 pairs
    assert significance.smallest_p_value(10) == pytest.approx(2 / 1024)
    rows = [{"values": {0: {0: 0.5, 1: 0.6, 2: 0.7}}, "mean": 0.6},
            {"values": {0: {0: 0.6, 1: 0.7, 2: 0.8}}, "mean": 0.7}]
    found = significance.compare_with_best(rows, "rank1")
    assert [f["best"] for f in found] == [False, True] and found[0]["tied"] and found[0]["pairs"] == 3
    assert [f["best"] for f in significance.compare_with_best(rows, "EER")] == [True, False]  # lower is better


def test_labels_tell_rows_apart_and_overrides_are_marked(tmp_path):
    write_run(tmp_path, "run", seed=0, variants=("all",))
    run_dir = tmp_path / "run"
    write_results(run_dir / "eval_noflip", "run (finetune, net_best)", 0, variants=("all",), run_dir=run_dir,
                  kind="finetune", explicit={"flip": False})
    write_results(run_dir / "eval_composed", "run (finetune, net_best)", 0, variants=("all",), run_dir=run_dir,
                  kind="finetune", eval_args={"inference_prompt": "composed"})
    write_results(run_dir / "eval_flip", "run (finetune, net_best)", 0, variants=("all",), run_dir=run_dir,
                  kind="finetune", explicit={"flip": True})  # given, but what the protocol implies anyway
    write_results(run_dir / "eval_concat", "run (finetune, net_best)", 0, variants=("all",), run_dir=run_dir,
                  kind="finetune", explicit={"feature": "concat"})
    rows = collect_results.main([str(tmp_path), "--out", str(tmp_path / "t")])
    labels = [(r["labels"]["method"], r["labels"]["protocol"]) for r in rows]
    assert len(set(labels)) == len(labels) == 5
    protocols_ = [p for _, p in labels]
    assert "clip-handid (flip off)" in protocols_ and "clip-handid (feature concat)" in protocols_
    assert sum(any(m.startswith("Fine-tuned (inference_prompt composed") for m, _ in labels) for _ in [0]) == 1
    markdown = table_lines(tmp_path / "t.md")
    assert markdown[0].startswith("| Method | Protocol |") and len(markdown) == 2 + 5


def test_protocols_are_not_mixed_without_flag(tmp_path):
    write_results(tmp_path / "a", "zero-shot", 0, protocol="clip-handid")
    write_results(tmp_path / "b", "zero-shot", 1, protocol="clip-reid", backbone="RN50")
    with pytest.raises(SystemExit, match="different protocols \\(clip-handid, clip-reid\\).*--mixed"):
        collect_results.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "t")])
    rows = collect_results.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "t"), "--mixed"])
    assert [r["labels"]["protocol"] for r in rows] == ["clip-handid"] * 2 + ["clip-reid"] * 2
    with pytest.raises(SystemExit, match="nothing.*does not exist"):
        collect_results.main([str(tmp_path / "nothing"), "--out", str(tmp_path / "t2")])


def test_grouped_layout_has_test_sets_as_column_groups(tmp_path):
    for backbone in ("ViT-B/16", "RN50"):
        for aspect in ("dorsal_r", "dorsal_l"):
            write_results(tmp_path / backbone.replace("/", "-") / aspect, "zero-shot", len(aspect), variants=("all",),
                          backbone=backbone, test_dir=f"/data/11k/train_val_test_split_{aspect}")
    collect_results.main([str(tmp_path), "--out", str(tmp_path / "t"), "--layout", "grouped", "--columns", "rank1",
                          "mAP"])
    markdown = table_lines(tmp_path / "t.md")
    assert markdown[0] == ("| Method | Backbone | 11k dorsal right: Rank-1 | 11k dorsal right: mAP | "
                           "11k dorsal left: Rank-1 | 11k dorsal left: mAP |")
    assert [line.split(" | ")[:2] for line in markdown[2:]] == [["| Zero-shot", "RN50"], ["| Zero-shot", "ViT-B/16"]]  # as found
    latex = (tmp_path / "t.tex").read_text()
    assert "\\multicolumn{4}{c}{11k}" in latex and "\\multicolumn{2}{c}{dorsal right}" in latex


def latex_widths(tex, tmp_path):
    """(table width, \\textwidth, shrunk?) in pt of a table file compiled in an article page."""
    (tmp_path / "table.tex").write_text(tex)
    (tmp_path / "doc.tex").write_text(
        "\\documentclass{article}\\usepackage{booktabs}\\usepackage{graphicx}\n"
        "\\let\\realresizebox\\resizebox\\renewcommand{\\resizebox}{\\typeout{SHRUNK}\\realresizebox}\n"
        "\\begin{document}\\newsavebox{\\probe}\\sbox{\\probe}{\\input{table.tex}}\n"
        "\\typeout{WIDTH=\\the\\wd\\probe}\\typeout{TEXTWIDTH=\\the\\textwidth}\\usebox{\\probe}\\end{document}\n")
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    log = (tmp_path / "doc.log").read_text(errors="replace")
    assert done.returncode == 0, log[-3000:]
    width = float(re.search(r"WIDTH=([\d.]+)pt", log).group(1))
    textwidth = float(re.search(r"TEXTWIDTH=([\d.]+)pt", log).group(1))
    return width, textwidth, "SHRUNK" in log


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")
def test_latex_compiles_no_wider_than_textwidth(tmp_path):
    for kind, name in (("finetune", "ft"), ("clipreid", "reid"), ("handid", "handid")):
        for backbone in ("ViT-B/16", "RN50"):
            write_run(tmp_path / "runs", f"{name}_{backbone[:3]}", kind=kind, variants=("all",), backbone=backbone,
                      shift=0.05 * len(name), spread=0.03)
    write_results(tmp_path / "runs" / "zs", "CLIP zero-shot", 3, variants=("all",), spread=0.03)
    collect_results.main([str(tmp_path / "runs"), "--out", str(tmp_path / "t")])
    width, textwidth, shrunk = latex_widths((tmp_path / "t.tex").read_text(), tmp_path)
    assert width <= textwidth and not shrunk  # the default columns fit as they are
    # a wide custom table is scaled down to the text width
    collect_results.main([str(tmp_path / "runs"), "--out", str(tmp_path / "t"), "--force", "--columns",
                          *collect_results.COLUMN_CHOICES[:12]])
    width, textwidth, shrunk = latex_widths((tmp_path / "t.tex").read_text(), tmp_path)
    assert width <= textwidth + 0.01 and shrunk  # (scaling rounds to a few thousandths of a point)


def test_figures_keep_legends_off_the_data(tmp_path):
    for s, (kind, backbone) in enumerate([("finetune", "ViT-B/16"), ("finetune", "RN50"), ("clipreid", "ViT-B/16")]):
        write_run(tmp_path / "runs", f"run{s}", kind=kind, seed=s, backbone=backbone)
    write_results(tmp_path / "runs" / "zs", "CLIP zero-shot", 3)
    paths = []
    original = figures.save

    def keep(fig, prefix, formats=("pdf", "png")):
        assert fig.get_figwidth() in (figures.SINGLE_COLUMN, figures.DOUBLE_COLUMN)
        assert figures.overlapping_legends(fig) == []
        assert fig.legends and all(t.get_fontsize() >= figures.FONT_SIZE for t in fig.findobj(
            lambda a: hasattr(a, "get_fontsize") and hasattr(a, "get_text") and a.get_text()))
        labels = [t.get_text() for t in fig.legends[0].get_texts()]
        assert "Fine-tuned ViT-B/16" in labels and "Zero-shot ViT-B/16" in labels
        paths.extend(original(fig, prefix, formats))
        return paths[-len(formats):]

    figures.save, saved = keep, figures.save
    try:
        collect_results.main([str(tmp_path / "runs"), "--out", str(tmp_path / "t"), "--plot"])
    finally:
        figures.save = saved
    assert sorted(os.path.basename(p) for p in paths) == ["t_cmc.pdf", "t_cmc.png", "t_roc.pdf", "t_roc.png"]
    for path in paths:  # drawn in the staging folder, then swapped in
        assert os.path.getsize(tmp_path / os.path.basename(path)) > 5_000
    assert (tmp_path / "t_cmc.pdf").read_bytes().startswith(b"%PDF")


def test_roc_only_where_enough_impostor_pairs(tmp_path):
    results = write_results(tmp_path / "a", "zero-shot", 0, variants=("all",))
    entry = collect_results.evaluation_entries(str(tmp_path / "a" / "results.json"), "both")[0]
    points = collect_results.measurable_roc([entry])
    assert points and min(f for f, _ in points) * 950 >= verification.MIN_FALSE_ACCEPTS
    assert len(points) < sum(t is not None for t in results["summary"]["all"]["roc_mean"]["tar"])


def one_line(info):
    message = str(info.value)
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message, message
    return message


def snapshot(folder):
    """{name: bytes} of every entry of a folder, hidden ones included."""
    return {n: (folder / n).read_bytes() for n in sorted(os.listdir(folder)) if (folder / n).is_file()} | {
        n: None for n in os.listdir(folder) if not (folder / n).is_file()}


@pytest.fixture
def five_rows(tmp_path):
    """runs/ with five rows (zero-shot and two fine-tuned learning rates, both galleries; one seed-less
    row of one gallery) and their table set `out/allruns` drawn with --plot."""
    write_results(tmp_path / "runs" / "zs", "CLIP zero-shot", 0)
    write_run(tmp_path / "runs", "ft", seed=0)
    write_run(tmp_path / "runs", "ft_lr", seed=0, lr=1e-5, variants=("all",))
    out = tmp_path / "out"
    rows = collect_results.main([str(tmp_path / "runs"), "--out", str(out / "allruns"), "--plot"])
    assert len(rows) == 5
    return tmp_path / "runs", out


def test_an_interrupted_rewrite_leaves_the_old_set_as_it_was(five_rows, monkeypatch):
    """Defect 7: Ctrl-C while the figures of a --force rewrite are drawn left a new 1-row table beside
    the old figures."""
    runs, out = five_rows
    before = snapshot(out)
    assert sorted(before) == sorted(collect_results.set_names("allruns")[:8])  # md tex csv json, cmc and roc
    real_save = figures.save

    def interrupted(fig, prefix, formats=("pdf", "png")):
        if prefix.endswith("_roc"):
            raise KeyboardInterrupt
        return real_save(fig, prefix, formats)
    monkeypatch.setattr(figures, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        collect_results.main([str(runs / "zs"), "--gallery", "all", "--out", str(out / "allruns"), "--plot", "--force"])
    assert snapshot(out) == before  # every file as it was, no staging folder, no lock left
    monkeypatch.setattr(figures, "save", real_save)
    rows = collect_results.main([str(runs / "zs"), "--gallery", "all", "--out", str(out / "allruns"), "--force"])
    assert len(rows) == 1 and sorted(os.listdir(out)) == ["allruns.csv", "allruns.json", "allruns.md", "allruns.tex"]
    assert len(table_lines(out / "allruns.md")) == 3  # the old figures went with the old table, at the swap


def test_one_writer_per_table(five_rows):
    runs, out = five_rows
    before = snapshot(out)
    with outputs.FolderLock(str(out / "allruns"), "a test"):
        with pytest.raises(SystemExit, match="allruns is being written by another collect_results.py") as info:
            collect_results.main([str(runs / "zs"), "--out", str(out / "allruns"), "--force"])
        one_line(info)
    assert snapshot(out) == before


def test_a_swap_killed_half_way_is_finished_by_the_next_run(five_rows, monkeypatch):
    runs, out = five_rows
    real_replace, moved = os.replace, []

    def killed(src, dst):
        if os.path.dirname(os.path.abspath(dst)) == str(out):  # a staged file put in place
            if len(moved) == 2:
                raise KeyboardInterrupt  # stands for SIGKILL: nothing after this line runs
            moved.append(dst)
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        collect_results.main([str(runs / "zs"), "--gallery", "all", "--out", str(out / "allruns"), "--force"])
    monkeypatch.setattr(os, "replace", real_replace)
    assert [n for n in os.listdir(out) if n.startswith(".allruns.new-")]  # the swap is half done
    with pytest.raises(SystemExit, match="allruns.md already exists"):  # finishes the swap, then refuses
        collect_results.main([str(runs / "zs"), "--out", str(out / "allruns")])
    assert sorted(os.listdir(out)) == ["allruns.csv", "allruns.json", "allruns.md", "allruns.tex"]
    assert len(table_lines(out / "allruns.md")) == 3 and len(pd.read_csv(out / "allruns.csv")) == 1


def edit_results(folder, change):
    with open(folder / "results.json") as f:
        results = json.load(f)
    change(results)
    with open(folder / "results.json", "w") as f:
        json.dump(results, f)


BAD_RESULTS = {  # defects 8 and 9: what was broken -> the field the one line names
    "binary": (None, "cannot read .*results.json .*utf-8"),
    "nested": ("[" * 100_000, "cannot read .*results.json"),
    "rank1 text": (lambda r: r["rows"][1].update(rank1="abc"), '"rank1" of rows\\[1\\] is \'abc\', not a number'),
    "summary list": (lambda r: r.update(summary=[1]), '"summary" is \\[1\\], not an object'),
    "cmc text": (lambda r: r["summary"]["all"].update(cmc_mean="abc"), '"summary.all.cmc_mean" is \'abc\''),
    "no rows": (lambda r: r.update(rows=[]), "holds 0 split rows, not 3 splits x 2 gallery variant"),
    "missing split": (lambda r: r["rows"].pop(), "holds 5 split rows, not 3 splits x 2"),
    "repeated split": (lambda r: r["rows"][1].update(split=0), "rows\\[1\\] repeats split 0 of gallery own"),
    "NaN": (lambda r: r["rows"][0].update(mAP_hand=float("nan")), '"mAP_hand" of rows\\[0\\] is nan'),
    "above 1": (lambda r: r["rows"][0].update(rank5=85.2), '"rank5" of rows\\[0\\] is 85.2'),
    "table_mAP": (lambda r: r.update(table_mAP="nosuch"), '"table_mAP" is \'nosuch\', not mAP_hand or mAP_standard'),
    "num_splits": (lambda r: r.update(num_splits="3"), '"num_splits" is \'3\''),
    "explicit": (lambda r: r["protocol"].update(explicit=3), '"protocol.explicit" is 3'),
}


@pytest.mark.parametrize("case", sorted(BAD_RESULTS))
def test_a_bad_results_json_is_one_line_naming_the_field(tmp_path, case):
    change, expected = BAD_RESULTS[case]
    folder = tmp_path / "zs"
    write_results(folder, "zero-shot", 0)
    if change is None:
        (folder / "results.json").write_bytes(bytes(range(256)))
    elif isinstance(change, str):
        (folder / "results.json").write_text(change)
    else:
        edit_results(folder, change)
    with pytest.raises(SystemExit, match=expected) as info:
        collect_results.main([str(folder), "--out", str(tmp_path / "out" / "t")])
    assert str(folder / "results.json") in one_line(info)
    assert not os.path.exists(tmp_path / "out")  # nothing written, not even the lock's folder


def test_a_bad_run_config_is_one_line(tmp_path):
    write_run(tmp_path / "runs", "ft")
    config = tmp_path / "runs" / "ft" / "config.json"
    config.write_text(json.dumps({"method": "finetune", "args": {"seed": "0", "data_dir": TEST_DIR}}))
    with pytest.raises(SystemExit, match='config.json: "args.seed" is \'0\', not a whole number') as info:
        collect_results.main([str(tmp_path / "runs"), "--out", str(tmp_path / "t")])
    one_line(info)


def test_a_one_split_row_has_no_std_and_is_never_bold_over_more_splits(tmp_path):
    """Defect 9: one split printed '± 0.00' and took the bold from rows over three splits."""
    write_results(tmp_path / "zs", "zero-shot", 0, variants=("all",), num_splits=1, shift=0.45, spread=0.01)
    write_run(tmp_path, "ft", variants=("all",), shift=0.2, spread=0.05)
    rows = collect_results.main([str(tmp_path), "--out", str(tmp_path / "t"), "--columns", "rank1"])
    one, three = rows  # zero-shot first
    assert one["num_splits"] == 1 and three["num_splits"] == 3
    assert one["metrics"]["rank1"]["mean"] > three["metrics"]["rank1"]["mean"]
    assert not one["metrics"]["rank1"]["best"] and three["metrics"]["rank1"]["best"]
    assert one["metrics"]["rank1"]["std_splits"] is None and one["metrics"]["rank1"]["pairs"] == 1
    markdown = table_lines(tmp_path / "t.md")
    assert markdown[2].endswith(f"| {100 * one['metrics']['rank1']['mean']:.2f} ± n/a † |")
    assert markdown[3].split(" | ")[-1].startswith("**")
    text = (tmp_path / "t.md").read_text()
    assert "over the 1-3 splits" in text and "a row measured on one split has no std over splits" in text
    assert "fewer splits than others of their test set" in text
    assert "\\,$\\pm$\\,n/a" in (tmp_path / "t.tex").read_text()
    frame = pd.read_csv(tmp_path / "t.csv")
    assert pd.isna(frame.loc[0, "rank1_std_splits"]) and not frame.loc[0, "rank1_best"]


@pytest.mark.parametrize("where", ["separator", "folder", "under a file", "empty"])
def test_out_must_be_a_file_prefix(tmp_path, monkeypatch, where):
    """Defect 10: --out DIR/ wrote the hidden files DIR/.md, .tex, .csv, .json."""
    monkeypatch.chdir(tmp_path)  # --out "": the current folder
    write_results(tmp_path / "zs", "zero-shot", 0)
    (tmp_path / "co").mkdir()
    (tmp_path / "afile").write_text("mine")
    out, expected = {"separator": (str(tmp_path / "new") + os.sep, "is a folder; --out takes a file prefix"),
                     "folder": (str(tmp_path / "co"), "is a folder; --out takes a file prefix"),
                     "under a file": (str(tmp_path / "afile" / "x"), "afile is a file, not a folder"),
                     "empty": ("", "is a folder")}[where]
    with pytest.raises(SystemExit, match=expected) as info:
        collect_results.main([str(tmp_path / "zs"), "--out", out])
    one_line(info)
    assert sorted(os.listdir(tmp_path)) == ["afile", "co", "zs"] and os.listdir(tmp_path / "co") == []


def test_out_never_lands_in_an_evaluation_folder(tmp_path):
    """--out EVAL/results --force replaced the evaluation's results.json and results.csv with the table."""
    write_results(tmp_path / "zs", "zero-shot", 0)
    before = snapshot(tmp_path / "zs")
    with pytest.raises(SystemExit, match="lies in an evaluation folder it reads") as info:
        collect_results.main([str(tmp_path / "zs"), "--out", str(tmp_path / "zs" / "results"), "--force"])
    one_line(info)
    with pytest.raises(SystemExit, match="lies in an evaluation folder it reads"):  # not "pass --force"
        collect_results.main([str(tmp_path / "zs"), "--out", str(tmp_path / "zs" / "table")])
    assert snapshot(tmp_path / "zs") == before


def test_robustness_benchmarks_below_a_run_are_skipped(tmp_path, capsys):
    write_run(tmp_path, "ft")
    folder = tmp_path / "ft" / "robustness_best_dorsal_r"
    write_results(folder, "ft", 0)
    edit_results(folder, lambda r: r.update(families=["blur"], degrade="query", rows=[{"family": "blur"}]))
    rows = collect_results.main([str(tmp_path / "ft"), "--out", str(tmp_path / "t")])
    assert len(rows) == 2 and f"skipped {folder / 'results.json'}: a robustness benchmark" in capsys.readouterr().out


def write_split_root(folder, seed=0, identities=range(1, 6)):
    """A split root's splits.json (3 query/gallery splits of `identities`), nothing else."""
    sets = {"test": [(str(i), f"Hands/h{i}_{k}.jpg") for i in identities for k in range(3)]}
    for split in range(3):
        sets[f"query{split}"] = [(str(i), f"Hands/h{i}_{(split + seed) % 3}.jpg") for i in identities]
        sets[f"gallery{split}"] = [(str(i), f"Hands/h{i}_{(split + seed + 1) % 3}.jpg") for i in identities]
        sets[f"gallery{split}_all"] = sets[f"gallery{split}"]
    os.makedirs(folder, exist_ok=True)
    manifest = splits.split_manifest(sets, dataset="11k", aspect="dorsal_r", seed=seed, num_splits=3, source_root="..")
    (folder / "splits.json").write_text(splits.manifest_text(manifest))


def test_a_moved_split_root_is_one_test_set_and_others_are_named_by_what_differs(tmp_path):
    """An --out folder of reproduce.py copied and moved (cp -a rep1 rep2; mv rep2 rep3), a few evaluations
    re-run: the table had column groups titled with paths, '–' in half of their cells, and a matrix figure."""
    name = "train_val_test_split_dorsal_r"
    write_split_root(tmp_path / "rep1" / name)
    shutil.copytree(tmp_path / "rep1", tmp_path / "rep3")
    write_results(tmp_path / "rep3" / "zs", "zero-shot", 0, test_dir=str(tmp_path / "rep1" / name))  # before the copy
    write_run(tmp_path / "rep3", "ft", shift=0.1, data_dir=str(tmp_path / "rep3" / name),
              test_dir=str(tmp_path / "rep3" / name))  # re-run after the move
    out = tmp_path / "t"
    for removed in (False, True):  # the old folder still there, then gone: what results.json records decides
        if removed:
            shutil.rmtree(tmp_path / "rep1")
        rows = collect_results.main([str(tmp_path / "rep3"), "--out", str(out), "--layout", "grouped", "--plot",
                                     "--force"])
        assert {r["labels"]["test_set"] for r in rows} == {"11k dorsal right"}
        assert len({r["group"] for r in rows if r["labels"]["gallery"] == "with distractors"}) == 1
        text = (tmp_path / "t.md").read_text()
        assert str(tmp_path) not in text and "–" not in text
        assert not (tmp_path / "t_matrix.png").exists()
    # split roots that really differ are told apart by what differs, never by a path
    write_split_root(tmp_path / "seed1" / name, seed=1)
    write_results(tmp_path / "rep3" / "zs_seed1", "zero-shot", 1, test_dir=str(tmp_path / "seed1" / name),
                  split_seed=1)
    write_split_root(tmp_path / "other" / name, identities=range(6, 11))
    write_results(tmp_path / "rep3" / "zs_other", "zero-shot", 2, test_dir=str(tmp_path / "other" / name))
    rows = collect_results.main([str(tmp_path / "rep3"), "--out", str(out), "--force"])
    assert sorted({r["labels"]["test_set"] for r in rows}) == [
        "11k dorsal right (split seed 0, split root 1 of 2)", "11k dorsal right (split seed 0, split root 2 of 2)",
        "11k dorsal right (split seed 1)"]
    assert str(tmp_path) not in (tmp_path / "t.md").read_text()


def test_force_never_replaces_another_programs_files(tmp_path):
    """--out OTHER_EVAL/results --force overwrote another evaluation's results.json and results.csv, and
    --out EVAL/sub/table was accepted while reading EVAL."""
    write_results(tmp_path / "a", "zero-shot", 0)
    write_run(tmp_path, "ft")  # ft/config.json (a run) and ft/eval_best (an evaluation)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "result_split0.mat").write_bytes(b"mat")
    (tmp_path / "a" / "sub").mkdir()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.md").write_text("my notes")
    def tree():  # every file and folder below tmp_path, hidden ones (lock files) included
        return {os.path.join(d, n): open(os.path.join(d, n), "rb").read() if n in files else None
                for d, folders, files in os.walk(tmp_path) for n in folders + files}
    before = tree()
    for out, message in [(tmp_path / "ft" / "eval_best" / "results", "lies in an evaluation or run folder"),
                         (tmp_path / "ft" / "table", "lies in an evaluation or run folder"),
                         (tmp_path / "b" / "table", "lies in an evaluation or run folder"),
                         (tmp_path / "a" / "sub" / "table", "lies in an evaluation folder it reads"),
                         (tmp_path / "mine" / "notes", "is not part of a table written by collect_results.py")]:
        for force in ([], ["--force"]):
            with pytest.raises(SystemExit, match=message) as info:
                collect_results.main([str(tmp_path / "a"), "--out", str(out), *force])
            one_line(info)
    assert tree() == before
    collect_results.main([str(tmp_path / "a"), "--out", str(tmp_path / "mine" / "t")])
    assert json.loads((tmp_path / "mine" / "t.json").read_text())["written_by"] == "collect_results.py"
    collect_results.main([str(tmp_path / "a"), "--out", str(tmp_path / "mine" / "t"), "--force"])  # ours: replaced
