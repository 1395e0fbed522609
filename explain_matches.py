"""Where the model looks: for chosen queries of an evaluator's result_split{i}.mat, the query and its
top-k gallery images overlaid with a heat map of what drives the query-gallery cosine similarity,
and the deletion test that says whether the map is faithful.

    python explain_matches.py --mat ./model_11k_d_r/clip_hand_vit/eval_best_.../result_split0.mat \
        --run_dir ./model_11k_d_r/clip_hand_vit --num_queries 4 --top_k 5 --out_dir ./explain
    python explain_matches.py --mat ./model_eval/clip_zero_shot/ViT-B-16/result_split0.mat \
        --backbone_name ViT-B/16 --out_dir ./explain_zeroshot

The model must be the one the .mat came from: a run folder of any trainer (rebuilt from config.json
and the checkpoint that ranked the gallery, net_<which_epoch>.pth as the evaluation's config.json
records it; its retrieval feature, PromptSG guided by its fixed prompt) or, for zero-shot CLIP, the
backbone name or checkpoint path. ViT: gradient-weighted attention rollout of
the similarity over all blocks; ResNet: Grad-CAM of the similarity on layer4. A gallery image's map
explains its similarity to the query; the query's map explains its similarity to the rank-1 image.
The similarity is that of the plain features (an evaluation with --flip ranked by f(x) + f(mirror)).

Deletion test, on each query against its rank-1 image: the query's highest-ranked 0 %, 10 %, ...,
100 % of pixels are set to 0 in the normalised input (= CLIP's normalisation mean colour, RGB
0.481 0.458 0.408, the mean the model's inputs are centred on) and the similarity is recorded; the
area under that curve (AUC; lower = the map found what matters) for the map, its reverse, and random
maps drawn on the model's own grid (mean over --num_random seeds).

Writes <out_dir>/explain.png, explain.pdf, explain.json (curves, AUCs, per-query numbers) and
config.json, whole or not at all (built beside the folder and swapped in; one explanation per folder
at a time). With --part_masks (synthetic data made with part masks) explain.json also reports the
share of each map's mass on the identity's distinguishing parts against their area.
"""
import argparse
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import clip
import models
from query_ranking_result_demo import (choose_queries, identity_caption, rank_gallery, split_manifest_of, style_panel,
                                       wrap_caption)
from utils import data, evaluation, explanation, figures, flags, interrupts, io, outputs, preprocessing
from utils.errors import ClipFHError, InputFileError

DELETION_FILL = ("0 in every channel of the normalised input, i.e. CLIP's normalisation mean colour "
                 "RGB (0.481, 0.458, 0.408)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mat", required=True, help="result_split{i}.mat written by an eval_query_gallery_*.py script")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run_dir", help="run folder of the trained model the .mat came from (<f_name>/<m_name>)")
    source.add_argument("--backbone_name", help="zero-shot: official CLIP name or local checkpoint path")
    p.add_argument("--which_epoch", default=None,
                   help="--run_dir checkpoint: best, last or an epoch number (default: the one that ranked the "
                        "gallery, from the evaluation's config.json; another one is refused)")
    p.add_argument("--input_size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="zero-shot input size (default: the evaluation's, from config.json beside the .mat, "
                        "else 224 224; run folders record theirs)")
    p.add_argument("--download_root", default="~/.cache/clip", help="where official weights are cached")
    p.add_argument("--query_index", type=int, nargs="+", default=None,
                   help="query row(s) to explain (0-based); default: --num_queries random queries")
    p.add_argument("--num_queries", type=int, default=4, help="random queries when --query_index is not given")
    p.add_argument("--top_k", type=int, default=5, help="gallery images per query")
    p.add_argument("--num_random", type=int, default=5, help="random orderings of the deletion test (seeds)")
    p.add_argument("--part_masks", default=None,
                   help="folder of <image stem>.png part masks (synthetic data: <data_dir>/Hands_parts)")
    p.add_argument("--draw", type=int, default=None,
                   help="rows of the figure: the first N explained queries (default: all; the deletion test and "
                        "explain.json always cover every query)")
    p.add_argument("--batch_size", type=int, default=64, help="images per forward pass of the deletion test")
    p.add_argument("--out_dir", default="./explain", help="output folder")
    p.add_argument("--force", action="store_true", help="overwrite an earlier explanation in --out_dir")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="tqdm bar (default: only when the output is a terminal)")
    io.add_common_args(p)
    args = p.parse_args(argv)
    if args.run_dir and args.input_size:
        p.error("--input_size is for zero-shot backbones; a run is explained at the input size it was trained with")
    flags.exit_on_problems(flags.bound_problems(args, at_least={
        "top_k": 1, "num_queries": 1, "num_random": 1, "batch_size": 1, "draw": 1, "input_size": 1}))
    return args


