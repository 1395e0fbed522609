"""Ranking figure from an evaluator's result_split{i}.mat: one row per query, the query image (with its
file name and identity) then its top-k gallery images, each with its identity and similarity under it
and a green border for the same identity, a red one for a different identity. The title names the
method, backbone, split and gallery variant (from results.json / config.json next to the .mat). The
images are read from the paths stored in the .mat, so they always belong to the split of the features.

    python query_ranking_result_demo.py --mat ./model_eval/clip_zero_shot/ViT-B-16/result_split0.mat \
        --num_queries 4 --top_k 10 --out ranking.png --pdf

Writes the PNG, and with --pdf also a vector PDF (same name, .pdf) for papers.
"""
import argparse
import math
import json
import os
import re
import textwrap

import numpy as np

from utils import data, display, errors, evaluation, figures, io, splits
from utils.outputs import check_writable

CORRECT, WRONG = figures.SAME_IDENTITY, figures.OTHER_IDENTITY  # border colours (figures.py's, one style)
LEGEND = ((CORRECT, "same identity as the query"), (WRONG, "another identity"))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mat", required=True, help="result_split{i}.mat written by an eval_query_gallery_*.py script")
    parser.add_argument("--query_index", type=int, nargs="+", default=None,
                        help="query row(s) to show (0-based); default: --num_queries random queries")
    parser.add_argument("--num_queries", type=int, default=4, help="random queries to show when --query_index is not given")
    parser.add_argument("--top_k", type=int, default=10, help="gallery images per row")
    parser.add_argument("--out", default="ranking.png", help="output PNG")
    parser.add_argument("--pdf", action="store_true", help="also write a vector PDF next to the PNG")
    parser.add_argument("--seed", type=io.seed_value, default=0, help="picks the random queries")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out figure (and its PDF)")
    parser.add_argument("--title", default=None, help="figure title (default: method, backbone, split and gallery)")
    parser.add_argument("--image_root", action="append", default=[], metavar="OLD=NEW",
                        help="read images stored under OLD from NEW instead (split folders moved since the "
                             "evaluation); repeat for several folders")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.num_queries < 1:
        parser.error("--top_k and --num_queries must be at least 1")
    bad = [r for r in args.image_root if "=" not in r or not r.split("=", 1)[0]]
    if bad:
        parser.error(f"--image_root takes OLD=NEW (the folder stored in the .mat = where it is now), got {bad[0]!r}")
    return args


def remap_paths(paths, image_roots):
    """Replace the folder prefix OLD by NEW for each "OLD=NEW" (the longest matching OLD wins)."""
    pairs = sorted((tuple(os.path.normpath(p) for p in r.split("=", 1)) for r in image_roots),
                   key=lambda pair: -len(pair[0]))

    def remap(path):
        for old, new in pairs:
            if path == old or path.startswith(old + os.sep):
                return new + path[len(old):]
        return path
    return np.array([remap(p) for p in paths])


def rank_gallery(result, query_index):
    """Gallery indices as the evaluator ranked them (cosine similarity, or the re-ranked distance when
    the .mat holds one; ties by gallery order), whether each is a true match, and the scores in that
    order (similarity, or distance for re-ranking)."""
    if result.get("rerank_dist") is not None:
        distance = result["rerank_dist"][query_index]
        order = np.argsort(distance, kind="stable")
        scores = distance[order]
    else:
        similarity = result["gallery_f"] @ result["query_f"][query_index]
        order = np.argsort(-similarity, kind="stable")
        scores = similarity[order]
    return order, result["gallery_label"][order] == result["query_label"][query_index], scores


def evaluation_info(mat_path):
    """results.json (over config.json) of the evaluation beside a .mat ({} when neither is there)."""
    folder = os.path.dirname(os.path.abspath(mat_path))
    info = {}
    for name in ("config.json", "results.json"):  # results.json wins
        try:
            with open(os.path.join(folder, name)) as f:
                found = json.load(f)
            info.update(found if isinstance(found, dict) else {})
        except (OSError, ValueError):
            pass
    return info


def default_title(mat_path):
    """'Zero-shot ViT-B/16 on 11k dorsal right, split 1, gallery with distractors' from the .mat's
    name and the results.json / config.json beside it (each part left out when unknown)."""
    info = evaluation_info(mat_path)
    method = display.method_name(display.results_method(info)) if info.get("method") else None
    backbone = display.backbone_name(info["backbone"]) if info.get("backbone") else None
    test_dir = info.get("test_dir") or (info.get("args") or {}).get("test_dir")
    parts = [" ".join(p for p in (method, backbone) if p) or None]
    if test_dir:
        parts[0] = f"{parts[0] or 'ranking'} on {display.test_set_name(test_dir, info.get('dataset'))}"
    found = re.fullmatch(r"result_split(\d+)(_all)?\.mat", os.path.basename(mat_path))
    if found:
        variant = "all" if found.group(2) else "own"
        parts += [f"split {found.group(1)}", f"gallery {display.gallery_name(variant, info.get('dataset'))}"]
    return ", ".join(p for p in parts if p) or os.path.basename(mat_path)


