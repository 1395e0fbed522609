"""reproduce.py: a tiny recipe end to end on a CPU, a second call that runs nothing, an interrupted call
that continues where it stopped, --dry_run of every recipe, and recipes that cannot run."""
import json
import os
import shlex
import shutil

import pandas as pd
import pytest

import reproduce
from utils import recipe_steps, recipes, training

pytestmark = pytest.mark.usefixtures("single_torch_thread")
# zero-shot and fine-tuning, ViT-B/16, on 11k dorsal right and HD: 8 steps of the clip-handid recipe
SUBSET = ["--only", "method=zero-shot,finetune", "backbone=ViT-B/16", "test=dorsal_r,HD"]


def run(out, *extra):
    return reproduce.main(["--recipe", "clip-handid", "--tiny", "--out", str(out), *extra])


def table_files(out):
    folder = out / "clip-handid"
    return {name: (folder / name).read_text() for name in ("table.md", "table.tex", "table.csv")}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The subset run once: (output root, the first call's result, its table files)."""
    out = tmp_path_factory.mktemp("reproduce")
    result = run(out, *SUBSET)
    return out, result, table_files(out)


def test_tiny_recipe_runs_end_to_end_in_the_clip_handid_layout(finished):
    out, result, files = finished
    assert len(result["ran"]) == 8 and result["skipped"] == []
    assert sum(i.startswith("prepare") for i in result["ran"]) == 2 and sum(i.startswith("train") for i in result["ran"]) == 2
    header = files["table.md"].splitlines()[0]
    assert header == "| Method | 11k dorsal right: Rank-1 | 11k dorsal right: mAP | HD: Rank-1 | HD: mAP |"
    assert "backbone: ViT-B-16-tiny" in files["table.md"]  # one backbone: said under the table
    rows = [line for line in files["table.md"].splitlines()[2:] if line.startswith("|")]
    assert [r.split(" | ")[0] for r in rows] == ["| Zero-shot", "| Fine-tuned"]
    assert "–" not in rows[0] and "–" not in rows[1]  # every cell filled: the fine-tuned row has both data sets
    assert "\\multicolumn{2}{c}{dorsal right}" in files["table.tex"] and "\\multicolumn{2}{c}{HD}" in files["table.tex"]
    frame = pd.read_csv(out / "clip-handid" / "table.csv")
    assert list(frame["test_set"]) == ["11k dorsal right", "HD", "11k dorsal right", "HD"]
    for name in ("table_cmc.pdf", "table_roc.pdf", "ranking_best.pdf", "ranking_best.png"):
        assert (out / "clip-handid" / name).stat().st_size > 1000
    record = json.loads((out / "clip-handid" / "reproduce.json").read_text())
    assert record["summary"] == result["summary"] and len(record["steps"]) == 8
    assert "ran 8 step(s) (2 prepare, 2 train, 4 evaluate), skipped 0 finished, 0 failed" in result["summary"]


def test_second_call_runs_nothing_and_gives_the_same_table(finished, capsys):
    out, _, files = finished
    again = run(out, *SUBSET)
    assert again["ran"] == [] and len(again["skipped"]) == 8
    assert table_files(out) == files
    assert "ran 0 step(s), skipped 8 finished, 0 failed" in capsys.readouterr().out


def test_interrupted_call_continues_where_it_stopped(finished, tmp_path, monkeypatch):
    """Ctrl-C in the second epoch of the training: the call stops (exit 130) with epoch 1 kept; the next
    call resumes the run from it, evaluates it and gets the numbers of an uninterrupted run."""
    subset = ["--only", "method=finetune", "backbone=ViT-B/16", "test=dorsal_r"]
    real_epoch, calls = training.train_one_epoch, []

    def interrupted_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(training, "train_one_epoch", interrupted_epoch)
    with pytest.raises(SystemExit) as stopped:
        run(tmp_path, *subset)
    assert stopped.value.code == reproduce.INTERRUPTED
    run_dir = tmp_path / "runs" / "finetune_ViT-B-16_dorsal_r_seed0"
    assert (run_dir / "net_last.pth").is_file() and recipe_steps.metrics_rows(str(run_dir)) == 1
    assert not (run_dir / "eval_clip-handid_dorsal_r").exists()
    monkeypatch.setattr(training, "train_one_epoch", real_epoch)
    plan = recipe_steps.Plan(recipes.load("clip-handid"), reproduce.parse_args(
        ["--recipe", "clip-handid", "--tiny", "--out", str(tmp_path), *subset]), recipes.load_tiny_profile())
    assert [recipe_steps.status(s)[0] for s in plan.steps] == ["done", "resume", "run"]
    result = run(tmp_path, *subset)
    assert result["ran"] == ["train-finetune_ViT-B-16_dorsal_r_seed0",
                             "evaluate-finetune_ViT-B-16_dorsal_r_seed0-on-dorsal_r"]
    assert "resumed from" in (run_dir / "train.log").read_text() and recipe_steps.metrics_rows(str(run_dir)) == 2
    # the resumed run ends where the uninterrupted one of the first test did
    resumed = json.loads((run_dir / "eval_clip-handid_dorsal_r" / "results.json").read_text())
    whole = json.loads((finished[0] / "runs" / "finetune_ViT-B-16_dorsal_r_seed0" / "eval_clip-handid_dorsal_r"
                        / "results.json").read_text())
    for a, b in zip(resumed["rows"], whole["rows"]):
        assert a["rank1"] == pytest.approx(b["rank1"], abs=1e-9) and a["mAP_hand"] == pytest.approx(b["mAP_hand"], abs=1e-6)


def test_outputs_with_other_flags_are_refused_without_force(finished, monkeypatch, capsys):
    out, _, _ = finished
    profile = recipes.load_tiny_profile()
    profile["flags"]["train"] = [t if t != "2" else "3" for t in profile["flags"]["train"]]  # --epochs 3
    monkeypatch.setattr(recipes, "load_tiny_profile", lambda path=None: profile)
    with pytest.raises(SystemExit, match="finetune_ViT-B-16_dorsal_r_seed0 records other flags than recipe clip-handid "
                                         "asks for \\(--epochs: 3, recorded 2\\).*--force"):
        run(out, *SUBSET)
    args = ["--recipe", "clip-handid", "--tiny", "--out", str(out), *SUBSET, "--dry_run"]
    reproduce.main(args)
    printed = capsys.readouterr().out
    assert "stale (--epochs: 3, recorded 2)" in printed and "--epochs 3" in printed and "--force" in printed


def test_dry_run_prints_every_command_of_every_recipe(tmp_path, capsys):
    expected = {"clip-handid": 2 + 20 * 3 + 10 + 20 * 3, "clip-fh": 1 + 4 * 3 + 2 + 4 * 3,
                "cross-aspect": 2 + 16 * 3 + 10 + 16 * 3 * 5}
    for name, count in expected.items():
        result = reproduce.main(["--recipe", name, "--out", str(tmp_path / "out"), "--data_root", str(tmp_path),
                                 "--seeds", "0", "1", "2", "--dry_run"])
        assert len(result["steps"]) == count
        lines = capsys.readouterr().out.splitlines()
        commands = [line for line in lines if line.startswith("python ")]
        assert len(commands) == count and f"{name} (dry run): {count} steps" in lines[-1]
        for line in commands:  # every command is one its script accepts
            script, *argv = shlex.split(line)[1:]
            recipe_steps.load_script(script).parse_args(argv)
        protocol = recipes.load(name)["protocol"]
        assert all(f"--protocol {protocol}" in c for c in commands if "eval_query" in c)
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_only_filters_steps_and_bad_recipes_are_one_line(tmp_path):
    args = ["--recipe", "clip-fh", "--out", str(tmp_path), "--dry_run"]
    steps = reproduce.main([*args, "--only", "method=clipreid", "backbone=RN50"])["steps"]
    assert [s["id"] for s in steps] == ["prepare-11k", "train-clipreid_RN50_dorsal_r_seed0",
                                        "evaluate-clipreid_RN50_dorsal_r_seed0-on-dorsal_r"]
    with pytest.raises(SystemExit, match="--only method=handid: recipe clip-fh has clipreid, promptsg, zero-shot"):
        reproduce.main([*args, "--only", "method=handid"])
    with pytest.raises(SystemExit, match="--recipe nothing: no such recipe; choose one of clip-fh, clip-handid, "
                                         "cross-aspect"):
        reproduce.main(["--recipe", "nothing", "--dry_run"])
    recipe = json.loads(open(os.path.join(recipes.RECIPE_DIR, "clip-fh.json")).read())
    broken = [({"train": "nowhere/train_val_test_split"}, "split root nowhere/train_val_test_split lies in nowhere/"),
              ({"method": "finetune"}, "method 'finetune' is not in \"methods\""),
              ({"train": None}, "method clipreid trains: give \"train\""),
              ({"train_flags": ["--no_such_flag", "1"]}, "train_clipreid.py refuses the flags --data_dir .* "
                                                         "unrecognized arguments: --no_such_flag 1")]
    for change, message in broken:
        bad = dict(recipe, runs=[{**recipe["runs"][1], "method": "clipreid", **change}])
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(SystemExit, match=message.replace("(", "\\(")):
            reproduce.main(["--recipe", str(path), "--dry_run"])


def test_a_failing_step_is_reported_and_the_rest_goes_on(tmp_path, capsys):
    """A step that fails (here a subprocess: the HD prepare script on a folder without HD data) gives
    its exit code and its last line; the steps that need it are not run, the others are."""
    step = {"script": "prepare_train_val_test_hd.py", "kind": "prepare"}
    log = tmp_path / "logs" / "step.log"
    code = reproduce.run_step(step, ["--data_dir", str(tmp_path / "missing")], "subprocess", str(log))
    assert code == 1 and "--data_dir" in reproduce.last_line(str(log)) and "missing" in reproduce.last_line(str(log))
    import train_finetune

    def broken(argv=None):
        raise SystemExit("error: a failure of this run")

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(train_finetune, "main", broken)
    try:
        with pytest.raises(SystemExit) as failed:
            run(tmp_path / "out", "--only", "method=zero-shot,finetune", "backbone=ViT-B/16", "test=dorsal_r")
    finally:
        monkeypatch.undo()
    assert failed.value.code == 1
    printed = capsys.readouterr().out
    assert "FAILED (exit 1)" in printed and "error: a failure of this run" in printed
    assert "ran 2 step(s) (1 prepare, 1 evaluate), skipped 0 finished, 1 failed, 1 not run after a failure" in printed
    assert (tmp_path / "out" / "clip-handid" / "table.md").is_file()  # the table of what finished


def write_recipe(tmp_path, change, base="clip-fh"):
    """A copy of a shipped recipe with `change(recipe)` applied, as a file; returns its path."""
    recipe = json.loads(open(os.path.join(recipes.RECIPE_DIR, f"{base}.json")).read())
    change(recipe)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(recipe))
    return str(path)


