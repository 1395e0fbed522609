"""--resume keeps the run's own settings, so that its config.json stays true.

A resumed run takes every recorded flag of <f_name>/<m_name>/config.json that the command does not
give. A flag given with another value than the recorded one is refused, one line naming it, unless
the resumed run can honour it:

- RUN_FLAGS say where the run is and how this process runs it, not what is trained (device, workers,
  progress bars, compilation, caches, --stage of CLIP-ReID): they are this command's, given or not;
- HONOURED flags may change: --epochs (more epochs, or as many as are done: the schedule's
  milestones are epoch numbers, so it continues as it was), --eval_every, --save_every, --final_test,
  --protocol (the final test's settings and checkpoint),
  --data_dir (a moved split root: the trainer checks its identities are the run's).

Everything else (optimizer, learning rates, schedule, batch size, sampler, losses, model, backbone,
input size, stride, augmentation, precision, seed, ...) is the run's. config.json keeps the original
settings and appends one entry per resume to its "resumes" list: date, git commit, command line,
the epoch it continued after and the honoured flags that changed.
"""
import json
import os

from .errors import TrainingInputError
from .io import atomic_write_json, read_config, run_info
from .splits import SPLITS_MANIFEST, dataset_of_roots

LOCATION = {"f_name", "m_name", "resume", "force"}  # where the run is and how it was claimed: never recorded
RUN_FLAGS = LOCATION | {"device", "num_workers", "progress", "compile", "gpu_augment", "cache_resized", "download_root",
                        "allow_mixed_seeds", "deterministic", "stage", "prompts"}
HONOURED = {"epochs", "eval_every", "save_every", "final_test", "protocol", "data_dir"}


def as_recorded(value):
    """A value as config.json holds it (tuples as lists)."""
    return json.loads(json.dumps(value))


def take_run_settings(args, out_dir, epochs_done):
    """Before anything is written: set every recorded flag the command does not give to the run's
    value; refuse (TrainingInputError, one line per flag) a given flag that disagrees and cannot be
    honoured, and an --epochs below the `epochs_done` already trained. `args._given` names the flags
    given on the command line (all of them when it is missing)."""
    path = os.path.join(out_dir, "config.json")
    config = read_config(out_dir, required=("args",))
    recorded = config["args"]
    given = getattr(args, "_given", None)
    problems = []
    for flag, old in recorded.items():
        if flag in RUN_FLAGS or flag.startswith("_") or not hasattr(args, flag):
            continue
        new = as_recorded(getattr(args, flag))
        if given is not None and flag not in given:
            setattr(args, flag, old)
        elif new != old and flag not in HONOURED:
            problems.append(f"--resume: --{flag} {_shown(new)} disagrees with {path}, which records {_shown(old)}; "
                            f"drop --{flag} to continue with the run's own value, or start a new --m_name")
    moved = as_recorded(getattr(args, "data_dir", None))
    if moved is not None and moved != recorded.get("data_dir") and recorded.get("data_type"):
        roots = moved if isinstance(moved, list) else [moved]
        dataset = dataset_of_roots(roots)
        if dataset not in ("unknown", recorded["data_type"]):
            problems.append(f"--resume: --data_dir {_shown(moved)} holds the {dataset} data set (its "
                            f"{SPLITS_MANIFEST}), {path} was trained on {recorded['data_type']}; a moved split "
                            f"root must be the run's own: give its new place, or start a new --m_name")
    if getattr(args, "amp", None) is None and config.get("amp"):
        args.amp = config["amp"]  # the precision the run chose on its device, not this device's default
    if args.epochs is not None and args.epochs < epochs_done:
        problems.append(f"--resume: --epochs {args.epochs} is below the {epochs_done} epochs {out_dir} has already "
                        f"trained; give at least {epochs_done}")
    if problems:
        raise TrainingInputError("\n".join(problems))


def _shown(value):
    if isinstance(value, list):
        return " ".join(map(str, value)) or "(none)"
    return str(value)


def record_resume(out_dir, args, after_epoch, **where):
    """Append this resume to config.json's "resumes": date, git commit, command line, the epoch (or
    stage, in `where`) it continues after and the run and honoured flags that changed."""
    config = read_config(out_dir, required=("args",))
    now = {flag: as_recorded(getattr(args, flag)) for flag in sorted((RUN_FLAGS - LOCATION) | HONOURED)
           if flag in config["args"] and hasattr(args, flag)}
    changed = {flag: {"from": config["args"][flag], "to": value} for flag, value in now.items()
               if value != config["args"][flag]}
    info = run_info()
    entry = {"date": info["date"], "git_commit": info["git_commit"], "argv": info["argv"],
             "after_epoch": after_epoch, **where, "changed_flags": changed}
    config["resumes"] = list(config.get("resumes", [])) + [entry]
    atomic_write_json(os.path.join(out_dir, "config.json"), config)
    return config
