"""benchmark.py --fast_paths: is each CUDA fast path worth it, end to end? Every configuration runs as
a fresh process of the real script, timed by wall clock from start to exit (imports, model build,
compile, cuDNN autotuning, the cache on the GPU, every epoch, validation and checkpoints included):

  train     train_finetune.py on the protocol's data (benchmark_protocol.protocol_data: 11k dorsal-right size,
            --cache_resized), --fast_paths_epochs epochs (70 = the protocol), per backbone;
  evaluate  eval_query_gallery_finetune.py on its 10 splits (the dorsal-right test photos and the
            gallery{i}_all distractors of the other aspects, 1600x1200);
  encode_N  an evaluator's model load and encoding of N photos (the protocol's, cycled; mirrored as
            the default protocol does): utils.evaluation.encode_images behind the same
            speed_up_image_encoder call, for N in --fast_paths_encode (1,000 and 10,000).

An untimed warm-up run of each kind comes first (it builds the resized-image cache, fills the page
cache and trains the one epoch whose weights the evaluations use; any weights time the same); --tiny
(a CPU check of the structure) skips them.

Configurations (--fast_paths_configs): "defaults" (the scripts' own on CUDA), "all_off", and one fast
path changed from the defaults at a time: "compile_cold" (--compile, an empty inductor cache, as a
first run), "compile_warm" (--compile again, with the cache compile_cold left), "bf16", "fp32"
(--amp), "no_gpu_augment", "no_cudnn_benchmark", "no_channels_last" (ResNets; utils/speed.py's
switches, set in the child process). Each "decisions" entry compares the run with a fast path on and
with it off, all else default: a fast path earns its default where "on_s" < "off_s".

    python benchmark.py --fast_paths --device cuda --out fast_paths.json
    python benchmark.py --fast_paths --device cuda --fast_paths_epochs 10 --fast_paths_configs defaults compile_cold

Here `python benchmark_fast_paths.py script|encode ...` is the child process; it is not meant for users."""
import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.abspath(__file__))
PROTOCOL_EPOCHS = 70
SWITCHES = ("channels_last", "cudnn_benchmark")  # utils.speed switches without a script flag
CONFIGS = {  # name: (extra script flags, speed switches off, inductor cache: None | "cold" | "warm")
    "defaults": ([], [], None),
    "all_off": (["--no-compile", "--no-gpu_augment", "--amp", "none"], list(SWITCHES), None),
    "compile_cold": (["--compile"], [], "cold"),
    "compile_warm": (["--compile"], [], "warm"),
    "bf16": (["--amp", "bf16"], [], None),
    "fp32": (["--amp", "none"], [], None),
    "no_gpu_augment": (["--no-gpu_augment"], [], None),
    "no_cudnn_benchmark": ([], ["cudnn_benchmark"], None),
    "no_channels_last": ([], ["channels_last"], None),
}
EVAL_CONFIGS = ("defaults", "all_off", "compile_cold", "compile_warm", "bf16", "fp32", "no_channels_last")
# fast path: (configuration with it on, configuration with it off), each against the other
DECISIONS = {"compile (first run)": ("compile_cold", "defaults"),
             "compile (inductor cache warm)": ("compile_warm", "defaults"), "bf16 autocast": ("bf16", "fp32"), "gpu_augment": ("defaults", "no_gpu_augment"),
             "cudnn.benchmark": ("defaults", "no_cudnn_benchmark"), "channels_last": ("defaults", "no_channels_last")}


