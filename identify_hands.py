"""Search your own photos: enrol hand photos into a gallery, search it with a new photo, verify a pair.

    python identify_hands.py enroll --run_dir ./model_11k_d_r/clip_hand_vit --images ./my_hands \\
        --gallery ./my_hands.gallery
    python identify_hands.py search --run_dir ./model_11k_d_r/clip_hand_vit --gallery ./my_hands.gallery \\
        --query ./new_photo.jpg --top_k 10 --out_dir ./search
    python identify_hands.py verify --run_dir ./model_11k_d_r/clip_hand_vit A.jpg B.jpg --gallery ./my_hands.gallery

The model is a trained run (--run_dir, any trainer's run folder, rebuilt from config.json and
net_<which_epoch>.pth as eval_query_gallery_finetune.py does) or zero-shot CLIP (--backbone_name).
Photos are encoded with exactly the test-time settings the model's evaluation uses under --protocol
(input size, retrieval feature, flip, precision, resize and normalisation); the gallery records them
and the model's fingerprint (its config and the checkpoint's SHA-256), and a gallery made by another
model or with other settings is refused.

enroll: --images DIR holds identity sub-folders (DIR/<identity>/<photo>), or photos named in
--labels CSV (columns file,identity), or photos without identities. --append adds photos to an
existing gallery; a photo whose bytes are already in it is skipped. The gallery format is described
in utils/gallery.py (float16 features in .npy shards read memory-mapped, entries.csv, gallery.json).

search: the top-k entries of every query photo (--query: a photo or a folder, laid out as for
enroll) with identity and cosine similarity, and a decision at a threshold calibrated for --far:
on the gallery's own impostor pairs (entries of different identities) when it has identities, or
from an evaluation's results.json (--results). A match is a similarity strictly above the
threshold. Writes <out_dir>/search.csv, search.json and ranking_<n>.png per query (--explain adds
explain_<n>.png, the explanation maps of explain_matches.py).

verify: the similarity of two photos and the decision at --far (threshold from --gallery or --results).
"""
import argparse
import re
import os
import textwrap
import time

import numpy as np

import clip
import explain_matches
import models
import models_handid  # noqa: F401  (registers the "handid" model kind)
import query_ranking_result_demo as ranking_figure
from utils import (data, evaluation, flags, gallery, interrupts, io, outputs, photo_folders, preprocessing, protocols,
                   training, verification)
from utils.errors import ClipFHError, EvaluationInputError, ImageLoadError
from utils.splits import FileLinker

ABOVE, BELOW, UNKNOWN = "#2c7bb6", "#969696", "#969696"
SETTING_NAMES = {"flip": "flip", "feature": "feature", "amp": "precision", "preprocessing": "preprocessing",
                 "inference_prompt": "PromptSG prompt", "aspect": "SIE aspect"}


class IdentifyError(ClipFHError, ValueError):
    """Bad input to identify_hands.py; the message names the file or flag."""


# ---- command line ----

