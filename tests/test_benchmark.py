"""benchmark.py --gpu and --protocol_run with --tiny on the CPU: the JSON has every row of issue 14's
table, with figures, FLOP fractions and targets (met is None off a GPU). Bad flags and a foreign --out
file are refused in one line each, before any part runs."""
import json
import os
import subprocess
import sys

import pytest

import benchmark
import benchmark_fast_paths
from benchmark_throughput import DATA_PATHS, TARGETS

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_gpu_table_json_has_every_row(tmp_path):
    out = tmp_path / "bench.json"
    benchmark.main(["--gpu", "--tiny", "--device", "cpu", "--out", str(out), "--photo_dir", str(tmp_path / "photos")])
    figures = json.loads(out.read_text())["gpu"]
    assert figures["device"] == "cpu" and figures["torch"] and "cuda" in figures and figures["tiny"] is True
    rows = {(row["mode"], row["backbone"]): row for row in figures["rows"]}
    assert set(rows) == {(m, b) for m in ("train", "infer") for b in ("ViT-B/16", "RN50")}
    for (mode, backbone), row in rows.items():
        assert set(row["images_per_s"]) == {f"bf16/{path}" for path in DATA_PATHS}  # no compile on a CPU
        assert row["eager"] == row["images_per_s"]["bf16/device"] > 0 and row["compiled"] is None
        assert row["fraction_of_peak"] == pytest.approx(row["eager"] / row["ceiling_images_per_s"])
        assert row["target_images_per_s"] == TARGETS[mode][backbone]
        assert row["target_met"] is None  # tiny models on a CPU measure nothing


def test_gpu_refuses_a_cpu_without_tiny(tmp_path, capsys):
    assert refused(["--gpu", "--device", "cpu", "--out", str(tmp_path / "bench.json")], capsys) == [
        "error: --gpu measures a CUDA GPU; pass --device cuda (or --tiny for a CPU smoke run)"]


def test_protocol_run_times_training_and_evaluation(tmp_path):
    out = tmp_path / "bench.json"
    benchmark.main(["--protocol_run", "--tiny", "--device", "cpu", "--out", str(out),
                    "--photo_dir", str(tmp_path / "protocol")])
    run = json.loads(out.read_text())["protocol_run"]
    assert set(run["seconds"]) == {"generate", "prepare", "train", "evaluate"}
    assert run["end_to_end_s"] == pytest.approx(run["seconds"]["train"] + run["seconds"]["evaluate"])
    assert run["train_images"] > 0 and run["test_images"] > 0 and run["num_splits"] == 2
    assert run["target_s"] == 180 and run["target_met"] is None
    with open(f"{run['run_dir']}/config.json") as f:
        args = json.load(f)["args"]
    assert args["cache_resized"] == "" and args["gpu_augment"] is False  # the CPU default; on CUDA it is on
    again = benchmark.main(["--protocol_run", "--tiny", "--device", "cpu", "--out", str(out),  # its own data: remade
                            "--photo_dir", str(tmp_path / "protocol")])
    assert again["protocol_run"]["num_splits"] == 2


def test_protocol_run_never_rewrites_a_users_data_set(tmp_path, monkeypatch):
    mine = tmp_path / "photos" / "11k" / "HandInfo.csv"  # a data set the benchmark did not make
    mine.parent.mkdir(parents=True)
    mine.write_text("id,age\n")
    with monkeypatch.context() as patch:
        patch.setitem(benchmark.PARTS, "protocol_run", no_work)
        with pytest.raises(SystemExit) as info:
            benchmark.main(["--protocol_run", "--tiny", "--device", "cpu", "--out", str(tmp_path / "b.json"),
                            "--photo_dir", str(tmp_path / "photos")])
    assert str(info.value).startswith(f"error: --photo_dir: {mine.parent} holds something benchmark.py did not make")
    assert mine.read_text() == "id,age\n" and not (tmp_path / "b.json").exists()


