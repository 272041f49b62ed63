"""An index names only files inside its own folder: no pipe:, URLs, absolute or parent paths; remote sources
are an explicit loader setting (shard_source). Also the cheap size check of `hsfm shards inspect`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hsfm_train.cli import main
from hsfm_train.data.pipeline import LoaderConfig, StreamingLoader
from hsfm_train.data.scene import Scene
from hsfm_train.data.shards import (
    INDEX_FILE,
    ShardBuildConfig,
    build_shards,
    check_shard_files,
    load_index,
    open_shard,
    shard_urls,
)
from hsfm_train.data.tiling import TilingConfig
from hsfm_train.errors import ConfigError, DataFormatError, UnsafeDataError

MARKER = "MARKER"
FIRST_SHARD = "shard-000000.tar"


def tiny_shards(root: Path) -> Path:
    """4 tiles of 8 bands in 2 shards: a few KiB, built in milliseconds."""
    cube = np.random.default_rng(0).random((16, 16, 8), dtype=np.float32)
    scene = Scene("tiny", cube, np.linspace(400.0, 900.0, 8), "tiny")
    build_shards([scene], ShardBuildConfig(str(root), max_samples_per_shard=2, tiling=TilingConfig(8)))
    return root


def set_first_file(root: Path, file: object) -> None:
    index = json.loads((root / INDEX_FILE).read_text())
    index["shards"][0]["file"] = file
    (root / INDEX_FILE).write_text(json.dumps(index))


def hostile_entries(root: Path) -> dict[str, str]:
    return {
        "pipe": f"pipe:touch {MARKER}; cat {FIRST_SHARD}",
        "absolute": str(root.resolve() / FIRST_SHARD),
        "parent": f"../{FIRST_SHARD}",
        "dotdot_inside": f"sub/../{FIRST_SHARD}",
        "url": f"http://example.com/{FIRST_SHARD}",
    }


HOSTILE = ["pipe", "absolute", "parent", "dotdot_inside", "url"]


@pytest.fixture
def shards(tmp_path) -> Path:
    return tiny_shards(tmp_path / "ds")


@pytest.mark.parametrize("kind", HOSTILE)
def test_load_index_refuses_a_file_outside_the_folder(shards, kind):
    bad = hostile_entries(shards)[kind]
    set_first_file(shards, bad)
    with pytest.raises(UnsafeDataError) as caught:
        load_index(shards)
    message = str(caught.value)
    assert "\n" not in message
    assert str(shards / INDEX_FILE) in message and "shards[0]" in message and repr(bad) in message
    assert "shard_source" in message


@pytest.mark.parametrize("kind", HOSTILE)
def test_streaming_loader_refuses_before_opening_anything(shards, kind, monkeypatch):
    set_first_file(shards, hostile_entries(shards)[kind])
    monkeypatch.chdir(shards)  # `shards=.` leaves a pipe: entry intact after the join
    with pytest.raises(UnsafeDataError, match=r"shards\[0\]"):
        loader = StreamingLoader(LoaderConfig(shards=".", batch_size=2, num_workers=0, resampled=False))
        next(iter(loader))  # unfixed code got here and ran the pipe: command
    assert not (shards / MARKER).exists()


@pytest.mark.parametrize("verify", [False, True])
@pytest.mark.parametrize("kind", HOSTILE)
def test_inspect_reports_a_hostile_entry_in_one_line(shards, kind, verify, capsys):
    bad = hostile_entries(shards)[kind]
    set_first_file(shards, bad)
    assert main(["shards", "inspect", str(shards), *(["--verify"] if verify else [])]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("hsfm: error: ") and "\n" not in error
    assert "shards[0]" in error and repr(bad) in error


@pytest.mark.parametrize("verify", [False, True])
def test_inspect_from_inside_the_folder_never_runs_a_pipe_entry(shards, verify, monkeypatch, capsys):
    set_first_file(shards, hostile_entries(shards)["pipe"])
    monkeypatch.chdir(shards)
    assert main(["shards", "inspect", ".", *(["--verify"] if verify else [])]) == 2
    assert "pipe:touch" in capsys.readouterr().err
    assert not (shards / MARKER).exists()


@pytest.mark.parametrize("entry", [
    "shard-000000.tar",  # not a mapping
    {"samples": 2, "bytes": 10},  # no file
    {"file": 7, "samples": 2, "bytes": 10},
    {"file": "x.tar", "samples": True, "bytes": 10},
    {"file": "x.tar", "samples": -1, "bytes": 10},
    {"file": "x.tar", "samples": "2", "bytes": 10},
])
def test_load_index_refuses_a_malformed_entry(shards, entry):
    index = json.loads((shards / INDEX_FILE).read_text())
    index["shards"][1] = entry
    (shards / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(DataFormatError, match=r"shards\[1\]") as caught:
        load_index(shards)
    assert str(shards / INDEX_FILE) in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("name", [".hidden.tar", "a b.tar", "x.tar;id", "C:x.tar", "back\\slash.tar", "..", ""])
def test_other_unsafe_names_are_refused(shards, name):
    set_first_file(shards, name)
    with pytest.raises(UnsafeDataError, match=r"shards\[0\]"):
        load_index(shards)


def test_shard_urls_local_by_default_and_templated_when_asked(shards):
    index = load_index(shards)
    files = [record["file"] for record in index["shards"]]
    assert shard_urls(index) == [str(shards / f) for f in files]
    assert shard_urls(index, None) == shard_urls(index)
    assert shard_urls(index, "pipe:aws s3 cp s3://bucket/ds/{file} -") == [
        f"pipe:aws s3 cp s3://bucket/ds/{f} -" for f in files]
    assert shard_urls(index, "https://host/ds/{file}") == [f"https://host/ds/{f}" for f in files]
    assert shard_urls(index, "/mnt/other/{file}") == [f"/mnt/other/{f}" for f in files]


@pytest.mark.parametrize("source", ["https://host/ds/", "pipe:cat {name}", "/mnt/{file}/{0}", "/mnt/{file"])
def test_a_source_template_must_use_only_the_file_placeholder(shards, source):
    with pytest.raises(ConfigError, match="shard_source") as caught:
        shard_urls(load_index(shards), source)
    assert repr(source) in str(caught.value)


def test_open_shard_reads_local_paths_and_never_runs_them(shards, tmp_path, monkeypatch):
    path = shards / FIRST_SHARD
    with open_shard(str(path), remote=False) as stream:
        assert stream.read() == path.read_bytes()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError):
        open_shard(f"pipe:touch {MARKER}", remote=False)
    assert not (tmp_path / MARKER).exists()


def test_open_shard_uses_gopen_only_when_remote(shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open_shard(f"pipe:cat {shards / FIRST_SHARD}", remote=True) as stream:
        assert stream.read() == (shards / FIRST_SHARD).read_bytes()


def test_inspect_without_verify_catches_a_truncated_shard(shards, capsys):
    shard = shards / "shard-000001.tar"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])
    assert check_shard_files(load_index(shards)) == [
        f"{shard}: {size // 2} bytes on disk, index says {size} (truncated or changed)"]
    assert main(["shards", "inspect", str(shards)]) == 1
    out = capsys.readouterr().out
    assert "shard-000001.tar" in out and "1 problem(s)" in out

    assert main(["shards", "inspect", str(shards), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["files"]["shards"] == 2
    assert len(report["files"]["problems"]) == 1 and "shard-000001.tar" in report["files"]["problems"][0]


def test_inspect_without_verify_catches_a_missing_shard(shards, capsys):
    (shards / "shard-000001.tar").unlink()
    assert main(["shards", "inspect", str(shards)]) == 1
    assert "shard-000001.tar: listed in the index but missing" in capsys.readouterr().out


def test_inspect_of_an_intact_folder_passes(shards, capsys):
    assert check_shard_files(load_index(shards)) == []
    assert main(["shards", "inspect", str(shards)]) == 0
    assert "0 problem(s)" in capsys.readouterr().out
    assert main(["shards", "inspect", str(shards), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["files"]["problems"] == []


@pytest.mark.parametrize("name", ["../evil", "a b", "-dash", "x;y", ""])
def test_build_refuses_a_name_whose_files_would_be_refused(tmp_path, name):
    with pytest.raises(ConfigError, match="shard name"):
        ShardBuildConfig(str(tmp_path), name=name)
