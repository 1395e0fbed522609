"""The command-line flags every trainer shares (data and output, batching, optimisation, input,
run control), the help formatter that prints each default once, and their common checks.
Method-specific flags are declared in each trainer."""
import argparse
import math
import os
import re
import sys

from . import io, protocols
from .errors import TrainingInputError
from .io import AMP_CHOICES, add_common_args


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default once: argparse appends it unless the help text already names it (a
    default of None means "decided later", which the help text says in words)."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or "").lower():
            return action.help
        return super()._get_help_string(action)


class TrainerParser(argparse.ArgumentParser):
    """Also records which flags the command line gave (args._given), for --resume (utils/resume.py)."""

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        defaults = {action: action.default for action in self._actions}
        try:
            for action in self._actions:
                action.default = argparse.SUPPRESS
            parsed._given = frozenset(vars(super().parse_args(args)))
        finally:
            for action, default in defaults.items():
                action.default = default
        return parsed


def trainer_parser(doc, m_name, several_roots=False):
    """A trainer's ArgumentParser (description: the first paragraph of doc) with the data and output flags."""
    parser = TrainerParser(description=doc.split("\n\n")[0], formatter_class=HelpFormatter)
    add_data_output_args(parser, m_name, several_roots)
    return parser


def add_data_output_args(parser, m_name, several_roots=False):
    g = parser.add_argument_group("data and output")
    if several_roots:
        g.add_argument("--data_dir", nargs="+", default=["./11k/train_val_test_split_dorsal_r"],
                       help="split root(s) holding train/ (or train_all/) and val/; several roots train one model "
                            "on several aspects (each root's identities are separate classes)")
    else:
        g.add_argument("--data_dir", default="./11k/train_val_test_split_dorsal_r",
                       help="split root holding train/ (or train_all/) and val/")
    g.add_argument("--f_name", default="./model_11k_d_r", help="output root")
    g.add_argument("--m_name", default=m_name, help="run folder inside --f_name")
    g.add_argument("--data_type", default=None, choices=["11k", "HD", "folder"],
                   help="dataset kind, read from the split manifest (a value that disagrees is an error); "
                        "needed only for split folders made by hand")
    g.add_argument("--allow_mixed_seeds", action="store_true",
                   help="accept split roots (and their sibling aspects) prepared with different --seed values")
    g.add_argument("--backbone_name", default="ViT-B/16",
                   help="CLIP model name (ViT-B/16, RN50, ...) or path to an OpenAI-format checkpoint")
    g.add_argument("--pretrained", choices=["true", "false"], default=None,
                   help="record whether the backbone weights are pretrained (default: true for official CLIP "
                        "names, unknown for local files)")
    g.add_argument("--train_all", action="store_true",
                   help="train on train_all (train + val); val then overlaps training, so net_best = last epoch")
    g.add_argument("--download_root", default=None,
                   help="where pretrained CLIP weights are cached (default ~/.cache/clip)")
    g.add_argument("--force", action="store_true",
                   help="replace an existing run: it is moved aside once the new run's input checked out, deleted "
                        "after the new run's first checkpoint and put back if the new run fails before that")
    return g


def add_batching_args(parser, batch_size, title="batching"):
    g = parser.add_argument_group(title)
    g.add_argument("--batch_size", type=int, default=batch_size, help="images per batch (per process under DDP)")
    g.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers")
    return g


def add_sampler_args(group, sampler):
    group.add_argument("--sampler", default=sampler, choices=["random", "pk"],
                       help="random: shuffled batches; pk: P identities x K images per batch")
    group.add_argument("--num_instances", type=int, default=4, help="K images per identity with --sampler pk")


