"""Results tables as papers print them, from the rows collect_results.py builds: Markdown, booktabs
LaTeX and CSV/JSON records. Two layouts: "rows" (one row per method x backbone x test set ...,
metrics as columns) and "grouped" (the MBA-Net / CLIP-HandID layout: test sets as column groups,
each with its metric columns). Percent with two decimals; the best value of each column in bold,
rows not significantly below it marked with a dagger (utils/significance.py).

A row: {"labels": {key: text}, "seeds": [...], "num_splits": n, "metrics": {metric: {"mean",
"std_seeds", "std_splits", "p", "pairs", "best", "tied"}}, "sources": [...], "group": the key of the rows
it is compared with}.

Depends on utils/io (the CSV writer) and utils/significance."""
import json

from . import significance
from .io import atomic_write_json, atomic_write_text, write_metrics_csv

# metric key -> column heading ("mAP": the protocol's table mAP, see collect_results)
METRIC_HEADINGS = {"rank1": "Rank-1", "rank5": "Rank-5", "rank10": "Rank-10", "rank20": "Rank-20", "mAP": "mAP",
                   "mAP_hand": "mAP (hand)", "mAP_standard": "mAP (standard)", "mINP": "mINP", "EER": "EER",
                   "AUC": "ROC AUC", "TAR@1e-1": "TAR@FAR=1e-1", "TAR@1e-2": "TAR@FAR=1e-2",
                   "TAR@1e-3": "TAR@FAR=1e-3", "TAR@1e-4": "TAR@FAR=1e-4"}
DEFAULT_COLUMNS = ("rank1", "rank5", "rank10", "mAP")
# label keys in table order -> heading
LABEL_HEADINGS = {"method": "Method", "backbone": "Backbone", "train_set": "Trained on", "test_set": "Test set",
                  "gallery": "Gallery", "protocol": "Protocol"}
MISSING = "–"  # a cell of the grouped layout that no evaluation fills
DAGGER_NOTE = "not significantly below the best (two-sided Wilcoxon signed-rank test, paired on the same splits"


def label_values(rows, key):
    """The distinct values of a label, in order; rows without one (zero-shot has no training set) left out."""
    return list(dict.fromkeys(r["labels"].get(key) for r in rows if r["labels"].get(key) is not None))


def trained_on_test_set(rows):
    """True when every trained row was trained on its own test set's training split (the published
    tables: a column per data set, trained and tested on it) and there are several test sets."""
    return (len(label_values(rows, "test_set")) > 1 and
            all(r["labels"].get("train_set") in (None, r["labels"].get("test_set")) for r in rows))


def varying_labels(rows, keys=tuple(LABEL_HEADINGS)):
    """The label keys whose value differs between rows (the method is always shown; the training set
    not when it is each row's test set)."""
    same = trained_on_test_set(rows)
    return [k for k in keys if k == "method" or (len(label_values(rows, k)) > 1 and not (k == "train_set" and same))]


def constant_labels(rows, keys=tuple(LABEL_HEADINGS)):
    """{key: value} of the label keys every row that has one shares (said once, under the table)."""
    shown = varying_labels(rows, keys)
    found = {k: label_values(rows, k)[0] for k in keys if k not in shown and len(label_values(rows, k)) == 1}
    if "train_set" in keys and "train_set" not in shown and trained_on_test_set(rows) and label_values(rows, "train_set"):
        found["train_set"] = "each test set's own training split"
    return found


def percent(value):
    """A fraction in percent with two decimals; 'n/a' for None (a std over one split)."""
    return "n/a" if value is None else f"{100 * value:.2f}"


def cell_text(stats, latex=False):
    """'85.20 ± 1.30' (one seed: ± std over splits) or '85.20 ± 0.40 [1.30]' (seeds: ± std over seeds,
    [std over splits]), percent; 'n/a' when not measured (as a std: one split); bold when best, a
    dagger when tied."""
    if stats is None:
        return MISSING
    if stats["mean"] is None:
        return "n/a"
    pm = "\\,$\\pm$\\," if latex else " ± "
    text = percent(stats["mean"])
    if stats.get("std_seeds") is not None:
        text += f"{pm}{percent(stats['std_seeds'])} [{percent(stats['std_splits'])}]"
    else:
        text += f"{pm}{percent(stats['std_splits'])}"
    if stats.get("best"):
        return f"\\textbf{{{text}}}" if latex else f"**{text}**"
    if stats.get("tied"):
        return text + ("\\rlap{$^\\dagger$}" if latex else " †")  # the dagger hangs into the column gap
    return text