def parse_args(argv=None):
    common = argparse.ArgumentParser(add_help=False)
    model = common.add_argument_group("model and test-time settings")
    source = model.add_mutually_exclusive_group(required=True)
    source.add_argument("--run_dir", help="run folder of a trained model (<f_name>/<m_name>)")
    source.add_argument("--backbone_name",
                        help="zero-shot CLIP: official name (ViT-B/16, RN50, ...) or checkpoint path")
    model.add_argument("--which_epoch", default=None,
                       help="--run_dir checkpoint: best, last or an epoch number (default: the one --protocol reports)")
    protocols.add_protocol_args(model, galleries=False)
    model.add_argument("--feature", default=None,
                       choices=list(dict.fromkeys(models.FEATURE_CHOICES + models.PROMPTSG_FEATURES)),
                       help="retrieval feature of a trained run (default: the protocol's, else the run's)")
    model.add_argument("--inference_prompt", choices=models.INFERENCE_PROMPTS, default=None,
                       help="PromptSG runs: fixed or composed prompt (default: the run's)")
    model.add_argument("--aspect", default=None,
                       help="CLIP-ReID --sie runs: the 11k aspect of the photos, e.g. 'dorsal right' (default: the "
                            "mean side-information embedding)")
    model.add_argument("--input_size", type=int, nargs=2, default=None, metavar=("H", "W"),
                       help="zero-shot input size (default: the backbone's own, 224 224 for ViT-B/16 and RN50; "
                            "runs use their own)")
    model.add_argument("--stride", type=int, default=None, help="zero-shot ViT patch stride (default: the patch size)")
    model.add_argument("--pos_interp", choices=list(clip.POS_INTERPOLATIONS), default=None,
                       help="zero-shot: how positional embeddings are resized (default bilinear, as the zero-shot "
                            "evaluator)")
    model.add_argument("--download_root", default="~/.cache/clip", help="where official CLIP weights are cached")
    model.add_argument("--batch_size", type=int, default=64, help="photos per encoding batch")
    model.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader workers")
    io.add_common_args(model)
    decision = argparse.ArgumentParser(add_help=False)
    group = decision.add_argument_group("decision")
    group.add_argument("--far", type=float, default=1e-3, help="false accept rate of the decision (default 1e-3)")
    group.add_argument("--results", default=None,
                       help="results.json of an evaluation of this model: take the threshold from its ROC instead of "
                            "the gallery's impostor pairs")

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    enroll = commands.add_parser("enroll", parents=[common], help="encode a folder of photos into a gallery")
    enroll.add_argument("--images", required=True, help="folder of photos (identity sub-folders, or flat)")
    enroll.add_argument("--labels", default=None, help="CSV with columns file,identity for flat folders")
    enroll.add_argument("--gallery", required=True, help="gallery folder to write (e.g. my_hands.gallery)")
    enroll.add_argument("--append", action="store_true", help="add the photos to an existing gallery")
    enroll.add_argument("--force", action="store_true", help="replace an existing gallery")
    enroll.add_argument("--storage", choices=gallery.DTYPES, default=None,
                        help="how features are stored: float16 (default; 1 GB per million 512-d entries, "
                             "similarities within 5e-4) or float32 (exact, twice the size); --append keeps the "
                             "gallery's")
    search = commands.add_parser("search", parents=[common, decision], help="rank a gallery for query photos")
    search.add_argument("--gallery", required=True, help="gallery folder written by enroll")
    search.add_argument("--query", required=True, help="a photo, or a folder of photos laid out as for enroll")
    search.add_argument("--query_labels", default=None, help="CSV file,identity for a flat query folder")
    search.add_argument("--top_k", type=int, default=10, help="gallery entries listed per query (default 10)")
    search.add_argument("--out_dir", default="./search", help="output folder (default ./search)")
    search.add_argument("--force", action="store_true", help="replace an earlier search in --out_dir")
    search.add_argument("--figures", type=int, default=50,
                        help="ranking figures for at most this many queries (default 50; 0: none)")
    search.add_argument("--explain", action="store_true",
                        help="explanation maps of the top matches (explain_matches.py)")
    search.add_argument("--explain_k", type=int, default=5, help="top matches explained per query (default 5)")
    search.add_argument("--num_random", type=int, default=5, help="random orderings of the explanation deletion test")
    verify = commands.add_parser("verify", parents=[common, decision], help="compare two photos")
    verify.add_argument("photos", nargs=2, metavar=("A", "B"), help="the two photos")
    verify.add_argument("--gallery", default=None, help="gallery whose impostor pairs calibrate the threshold")
    args = parser.parse_args(argv)
    problems = flags.bound_problems(args, at_least={"input_size": 1, "batch_size": 1, "num_workers": 0})
    if args.command != "enroll" and not 0 < args.far < 1:
        problems.append(f"--far must be between 0 and 1, got {args.far}")
    if args.command == "search":
        problems += flags.bound_problems(args, at_least={"top_k": 1, "explain_k": 1, "num_random": 1, "figures": 0})
    if args.run_dir is not None:
        problems += [f"--{flag} is for zero-shot CLIP (--backbone_name); a run uses the settings it was trained with"
                     for flag in ("input_size", "stride", "pos_interp") if getattr(args, flag) is not None]
    if args.command == "search" and args.explain and args.figures == 0:
        problems.append("--explain draws the maps of the queries that get figures; give --figures of at least 1")
    if args.command == "enroll" and args.append and args.force:
        problems.append("--append adds to a gallery, --force replaces it: give one of them")
    flags.exit_on_problems(problems)
    return args


