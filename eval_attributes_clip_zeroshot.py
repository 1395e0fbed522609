"""What CLIP's image features say about a hand in words: gender, age group, skin colour, nail polish,
accessories, palmar/dorsal and left/right (11k HandInfo.csv), read zero-shot (each class a prompt
ensemble) and by a linear probe on the same features, trained on the training identities and tested
on the test identities (no person on both sides).

    python eval_attributes_clip_zeroshot.py --data_dir ./11k --backbone_name ViT-B/16
    python eval_attributes_clip_zeroshot.py --data_dir ./11k/train_val_test_split_dorsal_r \
        --model ./model_11k_d_r/clip_hand_vit          # a trained image encoder, frozen CLIP text tower

--data_dir is an 11k root (HandInfo.csv + Hands/; ids split with the MBA-Net thresholds) or a split
root made by prepare_train_val_test_11k_r_l.py (train_all/ vs test/; HandInfo.csv found through its
splits.json, or --hand_info). Writes <out_dir>/attributes.json, attributes.csv,
confusion_<attribute>.png/.pdf and config.json.
"""
import argparse
import os

import numpy as np
import torch

import clip
import eval_query_gallery_clip_zeroshot as zeroshot
import models
from utils import attributes, evaluation, flags, interrupts, io, outputs, splits
from utils.errors import AttributeInputError, ClipFHError

METHODS = ("zero_shot", "probe")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="./11k", help="11k root (HandInfo.csv, Hands/) or a split root made from it")
    p.add_argument("--hand_info", default=None,
                   help="HandInfo.csv for a split root (default: the one its splits.json / prepare_config.json points to)")
    p.add_argument("--backbone_name", default="ViT-B/16",
                   help=f"official CLIP name {clip.available_models()} or a local checkpoint path (zero-shot CLIP)")
    p.add_argument("--download_root", default="~/.cache/clip", help="where official weights are cached")
    p.add_argument("--pretrained", choices=["true", "false"], default=None,
                   help="record whether --backbone_name holds pretrained weights (default: true for official names)")
    p.add_argument("--model", default=None, metavar="RUN_DIR",
                   help="run folder of any trainer: its image encoder replaces CLIP's, beside the frozen text "
                        "tower of the backbone it was trained from")
    p.add_argument("--which_epoch", default=None, help="with --model: best (default), last or an epoch number N")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="JSON {attribute: {class: [prompt, ...]}} replacing the default ensembles of the "
                        "attributes it lists (see README)")
    p.add_argument("--probe_l2", type=float, default=1e-3, help="L2 weight of the linear probe (default 1e-3)")
    p.add_argument("--probe_steps", type=int, default=100, help="L-BFGS iterations of the probe (default 100)")
    p.add_argument("--input_size", type=int, nargs=2, default=[224, 224], metavar=("H", "W"),
                   help="zero-shot CLIP: bicubic resize, no crop (default 224 224); --model uses its training size")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--amp", choices=io.AMP_CHOICES, default=None,
                   help="autocast on CUDA (default: bf16 on CUDA, none on CPU)")
    p.add_argument("--skip_missing", action="store_true",
                   help="11k root: skip images listed in HandInfo.csv but missing from Hands/ (default: error)")
    p.add_argument("--f_name", default="./model_eval",
                   help="output root for zero-shot CLIP: <f_name>/attributes/<backbone>/")
    p.add_argument("--out_dir", default=None,
                   help="output folder (default: <f_name>/attributes/<backbone>, or <RUN_DIR>/attributes_<which_epoch>)")
    p.add_argument("--force", action="store_true", help="overwrite an earlier result in the output folder")
    io.add_common_args(p)
    args = p.parse_args(argv)
    problems = flags.bound_problems(args, at_least={"probe_l2": 0, "probe_steps": 1, "input_size": 1, "batch_size": 1,
                                                    "num_workers": 0})
    if args.which_epoch is not None and args.model is None:
        problems.append(f"--which_epoch {args.which_epoch} picks a checkpoint of a --model run; zero-shot CLIP has "
                        f"none: give --model RUN_DIR or leave --which_epoch out")
    flags.exit_on_problems(problems)
    if args.model is not None and args.which_epoch is None:
        args.which_epoch = "best"
    return args