def set_run(key, value):
    return lambda recipe: recipe["runs"][0].update({key: value})


LIST_OF_STRINGS = "must be a string or a non-empty list of strings, got"
WRONG_FIELDS = {  # id: (change, what the one line says)
    "data-list": (lambda r: r.update(data=["11k"]), "\"data\" must be a non-empty object {data folder: "),
    "methods-list": (lambda r: r.update(methods=[]), "\"methods\" must be a non-empty object {method: "),
    "table-list": (lambda r: r.update(table=["rank1"]), "\"table\" must be an object {\"layout\""),
    "columns-string": (lambda r: r["table"].update(columns="rank1"),
                       "table.columns must be a non-empty list of metrics, got \"rank1\""),
    "protocol-list": (lambda r: r.update(protocol=["clip-fh"]),
                      "\"protocol\" must be one of clip-handid, clip-reid, clip-fh, got ['clip-fh']"),
    "nested-method": (set_run("method", [["zero-shot"]]), f"runs[0]: \"method\" {LIST_OF_STRINGS} [[\"zero-shot\"]]"),
    "backbone-int": (set_run("backbone", 16), f"runs[0]: \"backbone\" {LIST_OF_STRINGS} 16"),
    "backbone-empty": (set_run("backbone", []), f"runs[0]: \"backbone\" {LIST_OF_STRINGS} []"),
    "test-int": (set_run("test", 5), f"runs[0]: \"test\" {LIST_OF_STRINGS} 5"),
    "test-empty": (set_run("test", []), f"runs[0]: \"test\" {LIST_OF_STRINGS} []"),
    "train-empty": (lambda r: r["runs"][1].update(train=[]), f"runs[1]: \"train\" {LIST_OF_STRINGS} []"),
    "root-empty-part": (set_run("test", "11k/"), "runs[0]: split root '11k/' must be '<data folder>/<split root>'"),
    "name-escapes": (lambda r: r.update(name="../escaped"),
                     "\"name\" must be a plain folder name (no / or \\, not starting with a dot), got '../escaped'"),
    "name-int": (lambda r: r.update(name=7), "\"name\" must be a plain folder name"),
    "name-dotdot": (lambda r: r.update(name=".."), "\"name\" must be a plain folder name"),
    "name-reserved": (lambda r: r.update(name="runs"), "\"name\" 'runs' is a folder reproduce.py keeps under --out"),
    "backbone-unknown": (set_run("backbone", "ViT-X/99"),
                         "backbone 'ViT-X/99' is neither one of CLIP's models nor a checkpoint file; use one of RN50"),
}