# ---- the model and its test-time settings ----

def test_time_settings(args, run_config=None, input_size=(224, 224), run_feature=None, inference_prompt=None):
    """Every test-time setting with which the evaluator of this model encodes a photo under --protocol
    (protocols.test_settings, as both evaluators resolve them; explicit flags win): {"protocol", "flip",
    "feature", "amp", "preprocessing" (a utils.preprocessing record), "which_epoch", "inference_prompt",
    "aspect"}. run_config None: zero-shot CLIP at input_size."""
    setting = protocols.test_settings(args.protocol, run_config, input_size=input_size, flip=args.flip,
                                      feature=args.feature, amp=args.amp,
                                      which_epoch=args.which_epoch if run_config is not None else None,
                                      cuda=str(args.device).startswith("cuda"))
    return {"protocol": args.protocol, "flip": bool(setting["flip"]),
            "feature": setting["feature"] or run_feature or "CLIP encode_image",
            "amp": io.resolve_amp(setting["amp"], args.device), "preprocessing": setting["preprocessing"],
            "which_epoch": setting["which_epoch"], "inference_prompt": inference_prompt, "aspect": args.aspect}


def load_model(args):
    """(encode(images) -> features, image encoder, fingerprint, settings) of --run_dir or --backbone_name."""
    if args.run_dir:
        which_epoch = protocols.test_settings(args.protocol, models.read_run_config(args.run_dir),
                                              which_epoch=args.which_epoch)["which_epoch"]
        model, config, _ = models.load_trained_model(args.run_dir, which_epoch, device=args.device)
        kind = config["model"].get("kind", "finetune")
        if args.feature is not None and not hasattr(model, "feature"):
            raise IdentifyError(f"the {kind} model of {args.run_dir} has no --feature choice")
        if args.inference_prompt is not None and not hasattr(model, "inference_prompt"):
            raise IdentifyError(f"--inference_prompt applies to PromptSG runs; {args.run_dir} holds a {kind} model")
        if args.aspect is not None and not getattr(model, "sie_aspects", None):
            raise IdentifyError(f"--aspect applies to CLIP-ReID runs trained with --sie; {args.run_dir} has none")
        settings = test_time_settings(args, config, config["model"]["backbone"]["input_size"],
                                      getattr(model, "feature", None),
                                      args.inference_prompt or getattr(model, "inference_prompt", None))
        if hasattr(model, "feature"):
            model.check_feature(settings["feature"])
            model.feature = settings["feature"]
        if settings["inference_prompt"]:
            model.inference_prompt = settings["inference_prompt"]
        if args.aspect is not None and model.set_test_aspect(args.aspect) is None:
            raise IdentifyError(f"--aspect {args.aspect!r} was not trained; the run knows {model.sie_aspects}")
        checkpoint = training.checkpoint_path(args.run_dir, which_epoch)
        fingerprint = {"kind": "run", "run_dir": os.path.abspath(args.run_dir), "which_epoch": str(which_epoch),
                       "checkpoint_sha256": io.file_sha256(checkpoint), "model": config["model"]}
        return model, model.visual, fingerprint, settings
    if args.feature or args.inference_prompt or args.aspect:
        raise IdentifyError("--feature, --inference_prompt and --aspect apply to trained runs (--run_dir)")
    size = tuple(args.input_size or clip.native_input_size(args.backbone_name))
    clip_model, _ = clip.load(args.backbone_name, device=args.device, download_root=args.download_root,
                              input_size=size, patch_stride=args.stride, pos_interp=args.pos_interp or "bilinear")
    sha = clip.release_sha256(args.backbone_name) or io.file_sha256(os.path.expanduser(args.backbone_name))
    name = args.backbone_name if clip.release_sha256(args.backbone_name) else os.path.basename(args.backbone_name)
    fingerprint = {"kind": "zero-shot", "backbone": name, "sha256": sha, "stride": args.stride,
                   "pos_interp": args.pos_interp or "bilinear"}
    settings = test_time_settings(args, None, size)
    return clip_model.encode_image, clip_model.visual, fingerprint, settings