def is_output_file(name):
    """A file main() writes into its output folder."""
    return name in ("attributes.json", "attributes.csv", "config.json") or (
        name.startswith("confusion_") and name.endswith((".png", ".pdf")))


def default_out_dir(args):
    if args.out_dir:
        return args.out_dir
    if args.model:
        return os.path.join(args.model, f"attributes_{args.which_epoch}")
    return os.path.join(args.f_name, "attributes", zeroshot.backbone_folder_name(args.backbone_name))


# ---- images and their attributes ----

def read_hand_info_rows(csv_path):
    """{image name: {"id", "aspect", "classes"}} for every row of HandInfo.csv."""
    rows = {}
    for line, row in splits.read_hand_info(csv_path):
        where = f"{csv_path} line {line}"
        name, label = (row["imageName"] or "").strip(), (row["id"] or "").strip()
        if not label.isdigit():
            raise AttributeInputError(f"{where}: id {row['id']!r} must be a whole number")
        if name in rows:
            raise AttributeInputError(f"{where}: image {name} is listed twice")
        rows[name] = {"id": label, "aspect": row["aspectOfHand"].strip().lower(),
                      "classes": attributes.row_classes(row, where)}
    if not rows:
        raise AttributeInputError(f"{csv_path} lists no images")
    return rows


def images_of_11k_root(data_dir, skip_missing):
    """Every image of HandInfo.csv (accessories rows included); a person is a training identity
    when its id is at or below the MBA-Net threshold of every aspect it appears in."""
    csv_path = os.path.join(data_dir, "HandInfo.csv")
    rows = read_hand_info_rows(csv_path)
    present = set(os.listdir(os.path.join(data_dir, "Hands")))
    missing = [name for name in rows if name not in present]
    if missing and not skip_missing:
        raise AttributeInputError(f"{len(missing)} image(s) listed in {csv_path} are missing from "
                                  f"{os.path.join(data_dir, 'Hands')} (first: {missing[0]}); restore them or "
                                  f"pass --skip_missing")
    names = sorted(name for name in rows if name in present)
    train_ids = attributes.train_identities_11k([rows[n]["id"] for n in names], [rows[n]["aspect"] for n in names],
                                                splits.LAST_TRAIN_ID_11K)
    images = [{"path": os.path.join(data_dir, "Hands", n), "id": rows[n]["id"], "classes": rows[n]["classes"],
               "side": "train" if rows[n]["id"] in train_ids else "test"} for n in names]
    how = ("11k root: ids at or below the MBA-Net threshold of every aspect they appear in train the probe, "
           "the rest test")
    return images, csv_path, how, len(missing)


def find_hand_info(split_root, hand_info):
    if hand_info:
        return hand_info
    manifest = splits.read_manifest(split_root) or {}
    candidates = []
    if manifest.get("source_root"):
        candidates.append(os.path.join(split_root, manifest["source_root"], "HandInfo.csv"))
    prepare_config = os.path.join(split_root, splits.PREPARE_CONFIG)
    if os.path.isfile(prepare_config):
        data_dir = io.read_json(prepare_config, error=AttributeInputError).get("args", {}).get("data_dir")
        if data_dir:
            candidates.append(os.path.join(data_dir, "HandInfo.csv"))
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise AttributeInputError(f"no HandInfo.csv found for split root {split_root} (looked at: "
                              f"{', '.join(candidates) or 'nothing recorded'}); pass --hand_info PATH")