@pytest.mark.parametrize("change, message", WRONG_FIELDS.values(), ids=WRONG_FIELDS.keys())
def test_recipe_fields_of_the_wrong_kind_are_one_line_naming_file_and_field(tmp_path, change, message):
    path = write_recipe(tmp_path, change)
    with pytest.raises(SystemExit) as refused:
        reproduce.main(["--recipe", path, "--out", str(tmp_path / "out"), "--dry_run"])
    assert str(refused.value).startswith(f"error: recipe {path}: ") and "\n" not in str(refused.value)
    assert message in str(refused.value)


def test_unknown_backbone_under_tiny_is_refused_before_any_step(tmp_path):
    """Before: a traceback (KeyError) from the tiny flags of the zero-shot run, or the other steps first."""
    path = write_recipe(tmp_path, set_run("backbone", ["ViT-B/16", "ViT-X/99"]))
    with pytest.raises(SystemExit, match="the tiny profile has no tiny model for backbone 'ViT-X/99' \\(it has ViT-B/16, "
                                         "RN50"):
        reproduce.main(["--recipe", path, "--tiny", "--out", str(tmp_path / "out"), "--only", "backbone=ViT-B/16"])
    assert not (tmp_path / "out").exists()


def test_a_file_where_an_output_folder_goes_is_one_line_before_any_step(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("a user's file")
    for out in (blocker, blocker / "sub"):
        with pytest.raises(SystemExit, match=f"^error: --out {out}: {blocker} is a file where reproduce.py needs a "
                                             f"folder; move it away or choose another --out$"):
            run(out, "--only", "method=zero-shot", "backbone=ViT-B/16", "test=dorsal_r")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "clip-handid").write_text("a user's file")
    with pytest.raises(SystemExit, match="clip-handid is a file where reproduce.py needs a folder"):
        run(tmp_path / "out", "--only", "method=zero-shot", "backbone=ViT-B/16", "test=dorsal_r")
    assert sorted(os.listdir(tmp_path / "out")) == ["clip-handid"] and blocker.read_text() == "a user's file"