def describe_model(fingerprint, short=False):
    if fingerprint.get("kind") == "run" and short:
        return f"run {os.path.basename(fingerprint['run_dir'])} net_{fingerprint['which_epoch']}"
    if fingerprint.get("kind") == "run":
        return (f"run {fingerprint['run_dir']} net_{fingerprint['which_epoch']}.pth "
                f"(SHA-256 {fingerprint['checkpoint_sha256'][:12]})")
    if fingerprint.get("kind") == "zero-shot" and short:
        return f"zero-shot {fingerprint['backbone']}"
    if fingerprint.get("kind") == "zero-shot":
        return f"zero-shot {fingerprint['backbone']} (SHA-256 {fingerprint['sha256'][:12]})"
    return str(fingerprint.get("kind"))


def same_model(a, b):
    keys = {"run": ("checkpoint_sha256", "model"), "zero-shot": ("sha256", "stride", "pos_interp")}
    return a.get("kind") == b.get("kind") and all(a.get(k) == b.get(k) for k in keys.get(a.get("kind"), ("kind",)))


def describe_setting(name, value):
    return preprocessing.describe(value) if name == "preprocessing" and value else str(value)


def check_gallery_fits(found, fingerprint, settings):
    """Refuse (one line naming both) a gallery made by another model or with other settings."""
    made_by, made_with = found.header.get("model", {}), found.header.get("settings", {})
    if not same_model(made_by, fingerprint):
        raise IdentifyError(f"gallery {found.folder} was made by {describe_model(made_by)}, not by "
                            f"{describe_model(fingerprint)}; use that model or enrol a new gallery")
    differ = [k for k in SETTING_NAMES if made_with.get(k) != settings.get(k)]
    if differ:
        pairs = "; ".join(f"{SETTING_NAMES[k]}: {describe_setting(k, made_with.get(k))} in the gallery, "
                          f"{describe_setting(k, settings.get(k))} now" for k in differ)
        raise IdentifyError(f"gallery {found.folder} was made with other test-time settings ({pairs}); pass the "
                            f"flags it was made with (protocol {made_with.get('protocol')}) or enrol a new gallery")


def encode(encode_fn, paths, settings, args, desc):
    """L2-normalised float32 features of the photos at `paths` under `settings`."""
    features = evaluation.encode_images(encode_fn, paths, batch_size=args.batch_size, num_workers=args.num_workers,
                                        device=args.device, flip=settings["flip"], amp=settings["amp"],
                                        preprocessing=settings["preprocessing"], desc=desc)
    bad = np.flatnonzero(~np.isfinite(features).all(axis=1))
    if len(bad):
        raise EvaluationInputError(f"the encoder produced NaN/inf features for {paths[bad[0]]}; try --amp none")
    return features


def check_photos(paths, settings, args, what, hint="replace or remove them"):
    """Decode every photo once before the work (one line listing the unreadable ones)."""
    size = tuple(settings["preprocessing"]["size"]) if settings else None
    try:
        data.check_images(paths, size, args.num_workers if settings else 0, what=what, progress=None if settings else False)
    except ImageLoadError as err:
        raise IdentifyError(f"{str(err).split('; replace these files')[0]}; {hint}") from None


# ---- enroll ----