def add_optimisation_args(parser, lr, epochs, warmup_epochs, milestones, gamma, weight_decay=5e-4,
                          title="optimisation", description=None):
    """The optimiser and step-schedule flags every trainer has (a trainer's description says which
    parameter groups get a multiple of --lr)."""
    g = parser.add_argument_group(title, description)
    g.add_argument("--lr", type=float, default=lr, help="base learning rate (of the pretrained image encoder)")
    g.add_argument("--optimizer", default="adam", choices=["adam", "adamw", "sgd"], help="optimizer")
    g.add_argument("--weight_decay", type=float, default=weight_decay, help="weight decay")
    g.add_argument("--epochs", type=int, default=epochs, help="training epochs")
    g.add_argument("--warmup_epochs", type=int, default=warmup_epochs,
                   help="epochs of linear warm-up from a fraction of --lr (0: none)")
    g.add_argument("--milestones", type=int, nargs="*", default=milestones,
                   help="epochs where lr is multiplied by --gamma")
    g.add_argument("--gamma", type=float, default=gamma, help="lr factor at each milestone")
    g.add_argument("--ls", type=float, default=0.1, help="label smoothing of the ID losses (0 disables)")
    return g


def add_input_args(parser, erasing_p=0.0, cache_root="<data_dir>"):
    """Input geometry, random erasing and the resized-image cache (a trainer adds its own augmentation flags
    to the group this returns)."""
    group = parser.add_argument_group("augmentation and input")
    group.add_argument("--erasing_p", type=float, default=erasing_p, help="random erasing probability")
    group.add_argument("--input_size", type=int, nargs=2, default=[224, 224], metavar=("H", "W"),
                       help="network input height and width")
    group.add_argument("--stride", type=int, default=None,
                       help="ViT patch stride; default: the backbone's own patch size (smaller: overlapping patches)")
    group.add_argument("--pos_interp", choices=["bilinear", "bicubic"], default="bilinear",
                       help="resizing of the pretrained positional embedding to the input's token grid "
                            "(bilinear, as CLIP-ReID and CLIP-HandID)")
    group.add_argument("--last_stride", type=int, default=1, choices=[1, 2],
                       help="ResNet layer4 stride (1 as in CLIP-HandID: 14x14 map at 224)")
    group.add_argument("--cache_resized", nargs="?", const="", default=None, metavar="DIR",
                       help=f"decode and resize every photo once into a uint8 cache (default DIR: "
                            f"{cache_root}/.cache_resized) so epochs skip JPEG decoding")
    group.add_argument("--fast_decode", action="store_true",
                       help="decode the training and validation JPEGs (and the --cache_resized cache) in PIL's draft "
                            "mode: several times faster on large photos, pixels differ slightly (README 'JPEG "
                            "decoding'); the final test always decodes fully")
    return group


def add_gpu_augment_arg(group):
    """--gpu_augment for trainers whose augmentation is data.build_train_transform's."""
    group.add_argument("--gpu_augment", action=argparse.BooleanOptionalAction, default=None,
                       help="keep the --cache_resized images on the GPU as uint8 and augment whole batches there "
                            "(default: on with CUDA and --cache_resized when the cache fits)")


def add_run_control_args(parser, resume_help, final_test_help, amp=None, eval_every=5):
    """amp: the training precision's default (None: bf16 on CUDA, fp32 elsewhere; "none": fp32, the
    reference's where it trains in fp32); eval_every: validate every N epochs (1 where the reference
    validates every epoch)."""
    g = parser.add_argument_group("run control")
    amp_help = ("autocast dtype (default: none = fp32, the reference's precision; bf16 is the faster option on CUDA)"
                if amp == "none" else "autocast dtype (default: bf16 on CUDA, none on CPU)")
    g.add_argument("--amp", default=amp, choices=AMP_CHOICES, help=amp_help)
    io.add_compile_arg(g)
    g.add_argument("--grad_clip", type=float, default=0.0, help="max gradient norm (0: off); applied before the step")
    g.add_argument("--resume", action="store_true",
                   help=resume_help + "; flags left out take the run's recorded values, and one given with another "
                                      "value is refused unless the run can honour it, e.g. more --epochs (README "
                                      "'--resume')")
    g.add_argument("--save_every", type=int, default=0, help="also keep net_<epoch>.pth every N epochs (0: never)")
    g.add_argument("--eval_every", type=int, default=eval_every,
                   help="validate every N epochs (and after the last); net_best is chosen among validated epochs")
    g.add_argument("--final_test", action=argparse.BooleanOptionalAction, default=True, help=final_test_help)
    g.add_argument("--protocol", choices=list(protocols.PROTOCOLS), default=protocols.DEFAULT_PROTOCOL,
                   help="the protocol of the final test (README 'Protocols'): its checkpoint (net_best or net_last), "
                        "feature, flip, precision, galleries and mAP")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="tqdm bars (default: only when the output is a terminal)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic GPU kernels, cuDNN autotuning off (slower): a resumed GPU run then ends "
                        "with the same weights as an uninterrupted one")
    add_common_args(g)
    return g