def images_of_split_root(split_root, hand_info):
    """The images of train_all/ (probe training) and test/ (probe test), with HandInfo's attributes."""
    manifest = splits.read_manifest(split_root)
    names = set(manifest["sets"]) if manifest else set(os.listdir(split_root))
    if not {"train_all", "test"} <= names:
        raise AttributeInputError(f"--data_dir {split_root} has no train_all and test sets: pass an 11k root "
                                  f"(HandInfo.csv + Hands/) or a split root made by prepare_train_val_test_11k_r_l.py")
    csv_path = find_hand_info(split_root, hand_info)
    rows = read_hand_info_rows(csv_path)
    sets = splits.read_split_sets(split_root, ["train_all", "test"])
    images = []
    for side, set_name in (("train", "train_all"), ("test", "test")):
        for path, label, _ in sets[set_name]:
            name = os.path.basename(path)
            if name not in rows:
                raise AttributeInputError(f"{path}: {name} is not listed in {csv_path}; pass the HandInfo.csv "
                                          f"this split root was made from as --hand_info")
            if rows[name]["id"].lstrip("0") != str(label).strip().lstrip("0"):  # "0000123" == "123"
                raise AttributeInputError(f"{path} belongs to identity {label} but {csv_path} says id "
                                          f"{rows[name]['id']}; pass the matching HandInfo.csv as --hand_info")
            images.append({"path": path, "id": rows[name]["id"], "classes": rows[name]["classes"], "side": side})
    return images, csv_path, "split root: train_all/ trains the probe, test/ tests it", 0


def collect_images(data_dir, hand_info, skip_missing):
    if not os.path.isdir(data_dir):
        raise AttributeInputError(f"--data_dir {data_dir} is not a folder")
    if os.path.isfile(os.path.join(data_dir, "HandInfo.csv")) and os.path.isdir(os.path.join(data_dir, "Hands")):
        if hand_info:
            raise AttributeInputError("--hand_info applies to split roots; an 11k root uses its own HandInfo.csv")
        return images_of_11k_root(data_dir, skip_missing)
    return images_of_split_root(data_dir, hand_info)


# ---- encoders ----

def load_encoders(args):
    """(encode_image, text CLIP model, input size, description): the image side of zero-shot CLIP or of
    a trained run, and the CLIP text tower beside it."""
    if args.model is None:
        try:
            model, _ = clip.load(args.backbone_name, device=args.device, download_root=args.download_root,
                                 input_size=tuple(args.input_size))
        except RuntimeError as err:
            raise AttributeInputError(f"cannot load --backbone_name {args.backbone_name}: {err}") from None
        official = args.backbone_name in clip.available_models()
        pretrained = {"true": True, "false": False}.get(args.pretrained, True if official else None)
        return model.encode_image, model, tuple(args.input_size), {
            "backbone": args.backbone_name, "pretrained": pretrained, "image_feature": "CLIP encode_image",
            "text_tower": args.backbone_name}
    model, config, checkpoint = models.load_trained_model(args.model, args.which_epoch, device=args.device,
                                                          flag="--model")
    if hasattr(model, "set_test_dir") and not os.path.isfile(os.path.join(args.data_dir, "HandInfo.csv")):
        note = model.set_test_dir(args.data_dir)  # CLIP-ReID --sie: the split root's aspect
        if note:
            print(note)
    spec = dict(config["model"]["backbone"])
    if hasattr(model, "text"):  # PromptSG keeps its frozen text tower in the checkpoint
        text_model, text_source = model.text, f"{args.model} (the run's frozen text tower)"
    else:
        recorded = spec.get("arch")
        try:
            text_model = models.load_clip_model(spec, "pretrained", args.download_root).to(args.device).eval()
        except RuntimeError as err:
            raise AttributeInputError(f"cannot load the text tower of {spec['name']}, the backbone {args.model} was "
                                      f"trained from: {err}") from None
        if recorded and spec["arch"] != recorded:
            raise AttributeInputError(f"{spec['name']} is not the backbone {args.model} was trained from (its "
                                      f"architecture differs from config.json's); restore that checkpoint file")
        text_source = spec["name"]
    return (lambda images: model.visual.forward_features(images)["proj"]), text_model, tuple(spec["input_size"]), {
        "backbone": spec["name"], "pretrained": config.get("pretrained"), "run_dir": os.path.abspath(args.model),
        "model_kind": config["model"].get("kind", "finetune"), "which_epoch": str(args.which_epoch),
        "epoch": checkpoint.get("epoch"), "image_feature": "the trained encoder's projected CLIP embedding (proj)",
        "text_tower": text_source}