def enroll(args):
    photos = photo_folders.scan_photos(args.images, args.labels)
    target = os.path.abspath(args.gallery)
    if os.path.isdir(target) and os.listdir(target) and not gallery.is_gallery(target):
        raise IdentifyError(f"--gallery {args.gallery} is a folder that is not a gallery; choose another path "
                            f"(nothing there is replaced)")
    outputs.refuse_overlap("--gallery", args.gallery, {"--images": args.images, "--run_dir": args.run_dir})
    with outputs.OutputFolder(target, overwrite=args.append or args.force, flag="--append (add photos) or --force "
                              "(replace it)", what="another enrolment", exists=gallery.is_gallery,
                              ours=gallery.is_gallery_file) as out:
        encode_fn, _, fingerprint, settings = load_model(args)
        old = gallery.Gallery(target) if args.append and gallery.is_gallery(target) else None
        if old is not None:
            check_gallery_fits(old, fingerprint, settings)
        seen = set(old.hashes) if old else set()
        new, duplicates = [], []
        for path, label in photos:
            sha = io.file_sha256(path)
            (duplicates if sha in seen else new).append((path, label, sha))
            seen.add(sha)
        if not new:
            print(f"{args.gallery} already holds all {len(photos)} photo(s) of {args.images} (same bytes); nothing "
                  f"added, the gallery is unchanged")
            return {"gallery": target, "added": 0, "skipped": len(duplicates), "num_entries": len(old)}
        check_photos([p for p, _, _ in new], settings, args, f"photos of {args.images}")
        dim = encode(encode_fn, [new[0][0]], settings, args, "probe").shape[1]
        if old is not None and args.storage not in (None, old.header["dtype"]):
            raise IdentifyError(f"--storage {args.storage}: {args.gallery} stores {old.header['dtype']}, which "
                                f"--append keeps; drop --storage, or enrol into a new gallery")
        storage = old.header["dtype"] if old is not None else args.storage or "float16"
        out.check_space(gallery.gallery_bytes(len(new), dim, storage))
        history = (old.header.get("history", []) if old else []) + [{
            "images": os.path.abspath(args.images), "labels": args.labels and os.path.abspath(args.labels),
            "added": len(new), "skipped_duplicates": len(duplicates), **io.run_info()}]
        with out.staged() as tmp:
            writer = gallery.GalleryWriter(tmp, dim, FileLinker("hardlink"), storage)
            if old is not None:
                writer.link_shards(old)
            for start in range(0, len(new), gallery.SHARD_ROWS):
                chunk = [p for p, _, _ in new[start:start + gallery.SHARD_ROWS]]
                writer.add(encode(encode_fn, chunk, settings, args, f"encode {start + len(chunk)}/{len(new)} photos"))
            entries = (list(zip(old.paths, old.labels, old.hashes)) if old else []) + new
            header = writer.finish(entries, fingerprint, settings, history)
    identities = len({label for _, label, _ in entries if label})
    if duplicates:
        print(f"skipped {len(duplicates)} photo(s) already in the gallery (same bytes), e.g. {duplicates[0][0]}")
    print(f"Wrote gallery {target}: {header['num_entries']} entries ({len(new)} new, {identities} identities), "
          f"{dim}-d features of {describe_model(fingerprint)}")
    return {"gallery": target, "added": len(new), "skipped": len(duplicates), "num_entries": header["num_entries"]}


# ---- thresholds ----