EXPLAIN_FILES = ("explain.png", "explain.pdf", "explain.json", "config.json")


def evaluation_config(mat):
    """What the evaluator recorded beside the .mat: its config.json, else (a trainer's final test) the
    settings in results.json; {} when there is neither. Both are checked as they are read."""
    folder = os.path.dirname(os.path.abspath(mat))
    for name in ("config.json", "results.json"):
        if os.path.isfile(os.path.join(folder, name)):
            return io.read_json(os.path.join(folder, name))
    return {}


def checkpoint_of_evaluation(args, evaluated):
    """The net_<which_epoch>.pth that ranked the gallery of the .mat; another --which_epoch is refused."""
    recorded = evaluated.get("which_epoch")
    if recorded is not None and args.which_epoch is not None and str(args.which_epoch) != str(recorded):
        raise SystemExit(f"error: --which_epoch {args.which_epoch}: {args.mat} was ranked by net_{recorded}.pth; "
                         f"explain the checkpoint that ranked it (drop --which_epoch) or evaluate net_"
                         f"{args.which_epoch} first")
    return str(args.which_epoch or recorded or "best")


def same_path(a, b):
    return os.path.realpath(os.path.abspath(a)) == os.path.realpath(os.path.abspath(b))


def load_model(args, evaluated):
    """(encode(images) -> retrieval features, image encoder, input size (H, W), description), set up
    as the evaluation `evaluated` (its config.json) was: same retrieval feature, same SIE aspect."""
    if args.run_dir:
        if evaluated.get("backbone") and not evaluated.get("run_dir"):
            raise SystemExit(f"error: {args.mat} was computed by the zero-shot evaluator; pass --backbone_name "
                             f"{evaluated.get('backbone', '')} instead of --run_dir")
        if evaluated.get("run_dir") and not same_path(evaluated["run_dir"], args.run_dir):
            raise SystemExit(f"error: {args.mat} was computed with the model of {evaluated['run_dir']}, not "
                             f"--run_dir {args.run_dir}; explain it with the model it came from")
        which_epoch = checkpoint_of_evaluation(args, evaluated)
        model, config, _ = models.load_trained_model(args.run_dir, which_epoch, device=args.device)
        if evaluated.get("feature") and hasattr(model, "feature"):
            model.check_feature(evaluated["feature"])
            model.feature = evaluated["feature"]
        test_dir = evaluated.get("args", {}).get("test_dir")
        if hasattr(model, "set_test_dir") and test_dir:
            model.set_test_dir(test_dir)
        if hasattr(model, "inference_prompt"):
            model.inference_prompt = "fixed"  # the composed prompt would explain the inversion network too
        kind = config["model"].get("kind", "finetune")
        return (model, model.visual, tuple(config["model"]["backbone"]["input_size"]),
                f"{kind} ({args.run_dir}, net_{which_epoch})")
    if evaluated.get("run_dir"):
        raise SystemExit(f"error: {args.mat} was computed with the trained model of {evaluated['run_dir']}; pass "
                         f"--run_dir {evaluated['run_dir']} instead of --backbone_name")
    recorded_backbone = evaluated.get("backbone")
    same_file = recorded_backbone and os.path.isfile(str(recorded_backbone)) and os.path.isfile(args.backbone_name) \
        and same_path(recorded_backbone, args.backbone_name)
    if recorded_backbone and recorded_backbone != args.backbone_name and not same_file:
        raise SystemExit(f"error: {args.mat} was computed with backbone {evaluated['backbone']}, not "
                         f"--backbone_name {args.backbone_name}")
    recorded = evaluated.get("args", {}).get("input_size")
    if args.input_size and recorded and list(args.input_size) != list(recorded):
        raise SystemExit(f"error: --input_size {' '.join(map(str, args.input_size))}: {args.mat} was ranked at "
                         f"{' '.join(map(str, recorded))}; drop --input_size to explain what ranked the gallery")
    size = tuple(args.input_size or recorded or clip.native_input_size(args.backbone_name))
    geometry = {k: evaluated.get("args", {}).get(k) for k in ("stride", "pos_interp")}  # as the evaluator built it
    try:
        clip_model, _ = clip.load(args.backbone_name, device=args.device, download_root=args.download_root,
                                  input_size=size, patch_stride=geometry["stride"],
                                  pos_interp=geometry["pos_interp"] or "bilinear")
    except RuntimeError as err:  # clip reports an unknown name, a bad file and a failed download this way
        raise SystemExit(f"cannot load --backbone_name {args.backbone_name}: {err}") from None
    return clip_model.encode_image, clip_model.visual, size, f"zero-shot {args.backbone_name}"