def choose_queries(args, num_queries):
    if args.query_index is not None:
        bad = [i for i in args.query_index if not 0 <= i < num_queries]
        if bad:
            raise SystemExit(f"--query_index {bad[0]} is out of range: {args.mat} has {num_queries} queries "
                             f"(valid indices 0..{num_queries - 1})")
        return list(args.query_index)
    rng = np.random.default_rng(args.seed)
    return sorted(rng.choice(num_queries, size=min(args.num_queries, num_queries), replace=False).tolist())


def split_manifest_of(result):
    """The manifest (splits.json) of the split root the .mat's gallery images lie in
    (<split root>/<set>/<identity>/<file>), or None."""
    for path in result["gallery_path"][:1]:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(path))))
        try:
            return splits.read_manifest(root)
        except errors.ClipFHError:
            return None
    return None


def identity_caption(label, manifest):
    """'id 1058' for the split root's own identities; a distractor by where it comes from and its
    original id on two lines ('dorsal left' / 'id 1039', 'HD 502-712' / 'id 560'), not by its relabelled
    number."""
    origin = splits.distractor_origin(label, manifest)
    if origin is None:
        return f"id {label}"
    where, original = origin
    return f"{'HD ' if where[:1].isdigit() else ''}{where}\nid {original}"


def ranking_rows(result, query_indices, top_k, manifest=None):
    """The rows draw_rankings draws for the queries of an evaluation: the query, then its top-k with
    identity (a distractor by where it comes from, see identity_caption) and similarity (two decimals;
    the re-ranked distance when the .mat holds one), bordered by whether it is the query's identity."""
    score_name = "dist" if result.get("rerank_dist") is not None else "sim"
    rows = []
    for q in query_indices:
        order, is_match, scores = rank_gallery(result, q)
        hits = np.flatnonzero(is_match)
        first = f"first correct match at rank {hits[0] + 1}" if len(hits) else "no correct match in the gallery"
        rows.append({"title": f"query {os.path.basename(result['query_path'][q])}, id {result['query_label'][q]}: "
                              f"{first}",
                     "query": (result["query_path"][q], identity_caption(result["query_label"][q], manifest)),
                     "matches": [(result["gallery_path"][g], f"{identity_caption(result['gallery_label'][g], manifest)}"
                                  f"\n{score_name} {scores[rank]:.2f}", CORRECT if is_match[rank] else WRONG)
                                 for rank, g in enumerate(order[:top_k])]})
    return rows


def draw_figure(result, query_indices, top_k, out_png, title, pdf=False):
    """The ranking figure of an evaluation's queries, saved as out_png (and with `pdf` the PDF beside
    it); returns the paths written."""
    top_k = min(top_k, len(result["gallery_label"]))
    return draw_rankings(ranking_rows(result, query_indices, top_k, split_manifest_of(result)), out_png, title, pdf)


def draw_rankings(rows, out_png, title, pdf=False, legend=LEGEND):
    """A ranking figure for any ranked photos (evaluations, identify_hands.py): rows = [{"title",
    "query": (path, caption), "matches": [(path, caption, border colour), ...]}], legend = (colour,
    meaning) pairs. Saves the PNG (and a PDF with `pdf`); returns the paths written."""
    fig = ranking_figure(rows, title, legend)
    return figures.save(fig, os.path.splitext(out_png)[0], ("png", "pdf") if pdf else ("png",))


