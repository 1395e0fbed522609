"""benchmark.py --gpu and --protocol_run with --tiny on the CPU: the JSON has every row of issue 14's
table, with figures, FLOP fractions and targets (met is None off a GPU)."""
import json

import pytest

import benchmark
import benchmark_fast_paths

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_gpu_table_json_has_every_row(tmp_path):
    out = tmp_path / "bench.json"
    benchmark.main(["--gpu", "--tiny", "--device", "cpu", "--out", str(out), "--photo_dir", str(tmp_path / "photos")])
    figures = json.loads(out.read_text())["gpu"]
    assert figures["device"] == "cpu" and figures["torch"] and "cuda" in figures and figures["tiny"] is True
    rows = {(row["mode"], row["backbone"]): row for row in figures["rows"]}
    assert set(rows) == {(m, b) for m in ("train", "infer") for b in ("ViT-B/16", "RN50")}
    for (mode, backbone), row in rows.items():
        assert set(row["images_per_s"]) == {f"bf16/{path}" for path in benchmark.DATA_PATHS}  # no compile on a CPU
        assert row["eager"] == row["images_per_s"]["bf16/device"] > 0 and row["compiled"] is None
        assert row["fraction_of_peak"] == pytest.approx(row["eager"] / row["ceiling_images_per_s"])
        assert row["target_images_per_s"] == benchmark.TARGETS[mode][backbone]
        assert row["target_met"] is None  # tiny models on a CPU measure nothing


def test_gpu_refuses_a_cpu_without_tiny(tmp_path):
    with pytest.raises(SystemExit, match="CUDA"):
        benchmark.main(["--gpu", "--device", "cpu", "--out", str(tmp_path / "bench.json")])


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


def test_fast_paths_refuses_a_cpu_without_tiny(tmp_path):
    with pytest.raises(SystemExit, match="CUDA"):
        benchmark.main(["--fast_paths", "--device", "cpu", "--out", str(tmp_path / "bench.json")])