def test_fast_paths_runs_each_configuration_as_its_own_process(tmp_path):
    out = tmp_path / "bench.json"
    benchmark.main(["--fast_paths", "--tiny", "--device", "cpu", "--out", str(out), "--photo_dir", str(tmp_path),
                    "--fast_paths_configs", "all_off"])
    figures = json.loads(out.read_text())["fast_paths"]
    assert figures["measured"] is False and figures["epochs"] == 2
    row = figures["train"]["ViT-B/16"]["all_off"]
    assert row["wall_s"] > sum(row["epoch_seconds"]) > 0 and len(row["epoch_seconds"]) == 2
    assert row["projected_protocol_s"] == pytest.approx(row["wall_s"] + 68 * row["epoch_to_epoch_s"])
    assert figures["evaluate"]["all_off"]["wall_s"] > 0 and figures["encode"]["8"]["all_off"]["wall_s"] > 0
    log = (tmp_path / "fast_paths" / "ViT-B-16_all_off.log").read_text()
    assert "utils.speed switches off: channels_last, cudnn_benchmark" in log  # the switches reached the child
    with open(tmp_path / "fast_paths" / "ViT-B-16_all_off" / "config.json") as f:
        assert json.load(f)["args"]["gpu_augment"] is False  # and the flags
    assert "encoded 8 images" in (tmp_path / "fast_paths" / "encode8_all_off.log").read_text()


def test_fast_path_decisions_compare_on_with_off():
    rows = {"defaults": {"wall_s": 50.0}, "compile_cold": {"wall_s": 80.0}, "compile_warm": {"wall_s": 45.0},
            "no_gpu_augment": {"wall_s": 60.0}, "bf16": {"wall_s": 40.0}}
    found = benchmark_fast_paths.decisions(rows, "wall_s")
    assert set(found) == {"compile (first run)", "compile (inductor cache warm)", "gpu_augment"}  # no fp32 row
    assert found["compile (first run)"] == {"on": "compile_cold", "off": "defaults", "on_s": 80.0, "off_s": 50.0,
                                            "on_wins": False}
    assert found["compile (inductor cache warm)"]["on_wins"] and found["gpu_augment"]["on_wins"]


def test_fast_paths_refuses_a_cpu_without_tiny(tmp_path, capsys):
    assert refused(["--fast_paths", "--device", "cpu", "--out", str(tmp_path / "bench.json")], capsys) == [
        "error: --fast_paths measures a CUDA GPU; pass --device cuda (or --tiny for a CPU smoke run)"]


# ---- bad input ----

def no_work(args):
    raise AssertionError("a part ran before the input was checked")


def refused(argv, capsys):
    """The error lines of a command line benchmark.py refuses with exit status 2 before any part runs."""
    with pytest.MonkeyPatch.context() as patch:
        for name in benchmark.PARTS:
            patch.setitem(benchmark.PARTS, name, no_work)
        with pytest.raises(SystemExit) as info:
            benchmark.main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err.splitlines()


def test_each_bad_number_is_its_own_line_before_any_work(tmp_path, capsys):
    out = str(tmp_path / "bench.json")
    lines = refused(["--out", out, "--repeats", "0", "--metrics_shape", "-5", "100", "--search_sizes", "-10",
                     "--search_queries", "0", "--decode_images", "0", "--tiny", "--iters", "0",
                     "--protocol_ids", "1", "--peak_tflops", "0", "--bench_workers", "-1"], capsys)
    assert lines == ["error: --repeats must be at least 1, got 0", "error: --decode_images must be at least 1, got 0",
                     "error: --search_sizes must be at least 1, got -10",
                     "error: --search_queries must be at least 1, got 0",
                     "error: --protocol_ids must be at least 3, got 1", "error: --iters must be at least 1, got 0",
                     "error: --bench_workers must be at least 0, got -1",
                     "error: --peak_tflops must be positive, got 0.0",
                     "error: --metrics_shape Q G needs at least 1 query and 5 gallery entries (the verification "
                     "part draws G/5 identities), got -5 100"]
    assert refused(["--out", out, "--matches_per_query", "0"], capsys) == [
        "error: --matches_per_query must be at least 1, got 0"]
    assert refused(["--out", out, "--metrics_shape", "10", "20", "--matches_per_query", "1", "30"], capsys) == [
        "error: --matches_per_query 30 is more than the gallery of --metrics_shape (20); give at most 20"]
    assert not os.listdir(tmp_path)


def test_backbones_are_checked_before_any_work(tmp_path, capsys):
    out = str(tmp_path / "bench.json")
    [line] = refused(["--only", "infer", "--backbones", "ViT-X/99", "--out", out], capsys)
    assert line.startswith("error: --backbones: ViT-X/99 is not an official CLIP name; choose from RN50 ")
    [line] = refused(["--only", "infer", "--tiny", "--backbones", "ViT-B/16", "--input_size", "8", "8", "--out", out],
                     capsys)
    assert line == ("error: backbone ViT-B/16: input size (8, 8) is smaller than the patch size 16 (--input_size, "
                    "--stride, --last_stride)")
    assert refused(["--protocol_run", "--tiny", "--input_size", "40", "40", "--out", out], capsys) == [
        "error: --input_size 40 40: the tiny ViT-B/16 checkpoint of --tiny --protocol_run / --fast_paths needs a "
        "height that is a multiple of 16"]