def differences_from_evaluation(evaluated):
    """What the explained similarity does differently from the ranking in the .mat, for the log."""
    notes = []
    if (evaluated.get("protocol") or {}).get("flip", evaluated.get("args", {}).get("flip")):
        notes.append("the .mat ranked f(image) + f(mirror) (--flip); the maps explain the plain feature")
    if evaluated.get("inference_prompt") == "composed":
        notes.append("the .mat used PromptSG's composed prompt; the maps use the fixed prompt")
    if evaluated.get("rerank"):
        notes.append("the .mat ranking is re-ranked; the maps explain the cosine similarity of the top-k")
    return notes


class SimilarityMaps:
    """Keeps what a map needs from an image encoder's forward pass: every block's attention
    probabilities and the last block's output tokens (ViT), or layer4's activations (ResNet)."""

    def __init__(self, visual):
        self.is_vit = hasattr(visual, "transformer")
        self.grid_size = tuple(visual.grid_size)
        if self.is_vit:
            self.attentions = [block.attn for block in visual.transformer.resblocks]
            last = visual.transformer.resblocks[-1]
        else:
            last = visual.layer4
        self.output = None
        last.register_forward_hook(self._keep_output)
        visual.requires_grad_(False)  # gradients are wanted for activations only

    def _keep_output(self, module, inputs, output):
        if output.requires_grad:
            output.retain_grad()
        self.output = output

    def recording(self, on):
        if self.is_vit:
            for attn in self.attentions:
                attn.keep_attention = on
        return self

    def grid_maps(self):
        """(N, h, w) maps on the encoder's grid, after the backward pass of the score."""
        if not self.is_vit:
            return explanation.grad_cam(self.output, self.output.grad)
        # an output token's share is its gradient's norm: only the class token for CLS-based features,
        # every token for PromptSG, whose fused feature attends over all of them
        relevance = explanation.attention_rollout([a.attention_probs for a in self.attentions],
                                                  [a.attention_probs.grad for a in self.attentions],
                                                  token_relevance=self.output.grad.norm(dim=-1))
        return relevance[:, 1:].reshape(-1, *self.grid_size)


def normalized(encode, images):
    return F.normalize(encode(images).float(), dim=1)


def explain_query(encode, recorder, images):
    """images: (1 + k, 3, H, W), the query then its top-k. Returns ((1 + k, H, W) maps, (k,) cosine
    similarities): the query's map explains its similarity to images[1], each gallery map its own."""
    images = images.clone().requires_grad_(True)
    recorder.recording(True)
    with torch.enable_grad():
        features = normalized(encode, images)
        query, gallery = features[0], features[1:]
        similarity = gallery @ query
        (similarity[0] + (gallery[1:] @ query.detach()).sum()).backward()
    maps = explanation.to_image_size(recorder.grid_maps(), images.shape[-2:])
    recorder.recording(False)
    return maps.detach(), similarity.detach()


