"""Run bookkeeping shared by every script: seeds, default device, common flags, AMP choice, git commit,
atomic writes, run config, mean ± std and the one results-table / CSV formatter."""
import csv
import datetime
import hashlib
import io as _stdio
import json
import os
import random
import subprocess
import sys
import tempfile

import numpy as np
import scipy.io
import torch

from .errors import InputFileError, TrainingInputError
from .outputs import output_errors


REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def is_plain_folder_name(name):
    """One path component that stays inside the folder it is joined to: not empty, '.' or '..', no
    separator."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "\0" not in name
            and not any(sep in name for sep in ("/", "\\", os.sep)))


def file_sha256(path):
    """SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bars_off(progress=None):
    """tqdm's `disable` for a --progress setting: None (the default) shows bars only when stderr is a
    terminal, so logs and pipes stay clean; True always; False never."""
    return not sys.stderr.isatty() if progress is None else not progress


def seed_value(text):
    """argparse type of --seed: an integer that Python, numpy and torch all accept (0 to 2**32 - 1)."""
    import argparse
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if not 0 <= value < 2 ** 32:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**32 - 1, got {value}")
    return value


def device_value(text):
    """argparse type of --device: a torch device this machine has (cpu, cuda, cuda:N, mps)."""
    import argparse
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: no CUDA GPU is usable on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                                             f"numbered from 0")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available on this machine; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text}: CLIP-FH runs on cpu, cuda or mps devices")
    return text


def add_common_args(parser):
    parser.add_argument("--seed", type=seed_value, default=0, help="random seed (default 0)")
    parser.add_argument("--device", default=default_device(), type=device_value,
                        help="torch device, e.g. cuda, cuda:1 or cpu (default: cuda when available)")
    return parser


def add_compile_arg(parser):
    """--compile / --no-compile of the image encoder; None (the default) is resolved by speed.use_compile."""
    import argparse
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the image encoder on CUDA (default: off; the compile takes longer "
                             "than it saves at the protocols' sizes, see README 'GPU')")
    return parser


def set_seed(seed, deterministic=False):
    """Seed Python, numpy and torch. deterministic=True also turns cuDNN autotuning off and makes
    torch use deterministic kernels only (an op without one raises), with the cuBLAS workspace
    setting they need; then a GPU run repeats bit for bit on the same GPU, software and flags."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True)


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_DIR,
                             capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip()
        if out.returncode != 0 or not commit:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_DIR,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _current_umask():
    mask = os.umask(0)  # the only way to read the umask is to set it
    os.umask(mask)
    return mask


def _atomic_write(path, write_fn, mode="w"):
    """Write through `write_fn(file)` into a temporary file next to `path`, then rename it. A full
    disk or a read-only location is an OutputWriteError naming `path`; nothing half-written is left."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    with output_errors(path):
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, mode) as f:
                write_fn(f)
            os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600 files; give them the usual mode
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise


def atomic_write_text(path, text):
    _atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def atomic_torch_save(obj, path):
    _atomic_write(path, lambda f: torch.save(obj, f), mode="wb")


def atomic_savemat(path, mdict):
    _atomic_write(path, lambda f: scipy.io.savemat(f, mdict), mode="wb")


def run_info():
    return {"git_commit": git_commit(), "torch": torch.__version__, "python": sys.version.split()[0],
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "argv": sys.argv}


def write_run_config(out_dir, args, extra=None, name="config.json"):
    """Record every argument, the seed and the git commit of a run in `out_dir/name`."""
    values = vars(args) if not isinstance(args, dict) else dict(args)
    config = {"args": {k: v for k, v in values.items() if not k.startswith("_")}, **run_info()}
    if extra:
        config.update(extra)
    atomic_write_json(os.path.join(out_dir, name), config)
    return config


