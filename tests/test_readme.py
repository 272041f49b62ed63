"""The README's promises to a new user: its Python snippets run as written, and it says how to get a CPU-only
torch from plain PyPI."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.runs import overrides, run, run_env

README = (REPO_ROOT / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_readme_says_how_to_install_a_cpu_only_torch():
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in README


@pytest.fixture(scope="module")
def user_directory(demo_dir, tmp_path_factory) -> Path:
    """What the README's commands leave behind: the main job's export and a shard folder."""
    root = tmp_path_factory.mktemp("user")
    result = run(["pretrain", *overrides(demo_dir, root / "runs" / "main-mae", "trainer.max_steps=2")], root)
    assert result.returncode == 0, result.stderr[-3000:]
    (root / "shards").mkdir()
    (root / "shards" / "mixed").symlink_to(demo_dir / "train")
    return root


@pytest.mark.parametrize("number", range(len(SNIPPETS)))
def test_readme_python_snippet_runs(user_directory, number):
    assert len(SNIPPETS) >= 2
    result = subprocess.run([sys.executable, "-c", SNIPPETS[number]], cwd=user_directory, env=run_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"README snippet {number}:\n{SNIPPETS[number]}\n{result.stderr[-3000:]}"
