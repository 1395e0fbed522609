"""One results table from several evaluations: a row per method x backbone x test set x gallery, with
Rank-1/5/10, mAP (hand and standard), mINP, EER and TAR@FAR=1e-3 as mean ± std over the splits
(percent), written as Markdown, LaTeX (booktabs) and CSV.

    python collect_results.py ./results/clip_zero_shot/* './model_11k_d_r/*/eval_*' --out table
    python collect_results.py ./demo_output/*/eval_best --out table --plot    # + CMC and ROC curves

Each argument is a results.json, a folder holding one, or a run folder (every results.json below it
is collected); glob patterns are expanded. Rows name the protocol and the gallery; rows evaluated
under different protocols are refused in one table unless --mixed.
"""
import argparse
import glob
import json
import os

from utils import io, verification
from utils.outputs import check_writable
from utils.errors import ClipFHError, EvaluationInputError, OutputExistsError

COLUMNS = [("Rank-1", "rank1"), ("Rank-5", "rank5"), ("Rank-10", "rank10"), ("mAP (hand)", "mAP_hand"),
           ("mAP (standard)", "mAP_standard"), ("mINP", "mINP"), ("EER", "EER"), ("TAR@1e-3", "TAR@1e-3")]
LABELS = [("method", "method"), ("backbone", "backbone"), ("test set", "test_set"), ("gallery", "gallery"),
          ("protocol", "protocol")]
CMC_RANKS = 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="results.json files, result folders or run folders (globs welcome)")
    p.add_argument("--out", default="results_table",
                   help="output prefix: writes PREFIX.md, PREFIX.tex, PREFIX.csv (and PREFIX_cmc/_roc.png/.pdf)")
    p.add_argument("--gallery", default="both", choices=["own", "all", "both"], help="gallery variants to list")
    p.add_argument("--plot", action="store_true", help="also draw overlaid CMC (ranks 1-20) and ROC curves")
    p.add_argument("--mixed", action="store_true", help="allow rows evaluated under different protocols")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
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


def backbone_label(backbone):
    """An official name as it is; a checkpoint path by its file stem."""
    if not backbone:
        return "unknown"
    if backbone.endswith((".pt", ".pth")):
        return os.path.splitext(os.path.basename(backbone))[0]
    return backbone


def table_rows(path, galleries):
    """Rows of one results.json: labels, per-metric (mean, std) over the splits, mean CMC and ROC."""
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise EvaluationInputError(f"cannot read {path}: {err}") from None
    if "rows" not in results or "summary" not in results:
        raise EvaluationInputError(f"{path} is not a results.json of this repository's evaluators (no rows/summary)")
    rows = []
    for variant in results["gallery_variants"]:
        if galleries != "both" and variant != galleries:
            continue
        splits = [r for r in results["rows"] if r["gallery"] == variant]
        summary = results["summary"].get(variant, {})
        row = {"method": results.get("method", "?"), "backbone": backbone_label(results.get("backbone")),
               "test_set": f"{results.get('dataset', '?')} {os.path.basename(results.get('test_dir', '?'))}",
               "gallery": variant, "protocol": protocol_name(results.get("protocol")),
               "pretrained": results.get("pretrained"), "num_splits": len(splits), "source": os.path.dirname(path),
               "cmc": summary.get("cmc_mean"), "roc": summary.get("roc_mean")}
        for _, key in COLUMNS:
            row[key] = verification.mean_std_or_none([r.get(key) for r in splits])
        rows.append(row)
    return rows


def cell(mean_std, plain=False):
    mean, std = mean_std
    if mean is None:
        return "n/a"
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if plain else f"{100 * mean:.2f} $\\pm$ {100 * std:.2f}"