def mean_std(values):
    """Mean and sample standard deviation (ddof 1: the splits are a sample of possible splits);
    the std is 0.0 for a single value."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


PAPER_COLUMNS = (("Rank-1", "rank1"), ("Rank-5", "rank5"), ("Rank-10", "rank10"), ("mAP", "mAP"))


def format_results_table(rows, title=None, columns=PAPER_COLUMNS):
    """Paper-style table. `rows`: list of (name, {key: [one fraction per split]}); `columns`:
    (header, key) pairs. Each cell is mean ± std over the splits, in percent with two decimals; "n/a"
    when a split has no value (None)."""
    def cell(values):
        if any(v is None for v in values):
            return "n/a"
        mean, std = mean_std(values)
        return f"{100 * mean:.2f} ± {100 * std:.2f}"
    cells = [(name, [cell(metrics[key]) for _, key in columns]) for name, metrics in rows]
    name_width = max([len("method")] + [len(name) for name, _ in cells])
    width = max([len(c) for _, row in cells for c in row] + [len(h) for h, _ in columns])
    header = "method".ljust(name_width) + " | " + " | ".join(h.rjust(width) for h, _ in columns)
    lines = ([title] if title else []) + [header, "-" * len(header)]
    lines += [name.ljust(name_width) + " | " + " | ".join(c.rjust(width) for c in row) for name, row in cells]
    return "\n".join(lines)


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


AMP_CHOICES = ["none", "bf16", "fp16"]


def resolve_amp(amp, device):
    """None/"auto" -> bf16 on CUDA, none elsewhere."""
    if amp in (None, "auto"):
        return "bf16" if str(device).startswith("cuda") else "none"
    if amp not in ("none", "bf16", "fp16"):
        raise TrainingInputError(f"--amp must be none, bf16 or fp16, got {amp!r}")
    return amp


def autocast(amp, device):
    """torch.autocast to `amp` ("bf16" or "fp16") on `device`'s type; "none" or None: autocast off."""
    device_type = torch.device(device).type
    if amp in (None, "none"):
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=AMP_DTYPES[amp])


def write_metrics_csv(path, rows, columns=None, float_format=".6g"):
    """Rows (dicts) -> CSV through the csv module (cells with commas, quotes or line breaks are
    quoted), written atomically. Columns: `columns`, or every key in first-seen order. A missing or
    None value is an empty cell; floats are written with `float_format`."""
    if columns is None:
        columns = []
        for row in rows:
            columns += [k for k in row if k not in columns]
    buffer = _stdio.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_cell(row.get(c), float_format) for c in columns])
    atomic_write_text(path, buffer.getvalue())


def _csv_cell(value, float_format):
    if value is None:
        return ""
    if isinstance(value, float):
        return format(value, float_format)
    return str(value)


def read_json(path, required=(), error=InputFileError, kind=dict):
    """The JSON value in `path` (an object unless `kind` says otherwise), checked as it is read: a
    missing, unreadable, truncated or hand-broken file, a value of another kind, or an object without
    one of the `required` keys ("model.backbone.input_size" for nested ones) raises `error` with one
    line naming the file and what is wrong."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise error(f"{path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as err:
        raise error(f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); it is "
                    f"truncated or was edited by hand: restore it or write it again") from None
    except (OSError, ValueError, RecursionError) as err:  # not UTF-8, a number too long, nesting too deep
        raise error(f"cannot read {path} ({getattr(err, 'strerror', None) or err}); it is damaged or not a JSON "
                    f"file") from None
    if not isinstance(value, kind):
        raise error(f"{path} holds a JSON {type(value).__name__}, not the {kind.__name__} this program writes "
                    f"there; restore it or write it again")
    missing = [key for key in required if not _has_key(value, key.split("."))]
    if missing:
        raise error(f"{path} lacks {', '.join(repr(k) for k in missing)}; it was edited by hand or written by "
                    f"another program: restore it or write it again")
    return value


def _has_key(value, keys):
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return False
        value = value[key]
    return True


def read_config(out_dir, required=()):
    """<out_dir>/config.json (see read_json)."""
    return read_json(os.path.join(out_dir, "config.json"), required)
