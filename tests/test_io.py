"""utils/io.py: the one results-table formatter, the one CSV writer and the one autocast."""
import pytest
import torch

from utils import io


def test_results_table_is_mean_and_std_in_percent_with_two_decimals():
    rows = [("method A", {"rank1": [0.5, 1.0], "mAP": [0.25, 0.25]}), ("B", {"rank1": [1 / 3], "mAP": [0.0]})]
    table = io.format_results_table(rows, title="title", columns=[("Rank-1", "rank1"), ("mAP", "mAP")]).split("\n")
    assert table[0] == "title" and table[1].split(" | ") == ["method  ", "       Rank-1", "          mAP"]
    assert table[3] == "method A | 75.00 ± 35.36 |  25.00 ± 0.00"  # sample std (ddof 1) of 50 and 100  # one width for every metric column
    assert table[4] == "B        |  33.33 ± 0.00 |   0.00 ± 0.00"
    assert len({len(line) for line in table[1:]}) == 1
    with pytest.raises(KeyError):
        io.format_results_table(rows)  # the default paper columns need Rank-5 and Rank-10


def test_metrics_csv_columns_and_number_format(tmp_path):
    path = tmp_path / "m.csv"
    io.write_metrics_csv(path, [{"epoch": 1, "loss": 0.123456789}, {"epoch": 2, "acc": 0.5, "loss": None}])
    assert path.read_text() == "epoch,loss,acc\n1,0.123457,\n2,,0.5\n"
    io.write_metrics_csv(path, [{"split": 0, "x": 1 / 3, "y": 2.0}], columns=["split", "y"], float_format=".6f")
    assert path.read_text() == "split,y\n0,2.000000\n"


def test_autocast_off_for_none_and_bf16_on_request():
    x = torch.ones(2, 2)
    for amp in (None, "none"):
        with io.autocast(amp, "cpu"):
            assert (x @ x).dtype == torch.float32
    with io.autocast("bf16", "cpu"):
        assert (x @ x).dtype == torch.bfloat16


def test_seed_flag_takes_only_seeds_every_library_accepts():
    import argparse
    parser = io.add_common_args(argparse.ArgumentParser())
    assert parser.parse_args(["--seed", "4294967295"]).seed == 2 ** 32 - 1
    for bad in ("-1", str(2 ** 32), "1.5"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--seed", bad])


def test_device_flag_names_a_device_this_machine_has():
    import argparse
    parser = io.add_common_args(argparse.ArgumentParser())
    assert parser.parse_args(["--device", "cpu"]).device == "cpu"
    bad = ["foo", "cuda:99"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in bad:
        with pytest.raises(SystemExit):
            parser.parse_args(["--device", device])


def test_progress_bars_only_on_a_terminal_unless_asked(monkeypatch):
    import sys
    from utils import io as project_io
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert project_io.bars_off() is True and project_io.bars_off(None) is True  # a log or a pipe: quiet
    assert project_io.bars_off(True) is False and project_io.bars_off(False) is True
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert project_io.bars_off() is False and project_io.bars_off(False) is True
