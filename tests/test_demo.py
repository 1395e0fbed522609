"""demo.py end to end on a tiny checkpoint, and its loud fallback to random weights."""
import json

import pytest

import clip
import demo

TINY_DEMO = ["--num_ids", "16", "--images_per_id", "3", "5", "--num_splits", "2", "--epochs", "1", "--input_size", "64", "64",
             "--device", "cpu", "--num_workers", "0"]


def read_json(path):
    with open(path) as f:
        return json.load(f)


def test_demo_runs_every_step_with_a_local_checkpoint(tmp_path, tiny_vit_checkpoint):
    out = tmp_path / "out"
    rows = demo.main(["--data_dir", str(tmp_path / "data"), "--out", str(out),
                      "--backbone_name", tiny_vit_checkpoint, *TINY_DEMO])
    names = [name for name, _ in rows]
    assert len(names) == 5 and names[0].startswith("zero-shot")
    assert any("CLIP-ReID" in n for n in names) and any("PromptSG" in n for n in names)
    assert any("CLIP-HandID" in n for n in names)
    for _, metrics in rows:
        assert len(metrics["rank1"]) == 2 and all(0 <= v <= 1 for v in metrics["mAP"])
    assert (out / "ranking_zero_shot.png").stat().st_size > 0
    assert (out / "ranking_zero_shot.pdf").stat().st_size > 0
    summary = (out / "summary.txt").read_text()
    assert "Rank-1" in summary and "±" in summary and "local checkpoint" in summary
    assert read_json(out / "demo_config.json")["pretrained"] is None
    table = [line for line in (out / "results_table.md").read_text().splitlines() if line.startswith("|")]
    assert len(table) == 2 + 5 and "CLIP-ReID" not in table[0]  # 5 methods, gallery{i}_all (clip-handid)
    for name in ("results_table.tex", "results_table.csv", "results_table_cmc.png", "results_table_roc.pdf"):
        assert (out / name).stat().st_size > 0


def test_demo_falls_back_to_random_weights_loudly(tmp_path, monkeypatch, capsys):
    """No pretrained weights: a banner, the small random model (a tinier one here, to stay fast) with
    its recipe (patch stride 8), and "pretrained": false in every output."""
    def no_network(url, root):
        raise clip.ModelDownloadError("no network")

    monkeypatch.setattr(clip.clip, "_download", no_network)
    monkeypatch.setattr(demo, "SMALL_VIT", dict(clip.clip.tiny_config("vit"), vision_patch_size=8))
    out = tmp_path / "out"
    demo.main(["--data_dir", str(tmp_path / "data"), "--out", str(out), "--methods", "finetune",
               "--download_root", str(tmp_path / "empty_cache"), *TINY_DEMO])
    printed = capsys.readouterr().out
    assert "RANDOMLY INITIALISED" in printed and "SMALL CLIP-FORMAT ViT" in printed and "no network" in printed
    assert read_json(out / "demo_config.json")["pretrained"] is False
    zero_shot_dir = out / "clip_zero_shot" / "small_vit_random_init_seed0" / "dorsal_r"
    assert read_json(zero_shot_dir / "config.json")["pretrained"] is False
    assert read_json(zero_shot_dir / "results.json")["pretrained"] is False
    config = read_json(out / "finetune" / "config.json")
    assert config["pretrained"] is False and config["model"]["backbone"]["patch_stride"] == 8
    assert sorted(p.name for p in (out / "finetune").glob("*.pth")) == ["net_best.pth", "net_last.pth"]
    assert read_json(out / "finetune" / "eval_best" / "results.json")["pretrained"] is False
    assert "RANDOM INIT" in (out / "summary.txt").read_text()


@pytest.mark.parametrize("argv, lines", [
    (["--images_per_id", "1", "1"], ["--images_per_id must be at least 2, got 1 1"]),
    (["--images_per_id", "5", "3"], ["--images_per_id MIN MAX needs MIN <= MAX, got 5 3"]),
    (["--lr", "nan"], ["--lr must be a finite number, got nan"]),
    (["--lr", "inf", "--num_ids", "8"], ["--num_ids must be at least 16, got 8", "--lr must be a finite number, got inf"]),
])
def test_demo_refuses_bad_knobs_before_drawing_data(argv, lines, tmp_path, tiny_vit_checkpoint, capsys):
    with pytest.raises(SystemExit) as info:
        demo.main(["--data_dir", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
                   "--backbone_name", tiny_vit_checkpoint, *argv])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {line}" for line in lines]
    assert not (tmp_path / "data").exists()


def test_demo_refuses_an_input_size_the_backbone_cannot_take_before_drawing_data(tmp_path, tiny_vit_checkpoint):
    with pytest.raises(SystemExit) as info:
        demo.main(["--data_dir", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
                   "--backbone_name", tiny_vit_checkpoint, "--input_size", "100", "100", "--device", "cpu"])
    message = str(info.value.code)
    assert message.startswith("error: cannot build CLIP from") and "--input_size 100 100" in message
    assert "nearest valid: height 96 or 112, width 96 or 112" in message and "\n" not in message
    assert not (tmp_path / "data").exists()


def test_demo_cpu_input_size_is_whole_patches():
    assert demo.cpu_input_size("ViT-B/16") == [112, 112] and demo.cpu_input_size("ViT-B/32") == [128, 128]
    assert demo.cpu_input_size("RN50") == [112, 112]