def encode_prompts(text_model, prompts, device, where):
    def encode_texts(texts):
        try:
            tokens = clip.tokenize(texts, context_length=text_model.context_length)
        except RuntimeError as err:
            raise AttributeInputError(f"{where}: {err}") from None
        with torch.no_grad():
            return text_model.encode_text(tokens.to(device)).cpu()
    return attributes.class_text_features(encode_texts, prompts)


# ---- scoring and output ----

def score(images, image_features, class_features, args):
    """{attribute: {"zero_shot": summary, "probe": summary or {"skipped": why}, "train_counts"}}."""
    side = [im["side"] for im in images]
    train = torch.tensor([s == "train" for s in side])
    test = ~train
    labels = attributes.label_arrays([im["classes"] for im in images])
    results = {}
    for name, class_names in attributes.ATTRIBUTES.items():
        num_classes = len(class_names)
        y = labels[name]
        y_train, y_test = y[train.numpy()], y[test.numpy()]
        predicted = attributes.zero_shot_predict(image_features[test], class_features[name])
        entry = {"zero_shot": attributes.summarise(attributes.confusion_matrix(y_test, predicted, num_classes),
                                                   class_names),
                 "train_counts": {c: int((y_train == k).sum()) for k, c in enumerate(class_names)}}
        if len(set(y_train.tolist())) < 2:
            entry["probe"] = {"skipped": "the training images hold a single class"}
        else:
            probe = attributes.train_probe(image_features[train], y_train, num_classes, l2=args.probe_l2,
                                           steps=args.probe_steps, seed=args.seed)
            confusion = attributes.confusion_matrix(y_test, probe.predict(image_features[test]), num_classes)
            entry["probe"] = attributes.summarise(confusion, class_names)
        results[name] = entry
    return results


def percent(value):
    return "-" if value is None else f"{100 * value:.2f}"


def table_rows(results):
    rows = []
    for name, entry in results.items():
        zs, probe = entry["zero_shot"], entry["probe"]
        row = {"attribute": name, "test_images": zs["num_images"], "majority_rate": zs["majority_rate"],
               "zero_shot_accuracy": zs["accuracy"], "zero_shot_balanced_accuracy": zs["balanced_accuracy"],
               "probe_accuracy": probe.get("accuracy"), "probe_balanced_accuracy": probe.get("balanced_accuracy"),
               "test_counts": " ".join(f"{c}:{n}" for c, n in zs["counts"].items()),
               "train_counts": " ".join(f"{c}:{n}" for c, n in entry["train_counts"].items())}
        rows.append(row)
    return rows


def format_table(rows, title):
    columns = [("attribute", "attribute", str), ("test imgs", "test_images", str), ("majority", "majority_rate", percent),
               ("zero-shot acc", "zero_shot_accuracy", percent),
               ("zero-shot bal.", "zero_shot_balanced_accuracy", percent),
               ("probe acc", "probe_accuracy", percent), ("probe bal.", "probe_balanced_accuracy", percent),
               ("test counts", "test_counts", str)]
    cells = [[fmt(row[key]) for _, key, fmt in columns] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _, _) in enumerate(columns)]
    line = lambda values: " | ".join(v.ljust(w) if i in (0, 7) else v.rjust(w)
                                     for i, (v, w) in enumerate(zip(values, widths)))
    header = line([h for h, _, _ in columns])
    return "\n".join([title, header, "-" * len(header)] + [line(c) for c in cells])