def input_preprocessing(evaluated, size):
    """The preprocessing record the evaluation read its images with (its config.json), at `size`;
    evaluations from before the record existed squashed the whole photo."""
    recorded = evaluated.get("preprocessing")
    if not isinstance(recorded, dict):
        return preprocessing.record(size, "squash")
    try:
        return preprocessing.check(dict(recorded, size=list(size)), "its preprocessing record")
    except ValueError as err:
        raise InputFileError(f"the evaluation's config.json beside the .mat: {err}") from None


def load_inputs(paths, rec, device):
    return torch.stack([data.load_preprocessed(p, rec) for p in paths]).to(device)


def shown_region(path, rec, longest=400):
    """The photo as drawn under its map: whole (aspect kept) for a squash, the centre crop for a crop."""
    if rec["resize"] == "crop":
        height, width = rec["size"]
        scale = longest / max(height, width)
        return preprocessing.load(path, dict(rec, size=[round(height * scale), round(width * scale)]))
    photo = data.load_image(path)
    photo.thumbnail((longest, longest))  # keeps the aspect; full-size photos would bloat the PDF
    return photo


def explain_ranked(encode, recorder, images, num_random, seed, batch_size):
    """Maps, cosine similarities (see explain_query) and the deletion test of the query images[0]
    against its rank-1 image images[1]."""
    maps, similarity = explain_query(encode, recorder, images)
    with torch.no_grad():
        match_feature = normalized(encode, images[1:2])[0]
    deletion = explanation.deletion_test(lambda batch: normalized(encode, batch) @ match_feature, images[0],
                                         maps[0], recorder.grid_size, num_random, seed, batch_size=batch_size)
    return maps, similarity, deletion


def figure_row(query, paths, labels, colours, maps, similarity, deletion, manifest=None):
    """One row of draw_figure: the query (name `query`) and its ranked images with their maps; labels
    and paths start with the query's, colours are the ranked images' borders; `manifest` (the split
    root's) names distractors by where they come from."""
    panels = [{"path": paths[0], "map": maps[0].cpu().numpy(), "title": "query", "color": figures.QUERY,
               "caption": f"{identity_caption(labels[0], manifest)}\nmap vs rank 1"}]
    panels += [{"path": paths[r + 1], "map": maps[r + 1].cpu().numpy(), "title": f"rank {r + 1}", "color": colour,
                "caption": f"{identity_caption(labels[r + 1], manifest)}\ncos {float(similarity[r]):.2f}"}
               for r, colour in enumerate(colours)]
    return {"query": query, "label": labels[0], "path": paths[0], "deletion": deletion, "panels": panels}


def load_part_mask(folder, image_path, rec):
    path = os.path.join(folder, os.path.splitext(os.path.basename(image_path))[0] + ".png")
    if not os.path.isfile(path):
        raise SystemExit(f"--part_masks {folder} has no mask {os.path.basename(path)} for {image_path}; "
                         f"make the data with make_synthetic_11k(..., part_masks=True)")
    if rec["resize"] == "crop":
        return np.asarray(preprocessing.load(path, dict(rec, interpolation="bilinear")).convert("L")) >= 128
    size = rec["size"]
    return np.asarray(data.load_image(path).convert("L").resize((size[1], size[0]), 0)) >= 128


def thumbnail(path, longest=400):
    photo = data.load_image(path)
    photo.thumbnail((longest, longest))  # keeps the aspect; full-size photos would bloat the PDF
    return photo


BORDERS = ((figures.QUERY, "query"), (figures.SAME_IDENTITY, "same identity"), (figures.OTHER_IDENTITY, "another identity"))