def test_a_copied_out_folder_keeps_its_finished_steps(finished, tmp_path, monkeypatch, capsys):
    out, _, files = finished
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    again = run(copy, *SUBSET)
    assert again["ran"] == [] and len(again["skipped"]) == 8
    copied = table_files(copy)  # the same table (table.csv names its source folders: the copy's)
    assert copied["table.md"] == files["table.md"] and copied["table.tex"] == files["table.tex"]
    # a real difference is still refused, naming only that flag
    profile = recipes.load_tiny_profile()
    profile["flags"]["train"] = [t if t != "1e-3" else "2e-3" for t in profile["flags"]["train"]]
    monkeypatch.setattr(recipes, "load_tiny_profile", lambda path=None: profile)
    capsys.readouterr()
    run(copy, *SUBSET, "--dry_run")
    printed = capsys.readouterr().out
    assert "stale (--lr: 0.002, recorded 0.001)" in printed and "recorded " + str(out) not in printed


def test_paths_are_compared_relative_to_a_moved_root_and_by_content(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    for root, content in ((old, b"weights"), (new, b"weights")):
        (root / "checkpoints").mkdir(parents=True)
        (root / "checkpoints" / "m.pt").write_bytes(content)
    want, roots = str(new / "checkpoints" / "m.pt"), [str(new)]
    assert recipe_steps.same_location(want, str(old / "checkpoints" / "m.pt"), roots)  # a copy
    assert recipe_steps.same_location(want, str(tmp_path / "gone" / "checkpoints" / "m.pt"), roots)  # moved away
    assert not recipe_steps.same_location(want, str(old / "checkpoints" / "other.pt"), roots)
    assert not recipe_steps.same_location(want, str(old / "checkpoints" / "m.pt"), [])  # not below a root
    (old / "checkpoints" / "m.pt").write_bytes(b"other weights")
    assert not recipe_steps.same_location(want, str(old / "checkpoints" / "m.pt"), roots)  # another checkpoint