def ranking_figure(rows, title, legend=LEGEND, width=figures.DOUBLE_COLUMN):
    """The figure draw_rankings saves: one row per query (its title, the query photo, then the ranked
    photos with "rank n" above, the caption under and the border colour), the legend below; a
    double column wide, text of at least 8 pt. Captions too wide for one line of panels (long
    identity names) put the panels of a query on several lines instead. Returns the figure."""
    from matplotlib.patches import Patch
    columns = 1 + max(len(row["matches"]) for row in rows)
    captions = [wrap_caption(caption, width / columns) for row in rows
                for _, caption, *_ in [row["query"], *row["matches"]]]
    widest = max((figures.text_width(line) for caption in captions for line in (caption or "").split("\n")),
                 default=0.0)
    per_line = max(2, min(columns, int(width // (widest + 0.08))))
    grid_rows = math.ceil(columns / per_line)
    panel = width / per_line
    lines = max(caption.count("\n") + 1 for row in rows for _, caption, *_ in [row["query"], *row["matches"]])
    title = "\n".join(textwrap.fill(line, int(width / 0.075)) for line in title.split("\n"))  # 9 pt
    row_height = (panel * 0.75 + 0.45 + 0.16 * lines) * grid_rows
    with figures.paper_style() as plt:
        fig = plt.figure(figsize=(width, row_height * len(rows) + 0.45 + 0.16 * (title.count("\n") + 1)))
        fig.suptitle(title)
        fig.legend(handles=[Patch(facecolor="none", edgecolor=colour, linewidth=2, label=meaning)
                            for colour, meaning in legend], loc="outside lower center", ncols=len(legend))
        for subfig, row in zip(fig.subfigures(len(rows), 1, squeeze=False)[:, 0], rows):
            subfig.suptitle(row["title"], x=0.01, ha="left", fontsize=figures.FONT_SIZE)
            panels = [(row["query"][0], "query", row["query"][1], figures.QUERY)]
            panels += [(path, f"rank {rank + 1}", caption, colour)
                       for rank, (path, caption, colour) in enumerate(row["matches"])]
            axes = subfig.subplots(grid_rows, per_line, squeeze=False).ravel()
            for ax in axes[len(panels):]:  # a row with fewer matches than the others
                ax.set_visible(False)
            for ax, (image, header, caption, colour) in zip(axes, panels):
                image = data.load_image(image) if isinstance(image, str) else image
                image.thumbnail((400, 400))  # keeps the aspect; full-size photos would bloat the PDF
                ax.imshow(image)
                style_panel(ax, header, colour, wrap_caption(caption, width / columns))
    return fig


def wrap_caption(caption, panel_width):
    """Captions of narrow panels (under 0.9 in) put each word of a place name on its own line."""
    if not caption or panel_width >= 0.9:
        return caption
    return "\n".join("\n".join(line.split(" ")) if not line.startswith(("id ", "sim ", "dist ")) else line
                     for line in caption.split("\n"))




def style_panel(ax, title, color, caption=None):
    """Title (and caption below) and border in `color` (the query's black, same identity green,
    another identity red), no ticks."""
    ax.set_title(title, color=color, fontsize=figures.FONT_SIZE)
    if caption:
        ax.set_xlabel(caption, color=color, fontsize=figures.FONT_SIZE)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(2.5 if color != figures.QUERY else 1)


def main(argv=None):
    args = parse_args(argv)
    try:
        result = evaluation.load_result_mat(args.mat)
    except errors.ClipFHError as e:
        raise SystemExit(f"error: {e}") from None
    if result["query_path"] is None or result["gallery_path"] is None:
        raise SystemExit(f"{args.mat} stores no image paths (query_path / gallery_path); re-run the evaluator "
                         f"of this repository to write them")
    result["query_path"] = remap_paths(result["query_path"], args.image_root)
    result["gallery_path"] = remap_paths(result["gallery_path"], args.image_root)
    if not args.out.lower().endswith(".png"):
        raise SystemExit(f"--out must name a .png file, got {args.out}")
    outputs = [args.out] + ([os.path.splitext(args.out)[0] + ".pdf"] if args.pdf else [])
    existing = [p for p in outputs if os.path.exists(p)]
    if existing and not args.force:
        raise SystemExit(f"{existing[0]} already exists; pass --force to overwrite it or choose another --out")
    try:
        check_writable(os.path.dirname(os.path.abspath(args.out)), "--out")
    except errors.ClipFHError as err:
        raise SystemExit(f"error: {err}") from None
    queries = choose_queries(args, len(result["query_label"]))
    needed = [result["query_path"][q] for q in queries]
    for q in queries:
        order = rank_gallery(result, q)[0]
        needed += [result["gallery_path"][g] for g in order[:args.top_k]]
    try:
        data.check_images(needed, what=f"images named in {args.mat}", progress=False)
    except errors.ImageLoadError as err:
        raise SystemExit(f"error: {err}; if the split folders moved, pass --image_root OLD=NEW") from None
    for q in queries:
        order, is_match, _ = rank_gallery(result, q)
        hits = np.flatnonzero(is_match)
        print(f"query {q} ({result['query_path'][q]}), identity {result['query_label'][q]}: first correct match "
              f"at rank {hits[0] + 1 if len(hits) else 'none'}")
    try:
        paths = draw_figure(result, queries, args.top_k, args.out, args.title or default_title(args.mat), pdf=args.pdf)
    except errors.ClipFHError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"Wrote ranking figure for {len(queries)} quer{'y' if len(queries) == 1 else 'ies'} to {' and '.join(paths)}")
    return paths


if __name__ == "__main__":
    main()