def draw_figure(rows, top_k, out_png, rec=None, legend=None, width=figures.DOUBLE_COLUMN):
    """One row per explained query (the query, then its top-k, each overlaid with its map, the photo
    as the model saw it under the preprocessing record `rec`, else whole), a colour bar of the maps and
    a legend of the borders below (legend: (colour, meaning) pairs; default: those of BORDERS the rows
    use); saves PNG and PDF. Returns the paths."""
    used = {item["color"] for row in rows for item in row["panels"]}
    legend = legend or [(colour, meaning) for colour, meaning in BORDERS if colour in used]
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Patch
    panel = width / (top_k + 1)
    with figures.paper_style() as plt:
        fig = plt.figure(figsize=(width, (panel * 0.75 + 0.85) * len(rows) + 0.75))
        subfigs = fig.subfigures(len(rows) + 1, 1, squeeze=False, height_ratios=[1] * len(rows) + [0.7 / (
            panel * 0.75 + 0.85)])[:, 0]
        for subfig, row in zip(subfigs, rows):
            auc = row["deletion"]["auc"]
            subfig.suptitle(f"query {os.path.basename(row['path'])}, id {row['label']}; deletion AUC (lower = more "
                            f"faithful): map {auc['map']:.2f}, random {auc['random']:.2f}, reverse {auc['reverse']:.2f}",
                            x=0.01, ha="left", fontsize=figures.FONT_SIZE)
            for ax, item in zip(subfig.subplots(1, top_k + 1, squeeze=False)[0], row["panels"]):
                photo = shown_region(item["path"], rec) if rec else thumbnail(item["path"])
                ax.imshow(explanation.overlay(np.asarray(photo), item["map"], colormap=figures.HEATMAP))
                style_panel(ax, item["title"], item["color"], wrap_caption(item["caption"], panel))
        key = subfigs[-1]
        legend_ax, bar_ax = key.subplots(1, 2, width_ratios=[1.2, 1])
        legend_ax.axis("off")
        bar_ax.set_label("<colorbar>")  # as matplotlib names the colour bars it places itself
        legend_ax.legend(handles=[Patch(facecolor="none", edgecolor=c, linewidth=2, label=t) for c, t in legend],
                         loc="center", ncols=len(legend), handlelength=1.5, columnspacing=1.0)
        key.colorbar(ScalarMappable(Normalize(0, 1), figures.HEATMAP), cax=bar_ax, orientation="horizontal",
                     label="relevance to the similarity (each map scaled to 0-1)")
    return figures.save(fig, os.path.splitext(out_png)[0], ("png", "pdf"))


def explanation_bytes(num_rows, top_k, num_queries):
    """About what explain writes: the figure (PNG and PDF, a few hundred KiB per panel) and explain.json."""
    return num_rows * (top_k + 1) * 400 * 1024 + num_queries * (top_k + 1) * 4096


@interrupts.sigterm_as_ctrl_c
def main(argv=None):
    args = parse_args(argv)
    io.set_seed(args.seed)
    if not args.mat.lower().endswith(".mat"):
        raise SystemExit(f"--mat must name a result_split*.mat file, got {args.mat}")
    if args.part_masks and not os.path.isdir(args.part_masks):
        raise SystemExit(f"--part_masks {args.part_masks} is not a folder")
    try:
        with outputs.OutputFolder(args.out_dir, overwrite=args.force, flag="--force", what="another explanation",
                                  ours=lambda name: name in EXPLAIN_FILES) as out:
            return explain(args, out)
    except ClipFHError as err:
        raise SystemExit(f"error: {err}") from None