def threshold_from_results(path, far, fingerprint, settings):
    """The threshold for FAR `far` from an evaluation's results.json: the mean over its splits of the
    stored ROC thresholds of the table's gallery, after checking it evaluated this model and settings."""
    results = io.read_json(path, required=("rows", "gallery_variants"), error=IdentifyError)
    try:
        rows = [r for r in results["rows"] if r["gallery"] == protocols.headline_gallery(results["gallery_variants"])]
    except (KeyError, TypeError, IndexError) as err:
        raise IdentifyError(f"--results {path}: its rows lack {err}; pass an evaluation's results.json") from None
    kind = fingerprint["kind"]
    evaluated = (results.get("run_dir"), str(results.get("which_epoch"))) if kind == "run" else results.get("backbone")
    expected = (fingerprint.get("run_dir"), fingerprint.get("which_epoch")) if kind == "run" else None
    if kind == "run" and (not evaluated[0] or not explain_matches.same_path(evaluated[0], expected[0])
                          or evaluated[1] != expected[1]):
        what = (f"run {evaluated[0]} net_{evaluated[1]}" if evaluated[0] else
                f"zero-shot CLIP {results.get('backbone')}")
        raise IdentifyError(f"--results {path} evaluated {what}, not {describe_model(fingerprint)}")
    if kind == "zero-shot" and (results.get("run_dir") or os.path.basename(str(evaluated)) != fingerprint["backbone"]):
        raise IdentifyError(f"--results {path} evaluated {results.get('run_dir') or evaluated}, not "
                            f"{describe_model(fingerprint)}")
    found = {"flip": results.get("flip"), "amp": results.get("amp"), "input_size": results.get("input_size"),
             "feature": results.get("feature")}
    wanted = {"flip": settings["flip"], "amp": settings["amp"], "input_size": settings["preprocessing"]["size"],
              "feature": settings["feature"]}
    differ = [k for k in wanted if found[k] != wanted[k]]
    if differ:
        raise IdentifyError(f"--results {path} was evaluated with other settings (" + "; ".join(
            f"{k}: {found[k]} there, {wanted[k]} now" for k in differ) + ")")
    try:
        return dict(gallery.threshold_from_evaluation(rows, far), results=os.path.abspath(path))
    except gallery.GalleryError as err:
        raise IdentifyError(f"--results {path}: {err}") from None


def decision_threshold(args, found, fingerprint, settings):
    """The threshold record for --far: from --results, else from the gallery's impostor pairs."""
    if args.results:
        return threshold_from_results(args.results, args.far, fingerprint, settings)
    if found is None:
        return None
    return gallery.calibrate(found, args.far, seed=args.seed)


def describe_threshold(record):
    """One line: the decision rule and where its threshold comes from, or why there is none."""
    if record is None:
        return "no decision: pass --gallery or --results to calibrate a threshold"
    pairs = f"{record['num_impostor_pairs']:,} impostor pairs"
    if record["source"] == "results.json":
        where = f"the {record['num_splits']} split(s) of {record['results']} (mean threshold; at least {pairs} each)"
    else:
        where = f"the gallery's {pairs}" + (f" (among {record['entries_used']:,} randomly drawn entries)"
                                            if record.get("sampled") else "")
    if not record["measurable"]:
        return (f"no decision at FAR {record['far']:g}: {where} allow {record['expected_false_accepts']:.2f} false "
                f"accepts, fewer than {verification.MIN_FALSE_ACCEPTS} (the project's rule for a measurable FAR); "
                f"enrol more identities, pass --results, or choose a larger --far")
    return f"match = similarity > {record['threshold']:.4f}, calibrated for FAR {record['far']:g} on {where}"


def short_threshold(record):
    """The decision rule in a few words, for figure titles."""
    if record is None or record["threshold"] is None:
        return "no decision" + (f" at FAR {record['far']:g}: too few impostor pairs" if record else "")
    source = "evaluation" if record["source"] == "results.json" else "gallery"
    return (f"match = similarity > {record['threshold']:.3f} (FAR {record['far']:g} on "
            f"{record['num_impostor_pairs']:,} {source} impostor pairs)")


def decide(similarity, record):
    if record is None or record["threshold"] is None:
        return None
    return bool(similarity > record["threshold"])


# ---- search ----

def search_records(queries, found, scores, indices, record):
    out = []
    for q, (path, label) in enumerate(queries):
        matches = []
        for rank, (score, g) in enumerate(zip(scores[q], indices[q])):
            identity = found.labels[g]
            same = (identity == label) if label and identity else None
            matches.append({"rank": rank + 1, "index": int(g), "path": found.paths[g], "identity": identity,
                            "similarity": float(score), "same_identity": same, "match": decide(score, record)})
        out.append({"query": q, "path": path, "identity": label, "matches": matches})
    return out


