"""Record the before/after parity baseline of the trainers and evaluators: tests/data/before_after.json.

Runs one small fixed configuration of each trainer (train_finetune with a tiny ViT and a tiny
ResNet, train_clipreid and train_promptsg with the tiny ViT) and of both evaluators (zero-shot CLIP
on the tiny ViT, eval_query_gallery_finetune on the fine-tuned ViT run) on a synthetic 11k data set,
with seed 0, on the CPU, with one torch thread, and keeps:

- the epoch, tensor count, L2 norm and sketch of the model state dict in each run's net_last.pth
  (and, for CLIP-ReID, of the tensors of prompts.pth);
- the loss columns of each run's metrics.csv (and CLIP-ReID's stage1_metrics.csv);
- the per-split metrics of each evaluator's results.json, and the norm and sketch of the query and
  gallery features of each of its result_split*.mat files.

Only the scripts' public command lines (their main(argv)) are used, and the files they write, so the
same record can be made before and after an internal refactor. tests/test_before_after.py calls
record() and compares its result with the JSON file under tolerances (its docstring says which and
why): floating-point results are never compared bit for bit, since another instruction set (AVX-512,
AVX2, plain SSE) rounds differently and training amplifies the difference.

Weights, prompts and features are kept as a count sketch: every value of every tensor is added,
with a random sign, into one of SKETCH_BUCKETS buckets (bucket and sign drawn from a numpy generator
seeded by the tensor's name, the same on every machine), and the L2 norm of all values is kept.
The sketch is linear, so sketch(a) - sketch(b) = sketch(a - b), and its norm estimates ||a - b||
(unbiased in the square, relative spread about 1/sqrt(2 x buckets), 3 %): the relative L2
distance of two sets of weights without storing the weights.

    python tests/make_before_after.py            # writes tests/data/before_after.json (refuses to overwrite)
    python tests/make_before_after.py --force    # regenerate after a deliberate change of the numbers
"""
import argparse
import copy
import csv
import glob
import hashlib
import math
import json
import os
import platform
import subprocess
import sys
import tempfile

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)
DEFAULT_OUT = os.path.join(TESTS_DIR, "data", "before_after.json")
FORMAT = 2
SKETCH_BUCKETS = 512

# Synthetic data: 12 identities per aspect (6 train / 6 test), 4-5 images each, 2 query/gallery splits.
SYNTHETIC = {"num_ids_per_aspect": 12, "images_per_id": [4, 5], "image_size": [80, 60], "seed": 0}
PREPARE_FLAGS = ["--num_splits", "2", "--seed", "0"]

# Placeholders in the argv of each case, filled in by record().
SPLIT_ROOT, OUT_ROOT, VIT, RN = "<split_root>", "<out_root>", "<tiny_vit.pt>", "<tiny_rn.pt>"

RUN = ["--seed", "0", "--num_workers", "0", "--device", "cpu", "--amp", "none"]
TRAIN = RUN + ["--no-progress", "--input_size", "64", "64", "--stride", "16", "--last_stride", "1",
               "--no-final_test", "--save_every", "0"]


def _train(m_name, backbone, *flags):
    train = TRAIN
    if backbone == RN:  # --stride is a ViT flag (a ResNet refuses it; it never changed a ResNet's numbers)
        at = TRAIN.index("--stride")
        train = TRAIN[:at] + TRAIN[at + 2:]
    return ["--data_dir", SPLIT_ROOT, "--f_name", OUT_ROOT, "--m_name", m_name, "--backbone_name", backbone,
            *train, *flags]


FINETUNE = ["--epochs", "3", "--batch_size", "8", "--sampler", "random", "--lr", "3e-4", "--warmup_epochs", "1",
            "--milestones", "2", "--gamma", "0.5", "--eval_every", "3"]

# name -> (script module, argv). Trainers write <out_root>/<name>/; evaluators read or write next to them.
CASES = {
    "finetune_vit": ("train_finetune", _train("finetune_vit", VIT, *FINETUNE)),
    "finetune_rn": ("train_finetune", _train("finetune_rn", RN, *FINETUNE)),
    "clipreid_vit": ("train_clipreid", _train(
        "clipreid_vit", VIT, "--stage", "both", "--stage1_epochs", "2", "--stage1_lr", "1e-2",
        "--stage1_batch_size", "8", "--stage1_warmup_epochs", "1", "--epochs", "2", "--batch_size", "8",
        "--sampler", "pk", "--num_instances", "4", "--lr", "1e-3", "--warmup_epochs", "1", "--milestones", "2",
        "--erasing_p", "0", "--eval_every", "2")),
    "promptsg_vit": ("train_promptsg", _train(
        "promptsg_vit", VIT, "--epochs", "3", "--batch_size", "8", "--sampler", "pk", "--num_instances", "4",
        "--lr", "1e-3", "--warmup_epochs", "0", "--milestones", "2", "--inference_prompt", "fixed",
        "--eval_every", "3")),
    "eval_zeroshot_vit": ("eval_query_gallery_clip_zeroshot", [
        "--test_dir", SPLIT_ROOT, "--f_name", os.path.join(OUT_ROOT, "eval_zeroshot_vit"), "--backbone_name", VIT,
        *RUN, "--input_size", "64", "64", "--batch_size", "16", "--gallery", "both"]),
    "eval_finetune_vit": ("eval_query_gallery_finetune", [
        "--f_name", OUT_ROOT, "--m_name", "finetune_vit", "--which_epoch", "last", "--test_dir", SPLIT_ROOT,
        "--out_dir", os.path.join(OUT_ROOT, "eval_finetune_vit"), *RUN, "--batch_size", "16", "--gallery", "both"]),
}
TRAINERS = ("train_finetune", "train_clipreid", "train_promptsg")
SPLIT_METRICS = ("rank1", "rank5", "rank10", "rank20", "mAP_hand", "mAP_standard", "mINP", "num_query",
                 "num_gallery", "num_query_without_match", "cmc")