def markdown_table(rows):
    header = [h for h, _ in LABELS] + [h for h, _ in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(LABELS) + "---:|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join([str(row[k]) for _, k in LABELS] + [cell(row[k], plain=True) for _, k in COLUMNS]) + " |")
    return "\n".join(lines) + "\n"


def latex_escape(text):
    for char in "\\&%$#_{}":
        text = text.replace(char, "\\" + char)
    return text


def latex_table(rows):
    header = [h for h, _ in LABELS] + [h.replace("@", "@") for h, _ in COLUMNS]
    lines = ["\\begin{tabular}{" + "l" * len(LABELS) + "r" * len(COLUMNS) + "}", "\\toprule",
             " & ".join(latex_escape(h) for h in header) + " \\\\", "\\midrule"]
    for row in rows:
        lines.append(" & ".join([latex_escape(str(row[k])) for _, k in LABELS] + [cell(row[k]) for _, k in COLUMNS])
                     + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "% mean $\\pm$ std over the splits, percent; needs \\usepackage{booktabs}\n" + "\n".join(lines) + "\n"


def csv_rows(rows):
    out = []
    for row in rows:
        record = {k: row[k] for _, k in LABELS}
        record.update(pretrained=row["pretrained"], num_splits=row["num_splits"])
        for _, key in COLUMNS:
            mean, std = row[key]
            record[f"{key}_mean"] = None if mean is None else round(100 * mean, 4)
            record[f"{key}_std"] = None if std is None else round(100 * std, 4)
        record["source"] = row["source"]
        out.append(record)
    return out


def row_name(row):
    return f"{row['method']} [{row['backbone']}, {row['test_set']}, gallery {row['gallery']}]"


def plot_curves(rows, prefix):
    """Overlaid CMC (ranks 1-20) and ROC (log FAR) curves, PNG and PDF each. Returns the paths written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    for kind in ("cmc", "roc"):
        fig, ax = plt.subplots(figsize=(6.4, 4.8), layout="constrained")
        for row in rows:
            if kind == "cmc" and row["cmc"]:
                cmc = row["cmc"][:CMC_RANKS]
                ax.plot(range(1, len(cmc) + 1), [100 * v for v in cmc], marker=".", label=row_name(row))
            elif kind == "roc" and row["roc"]:
                points = [(f, t) for f, t in zip(row["roc"]["far"], row["roc"]["tar"]) if t is not None]
                ax.plot([f for f, _ in points], [100 * t for _, t in points], label=row_name(row))
        if kind == "cmc":
            ax.set(xlabel="rank", ylabel="identification rate (%)", title="CMC (mean over splits)",
                   xticks=range(1, CMC_RANKS + 1, 2 if CMC_RANKS > 10 else 1), xlim=(0.5, CMC_RANKS + 0.5))
        else:
            ax.set_xscale("log")
            ax.set(xlabel="false accept rate", ylabel="true accept rate (%)", title="ROC (mean over splits)")
        ax.set_ylim(0, 101)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
        for ext in ("png", "pdf"):
            path = f"{prefix}_{kind}.{ext}"
            io._atomic_write(path, lambda f: fig.savefig(f, format=ext, dpi=150), mode="wb")
            written.append(path)
        plt.close(fig)
    return written


def run(args):
    files = find_results(args.paths)
    rows = [row for path in files for row in table_rows(path, args.gallery)]
    if not rows:
        raise EvaluationInputError(f"no rows for --gallery {args.gallery} in {len(files)} results.json file(s)")
    protocols = sorted({row["protocol"] for row in rows})
    if len(protocols) > 1 and not args.mixed:
        raise EvaluationInputError(f"the results were evaluated under different protocols ({', '.join(protocols)}); "
                                f"collect one protocol per table or pass --mixed")
    if args.plot and not all(row["cmc"] for row in rows):
        missing = next(row["source"] for row in rows if not row["cmc"])
        raise EvaluationInputError(f"{missing}/results.json holds no mean CMC curve; re-run its evaluation to plot it")
    outputs = [f"{args.out}.{ext}" for ext in ("md", "tex", "csv")]
    if args.plot:
        outputs += [f"{args.out}_{kind}.{ext}" for kind in ("cmc", "roc") for ext in ("png", "pdf")]
    existing = [p for p in outputs if os.path.exists(p)]
    if existing and not args.force:
        raise OutputExistsError(f"{existing[0]} already exists; pass --force to overwrite it or choose another --out")
    check_writable(os.path.dirname(os.path.abspath(args.out)), "--out")  # atomic writes make the folder
    io.atomic_write_text(outputs[0], markdown_table(rows))
    io.atomic_write_text(outputs[1], latex_table(rows))
    io.write_metrics_csv(outputs[2], csv_rows(rows))
    if args.plot:
        plot_curves(rows, args.out)
    print(markdown_table(rows))
    return rows, outputs


def protocol_name(protocol):
    """The protocol's name from results.json: a dict of every setting it implied (its "protocol" entry)
    in current evaluations, a plain name in older ones, absent in the oldest."""
    if isinstance(protocol, dict):
        protocol = protocol.get("protocol")
    return str(protocol) if protocol else "unspecified"


def main(argv=None):
    args = parse_args(argv)
    try:
        rows, outputs = run(args)
    except ClipFHError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"Wrote a table of {len(rows)} row(s) to {', '.join(outputs)}")
    return rows


if __name__ == "__main__":
    main()
