"""benchmark.py --gpu and --protocol_run with --tiny on the CPU: the JSON has every row of issue 14's
table, with figures, FLOP fractions and targets (met is None off a GPU)."""
import json

import pytest

import benchmark

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
