"""Shared fixtures. Real benchmark data is read from ../shared/data (or $HSFM_SHARED_DATA); on a clone
without it, the tests that need it skip with a reason that says where it was looked for."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("HSFM_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def shared_file(relative: str) -> Path:
    """Path of a file under the shared data folder; skips the calling test when it is absent."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real benchmark data not found: {path} (set HSFM_SHARED_DATA to the shared/data folder)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real benchmark data folder not found: {SHARED_DATA} (set HSFM_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """The main job's demo shards (train and eval), built once for the session."""
    from hsfm_train.data.demo import build_demo_shards

    directory = tmp_path_factory.mktemp("demo")
    build_demo_shards(directory)
    return directory