def test_out_is_checked_before_any_work(tmp_path, capsys):
    assert refused(["--only", "metrics", "--out", str(tmp_path)], capsys) == [
        f"error: --out {tmp_path} is a folder; name a JSON file, e.g. {tmp_path / 'benchmark_results.json'}"]
    missing = tmp_path / "no" / "bench.json"
    assert refused(["--only", "metrics", "--out", str(missing)], capsys) == [
        f"error: --out {missing}: the folder {missing.parent} does not exist; create it or choose another --out"]
    assert os.listdir(tmp_path) == []


def test_tiny_fills_only_the_flags_left_out():
    full, tiny = benchmark.parse_args([]), benchmark.parse_args(["--tiny"])
    assert full.search_sizes == [10_000, 100_000, 1_000_000] and tiny.search_sizes == [1000, 5000]
    assert (full.protocol_ids, full.input_size, full.fast_paths_epochs) == (290, [224, 224], 70)
    assert (tiny.protocol_ids, tiny.input_size, tiny.fast_paths_epochs) == (8, [32, 32], 2)
    given = benchmark.parse_args(["--tiny", "--search_sizes", "7", "--protocol_ids", "5", "--input_size", "64", "48",
                                  "--fast_paths_epochs", "3", "--iters", "4", "--protocol_epochs", "2"])
    assert given.search_sizes == [7] and given.protocol_ids == 5 and given.input_size == [64, 48]
    assert (given.fast_paths_epochs, given.iters, given.protocol_epochs) == (3, 4, 2)
    assert given.search_queries == 8 and given.photo_size == [64, 48]  # the ones left out: --tiny's


def test_out_of_another_program_is_refused_unless_force(tmp_path, monkeypatch):
    results = tmp_path / "results.json"  # an evaluation's
    results.write_text(json.dumps({"metrics": {"Rank-1": 91.5}, "config": {"seed": 0}}))
    before = results.read_bytes()
    argv = ["--only", "verification", "--metrics_shape", "20", "50", "--out", str(results)]
    with monkeypatch.context() as patch:
        patch.setitem(benchmark.PARTS, "verification", no_work)
        with pytest.raises(SystemExit) as info:
            benchmark.main(argv)
    assert str(info.value) == (f"error: --out {results} holds something benchmark.py did not write (no "
                               f"\"benchmark\" key); choose another --out, or pass --force to replace it")
    assert results.read_bytes() == before
    broken = tmp_path / "notes.json"
    broken.write_text("not JSON at all")
    with pytest.raises(SystemExit, match="pass --force to replace it"):
        benchmark.main(["--only", "verification", "--metrics_shape", "20", "50", "--out", str(broken)])
    assert broken.read_text() == "not JSON at all"

    benchmark.main(argv + ["--force"])
    replaced = json.loads(results.read_text())
    assert set(replaced) == {"benchmark", "verification", "runs"}
    assert replaced["benchmark"] == {"program": "benchmark.py", "format": 1}
    benchmark.main(["--only", "metrics", "--metrics_shape", "20", "50", "--out", str(results)])  # ours: merged
    merged = json.loads(results.read_text())
    assert merged["verification"] == replaced["verification"] and merged["metrics"]["shape_QxG"] == [20, 50]
    assert set(merged["runs"]) == {"verification", "metrics"}


def test_a_benchmark_file_from_before_the_marker_is_merged_into(tmp_path):
    out = tmp_path / "bench.json"
    out.write_text(json.dumps({"decode": {"speedup": 3.2}, "runs": {"decode": {"git_commit": "abc"}}}))
    benchmark.main(["--only", "verification", "--metrics_shape", "20", "50", "--out", str(out)])
    found = json.loads(out.read_text())
    assert found["decode"] == {"speedup": 3.2} and found["verification"]["shape_QxG"] == [20, 50]
    assert found["benchmark"]["program"] == "benchmark.py"


@pytest.mark.parametrize("module, line", [
    ("benchmark_protocol", "benchmark_protocol.py is run by `python benchmark.py --protocol_run` (see its --help); "
                           "run that instead"),
    ("benchmark_fast_paths", "benchmark_fast_paths.py is the child process of `python benchmark.py --fast_paths` "
                             "(see its --help); run that instead")])
def test_a_part_module_run_alone_says_what_to_run(module, line):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(repo, f"{module}.py"), "--help"], cwd=repo,
                          capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr.splitlines()) == (1, "", [line])
