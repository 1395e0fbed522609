"""Training pieces: error types, learning-rate schedules, parameter groups, optimizers, the AMP
grad scaler, one training epoch, RNG state and checkpoints."""
import bisect
import hashlib
import math
import os
import pickle
import random
import time
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from .errors import NonFiniteLossError, TrainingInputError
from .io import atomic_torch_save, autocast, bars_off


class WarmupMultiStepLR(torch.optim.lr_scheduler.LRScheduler):
    """Per-epoch schedule: linear warm-up from warmup_factor x lr over warmup_epochs, then x gamma at
    every milestone. Factor at epoch e < warmup_epochs: f + (1 - f) * e / warmup_epochs; afterwards
    gamma ** (number of milestones <= e). Call step() once after every epoch. The first epoch is
    e = first_epoch: 0 in CLIP-HandID, 1 in CLIP-ReID (which steps the scheduler at the start of
    each epoch n = 1, 2, ..., so its epoch 1 already trains at f + (1 - f) / warmup_epochs)."""

    def __init__(self, optimizer, milestones=(40, 60), gamma=0.5, warmup_epochs=10, warmup_factor=0.01,
                 last_epoch=-1, first_epoch=0):
        self.first_epoch = int(first_epoch)
        if list(milestones) != sorted(milestones):
            raise TrainingInputError(f"--milestones must be increasing, got {list(milestones)}")
        self.milestones = [int(m) for m in milestones]
        self.gamma, self.warmup_epochs, self.warmup_factor = float(gamma), int(warmup_epochs), float(warmup_factor)
        super().__init__(optimizer, last_epoch)

    def lr_factor(self, epoch):
        if epoch < self.warmup_epochs:
            return self.warmup_factor + (1 - self.warmup_factor) * epoch / self.warmup_epochs
        return self.gamma ** bisect.bisect_right(self.milestones, epoch)

    def get_lr(self):
        return [base_lr * self.lr_factor(self.last_epoch + self.first_epoch) for base_lr in self.base_lrs]


def schedule_warnings(epochs, warmup_epochs, milestones, first_epoch=0, flags=("--epochs", "--warmup_epochs",
                                                                                  "--milestones")):
    """Warnings (strings) for a WarmupMultiStepLR run too short for its schedule: one that ends
    inside the warm-up (the learning rate never reaches its base value) or before the first
    milestone (it is never decayed). first_epoch: as WarmupMultiStepLR's."""
    epochs_flag, warmup_flag, milestones_flag = flags
    last = first_epoch + epochs - 1  # the schedule's epoch index of the last epoch
    found = []
    if warmup_epochs > 0 and last < warmup_epochs:
        found.append(f"warning: {epochs_flag} {epochs} ends inside the {warmup_epochs}-epoch warm-up "
                     f"({warmup_flag}): the learning rate never reaches its base value; lower {warmup_flag}")
    if milestones and last < min(milestones):
        found.append(f"warning: {epochs_flag} {epochs} ends before the first {milestones_flag} step (epoch "
                     f"{min(milestones)}): the learning rate is never decayed; lower {milestones_flag}")
    return found


class Stage1CosineLR(torch.optim.lr_scheduler.LRScheduler):
    """CLIP-ReID's stage-1 schedule per epoch n = 1..epochs (timm CosineLRScheduler, t = n): linear
    warm-up warmup_lr + n (base - warmup_lr) / warmup_epochs for n < warmup_epochs, then
    min_lr + (base - min_lr)(1 + cos(pi n / epochs)) / 2, and min_lr at n = epochs. Call step() once
    after every epoch."""

    def __init__(self, optimizer, epochs, warmup_epochs=5, warmup_lr=1e-5, min_lr=1e-6, last_epoch=-1):
        self.epochs, self.warmup_epochs = int(epochs), int(warmup_epochs)
        self.warmup_lr, self.min_lr = float(warmup_lr), float(min_lr)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, number, base_lr):
        if number < self.warmup_epochs:
            return self.warmup_lr + number * (base_lr - self.warmup_lr) / self.warmup_epochs
        if number >= self.epochs:
            return self.min_lr
        return self.min_lr + 0.5 * (base_lr - self.min_lr) * (1 + math.cos(math.pi * number / self.epochs))

    def get_lr(self):
        return [self.lr_at(self.last_epoch + 1, base_lr) for base_lr in self.base_lrs]


