"""Small builders shared by the data tests."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np

from hsfm_train.data.scene import Scene
from hsfm_train.data.shards import INDEX_FILE
from tests.conftest import shared_file


def samson_scene() -> Scene:
    data = np.load(shared_file("unmixing/samson/samson.npz"))
    return Scene("samson", data["cube"], data["wavelengths_nm"], "samson",
                 abundances=data["abundances"], endmembers=data["endmembers"],
                 endmember_names=list(data["endmember_names"]))


def salinas_a_scene() -> Scene:
    data = np.load(shared_file("classification/salinasA/salinasA.npz"))
    return Scene("salinasA", data["cube"], None, "aviris", labels=data["labels"])


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=array.dtype == object)
    return buffer.getvalue()


def append_handmade_shard(root: Path, file_name: str, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """Write a tar of raw members and list it in the index, as a buggy or hostile producer would."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    (root / file_name).write_bytes(buffer.getvalue())
    index = json.loads((root / INDEX_FILE).read_text())
    index["shards"].append({"file": file_name, "samples": len(samples), "bytes": len(buffer.getvalue()),
                            "sha256": hashlib.sha256(buffer.getvalue()).hexdigest(), "band_sets": {}})
    index["total_samples"] += len(samples)
    (root / INDEX_FILE).write_text(json.dumps(index))


def meta_bytes(bands: int, band_set: str, scene: str = "handmade") -> bytes:
    return json.dumps({"schema": 1, "scene": scene, "bands": bands, "band_set": band_set, "sensor": "samson",
                       "origin": [0, 0], "size": [16, 16]}).encode()
