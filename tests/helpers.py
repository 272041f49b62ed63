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


def grouped_angle_case(seed: int, groups: int = 3, bands: int = 14, height: int = 4, width: int = 5):
    """(prediction, target, membership, weight) for the grouped spectral angle: two samples whose last two bands
    are padding (in no group, garbage values) and whose other bands fall in 2-3 groups (interleaved in sample 0,
    contiguous in sample 1); one (sample, group, pixel) with a zero prediction, one with a zero target, one with
    prediction = target; weights in [0, 2) with zeros among them."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    real = bands - 2
    ids = torch.full((2, bands), -1)
    ids[0, :real] = torch.arange(real) % groups
    ids[1, :real] = torch.arange(real) * groups // real
    membership = torch.stack([ids == group for group in range(groups)], dim=2)
    prediction = torch.rand(2, bands, height, width, generator=generator) + 0.05
    target = torch.rand(2, bands, height, width, generator=generator) + 0.05  # generic angles, away from the clamp
    prediction[:, real:] = 1e3
    target[:, real:] = -1e3
    prediction[0, ids[0] == 1, 1, 1] = 0.0
    target[1, ids[1] == 0, 2, 3] = 0.0
    last = ids[0] == groups - 1
    target[0, last, height - 1, 0] = prediction[0, last, height - 1, 0]
    weight = 2 * torch.rand(2, groups, height, width, generator=generator)
    weight[torch.rand(weight.shape, generator=generator) < 0.2] = 0.0
    return prediction, target, membership, weight