def param_groups(model, lr, weight_decay, head_lr_mult=10.0, backbone_prefixes=("visual.",)):
    """Two groups of trainable parameters: the pretrained encoder (names starting with one of
    backbone_prefixes) at lr and every new layer at head_lr_mult x lr. Frozen parameters
    (requires_grad False) are left out."""
    backbone, heads = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (backbone if name.startswith(tuple(backbone_prefixes)) else heads).append(param)
    groups = [{"params": backbone, "lr": lr, "weight_decay": weight_decay, "name": "backbone"},
              {"params": heads, "lr": lr * head_lr_mult, "weight_decay": weight_decay, "name": "heads"}]
    return [g for g in groups if g["params"]]


def make_optimizer(name, groups, lr, weight_decay):
    """adam (coupled L2, as CLIP-HandID), adamw (decoupled) or sgd (momentum 0.9, Nesterov)."""
    name = name.lower()
    params = [p for group in groups for p in group["params"]]
    # the fused kernels run the whole update in a few launches, but need every parameter on CUDA
    fused = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay, fused=fused or None)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused or None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    raise TrainingInputError(f"--optimizer must be adam, adamw or sgd, got {name!r}")


def make_grad_scaler(amp, device):
    """A GradScaler, active only for fp16 (bf16 needs none)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=(amp == "fp16"))


@dataclass
class EpochResult:
    losses: dict
    accuracy: float
    images: int
    seconds: float

    @property
    def images_per_s(self):
        return self.images / max(self.seconds, 1e-9)


def _first_bad(values, epoch, offset, names, dist_info):
    """Raise NonFiniteLossError if any recorded loss is NaN/inf (on any rank); batches count from 1."""
    stacked = torch.stack(values)  # (steps, terms)
    finite = torch.isfinite(stacked).all(dim=1)
    bad = (~finite).any().float()
    if dist_info is not None and dist_info.distributed:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    if bad.item() == 0:
        return
    steps = (~finite).nonzero().flatten().tolist()
    if steps:
        step = steps[0]
        terms = {n: float(v) for n, v in zip(names, stacked[step].tolist())}
        raise NonFiniteLossError(f"non-finite loss at epoch {epoch}, batch {offset + step + 1}: {terms}")
    raise NonFiniteLossError(f"non-finite loss on another rank at epoch {epoch}, batches "
                             f"{offset + 1}..{offset + len(values)}")


def module_loss(module, images, labels):
    """The compute_loss of train_one_epoch for a module that is model and objective in one
    (FinetuneLoss, ClipReIDLoss, PromptSGLoss), so DDP can wrap it whole."""
    return module(images, labels)


def train_one_epoch(model, loader, compute_loss, optimizers, scaler, amp, device, epoch, grad_clip=None,
                    dist_info=None, check_every=20, progress=None):
    """Generic training epoch.

    compute_loss(model, images, labels) -> (total loss, {term name: loss tensor}, logits or None)
    runs under autocast. optimizers: list; the first one's parameters are gradient-clipped
    (clip_grad_norm_ to grad_clip, after unscaling and BEFORE the step). Loss terms are checked for
    NaN/inf every `check_every` batches and at the end (NonFiniteLossError names epoch and batch; the
    caller keeps the last good checkpoint). Returns an EpochResult with mean losses over batches and
    the training accuracy of the logits."""
    model.train()
    names, recorded, offset = None, [], 0
    sums, correct, seen, steps = None, torch.zeros((), device=device), 0, 0
    start = time.perf_counter()
    batches = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=bars_off(progress))
    for images, labels in batches:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with autocast(amp, device):
            loss, terms, logits = compute_loss(model, images, labels)
        values = torch.stack([loss.detach().float()] + [t.detach().float() for t in terms.values()])
        if names is None:
            names = ["loss"] + list(terms)
            sums = torch.zeros_like(values)
        recorded.append(values)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(optimizers[0])
            params = [p for group in optimizers[0].param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        for optimizer in optimizers:
            scaler.step(optimizer)
        scaler.update()
        sums += values
        if logits is not None:
            correct += (logits.detach().argmax(dim=1) == labels).sum()
        seen += labels.shape[0]
        steps += 1
        if len(recorded) >= check_every:
            _first_bad(recorded, epoch, offset, names, dist_info)
            offset += len(recorded)
            recorded = []
    if recorded:
        _first_bad(recorded, epoch, offset, names, dist_info)
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if steps == 0:
        raise TrainingInputError(f"epoch {epoch} had no full batch: the training set is smaller than one batch "
                                 f"(lower --batch_size)")
    totals = torch.cat([sums, correct.float()[None], torch.tensor([float(seen), float(steps)], device=sums.device)])
    if dist_info is not None and dist_info.distributed:
        torch.distributed.all_reduce(totals)
    totals = totals.tolist()
    num_steps, num_seen = totals[-1], totals[-2]
    losses = {name: totals[i] / num_steps for i, name in enumerate(names)}
    return EpochResult(losses=losses, accuracy=totals[len(names)] / num_seen, images=int(num_seen), seconds=seconds)


def capture_rng_state():
    """Python, NumPy, torch (and CUDA) RNG states in types torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state):
    random.setstate(_as_tuples(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value):
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value


CHECKSUM_KEY = "tensors_sha256"


def tensors_sha256(obj):
    """SHA-256 over every tensor of a nested dict/list (the key path, dtype, shape and bytes of each,
    dict keys in sorted order): what save_checkpoint records and load_checkpoint verifies."""
    digest = hashlib.sha256()

    def walk(value, path):
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{path}|{tensor.dtype}|{tuple(value.shape)}\n".encode())
            if tensor.numel():
                digest.update(tensor.view(torch.uint8).numpy())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                if not (path == "" and key == CHECKSUM_KEY):
                    walk(value[key], f"{path}/{key}")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{path}[{i}]")

    walk(obj, "")
    return digest.hexdigest()


def save_checkpoint(path, state):
    """Atomic torch.save of a dict of tensors and plain Python values (no pickled objects), so
    load_checkpoint can use weights_only=True; it records the SHA-256 of its tensors."""
    atomic_torch_save(dict(state, **{CHECKSUM_KEY: tensors_sha256(state)}), path)


def load_checkpoint(path, map_location="cpu"):
    """A checkpoint written by save_checkpoint, its tensors verified against the recorded SHA-256."""
    if not os.path.isfile(path):
        raise TrainingInputError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):  # torch.save writes zip archives; anything else is not ours
        raise TrainingInputError(f"{path} is not a checkpoint of this project (not a torch.save archive); "
                                 f"it may be truncated or another kind of file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        # truncated or not a checkpoint at all (torch raises each of these); keep the first line only
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrainingInputError(f"cannot read checkpoint {path} ({first}); it is damaged or not a checkpoint "
                                 f"of this project") from None
    if not isinstance(state, dict):
        raise TrainingInputError(f"{path} is not a checkpoint of this project (it holds a {type(state).__name__})")
    recorded = state.get(CHECKSUM_KEY)
    if recorded is None:
        raise TrainingInputError(f"{path} has no SHA-256 of its tensors (it was not written by this project's "
                                 f"trainers); it cannot be verified")
    if tensors_sha256(state) != recorded:
        raise TrainingInputError(f"{path} is damaged: its tensors do not match the SHA-256 recorded when it was "
                                 f"written; restore it or train again")
    return state


def checkpoint_path(run_dir, which_epoch="last"):
    """net_last.pth, net_best.pth or net_<N>.pth of a run folder."""
    which = str(which_epoch)
    if which not in ("last", "best") and not which.isdigit():
        raise TrainingInputError(f"--which_epoch must be best, last or an epoch number, got {which!r}")
    return os.path.join(run_dir, f"net_{which}.pth")


def unwrap_model(model):
    return model.module if hasattr(model, "module") else model