def confusion_figure(path_png, name, class_names, entry):
    """confusion_<attribute>.png and .pdf: zero-shot and probe confusion matrices (row = true class)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(method, entry[method]) for method in METHODS if "confusion" in entry[method]]
    size = 2.2 + 0.45 * len(class_names)
    fig, axes = plt.subplots(1, len(panels), figsize=(size * len(panels), size), squeeze=False)
    for ax, (method, summary) in zip(axes[0], panels):
        confusion = np.array(summary["confusion"])
        rates = confusion / confusion.sum(axis=1, keepdims=True).clip(min=1)
        ax.imshow(rates, vmin=0, vmax=1, cmap="Blues")
        for i in range(len(class_names)):
            for j in range(len(class_names)):
                ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if rates[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(class_names)), class_names, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{method.replace('_', '-')}: acc {percent(summary['accuracy'])}%", fontsize=9)
    fig.suptitle(name.replace("_", " "), fontsize=10)
    fig.subplots_adjust(left=0.2, right=0.97, bottom=0.28, top=0.84, wspace=0.6)  # tight_layout is slow
    for path in (path_png, os.path.splitext(path_png)[0] + ".pdf"):
        fmt = os.path.splitext(path)[1][1:]
        io._atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=120), mode="wb")
    plt.close(fig)


@interrupts.sigterm_as_ctrl_c
def main(argv=None):
    args = parse_args(argv)
    io.set_seed(args.seed)
    out_dir = default_out_dir(args)
    try:
        with outputs.OutputFolder(out_dir, overwrite=args.force, flag="--force", what="another attribute evaluation",
                                  ours=is_output_file) as out:
            return evaluate(args, out)
    except ClipFHError as err:
        raise SystemExit(f"error: {err}") from None


def evaluate(args, out):
    """main() inside the locked output folder `out`: all its files are written together at the end."""
    out.check_space(2 * 2 ** 20 * (1 + len(attributes.ATTRIBUTES)))  # the figures, JSON and CSV: a few MiB
    prompts = attributes.load_prompts(args.prompts)
    images, hand_info, split_rule, num_missing = collect_images(args.data_dir, args.hand_info, args.skip_missing)
    identities = attributes.check_disjoint({im["id"] for im in images if im["side"] == "train"},
                                           {im["id"] for im in images if im["side"] == "test"}, args.data_dir)
    if identities["train"] == 0 or identities["test"] == 0:
        raise AttributeInputError(f"{args.data_dir}: {identities['train']} train and {identities['test']} test "
                                  f"identities; the probe needs both")
    encode_image, text_model, input_size, extra = load_encoders(args)
    class_features = encode_prompts(text_model, prompts, args.device, f"--prompts {args.prompts}"
                                    if args.prompts else "default prompts")
    image_features = torch.from_numpy(evaluation.encode_images(
        encode_image, [im["path"] for im in images], size=input_size, batch_size=args.batch_size,
        num_workers=args.num_workers, device=args.device, amp=io.resolve_amp(args.amp, args.device),
        desc=f"encode {len(images)} images"))
    results = score(images, image_features, class_features, args)

    rows = table_rows(results)
    weights = {True: "pretrained", False: "RANDOM INIT", None: "weights of unknown origin"}[extra["pretrained"]]
    title = (f"Attributes of {sum(im['side'] == 'test' for im in images)} test images "
             f"({identities['test']} test / {identities['train']} train identities), "
             f"{extra.get('run_dir') or extra['backbone']} ({weights}); percentages")
    table = format_table(rows, title)
    extra.update({"data_dir": os.path.abspath(args.data_dir), "hand_info": os.path.abspath(hand_info),
                  "split_rule": split_rule, "identities": identities, "missing_skipped": num_missing,
                  "input_size": list(input_size), "age_groups": [list(g) for g in attributes.AGE_GROUPS],
                  "probe": {"l2": args.probe_l2, "steps": args.probe_steps, "loss": "class-balanced cross-entropy"}})
    with out.staged() as staged:
        for name, class_names in attributes.ATTRIBUTES.items():
            confusion_figure(os.path.join(staged, f"confusion_{name}.png"), name, class_names, results[name])
        io.write_metrics_csv(os.path.join(staged, "attributes.csv"), rows)
        io.atomic_write_json(os.path.join(staged, "attributes.json"),
                             {**extra, "attributes": results, "prompts": prompts, "classes": attributes.ATTRIBUTES})
        io.write_run_config(staged, args, extra=extra)
    print(table)
    print(f"Wrote attributes.json, attributes.csv and {len(results)} confusion figures (PNG + PDF) for "
          f"{len(images)} images to {out.folder}")
    return {**extra, "attributes": results}


if __name__ == "__main__":
    main()
