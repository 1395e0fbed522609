"""The CUDA fast paths of the image encoder, and which are on by default (README "GPU"):
torch.compile (--compile, off by default), channels_last ResNets and cuDNN autotuning (on with CUDA).
The GPU-resident image cache with batch augmentation is utils/gpu_augment.py; AMP is utils.io.autocast.

Each switch below is read where its fast path is applied, so benchmark.py --fast_paths can time a
run with one of them off; the scripts' flags (--compile, --gpu_augment, --amp) are the user's."""
import torch

from clip.model import ModifiedResNet

COMPILE_BACKEND = "inductor"  # torch.compile's default; the CPU tests compile the same call with "aot_eager"
CHANNELS_LAST = True  # ResNet weights in NHWC on CUDA: cuDNN's tensor-core convolutions read that layout
CUDNN_BENCHMARK = True  # cuDNN autotuning in training runs (fixed input size), unless --deterministic


def on_cuda(device):
    return str(device).startswith("cuda")


def use_compile(flag, device):
    """--compile / --no-compile: off by default, because a compile costs more than it saves at the
    protocols' sizes (README "GPU"); asked for, it applies on CUDA only (a CPU run ignores it)."""
    return on_cuda(device) and bool(flag)


def autotune_convolutions(device, deterministic):
    """cuDNN autotuning for a training run on CUDA: every batch has --batch_size and one input size, so
    the kernel search happens once per shape. --deterministic turns it off (io.set_seed)."""
    if on_cuda(device) and not deterministic and CUDNN_BENCHMARK:
        torch.backends.cudnn.benchmark = True


class CompiledEncoderCall:
    """One entry point of an image encoder (its forward or forward_features), torch.compiled for the
    passes of one kind and eager for the other: a trainer compiles its training passes (module in
    train mode) and validates eagerly, so the few hundred validation images do not pay a second
    compile; an evaluator compiles its evaluation passes.

    Graphs are static (dynamic=False). Training batches all have --batch_size (the loaders drop the
    last, incomplete one). An evaluation batch smaller than the largest one seen (the last batch of an
    image set) is padded with zeros to that size and the outputs cut back, so it runs the compiled
    graph instead of compiling another one (torch's default would recompile once with a symbolic
    batch size). In eval mode the encoder treats every image alone (LayerNorm, BatchNorm with running
    statistics), so the padding changes nothing in the other rows."""

    def __init__(self, module, eager, for_training):
        self.module, self.eager, self.for_training = module, eager, bool(for_training)
        self.compiled = torch.compile(eager, backend=COMPILE_BACKEND, dynamic=False)
        self.largest_batch = 0

    def __call__(self, images):
        if self.module.training != self.for_training:
            return self.eager(images)
        if self.for_training:
            return self.compiled(images)
        count = images.shape[0]
        self.largest_batch = max(self.largest_batch, count)
        if count == self.largest_batch:
            return self.compiled(images)
        padding = images.new_zeros((self.largest_batch - count, *images.shape[1:]))
        return first_rows(self.compiled(torch.cat([images, padding])), count)


def first_rows(output, count):
    if isinstance(output, dict):
        return {key: value[:count] for key, value in output.items()}
    return output[:count]


def speed_up_image_encoder(visual, device, compile=None, *, for_training):
    """On CUDA: channels_last weights for ResNets and, with compile (--compile), torch.compile of both
    entry points of the encoder, forward_features (every trained model's) and forward (CLIP's
    encode_image: the zero-shot evaluator), for training passes (a trainer: for_training=True) or for
    evaluation passes (an evaluator: for_training=False); see CompiledEncoderCall. The bound methods are
    replaced, not the module, so state-dict keys stay unchanged. Returns what was done, for the log."""
    if not on_cuda(device):
        return "--compile ignored: it needs CUDA" if compile else ""
    done = []
    if isinstance(visual, ModifiedResNet) and CHANNELS_LAST:
        visual.to(memory_format=torch.channels_last)
        done.append("channels_last")
    if use_compile(compile, device):
        visual.forward_features = CompiledEncoderCall(visual, visual.forward_features, for_training)
        visual.forward = CompiledEncoderCall(visual, visual.forward, for_training)
        done.append(f"torch.compile of the image encoder ({'training' if for_training else 'evaluation'} passes)")
    return ", ".join(done)
