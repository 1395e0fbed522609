"""Before/after parity of the trainers and evaluators across internal refactors (the split of
utils.py into the utils/ package, the move of the trainers' loops, the run-folder locks).

tests/make_before_after.py runs one small fixed configuration of train_finetune (tiny ViT and tiny
ResNet), train_clipreid, train_promptsg, the zero-shot evaluator and the fine-tuned-model evaluator
through their public main(argv) on synthetic data (seed 0, CPU, one torch thread), and
tests/data/before_after.json holds what it recorded: a sketch of the net_last.pth weights (and of
CLIP-ReID's prompts), the loss columns of metrics.csv, the evaluators' per-split metrics and a sketch
of their .mat features. Here the same cases run again and must agree.

Never bit for bit: the same code on another machine of the same kind (another AVX-512 CPU), or
under ATEN_CPU_CAPABILITY=default / avx2, rounds differently, and training amplifies it. Each
comparison has a tolerance that such rounding stays under and that a real change exceeds. Measured
on this suite's cases (native AVX-512 against default and avx2; a real change: the trainers' --lr
10 % higher, the zero-shot evaluation without its mirrored image):

  quantity                             rounding (default, avx2)       real change       tolerance
  weights, finetune ViT / RN           4.4e-5 / 1.3e-5                 8.8e-4 / 8.9e-4   2e-4 (relative L2)
  weights, CLIP-ReID                   2.4e-4                          3.8e-3            1e-3 (relative L2)
  prompts, CLIP-ReID stage 1           2.9e-5                          (not trained)     1e-3 (relative L2)
  weights, PromptSG                    1.6e-2 (chaotic: 3 epochs of    1.6e-1            5e-2 (relative L2)
                                       cross-attention and PK batches)
  losses, finetune / CLIP-ReID         <= 3e-5                         3e-3 .. 1.4e-1    1e-3 (absolute)
  losses, PromptSG                     7.2e-3 (epoch 3)                2.5e-2            1.5e-2 (absolute)
  .mat features, zero-shot             5.4e-7                          1.5e-2 (no flip)  1e-4 (relative L2)
  .mat features, fine-tuned model      3.0e-4 (its weights' drift)     1.5e-2            2e-3 (relative L2)
  per-split metrics (fractions)        0 seen, but score gaps of 2e-7  5e-2              1 / num_query
                                       exist: a near-tie may swap                        (absolute)

Each tolerance sits between the two columns (about the geometric mean), so it has a margin of 2x
or more either way. Relative L2 = ||now - recorded|| / ||recorded|| over all floating-point tensors
together, estimated from the sketches (spread about 3 %). The metrics may move by one query's worth:
a rounding difference can break a near-tie the other way; a real change of the evaluation shows in
the features (and the metric functions themselves are pinned by test_metrics' reference vectors).
Counts (epochs, tensors, queries, gallery sizes, splits) and the flags must be equal.

A refactor must keep every value within its tolerance. If a value changes on purpose (a deliberate
fix), regenerate the file and commit it with the fix, saying why:

    python tests/make_before_after.py --force

The values are only comparable under the recorded torch/numpy versions (the test skips otherwise).
"""
import importlib.util
import json
import os

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(TESTS_DIR, "data", "before_after.json")
REGENERATE = "python tests/make_before_after.py --force"

# see the table in the docstring
WEIGHTS = {"finetune_vit": 2e-4, "finetune_rn": 2e-4, "clipreid_vit": 1e-3, "promptsg_vit": 5e-2}
PROMPTS = 1e-3
LOSSES = {"finetune_vit": 1e-3, "finetune_rn": 1e-3, "clipreid_vit": 1e-3, "promptsg_vit": 1.5e-2}
FEATURES = {"eval_zeroshot_vit": 1e-4, "eval_finetune_vit": 2e-3}


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_before_after", os.path.join(TESTS_DIR, "make_before_after.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generator = _load_generator()

with open(FIXTURE) as f:
    EXPECTED = json.load(f)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    env, now = EXPECTED["environment"], generator.environment()
    changed = [f"{k} {env[k]} -> {now[k]}" for k in ("torch", "numpy") if env.get(k) != now[k]]
    if changed:
        pytest.skip(f"{FIXTURE} was recorded under other versions ({', '.join(changed)}); their kernels may "
                    f"round differently beyond the tolerances")
    return generator.record(str(tmp_path_factory.mktemp("before_after")))


def exact(expected, got, path):
    return [] if expected == got and type(expected) is type(got) else [f"{path}: {expected!r} before, {got!r} now"]


def sketch_difference(expected, got, tolerance, path):
    found = generator.relative_distance(expected, got)
    if len(expected["sketch"]) != len(got["sketch"]) or not found <= tolerance:
        return [f"{path}: relative L2 distance {found:.2e} from the recorded values > {tolerance:.0e}"]
    return []