def csv_rows(records, record):
    threshold = None if record is None else record["threshold"]
    for query in records:
        for m in query["matches"]:
            yield {"query": query["query"], "query_path": query["path"], "query_identity": query["identity"],
                   "rank": m["rank"], "gallery_index": m["index"], "gallery_path": m["path"], "identity": m["identity"],
                   "similarity": m["similarity"], "same_identity": m["same_identity"],
                   "decision": {True: "match", False: "no match", None: ""}[m["match"]], "threshold": threshold}


def ranking_row(query):
    """A row of query_ranking_result_demo.draw_rankings for one query's search record."""
    matches = []
    for m in query["matches"]:
        colour = ({True: ranking_figure.CORRECT, False: ranking_figure.WRONG}.get(m["same_identity"], UNKNOWN)
                  if query["identity"] else {True: ABOVE, False: BELOW, None: UNKNOWN}[m["match"]])
        verdict = {True: "\nmatch", False: "", None: ""}[m["match"]]
        matches.append((m["path"], f"id {m['identity'] or 'unknown'}\nsim {m['similarity']:.2f}{verdict}", colour))
    hits = [m["rank"] for m in query["matches"] if m["match"]]
    verdict = (f"{len(hits)} match{'es' if len(hits) > 1 else ''} above the threshold, best at rank {hits[0]}"
               if hits else
               "no match above the threshold" if query["matches"][0]["match"] is False else "no decision")
    name = os.path.basename(query["path"])
    identity = f" (identity {query['identity']})" if query["identity"] else ""
    return {"title": f"query {name}{identity}: {verdict}",
            "query": (query["path"], f"id {query['identity'] or 'unknown'}"), "matches": matches}


def figure_legend(query, row):
    """The colours the row uses, with their meaning."""
    meanings = (dict(ranking_figure.LEGEND) | {UNKNOWN: "gallery identity unknown"} if query["identity"] else
                {ABOVE: "match (above the threshold)", BELOW: "below the threshold or no decision"})
    used = {colour for _, _, colour in row["matches"]}
    return tuple((colour, meaning) for colour, meaning in meanings.items() if colour in used)


def write_explanations(tmp, records, encode_fn, visual, settings, args):
    """explain_<n>.png/.pdf per drawn query; returns {query: deletion AUCs}."""
    recorder = explain_matches.SimilarityMaps(visual)
    aucs = {}
    for query in records[:args.figures]:
        top = query["matches"][:args.explain_k]
        paths = [query["path"]] + [m["path"] for m in top]
        images = explain_matches.load_inputs(paths, settings["preprocessing"], args.device)
        maps, similarity, deletion = explain_matches.explain_ranked(encode_fn, recorder, images, args.num_random,
                                                                    args.seed, args.batch_size)
        colours = [ranking_row(query)["matches"][r][2] for r in range(len(top))]
        labels = [query["identity"] or "unknown"] + [m["identity"] or "unknown" for m in top]
        row = explain_matches.figure_row(os.path.basename(query["path"]), paths, labels, colours, maps, similarity,
                                         deletion)
        explain_matches.draw_figure([row], len(top), os.path.join(tmp, f"explain_{query['query']}.png"),
                                    settings["preprocessing"])
        aucs[query["query"]] = deletion["auc"]
    return aucs


SEARCH_FILE = re.compile(r"(search\.(csv|json)|(ranking|explain)_\d+\.(png|pdf))$")


def is_search_file(name):
    """A file search writes into --out_dir (anything else there is the user's and is never replaced)."""
    return SEARCH_FILE.fullmatch(name) is not None


