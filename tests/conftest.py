"""Shared pytest fixtures: a tiny OpenAI-format CLIP checkpoint and a prepared synthetic 11k
dataset, each built once per test session (tests must never download anything)."""
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def vectors_dir(name):
    """Folder of the parity vectors `name`: $CLIPFH_VECTORS/<name> when set, else tests/vectors/<name>."""
    root = os.environ.get("CLIPFH_VECTORS") or os.path.join(TESTS_DIR, "vectors")
    return os.path.join(root, name)


@pytest.fixture(scope="session")
def tiny_vit_checkpoint(tmp_path_factory):
    import clip
    path = tmp_path_factory.mktemp("ckpt") / "tiny_vit.pt"
    clip.save_tiny_checkpoint(str(path), kind="vit", seed=0)
    return str(path)


@pytest.fixture(scope="session")
def tiny_rn_checkpoint(tmp_path_factory):
    import clip
    path = tmp_path_factory.mktemp("ckpt") / "tiny_rn.pt"
    clip.save_tiny_checkpoint(str(path), kind="rn", seed=0)
    return str(path)


@pytest.fixture(scope="session")
def synthetic_11k(tmp_path_factory):
    """A synthetic 11k-format dataset with its four prepared split roots (3 MC splits).
    Returns the data_dir; split roots are <data_dir>/train_val_test_split_<aspect>.
    Treat it as read-only: it is shared by every test of the session."""
    from utils import synthetic
    import prepare_train_val_test_11k_r_l as prepare
    data_dir = tmp_path_factory.mktemp("synthetic_11k") / "11k"
    synthetic.make_synthetic_11k(str(data_dir), num_ids_per_aspect=16, seed=0)
    prepare.main(["--data_dir", str(data_dir), "--num_splits", "3", "--seed", "0"])
    return str(data_dir)


@pytest.fixture(scope="session")
def hand_data(tmp_path_factory):
    """The dorsal-right split root of a synthetic 11k data set with enough identities to learn from
    (12 train / 12 test identities per aspect, 5-7 images each) and 2 query/gallery splits; shared by
    the training tests, with the part masks in <data_dir>/Hands_parts. Read-only."""
    from utils import synthetic
    import prepare_train_val_test_11k_r_l as prepare
    data_dir = tmp_path_factory.mktemp("hand_data") / "11k"
    synthetic.make_synthetic_11k(str(data_dir), num_ids_per_aspect=24, images_per_id=(5, 7), image_size=(80, 60), seed=0,
                                 part_masks=True)
    prepare.main(["--data_dir", str(data_dir), "--num_splits", "2", "--seed", "0"])
    return str(data_dir / "train_val_test_split_dorsal_r")


@pytest.fixture(scope="module")
def single_torch_thread():
    """Tiny models run fastest on one thread: with several, OpenMP spin contention makes a busy 2-core
    machine many times slower. Use with `pytestmark = pytest.mark.usefixtures("single_torch_thread")`."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def folder_split(tmp_path_factory):
    """An identity-folder data set (12 people with 4-6 photos, one with a single photo, 3 flat distractor
    photos beside it) prepared by prepare_train_val_test_folder.py with 2 splits. Returns the split root
    (<data_dir>/train_val_test_split). Read-only."""
    from utils import synthetic
    import prepare_train_val_test_folder as prepare
    base = tmp_path_factory.mktemp("folder_data")
    synthetic.make_synthetic_folder(str(base / "hands"), num_ids=12, images_per_id=(4, 6), image_size=(48, 36),
                                    distractor_dir=str(base / "strangers"), single_image_ids=1, seed=0)
    prepare.main(["--data_dir", str(base / "hands"), "--num_splits", "2", "--seed", "0", "--distractors",
                  str(base / "strangers"), "--num_workers", "0"])
    return str(base / "hands" / prepare.SPLIT_ROOT)


FOLDER_TRAINING = ["--input_size", "32", "32", "--epochs", "1", "--batch_size", "8", "--num_workers", "0",
                   "--device", "cpu", "--no-progress", "--no-final_test"]


@pytest.fixture(scope="session")
def folder_finetune_run(folder_split, tiny_vit_checkpoint, tmp_path_factory):
    """train_finetune.py, 1 epoch on folder_split: the run folder."""
    import torch
    import train_finetune
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train_finetune.main(["--data_dir", folder_split, "--f_name", str(tmp_path_factory.mktemp("folder_runs")),
                                      "--m_name", "finetune", "--backbone_name", tiny_vit_checkpoint, *FOLDER_TRAINING])
    finally:
        torch.set_num_threads(threads)
    return result["out_dir"]
