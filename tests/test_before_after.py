"""Before/after parity of the trainers and evaluators across internal refactors (the split of
utils.py into the utils/ package, the move of the trainers' loops).

tests/make_before_after.py runs one small fixed configuration of train_finetune (tiny ViT and tiny
ResNet), train_clipreid, train_promptsg, the zero-shot evaluator and the fine-tuned-model evaluator
through their public main(argv) on synthetic data (seed 0, CPU, one torch thread), and
tests/data/before_after.json holds what it recorded before the refactor: sha256 of the net_last.pth
model weights (and CLIP-ReID's prompts), the loss columns of metrics.csv, and the evaluators'
per-split metrics. Here the same cases run again and must give exactly (==) the same values.

A refactor must not change any of them. If a value changes on purpose (a deliberate fix), regenerate
the file and commit it with the fix, saying why:

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
        pytest.skip(f"{FIXTURE} was recorded under other versions ({', '.join(changed)}); bit-identical "
                    f"numbers are only expected under the same ones")
    return generator.record(str(tmp_path_factory.mktemp("before_after")))


def differences(expected, got, path=""):
    """Paths at which two JSON-like values differ (exact comparison, also of the types int / float)."""
    if isinstance(expected, dict) and isinstance(got, dict):
        out = [f"{path}/{k}: missing" for k in expected if k not in got]
        out += [f"{path}/{k}: not recorded before" for k in got if k not in expected]
        for k in expected:
            if k in got:
                out += differences(expected[k], got[k], f"{path}/{k}")
        return out
    if isinstance(expected, list) and isinstance(got, list):
        if len(expected) != len(got):
            return [f"{path}: {len(expected)} items before, {len(got)} now"]
        return [d for i, (e, g) in enumerate(zip(expected, got)) for d in differences(e, g, f"{path}[{i}]")]
    if type(expected) is not type(got) or expected != got:
        return [f"{path}: {expected!r} before, {got!r} now"]
    return []


def test_fixture_matches_the_generator_cases():
    # the recorded flags are the ones the generator runs; a changed case needs a regenerated file
    assert list(EXPECTED["cases"]) == list(generator.CASES)
    for name, (script, argv) in generator.CASES.items():
        assert EXPECTED["cases"][name]["script"] == script, name
        assert EXPECTED["cases"][name]["argv"] == argv, f"{name}: flags changed; regenerate with {REGENERATE}"
    assert EXPECTED["synthetic"] == generator.SYNTHETIC and EXPECTED["prepare"] == generator.PREPARE_FLAGS


@pytest.mark.parametrize("name", list(EXPECTED["cases"]))
def test_same_numbers_as_before(recorded, name):
    diffs = differences(EXPECTED["cases"][name], recorded[name])
    assert not diffs, (f"{name} gives other numbers than recorded in {FIXTURE} ({EXPECTED['commit']}):\n  "
                       + "\n  ".join(diffs[:20]) + f"\nIf the change is deliberate, regenerate with {REGENERATE}")
