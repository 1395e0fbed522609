"""The robustness benchmark's results (eval_robustness.py): every evaluator metric per corruption
family x severity as mean ± std over the splits, each family's mean relative to clean, the
paper-style table, robustness.json / robustness.csv, the mAP-against-severity plot and the grid of
one hand under every family and severity."""
import os

import numpy as np

from . import corruptions, display, verification
from .evaluation import metric_names
from .io import atomic_write_json, write_metrics_csv
from .outputs import output_errors

MAP_LABELS = {"mAP_hand": "mAP (trapezoid AP, MBA-Net / CLIP-HandID)", "mAP_standard": "mAP (standard AP)"}


def _ratio(value, clean):
    return None if value is None or not clean else value / clean


def _stat_row(per_split, clean_mean, **head):
    """A flat row: head, then <metric>_mean, _std (over splits) and _relative (mean / clean mean)."""
    row = dict(head, num_splits=len(per_split))
    for name in metric_names():
        mean, std = verification.mean_std_or_none([r[name] for r in per_split])
        row.update({f"{name}_mean": mean, f"{name}_std": std,
                    f"{name}_relative": _ratio(mean, clean_mean.get(name) if clean_mean else mean)})
    return row


def _severity_average(per_severity):
    """Per split: each metric averaged over the severities (None where a severity has None)."""
    out = []
    for split_rows in zip(*per_severity):
        values = {}
        for name in metric_names():
            found = [r[name] for r in split_rows]
            values[name] = None if any(v is None for v in found) else float(np.mean(found))
        out.append(values)
    return out


def summarise(scored, variants, families, severities, table_mAP, headline):
    """scored: {(family, severity): score_splits rows}, ("clean", 0) holding the clean evaluation.
    Returns {"rows": flat rows (robustness.csv), "splits": every split's metrics, "relative":
    {variant: {family: {metric: mean over severities / clean}}}, "most_damaging", "least_damaging"}
    (by the relative `table_mAP` on the `headline` gallery)."""
    rows, split_rows, relative = [], [], {}
    for variant in variants:
        mine = {key: [r for r in found if r["gallery"] == variant] for key, found in scored.items()}
        for (family, severity), found in mine.items():
            split_rows += [{"gallery": variant, "family": family, "severity": severity, "split": r["split"],
                            "num_query": r["num_query"], "num_gallery": r["num_gallery"],
                            **{name: r[name] for name in metric_names()}} for r in found]
        clean = _stat_row(mine[("clean", 0)], None, gallery=variant, family="clean", severity=0)
        clean_mean = {name: clean[f"{name}_mean"] for name in metric_names()}
        rows.append(clean)
        relative[variant] = {}
        for family in families:
            rows += [_stat_row(mine[(family, s)], clean_mean, gallery=variant, family=family, severity=s)
                     for s in severities]
            average = _stat_row(_severity_average([mine[(family, s)] for s in severities]), clean_mean,
                                gallery=variant, family=family, severity="mean")
            rows.append(average)
            relative[variant][family] = {name: average[f"{name}_relative"] for name in metric_names()}
    ranked = sorted(families, key=lambda f: relative[headline][f][table_mAP] if relative[headline][f][table_mAP]
                    is not None else float("inf"))
    pick = [{"family": f, "relative": relative[headline][f][table_mAP]} for f in (ranked[0], ranked[-1])]
    return {"rows": rows, "splits": split_rows, "relative": relative, "most_damaging": pick[0],
            "least_damaging": pick[1]}


def damage_line(results):
    """'most damaging: occlusion (mAP 41.2% of clean), least damaging: ...' (by the mean over severities)."""
    def name(pick):
        share = "n/a" if pick["relative"] is None else f"{100 * pick['relative']:.1f}%"
        return f"{corruptions.SEVERITIES[pick['family']].label} (mAP {share} of clean)"
    if len(results["families"]) == 1:
        return f"one family: {name(results['most_damaging'])}"
    return f"most damaging: {name(results['most_damaging'])}, least damaging: {name(results['least_damaging'])}"


def corruption_table(families):
    """{family: {"label", "parameter", "values"}} of SEVERITIES, for robustness.json."""
    return {f: {"label": corruptions.SEVERITIES[f].label, "parameter": corruptions.SEVERITIES[f].parameter,
                "values": list(corruptions.SEVERITIES[f].values)} for f in families}


def _headline_rows(results):
    return [r for r in results["rows"] if r["gallery"] == results["headline_gallery"]]