def run_child(command, config, cache_root, log_path, timeout):
    """Wall seconds of `python benchmark_fast_paths.py <command>` with the configuration's switches off
    and its inductor cache; its output goes to log_path."""
    _, off, cache = CONFIGS[config]
    env = dict(os.environ)
    if cache is not None:
        env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache_root, "inductor")
        if cache == "cold":
            shutil.rmtree(env["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)
    argv = [sys.executable, os.path.join(REPO, "benchmark_fast_paths.py"), *command[:1],
            *(["--off", *off] if off else []), "--", *command[1:]]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        done = subprocess.run(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"error: the {config} run failed (exit {done.returncode}); see {log_path}")
    return seconds


def train_figures(wall, run_dir, epochs):
    """The run's wall time, its epochs' training seconds (metrics.csv) and, with fewer epochs than the
    protocol's, the protocol's time projected from them: wall + (70 - epochs) x the time from one
    epoch's end to the next in train.log (training, validation, checkpoints; one-second stamps)."""
    import csv
    import datetime
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        epoch_seconds = [float(row["epoch_seconds"]) for row in csv.DictReader(f)]
    steady = sorted(epoch_seconds[1:] or epoch_seconds)[len(epoch_seconds[1:] or epoch_seconds) // 2]
    figures = {"wall_s": wall, "epochs": epochs, "epoch_seconds": epoch_seconds, "steady_epoch_s": steady,
               "first_epoch_extra_s": epoch_seconds[0] - steady}  # compile, autotuning, warm-up
    with open(os.path.join(run_dir, "train.log")) as f:
        ends = [datetime.datetime.strptime(line[:19], "%Y-%m-%d %H:%M:%S") for line in f
                if line[20:].startswith("epoch ")]
    if epochs < PROTOCOL_EPOCHS and len(ends) >= 2:
        per_epoch = (ends[-1] - ends[0]).total_seconds() / (len(ends) - 1)
        figures.update(epoch_to_epoch_s=per_epoch, projected_protocol_s=wall + (PROTOCOL_EPOCHS - epochs) * per_epoch)
    return figures


def decisions(rows, key):
    """{fast path: {"on", "off", "on_s", "off_s", "on_wins"}} for the pairs measured in rows."""
    found = {}
    for name, (on, off) in DECISIONS.items():
        if on in rows and off in rows:
            on_s, off_s = rows[on][key], rows[off][key]
            found[name] = {"on": on, "off": off, "on_s": on_s, "off_s": off_s, "on_wins": on_s < off_s}
    return found


def add_arguments(parser):
    """benchmark.py's --fast_paths_* flags."""
    g = parser.add_argument_group("--fast_paths")
    g.add_argument("--fast_paths_configs", nargs="+", choices=list(CONFIGS),
                   default=list(CONFIGS), help="configurations to run (default: all)")
    g.add_argument("--fast_paths_backbones", nargs="+", default=["ViT-B/16"],
                   help="backbones trained (random weights; default ViT-B/16, add RN50 for its fast paths)")
    g.add_argument("--fast_paths_epochs", type=int, default=None,
                   help="epochs of each training run (default 70, the protocol, --tiny 2; fewer: the protocol is "
                        "projected)")
    g.add_argument("--fast_paths_encode", type=int, nargs="+", default=None,
                   help="photos an evaluator encodes in the encode_N runs (default 1000 10000, --tiny 8)")
    g.add_argument("--fast_paths_timeout", type=int, default=3600, help="seconds one run may take")


def bench_fast_paths(args):
    """The figures of every configuration and the decisions (see the module docstring)."""
    import torch
    from benchmark_protocol import protocol_data
    device = args.device
    data = protocol_data(args)
    work = os.path.join(os.path.dirname(data["root"]), "fast_paths")
    os.makedirs(work, exist_ok=True)
    configs = [c for c in CONFIGS if c in args.fast_paths_configs]  # compile_warm after compile_cold
    figures = {"device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
               "torch": torch.__version__, "cuda": torch.version.cuda, "tiny": args.tiny,
               "measured": device.startswith("cuda") and not args.tiny, "epochs": args.fast_paths_epochs,
               "train": {}, "evaluate": {}, "encode": {}, "decisions": {}}
    common = ["--device", device, "--seed", str(args.seed), "--no-progress"]
    small = ["--num_workers", "0", "--batch_size", "4"] if args.tiny else []

    def timed(command, config, name):
        return run_child(command, config, work, os.path.join(work, f"{name}.log"), args.fast_paths_timeout)

    def train_command(name, checkpoint, epochs, config):
        return ["script", "train_finetune", "--data_dir", data["split_root"], "--f_name", work, "--m_name", name,
                "--backbone_name", checkpoint, "--pretrained", "false", "--epochs", str(epochs), "--cache_resized",
                "--force", "--no-final_test", "--input_size", *map(str, args.input_size), *common, *small,
                *CONFIGS[config][0]]

    for number, backbone in enumerate(args.fast_paths_backbones):
        checkpoint = data["checkpoint"] if backbone == "ViT-B/16" else random_checkpoint(backbone, work, args)
        prefix = backbone.replace("/", "-")
        # untimed: builds the resized-image cache and fills the page cache, which every timed run then finds;
        # the first backbone's also gives the weights the evaluations time (--tiny: the first timed run's)
        if not args.tiny:
            timed(train_command(f"{prefix}_warmup", checkpoint, 1, "defaults"), "defaults", f"{prefix}_warmup")
        rows = figures["train"][backbone] = {}
        for config in configs:
            if config == "no_channels_last" and backbone.startswith("ViT"):
                continue
            name = f"{prefix}_{config}"
            wall = timed(train_command(name, checkpoint, args.fast_paths_epochs, config), config, name)
            rows[config] = train_figures(wall, os.path.join(work, name), args.fast_paths_epochs)
            if not args.tiny:  # its checkpoints (a GB or two for ViT-B/16) are not needed (--tiny evaluates one)
                for file in os.listdir(os.path.join(work, name)):
                    if file.startswith("net_") and file.endswith(".pth"):
                        os.remove(os.path.join(work, name, file))
            report(f"train {backbone} {config}", rows[config])
        key = "wall_s" if args.fast_paths_epochs >= PROTOCOL_EPOCHS else "projected_protocol_s"
        figures["decisions"][f"train {backbone}"] = decisions(rows, key)

    first = configs[0] if args.tiny else "warmup"
    run = os.path.join(work, f"{args.fast_paths_backbones[0].replace('/', '-')}_{first}")
    resnet = args.fast_paths_backbones[0].startswith("RN")
    eval_configs = [c for c in configs if c in EVAL_CONFIGS and (resnet or c != "no_channels_last")]
    evaluate = ["eval_query_gallery_finetune", "--f_name", work, "--m_name", os.path.basename(run), "--test_dir",
                data["split_root"], "--which_epoch", "last", "--force", "--device", device, *small[:2]]
    if not args.tiny:
        timed(["script", *evaluate, "--out_dir", os.path.join(work, "eval_warmup")], "defaults", "eval_warmup")
    for config in eval_configs:
        flags = [f for f in CONFIGS[config][0] if f != "--no-gpu_augment"]  # a trainer's flag
        wall = timed(["script", *evaluate, "--out_dir", os.path.join(work, f"eval_{config}"), *flags], config,
                     f"eval_{config}")
        figures["evaluate"][config] = {"wall_s": wall}
        report(f"evaluate {config}", figures["evaluate"][config])
    figures["decisions"]["evaluate"] = decisions(figures["evaluate"], "wall_s")

    paths = os.path.join(work, "photos.json")
    hands = os.path.join(data["root"], "Hands")
    with open(paths, "w") as f:
        json.dump(sorted(os.path.join(hands, name) for name in os.listdir(hands)), f)
    encode = ["encode", "--run_dir", run, "--paths", paths, "--device", device,
              *(["--num_workers", "0"] if args.tiny else [])]
    if not args.tiny:
        timed([*encode, "--count", str(max(args.fast_paths_encode))], "defaults", "encode_warmup")
    for count in args.fast_paths_encode:
        rows = figures["encode"][str(count)] = {}
        for config in eval_configs:
            flags = [f for f in CONFIGS[config][0] if f != "--no-gpu_augment"]
            wall = timed([*encode, "--count", str(count), *flags], config, f"encode{count}_{config}")
            rows[config] = {"wall_s": wall}
            report(f"encode {count} images {config}", rows[config])
        figures["decisions"][f"encode {count}"] = decisions(rows, "wall_s")
    for what, found in figures["decisions"].items():
        for fast_path, d in found.items():
            caveat = "" if figures["measured"] else " (not a GPU measurement)"
            print(f"{what}: {fast_path}: on {d['on_s']:.1f} s, off {d['off_s']:.1f} s -> "
                  f"{'on wins' if d['on_wins'] else 'off wins'}{caveat}")
    return figures


def random_checkpoint(backbone, folder, args):
    import clip
    import torch
    path = os.path.join(folder, f"random_{backbone.replace('/', '-')}.pt")
    if args.tiny:
        clip.save_tiny_checkpoint(path, kind="rn" if backbone.startswith("RN") else "vit",
                                  image_resolution=args.input_size[0])
    else:
        torch.save(clip.model.random_state_dict(backbone, seed=args.seed), path)
    return path


def report(what, row):
    extra = "".join(f", {k} {row[k]:.1f} s" for k in ("first_epoch_extra_s", "projected_protocol_s") if k in row)
    print(f"fast paths: {what}: {row['wall_s']:.1f} s end to end{extra}")


# ---- the child process ----------------------------------------------------------------------------

def encode(argv):
    """An evaluator's work for N photos: rebuild the model, speed it up, encode (mirrored)."""
    import torch
    import models
    from utils import evaluation, io
    p = argparse.ArgumentParser()
    p.add_argument("--run_dir", required=True)
    p.add_argument("--paths", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--amp", default="none")
    io.add_compile_arg(p)
    args = p.parse_args(argv)
    with open(args.paths) as f:
        photos = json.load(f)
    paths = [photos[i % len(photos)] for i in range(args.count)]
    model, config, _ = models.load_trained_model(args.run_dir, "last", device=args.device)
    models.speed_up_image_encoder(model.visual, args.device, args.compile, for_training=False)
    size = tuple(config["model"]["backbone"]["input_size"])
    features = evaluation.encode_images(model, paths, size, batch_size=64, num_workers=args.num_workers,
                                        device=args.device, flip=True, amp=args.amp)
    if str(args.device).startswith("cuda"):
        torch.cuda.synchronize()
    print(f"encoded {len(features)} images")


def child(argv):
    """`script <module> [--off switch ...] -- <its arguments>` or `encode [--off ...] -- <arguments>`."""
    if not argv or argv[0] not in ("script", "encode") or "--" not in argv:
        raise SystemExit("benchmark_fast_paths.py is the child process of `python benchmark.py --fast_paths` "
                         "(see its --help); run that instead")
    kind, rest = argv[0], argv[1:]
    split = rest.index("--")
    options, arguments = rest[:split], rest[split + 1:]
    from utils import speed
    off = options[1:] if options[:1] == ["--off"] else []
    for switch in off:
        setattr(speed, switch.upper(), False)
    print(f"utils.speed switches off: {', '.join(off) or 'none'}", flush=True)
    if kind == "encode":
        return encode(arguments)
    sys.argv = [f"{arguments[0]}.py", *arguments[1:]]
    importlib.import_module(arguments[0]).main(arguments[1:])


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    child(sys.argv[1:])