def search(args):
    found = gallery.Gallery(args.gallery)
    queries = photo_folders.scan_photos(args.query, args.query_labels, flag="--query")
    outputs.refuse_overlap("--out_dir", args.out_dir, {"--gallery": args.gallery, "--query": args.query, "--run_dir": args.run_dir})
    with outputs.OutputFolder(args.out_dir, overwrite=args.force, flag="--force", what="another search",
                              ours=is_search_file) as out:
        out.check_space(len(queries) * min(args.top_k, len(found)) * 400 + min(len(queries), args.figures) * 2 ** 21)
        encode_fn, visual, fingerprint, settings = load_model(args)
        check_gallery_fits(found, fingerprint, settings)
        check_photos([p for p, _ in queries], settings, args, f"query photos of {args.query}")
        record = decision_threshold(args, found, fingerprint, settings)
        start = time.perf_counter()
        features = encode(encode_fn, [p for p, _ in queries], settings, args, f"encode {len(queries)} queries")
        scores, indices = gallery.search(found, features, args.top_k, args.device)
        seconds = time.perf_counter() - start
        records = search_records(queries, found, scores, indices, record)
        drawn = records[:args.figures]
        check_photos([m["path"] for q in drawn for m in q["matches"]], None, args, "gallery photos of the figures",
                     "the figures need them: restore them, or pass --figures 0")
        title = (f"{describe_model(fingerprint, short=True)}, gallery {os.path.basename(found.folder)} "
                 f"({len(found):,} entries)")
        with out.staged() as tmp:
            for query in drawn:
                row = ranking_row(query)
                width = int(14 * (len(row["matches"]) + 1))  # characters a title line fits (1.6 in per photo)
                text = "\n".join(textwrap.fill(line, width) for line in (title, short_threshold(record)))
                ranking_figure.draw_rankings([row], os.path.join(tmp, f"ranking_{query['query']}.png"), text,
                                             legend=figure_legend(query, row))
            aucs = write_explanations(tmp, records, encode_fn, visual, settings, args) if args.explain else {}
            for query in records:
                if query["query"] in aucs:
                    query["explanation_deletion_auc"] = aucs[query["query"]]
            summary = {"gallery": found.folder, "gallery_entries": len(found), "model": fingerprint,
                       "settings": settings, "threshold": record, "top_k": int(scores.shape[1]),
                       "search_seconds": seconds, "queries": records, **io.run_info()}
            io.atomic_write_json(os.path.join(tmp, "search.json"), summary)
            io.write_metrics_csv(os.path.join(tmp, "search.csv"), list(csv_rows(records, record)), float_format=".6f")
    for query in records[:10]:
        best = query["matches"][0]
        print(f"{os.path.basename(query['path'])}: best {best['identity'] or '?'} ({os.path.basename(best['path'])}), "
              f"similarity {best['similarity']:.4f}" + ("" if best["match"] is None else
                                                         f", {'match' if best['match'] else 'no match'}"))
    print(describe_threshold(record))
    print(f"Wrote search.csv, search.json and {len(drawn)} ranking figure(s){' with explanations' if aucs else ''} "
          f"for {len(queries)} quer{'y' if len(queries) == 1 else 'ies'} to {os.path.abspath(args.out_dir)}")
    return summary


# ---- verify ----

def verify(args):
    found = gallery.Gallery(args.gallery) if args.gallery else None
    missing = [p for p in args.photos if not os.path.isfile(p)]
    if missing:
        raise IdentifyError(f"photo {missing[0]} does not exist (verify takes two photo files)")
    photos = [photo_folders.scan_photos(p, flag="photo")[0][0] for p in args.photos]
    encode_fn, _, fingerprint, settings = load_model(args)
    if found is not None:
        check_gallery_fits(found, fingerprint, settings)
    check_photos(photos, settings, args, "photos to verify")
    record = decision_threshold(args, found, fingerprint, settings)
    features = encode(encode_fn, photos, settings, args, "encode 2 photos")
    similarity = float(features[0] @ features[1])
    same = decide(similarity, record)
    verdict = {True: "same person", False: "different people", None: "no decision"}[same]
    print(f"similarity {similarity:.4f}: {verdict}; {describe_threshold(record)}")
    return {"photos": photos, "similarity": similarity, "match": same, "threshold": record, "settings": settings}


@interrupts.sigterm_as_ctrl_c
def main(argv=None):
    args = parse_args(argv)
    io.set_seed(args.seed)
    try:
        return {"enroll": enroll, "search": search, "verify": verify}[args.command](args)
    except (ClipFHError, clip.ModelDownloadError, clip.CheckpointError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
