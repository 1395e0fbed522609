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
    import utils
    import prepare_train_val_test_11k_r_l as prepare
    data_dir = tmp_path_factory.mktemp("synthetic_11k") / "11k"
    utils.make_synthetic_11k(str(data_dir), num_ids_per_aspect=16, seed=0)
    prepare.main(["--data_dir", str(data_dir), "--num_splits", "3", "--seed", "0"])
    return str(data_dir)