def _import_repo():
    if REPO not in sys.path:
        sys.path.insert(0, REPO)


def make_synthetic():
    """utils.make_synthetic_11k before the utils/ split, utils.synthetic.make_synthetic_11k after it."""
    _import_repo()
    try:
        from utils import synthetic
        return synthetic.make_synthetic_11k
    except ImportError:
        import utils
        return utils.make_synthetic_11k


def sketch(arrays):
    """{name: float array or tensor} -> {"norm": L2 norm of every value, "sketch": SKETCH_BUCKETS
    floats} (see the module docstring); in float64, names in sorted order."""
    import numpy as np
    buckets, squares = np.zeros(SKETCH_BUCKETS), 0.0
    for name in sorted(arrays):
        values = arrays[name]
        if hasattr(values, "detach"):
            values = values.detach().cpu().double().numpy()
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
        rng = np.random.default_rng(seed)
        bucket = rng.integers(0, SKETCH_BUCKETS, size=len(values))
        sign = rng.integers(0, 2, size=len(values)) * 2.0 - 1.0
        buckets += np.bincount(bucket, weights=sign * values, minlength=SKETCH_BUCKETS)
        squares += float(values @ values)
    return {"norm": math.sqrt(squares), "sketch": [float(f"{v:.8g}") for v in buckets]}


def relative_distance(expected, got):
    """||a - b|| / ||a|| estimated from two sketch() records of the same tensors."""
    diff = math.sqrt(sum((a - b) ** 2 for a, b in zip(expected["sketch"], got["sketch"])))
    return diff / max(expected["norm"], 1e-30)


def float_tensors(tensors):
    import torch
    return {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}


def _load(path):
    import torch
    return torch.load(path, map_location="cpu", weights_only=True)


def weights_record(path):
    """Epoch, tensor count and sketch of the model state dict inside a checkpoint (net_*.pth keeps it under
    "model"); integer tensors (BatchNorm's batch counters) are only counted."""
    checkpoint = _load(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise ValueError(f"{path} holds no model state dict under 'model'")
    return {"epoch": checkpoint.get("epoch"), "num_tensors": len(checkpoint["model"]),
            **sketch(float_tensors(checkpoint["model"]))}


def prompts_record(path):
    """Sketch of the tensors of a CLIP-ReID prompts.pth (the learned tokens and the text features)."""
    tensors = float_tensors(_load(path))
    return {"keys": sorted(tensors), **sketch(tensors)}


def features_record(folder):
    """{mat file name: sketch of its query_f and gallery_f} of an evaluation folder."""
    import scipy.io
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "result_split*.mat"))):
        mat = scipy.io.loadmat(path)
        out[os.path.basename(path)] = sketch({"query_f": mat["query_f"], "gallery_f": mat["gallery_f"]})
    return out


def loss_rows(path):
    """The epoch and every loss* column of a metrics CSV, as floats (None for an empty cell)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: (int(v) if k == "epoch" else float(v) if v != "" else None)
             for k, v in row.items() if k == "epoch" or k.startswith("loss")} for row in rows]


def split_metrics(path):
    """Per-split, per-gallery values of an evaluator's results.json: {"<gallery>/split<i>": {metric: value}}."""
    with open(path) as f:
        results = json.load(f)
    out = {}
    for row in results["rows"]:
        key = f"{row['gallery']}/split{row['split']}"
        if key in out:
            raise ValueError(f"{path}: two rows for {key}")
        out[key] = {m: row[m] for m in SPLIT_METRICS}
    return {"num_splits": results["num_splits"], "splits": out}


def _fill(argv, places):
    return [places[a] if a in places else _fill_path(a, places) for a in argv]


def _fill_path(arg, places):
    for placeholder, value in places.items():
        if arg.startswith(placeholder + os.sep):
            return value + arg[len(placeholder):]
    return arg