def loss_differences(expected, got, tolerance, path):
    if [r["epoch"] for r in expected] != [r["epoch"] for r in got] or [list(r) for r in expected] != [list(r) for r in got]:
        return [f"{path}: epochs or loss columns differ: {expected} before, {got} now"]
    out = []
    for before, now in zip(expected, got):
        for key, value in before.items():
            if key == "epoch" or (value is None and now[key] is None):
                continue
            if value is None or now[key] is None or not abs(now[key] - value) <= tolerance:
                out.append(f"{path}[epoch {before['epoch']}]/{key}: {value} before, {now[key]} now (tolerance {tolerance})")
    return out


def metric_differences(expected, got, path):
    out = exact(expected["num_splits"], got["num_splits"], f"{path}/num_splits")
    out += exact(sorted(expected["splits"]), sorted(got["splits"]), f"{path}/splits")
    for key, before in expected["splits"].items():
        now = got["splits"].get(key, {})
        tolerance = 1.0 / before["num_query"] + 1e-9  # one query's worth
        for name, value in before.items():
            if name.startswith("num_"):
                out += exact(value, now.get(name), f"{path}/{key}/{name}")
                continue
            values, others = (value, now.get(name)) if isinstance(value, list) else ([value], [now.get(name)])
            if others is None or len(values) != len(others) or any(
                    not abs(a - b) <= tolerance for a, b in zip(values, others)):
                out.append(f"{path}/{key}/{name}: {value} before, {now.get(name)} now (tolerance {tolerance:.3g})")
    return out


def differences(name, expected, got):
    out = exact(expected["script"], got["script"], "script") + exact(expected["argv"], got["argv"], "argv")
    if "net_last" in expected:
        for key in ("epoch", "num_tensors"):
            out += exact(expected["net_last"][key], got["net_last"][key], f"net_last/{key}")
        out += sketch_difference(expected["net_last"], got["net_last"], WEIGHTS[name], "net_last (weights)")
    if "prompts" in expected:
        out += exact(expected["prompts"]["keys"], got["prompts"]["keys"], "prompts/keys")
        out += sketch_difference(expected["prompts"], got["prompts"], PROMPTS, "prompts")
    for key in ("metrics_csv", "stage1_metrics_csv"):
        if key in expected:
            out += loss_differences(expected[key], got[key], LOSSES[name], key)
    if "results" in expected:
        out += metric_differences(expected["results"], got["results"], "results")
        out += exact(sorted(expected["features"]), sorted(got["features"]), "features (files)")
        for file, before in expected["features"].items():
            if file in got["features"]:
                out += sketch_difference(before, got["features"][file], FEATURES[name], f"features/{file}")
    return out


def test_fixture_matches_the_generator_cases():
    # the recorded flags are the ones the generator runs; a changed case needs a regenerated file
    assert EXPECTED["format"] == generator.FORMAT, f"regenerate with {REGENERATE}"
    assert list(EXPECTED["cases"]) == list(generator.CASES)
    for name, (script, argv) in generator.CASES.items():
        assert EXPECTED["cases"][name]["script"] == script, name
        assert EXPECTED["cases"][name]["argv"] == argv, f"{name}: flags changed; regenerate with {REGENERATE}"
    assert EXPECTED["synthetic"] == generator.SYNTHETIC and EXPECTED["prepare"] == generator.PREPARE_FLAGS
    assert set(WEIGHTS) | set(FEATURES) == set(generator.CASES)


def test_tolerances_tell_a_real_change_from_rounding():
    """The comparison itself: recorded values moved by less than a tolerance pass, by more fail."""
    record = EXPECTED["cases"]["finetune_vit"]
    scale = WEIGHTS["finetune_vit"] * record["net_last"]["norm"]
    # a difference vector spread evenly over the buckets with a given norm
    spread = [scale / len(record["net_last"]["sketch"]) ** 0.5] * len(record["net_last"]["sketch"])
    for factor, ok in ((0.5, True), (2.0, False)):
        moved = json.loads(json.dumps(record))
        moved["net_last"]["sketch"] = [v + factor * d for v, d in zip(moved["net_last"]["sketch"], spread)]
        moved["metrics_csv"][0]["loss"] += factor * LOSSES["finetune_vit"]
        assert (differences("finetune_vit", record, moved) == []) == ok, factor
    moved = json.loads(json.dumps(EXPECTED["cases"]["eval_finetune_vit"]))
    split = moved["results"]["splits"]["own/split0"]
    split["rank1"] += 1.5 / split["num_query"]
    assert differences("eval_finetune_vit", EXPECTED["cases"]["eval_finetune_vit"], moved)


@pytest.mark.parametrize("name", list(EXPECTED["cases"]))
def test_same_numbers_as_before(recorded, name):
    diffs = differences(name, EXPECTED["cases"][name], recorded[name])
    assert not diffs, (f"{name} gives other numbers than recorded in {FIXTURE} ({EXPECTED['commit']}):\n  "
                       + "\n  ".join(diffs[:20]) + f"\nIf the change is deliberate, regenerate with {REGENERATE}")