def notes(rows, columns, shown_labels):
    """The lines said under a table: what every row shares, what a cell holds, what the marks mean."""
    lines = []
    shared = constant_labels(rows, [k for k in LABEL_HEADINGS if k not in shown_labels])
    for key in LABEL_HEADINGS:  # labels that follow the column group: each value with its groups
        if key not in shown_labels and key not in shared and key != "train_set" and len(label_values(rows, key)) > 1:
            groups = {}
            for row in rows:
                groups.setdefault(row["labels"].get(key), []).append(row["labels"].get("test_set"))
            shared[key] = ", ".join(f"{value} ({', '.join(dict.fromkeys(sets))})" for value, sets in groups.items())
    if shared:
        lines.append("; ".join(f"{LABEL_HEADINGS[k].lower()}: {v}" for k, v in shared.items()) + ".")
    splits = sorted({r["num_splits"] for r in rows})
    split_text = f"{splits[0]} splits" if len(splits) == 1 else f"{splits[0]}-{splits[-1]} splits"
    seeds = sorted({len(r["seeds"]) for r in rows})
    if seeds[-1] > 1:
        lines.append(f"Percent, mean ± std over training seeds (rows of one seed: ± std over the {split_text}); "
                     f"in brackets the std over the {split_text}.")
    else:
        lines.append(f"Percent, mean ± std over the {split_text}.")
    if splits[0] == 1:
        lines.append("n/a as a std: a row measured on one split has no std over splits.")
    counts = {}
    for row in rows:
        counts.setdefault(row.get("group"), set()).add(row["num_splits"])
    if any(len(c) > 1 for c in counts.values()):
        lines.append("Rows measured on fewer splits than others of their test set are compared with the best on the "
                     "splits they share and are never bold.")
    if "mAP" in columns:
        conventions = sorted({r.get("table_mAP") or "mAP_hand" for r in rows})
        lines.append(f"mAP: {', '.join(conventions)} (the protocol's convention, see README 'Metrics').")
    pairs = [m["pairs"] for r in rows for m in r["metrics"].values() if m.get("pairs")]
    lines.append(f"Bold: the best in its column; †: {DAGGER_NOTE} and seeds, p ≥ {significance.ALPHA}).")
    if pairs and max(pairs) < 6:
        lines.append(f"With {max(pairs)} pair(s) the smallest possible p is "
                     f"{significance.smallest_p_value(max(pairs)):.3g}: no difference can be significant, so every "
                     f"measured row carries a †; more splits or seeds are needed to separate the rows.")
    return lines


def latex_escape(text):
    text = str(text).replace("\\", "\\textbackslash{}")
    for char in "&%$#_{}":
        text = text.replace(char, "\\" + char)
    return text.replace("~", "\\textasciitilde{}").replace("^", "\\textasciicircum{}")


def _label(row, key):
    value = row["labels"].get(key)
    return MISSING if value is None else str(value)