def run_case(name, module_name, argv, places):
    """Run one case through its script's main(argv) and return what is recorded of it."""
    import importlib
    module = importlib.import_module(module_name)
    module.main(_fill(argv, places))
    out_root = places[OUT_ROOT]
    record = {"script": module_name, "argv": list(argv)}
    if module_name in TRAINERS:
        run_dir = os.path.join(out_root, name)
        record["net_last"] = weights_record(os.path.join(run_dir, "net_last.pth"))
        record["metrics_csv"] = loss_rows(os.path.join(run_dir, "metrics.csv"))
        if module_name == "train_clipreid":
            record["prompts"] = prompts_record(os.path.join(run_dir, "prompts.pth"))
            record["stage1_metrics_csv"] = loss_rows(os.path.join(run_dir, "stage1_metrics.csv"))
    else:
        found = sorted(glob.glob(os.path.join(out_root, name, "**", "results.json"), recursive=True))
        if len(found) != 1:
            raise RuntimeError(f"{name}: expected one results.json under {os.path.join(out_root, name)}, got {found}")
        record["results"] = split_metrics(found[0])
        record["features"] = features_record(os.path.dirname(found[0]))
    return record


def record(work_dir, cases=None):
    """Build the synthetic data and tiny checkpoints in work_dir (an empty or new folder), run every case
    (all of CASES by default, in order; evaluators after the run they read) and return the record dict."""
    import torch
    _import_repo()
    import clip
    import prepare_train_val_test_11k_r_l as prepare
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data_dir = os.path.join(work_dir, "11k")
        make_synthetic()(data_dir, num_ids_per_aspect=SYNTHETIC["num_ids_per_aspect"],
                         images_per_id=tuple(SYNTHETIC["images_per_id"]), image_size=tuple(SYNTHETIC["image_size"]),
                         seed=SYNTHETIC["seed"])
        prepare.main(["--data_dir", data_dir, *PREPARE_FLAGS])
        places = {SPLIT_ROOT: os.path.join(data_dir, "train_val_test_split_dorsal_r"),
                  OUT_ROOT: os.path.join(work_dir, "runs"),
                  VIT: clip.save_tiny_checkpoint(os.path.join(work_dir, "tiny_vit.pt"), kind="vit", seed=0),
                  RN: clip.save_tiny_checkpoint(os.path.join(work_dir, "tiny_rn.pt"), kind="rn", seed=0)}
        out = {}
        for name in cases or CASES:
            module_name, argv = CASES[name]
            out[name] = run_case(name, module_name, argv, places)
        return out
    finally:
        torch.set_num_threads(threads)


def environment():
    import numpy
    import PIL
    import torch
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "pillow": PIL.__version__, "machine": platform.machine()}


def git_commit():
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" (with uncommitted changes)" if dirty else "")


def about(commit):
    return (f"Recorded by tests/make_before_after.py from commit {commit}. All cases: one torch thread, "
            f"{' '.join(RUN)}; trainers also {' '.join(TRAIN[len(RUN):])} (tiny ViT, and tiny ResNet for "
            f"finetune_rn). Each case's exact flags are its 'argv' ({SPLIT_ROOT}: dorsal-right split root of the "
            f"synthetic data). Weights, prompts and features are count sketches ({SKETCH_BUCKETS} buckets, see "
            f"the generator's docstring); tests/test_before_after.py compares under tolerances.")


def build_document(records, commit):
    return {"format": FORMAT, "about": about(commit), "commit": commit, "environment": environment(),
            "synthetic": copy.deepcopy(SYNTHETIC), "prepare": list(PREPARE_FLAGS), "cases": records}


def write_json_atomically(path, document):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the fixture is an ordinary file
        with os.fdopen(fd, "w") as f:
            json.dump(document, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT, help="the JSON file to write (default tests/data/before_after.json)")
    p.add_argument("--work_dir", default=None,
                   help="folder for the synthetic data and the runs (default: a temporary folder, removed at the end)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    args = p.parse_args(argv)
    if os.path.exists(args.out) and not args.force:
        raise SystemExit(f"{args.out} exists; pass --force to overwrite it (only after a deliberate change)")
    commit = git_commit()
    if args.work_dir is None:
        with tempfile.TemporaryDirectory(prefix="before_after.") as work_dir:
            records = record(work_dir)
    else:
        if os.path.isdir(args.work_dir) and os.listdir(args.work_dir):
            raise SystemExit(f"--work_dir {args.work_dir} is not empty")
        os.makedirs(args.work_dir, exist_ok=True)
        records = record(args.work_dir)
    if os.path.exists(args.out) and not args.force:  # appeared while the cases ran
        raise SystemExit(f"{args.out} exists; pass --force to overwrite it")
    write_json_atomically(args.out, build_document(records, commit))
    print(f"Wrote {len(records)} cases to {args.out}")
    return records


if __name__ == "__main__":
    main()