def format_table(results):
    """Families x severities of the table mAP on the headline gallery, percent, mean ± std over the
    splits, the mean over the severities and that mean as a share of clean."""
    key, rows = results["table_mAP"], _headline_rows(results)
    clean = rows[0]

    def cell(row):
        return "n/a" if row[f"{key}_mean"] is None else f"{100 * row[f'{key}_mean']:.2f} ± {100 * row[f'{key}_std']:.2f}"
    headers = [f"severity {s}" for s in results["severities"]] + ["mean", "% of clean"]
    table = []
    for family in results["families"]:
        mine = {r["severity"]: r for r in rows if r["family"] == family}
        share = mine["mean"][f"{key}_relative"]
        table.append([corruptions.SEVERITIES[family].label] + [cell(mine[s]) for s in results["severities"]]
                     + [cell(mine["mean"]), "n/a" if share is None else f"{100 * share:.1f}"])
    width = max(len(c) for line in table for c in line[1:] + headers)
    name_width = max(len("family"), *(len(line[0]) for line in table))
    header = "family".ljust(name_width) + " | " + " | ".join(h.rjust(width) for h in headers)
    title = (f"{results['method']} on {results['test_dir']}: {MAP_LABELS.get(key, key)} in percent, gallery"
             f"{{i}}{'_all' if results['headline_gallery'] == 'all' else ''}, {results['degrade']} degraded, "
             f"mean ± std over {results['num_splits']} split(s); clean: {cell(clean)}")
    lines = [title, header, "-" * len(header)]
    lines += [line[0].ljust(name_width) + " | " + " | ".join(c.rjust(width) for c in line[1:]) for line in table]
    return "\n".join(lines)


def csv_columns():
    return ["gallery", "family", "severity", "num_splits"] + [
        f"{name}_{stat}" for name in metric_names() for stat in ("mean", "std", "relative")]


def write(folder, results, identity, example, seed, pdf=False):
    """robustness.json, robustness.csv, robustness_mAP.png (+ .pdf) and corruptions.png into folder."""
    atomic_write_json(os.path.join(folder, "robustness.json"), results)
    write_metrics_csv(os.path.join(folder, "robustness.csv"), results["rows"], columns=csv_columns(),
                      float_format=".6f")
    with output_errors(folder):
        plot_severity_curves(os.path.join(folder, "robustness_mAP.png"), results, pdf)
        plot_corruption_grid(os.path.join(folder, "corruptions.png"), example, identity, results["families"],
                             results["severities"], seed)


def plot_severity_curves(path, results, pdf=False):
    """The table mAP (headline gallery) against severity, one line per family, legend outside."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    key, rows = results["table_mAP"], _headline_rows(results)
    clean = rows[0][f"{key}_mean"]
    severities = [0] + list(results["severities"])
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    colours = plt.get_cmap("tab10").colors
    markers = "osD^vP*Xph"
    for k, family in enumerate(results["families"]):
        mine = {r["severity"]: r[f"{key}_mean"] for r in rows if r["family"] == family}
        values = [clean] + [mine[s] for s in results["severities"]]
        ax.plot(severities, [np.nan if v is None else 100 * v for v in values], marker=markers[k % len(markers)],
                color=colours[k % len(colours)], label=corruptions.SEVERITIES[family].label, linewidth=1.6)
    ax.set_xticks(severities)
    ax.set_xticklabels(["clean" if s == 0 else str(s) for s in severities])
    ax.set_xlabel("corruption severity (parameters: README, 'Robustness')")
    gallery = "gallery " + display.gallery_name(results["headline_gallery"], results.get("dataset"))
    ax.set_ylabel(f"{MAP_LABELS.get(key, key)}, %")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    side = {"query": "queries degraded, gallery clean", "gallery": "gallery degraded, queries clean",
            "both": "queries and gallery degraded"}[results["degrade"]]
    splits_text = "1 split" if results["num_splits"] == 1 else f"mean over {results['num_splits']} splits"
    ax.set_title(f"{results['method']}\n{display.test_set_name(results['test_dir'], results.get('dataset'))}, "
                 f"{gallery}: {side}; {splits_text}", fontsize=10)
    ax.legend(title="corruption", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, fontsize=9)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    if pdf:
        fig.savefig(os.path.splitext(path)[0] + ".pdf", bbox_inches="tight")
    plt.close(fig)


def plot_corruption_grid(path, example, identity, families, severities, seed):
    """One hand (uint8 (1, H, W, 3), as the model sees it) under every family (rows) and severity
    (columns), each cell captioned with its parameter; the same pixels the benchmark encoded."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    columns = [0] + list(severities)
    height, width = example.shape[1:3]
    cell = 1.35
    fig, axes = plt.subplots(len(families), len(columns), squeeze=False,
                             figsize=(cell * len(columns) * max(0.75, width / height) + 1.4, cell * len(families) + 0.9))
    for i, family in enumerate(families):
        for j, severity in enumerate(columns):
            image = corruptions.corrupt(example, family, severity, [identity], seed)[0].cpu().numpy()
            ax = axes[i][j]
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(corruptions.describe(family, severity), fontsize=7, labelpad=2)
            if i == 0:
                ax.set_title("clean" if severity == 0 else f"severity {severity}", fontsize=9)
            if j == 0:
                ax.set_ylabel(corruptions.SEVERITIES[family].label, fontsize=9)
    note = "" if min(height, width) == corruptions.REFERENCE_SIDE else (
        f"\npixel sizes are for a {corruptions.REFERENCE_SIDE}-px image and scaled to this one")
    fig.suptitle(f"One hand under each corruption, at the model's input size ({height}×{width} px){note}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