def markdown_rows_table(rows, columns, label_keys):
    header = [LABEL_HEADINGS[k] for k in label_keys] + [METRIC_HEADINGS.get(c, c) for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(label_keys) + "---:|" * len(columns)]
    for row in rows:
        cells = [_label(row, k) for k in label_keys] + [cell_text(row["metrics"].get(c)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def latex_rows_table(rows, columns, label_keys):
    lines = ["\\begin{tabular}{" + "l" * len(label_keys) + "r" * len(columns) + "}", "\\toprule",
             " & ".join([LABEL_HEADINGS[k] for k in label_keys]
                        + [latex_escape(METRIC_HEADINGS.get(c, c)) for c in columns]) + " \\\\", "\\midrule"]
    for row in rows:
        cells = [latex_escape(_label(row, k)) for k in label_keys]
        cells += [cell_text(row["metrics"].get(c), latex=True) for c in columns]
        lines.append(" & ".join(cells) + " \\\\")
    return lines + ["\\bottomrule", "\\end{tabular}"]


def follows_group(rows, key, group_key="test_set"):
    """True when a label has one value per column group (the gallery of each test set: 11k's with
    distractors, HD's own): it is then said under the table, not a row label."""
    groups = {}
    for row in rows:
        if row["labels"].get(key) is not None:
            groups.setdefault(row["labels"].get(group_key), set()).add(row["labels"][key])
    return all(len(values) == 1 for values in groups.values())


def row_labels(rows, group_key="test_set"):
    """The labels of a grouped table's rows: the varying ones, less those that follow the column group."""
    return [k for k in varying_labels(rows) if k != group_key and (k == "method" or not follows_group(rows, k, group_key))]


def pivot(rows, group_key="test_set"):
    """Grouped layout: (row keys, groups, {(row key, group): row}) with row key = every other varying label."""
    keys = row_labels(rows, group_key)
    groups = list(dict.fromkeys(r["labels"].get(group_key) for r in rows))
    table, row_keys = {}, []
    for row in rows:
        key = tuple(_label(row, k) for k in keys)
        if key not in row_keys:
            row_keys.append(key)
        table[(key, row["labels"].get(group_key))] = row
    return keys, row_keys, groups, table


def markdown_grouped_table(rows, columns, group_key="test_set"):
    keys, row_keys, groups, table = pivot(rows, group_key)
    header = [LABEL_HEADINGS[k] for k in keys] + [f"{g}: {METRIC_HEADINGS.get(c, c)}" for g in groups for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(keys) + "---:|" * (len(groups) * len(columns))]
    for key in row_keys:
        cells = list(key) + [cell_text(table[(key, g)]["metrics"].get(c)) if (key, g) in table else MISSING
                             for g in groups for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def latex_grouped_table(rows, columns, group_key="test_set"):
    """Test sets as column groups under a \\cmidrule; 11k aspects share one '11k' heading above them."""
    keys, row_keys, groups, table = pivot(rows, group_key)
    width = len(columns)
    spec = "l" * len(keys) + ("@{\\hspace{8pt}}" + "r" * width) * len(groups)
    lines = [f"\\begin{{tabular}}{{{spec}}}", "\\toprule"]
    datasets = [str(g).split(" ", 1) if str(g).startswith("11k ") else [None, str(g)] for g in groups]
    if any(d[0] for d in datasets):  # a first heading row: the dataset over its aspects
        cells, rules, column = [""] * len(keys), [], len(keys) + 1
        runs = []
        for dataset, _ in datasets:
            if runs and runs[-1][0] == dataset:
                runs[-1][1] += 1
            else:
                runs.append([dataset, 1])
        for dataset, count in runs:
            span = count * width
            cells.append(f"\\multicolumn{{{span}}}{{c}}{{{latex_escape(dataset or '')}}}")
            if dataset:
                rules.append(f"\\cmidrule(lr){{{column}-{column + span - 1}}}")
            column += span
        lines += [" & ".join(cells) + " \\\\", " ".join(rules)]
    cells, rules = [""] * len(keys), []
    for index, (_, name) in enumerate(datasets):
        first = len(keys) + 1 + index * width
        cells.append(f"\\multicolumn{{{width}}}{{c}}{{{latex_escape(name)}}}")
        rules.append(f"\\cmidrule(lr){{{first}-{first + width - 1}}}")
    lines += [" & ".join(cells) + " \\\\", " ".join(rules)]
    lines.append(" & ".join([LABEL_HEADINGS[k] for k in keys]
                            + [latex_escape(METRIC_HEADINGS.get(c, c)) for _ in groups for c in columns]) + " \\\\")
    lines.append("\\midrule")
    for key in row_keys:
        cells = [latex_escape(k) for k in key]
        cells += [cell_text(table[(key, g)]["metrics"].get(c), latex=True) if (key, g) in table else MISSING
                  for g in groups for c in columns]
        lines.append(" & ".join(cells) + " \\\\")
    return lines + ["\\bottomrule", "\\end{tabular}"]


def latex_document_part(tabular_lines, note_lines):
    """The tabular in \\footnotesize with narrow column gaps, boxed and scaled down to \\linewidth
    only if it is wider (needs booktabs and graphicx); the notes as comments for the caption."""
    head = [f"% {latex_escape_comment(line)}" for line in note_lines]
    head += ["% needs \\usepackage{booktabs} and \\usepackage{graphicx}; put it in a table environment",
             "\\begingroup\\footnotesize\\setlength{\\tabcolsep}{4pt}%",
             "\\ifdefined\\clipfhtablebox\\else\\newsavebox{\\clipfhtablebox}\\fi",
             "\\sbox{\\clipfhtablebox}{%"]
    tail = ["}%", "\\ifdim\\wd\\clipfhtablebox>\\linewidth\\resizebox{\\linewidth}{!}{\\usebox{\\clipfhtablebox}}%",
            "\\else\\usebox{\\clipfhtablebox}\\fi", "\\endgroup"]
    return "\n".join(head + tabular_lines + tail) + "\n"


def latex_escape_comment(text):
    return str(text).replace("\n", " ")


def render(rows, columns, layout="rows", group_key="test_set"):
    """(markdown text, LaTeX text, note lines) of the rows in `layout` ("rows" or "grouped")."""
    if layout == "grouped":
        shown = row_labels(rows, group_key) + [group_key]
        md, tex = markdown_grouped_table(rows, columns, group_key), latex_grouped_table(rows, columns, group_key)
    else:
        shown = varying_labels(rows)
        md, tex = markdown_rows_table(rows, columns, shown), latex_rows_table(rows, columns, shown)
    note_lines = notes(rows, columns, shown)
    return "\n".join(md) + "\n\n" + "\n".join(note_lines) + "\n", latex_document_part(tex, note_lines), note_lines


def records(rows, columns):
    """One flat record per row (the CSV's rows, the JSON's "rows" without the per-split values):
    labels, seeds (a list of whole numbers; in the CSV its JSON text), split count, and per metric the mean, the std over seeds and over splits (percent,
    4 decimals), the p-value against the best row, the number of pairs, best and tied."""
    out = []
    for row in rows:
        record = {k: row["labels"].get(k) for k in LABEL_HEADINGS}
        record.update(settings=row.get("settings") or None, seeds=list(row["seeds"]),
                      num_seeds=len(row["seeds"]), num_splits=row["num_splits"], pretrained=row.get("pretrained"))
        for column in columns:
            stats = row["metrics"].get(column) or {}
            for name in ("mean", "std_seeds", "std_splits"):
                value = stats.get(name)
                record[f"{column}_{name}"] = None if value is None else round(100 * value, 4)
            record[f"{column}_p_vs_best"] = stats.get("p")
            record[f"{column}_pairs"] = stats.get("pairs")
            record[f"{column}_best"] = bool(stats.get("best"))
            record[f"{column}_not_below_best"] = bool(stats.get("tied"))
        record["sources"] = " ".join(row["sources"])
        out.append(record)
    return out


WRITTEN_BY, MARKER = "written_by", "collect_results.py"  # PREFIX.json: what tells our table sets from others' files
EARLIER_KEYS = {"columns", "layout", "notes", "rows"}  # PREFIX.json of a set written before the marker


def is_table_json(record):
    """True for the PREFIX.json of a table set (write), by its marker or, for an earlier set, its keys."""
    return isinstance(record, dict) and (record.get(WRITTEN_BY) == MARKER or set(record) == EARLIER_KEYS)


def write(prefix, rows, columns, layout="rows", group_key="test_set"):
    """PREFIX.md, PREFIX.tex, PREFIX.csv and PREFIX.json; returns (paths, markdown text)."""
    markdown, latex, note_lines = render(rows, columns, layout, group_key)
    flat = records(rows, columns)
    paths = [f"{prefix}.{ext}" for ext in ("md", "tex", "csv", "json")]
    atomic_write_text(paths[0], markdown)
    atomic_write_text(paths[1], latex)
    # floats as the shortest text that reads back as the same float; the seeds as their JSON list
    write_metrics_csv(paths[2], [dict(r, seeds=json.dumps(r["seeds"])) for r in flat], float_format="")
    per_split = [{"per_split": {c: {str(seed): values for seed, values in (row["metrics"].get(c) or {}).get(
        "values", {}).items()} for c in columns}} for row in rows]
    atomic_write_json(paths[3], {WRITTEN_BY: MARKER, "columns": list(columns), "layout": layout, "notes": note_lines,
                                 "rows": [dict(r, **p) for r, p in zip(flat, per_split)]})
    return paths, markdown