def add_selection_args(group, reference="CLIP-HandID"):
    """--select_by and --reference_val_acc (trainers whose reference keeps the best val accuracy)."""
    group.add_argument("--select_by", default="val_mAP", choices=["val_mAP", "val_acc"],
                       help=f"net_best: best val retrieval mAP (ours) or best closed-set val accuracy ({reference}'s)")
    group.add_argument("--reference_val_acc", action="store_true",
                       help=f"val_acc as {reference}'s released code counts it: a shuffled val loader of --batch_size "
                            "that drops the incomplete batch (60 of 72 images on 11k dorsal right), divided by all "
                            "val images")


def common_arg_problems(args):
    """Messages for the flags every trainer shares, one per flag (a flag still None takes a backbone
    default later), and for every float flag of the trainer that holds nan or inf."""
    at_least = {"batch_size": 1, "epochs": 1, "eval_every": 1, "save_every": 0, "warmup_epochs": 0, "input_size": 1,
                "stride": 1, "num_workers": 0, "weight_decay": 0}
    if hasattr(args, "num_instances"):  # before the sampler divides --batch_size by it
        at_least["num_instances"] = 1
    problems = bound_problems(args, at_least=at_least, positive=("lr", "gamma"))
    if args.grad_clip < 0:
        problems.append(f"--grad_clip must not be negative, got {args.grad_clip}")
    if not 0 <= args.ls < 1:
        problems.append(f"--ls must be in [0, 1), got {args.ls}")
    if not 0 <= args.erasing_p <= 1:
        problems.append(f"--erasing_p must be in [0, 1], got {args.erasing_p}")
    return problems + finite_problems(args)


def bound_problems(args, at_least=None, positive=()):
    """One message per numeric flag out of range: `at_least` {flag: minimum} (a list value: every item),
    `positive` flags must be > 0; nan and inf are out of every range. A flag still None is skipped (it
    takes a default later)."""
    problems = []
    for flag, minimum in list((at_least or {}).items()) + [(flag, None) for flag in positive]:
        value = getattr(args, flag)
        values = value if isinstance(value, (list, tuple)) else [value]
        if value is None or not values:
            continue
        if not all(math.isfinite(v) for v in values):
            problems.append(f"--{flag} must be a finite number, got {_shown(value)}")
        elif minimum is None and min(values) <= 0:
            problems.append(f"--{flag} must be positive, got {_shown(value)}")
        elif minimum is not None and min(values) < minimum:
            problems.append(f"--{flag} must be at least {minimum}, got {_shown(value)}")
    return problems


def finite_problems(args):
    """One message per float flag (or list of floats) holding nan or inf: no range check catches them
    (every comparison with nan is false), and training would only stop at a non-finite loss."""
    problems = []
    for flag, value in vars(args).items():
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            problems.append(f"--{flag} must be a finite number, got {_shown(value)}")
    return problems


def _one_per_flag(problems):
    """The first message about each flag (the flag a message names first); a flag found by two checks,
    e.g. -inf by a range check and by finite_problems, is reported once."""
    kept, flags_seen = [], set()
    for problem in problems:
        flag = re.search(r"--\w+", problem)
        if flag is None or flag.group() not in flags_seen:
            kept.append(problem)
        if flag is not None:
            flags_seen.add(flag.group())
    return kept


def _shown(value):
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def refuse_training_flags(problems):
    """Trainers' flag checks: a TrainingInputError with one problem per line (run_training prints each
    as an "error:" line)."""
    if problems:
        raise TrainingInputError("\n".join(_one_per_flag(problems)))


def exit_on_problems(problems):
    """Scripts' flag checks: each problem on its own "error:" line, exit status 2 (as argparse)."""
    if problems:
        print("\n".join(f"error: {p}" for p in _one_per_flag(problems)), file=sys.stderr)
        raise SystemExit(2)