def explain(args, out):
    """main() inside the locked output folder `out`."""
    evaluated = evaluation_config(args.mat)
    result = evaluation.load_result_mat(args.mat)
    encode, visual, size, description = load_model(args, evaluated)
    rec = input_preprocessing(evaluated, size)
    if result["query_path"] is None or result["gallery_path"] is None:
        raise SystemExit(f"{args.mat} stores no image paths (query_path / gallery_path); re-run the evaluator "
                         f"of this repository to write them")
    queries = choose_queries(args, len(result["query_label"]))
    top_k = min(args.top_k, len(result["gallery_label"]))
    out.check_space(explanation_bytes(len(queries[:args.draw]), top_k, len(queries)))
    rankings = {q: rank_gallery(result, q) for q in queries}
    needed = [p for q in queries for p in [result["query_path"][q], *result["gallery_path"][rankings[q][0][:top_k]]]]
    missing = [p for p in needed if not os.path.isfile(p)]
    if missing:
        raise SystemExit(f"image {missing[0]} named in {args.mat} does not exist ({len(missing)} missing); "
                         f"the split folders moved or were deleted since the evaluation")

    manifest = split_manifest_of(result)
    notes = differences_from_evaluation(evaluated)
    for note in notes:
        print(f"note: {note}")
    recorder = SimilarityMaps(visual)
    rows, records, parts = [], [], []
    start = time.perf_counter()
    for q in tqdm(queries, desc="explain", unit="query", disable=io.bars_off(args.progress)):
        order, is_match, _ = rankings[q]
        paths = [result["query_path"][q], *result["gallery_path"][order[:top_k]]]
        images = load_inputs(paths, rec, args.device)
        maps, similarity, deletion = explain_ranked(encode, recorder, images, args.num_random, args.seed,
                                                    args.batch_size)
        labels = [result["query_label"][q], *result["gallery_label"][order[:top_k]]]
        record = {"query": q, "path": paths[0], "label": str(labels[0]), "matches": [
            {"rank": r + 1, "path": paths[r + 1], "label": str(labels[r + 1]), "same_identity": bool(is_match[r]),
             "similarity": float(similarity[r]), "mat_similarity": float(result["gallery_f"][g] @ result["query_f"][q])}
            for r, g in enumerate(order[:top_k])], "deletion": deletion,
            "zero_map": bool(maps[0].max() == 0)}  # nothing positive: the deletion order is then by position
        if args.part_masks:
            shares = [explanation.mass_on_mask(m.cpu().numpy(), load_part_mask(args.part_masks, p, rec))
                      for m, p in zip(maps, paths)]
            record["mass_on_parts"] = [{"path": p, "map_mass": mass, "area": area} for p, (mass, area) in zip(paths, shares)]
            parts += [s for s in shares if s[0] is not None]
        records.append(record)
        rows.append(figure_row(q, paths, labels, [figures.SAME_IDENTITY if is_match[r] else figures.OTHER_IDENTITY
                                                  for r in range(top_k)], maps, similarity, deletion, manifest))
    seconds = (time.perf_counter() - start) / len(queries)

    aucs = {name: float(np.mean([r["deletion"]["auc"][name] for r in records])) for name in ("map", "random", "reverse")}
    summary = {"num_queries": len(records), "deletion_auc": aucs,
               "map_below_random": float(np.mean([r["deletion"]["auc"]["map"] < r["deletion"]["auc"]["random"]
                                                  for r in records])),
               "seconds_per_query": seconds}
    if parts:
        summary["mass_on_parts"] = float(np.mean([m for m, _ in parts]))
        summary["part_area"] = float(np.mean([a for _, a in parts]))
    method = "gradient-weighted attention rollout" if recorder.is_vit else "Grad-CAM on layer4"
    extra = {"model": description, "map": method, "input_size": list(size), "preprocessing": rec,
             "deletion_fill": DELETION_FILL,
             "deletion_fractions": list(explanation.DELETION_FRACTIONS), "mat": os.path.abspath(args.mat),
             "notes": notes}
    with out.staged() as staged:  # the figure, explain.json and config.json appear together or not at all
        draw_figure(rows[:args.draw], top_k, os.path.join(staged, "explain.png"), rec)
        io.atomic_write_json(os.path.join(staged, "explain.json"), {**extra, "summary": summary, "queries": records})
        io.write_run_config(staged, args, extra=extra)
    out_png, pdf, out_json = (os.path.join(args.out_dir, name) for name in EXPLAIN_FILES[:3])
    print(f"deletion AUC over {len(records)} quer{'y' if len(records) == 1 else 'ies'} (lower = more faithful): "
          f"map {aucs['map']:.4f}, random {aucs['random']:.4f}, reverse {aucs['reverse']:.4f}; "
          f"map below random for {100 * summary['map_below_random']:.0f}% of queries")
    if parts:
        print(f"map mass on the distinguishing parts: {100 * summary['mass_on_parts']:.1f}% "
              f"(they cover {100 * summary['part_area']:.1f}% of the image)")
    print(f"Wrote {method} maps of {len(records)} queries x top-{top_k} to {out_png}, {pdf} and {out_json} "
          f"({seconds:.2f} s per query on {args.device})")
    return {"out_dir": args.out_dir, "png": out_png, "pdf": pdf, "summary": summary, "queries": records}


if __name__ == "__main__":
    main()
