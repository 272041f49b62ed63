"""Checkpointer: exact state round trips, RNG, keep-last, crash recovery (incl. a real SIGKILL), no pickle."""
from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hsfm_train.engine import checkpoint as ckpt
from hsfm_train.engine.checkpoint import Checkpointer, decode_state, encode_state, rng_state, set_rng_state
from hsfm_train.errors import ConfigError, DataFormatError

REPO_ROOT = Path(__file__).resolve().parents[1]


def _lr_lambda(step: int) -> float:
    return 0.5 ** step


def _training(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda)
    return model, optimizer, scheduler


def _step(model, optimizer, scheduler, inputs):
    optimizer.zero_grad()
    model(inputs).pow(2).mean().backward()
    optimizer.step()
    scheduler.step()


def _tiny(value: float = 1.0) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2, 3), value)}


def test_encode_decode_round_trip_keeps_int_keys_tuples_and_tags():
    model, optimizer, scheduler = _training()
    inputs = torch.randn(8, 4)
    for _ in range(2):
        _step(model, optimizer, scheduler, inputs)
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "odd": {"__tuple__": 1}, "nested": [(1, "a", None, True, 2.5)]}
    tree, tensors = encode_state(state)
    decoded = decode_state(json.loads(json.dumps(tree)), tensors)  # through real JSON, as on disk
    assert set(decoded["optimizer"]["state"]) == {0, 1}
    assert decoded["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.95)
    assert type(decoded["optimizer"]["param_groups"][0]["betas"]) is tuple
    assert decoded["scheduler"] == state["scheduler"]
    assert decoded["odd"] == {"__tuple__": 1} and decoded["nested"] == [(1, "a", None, True, 2.5)]
    for key, value in state["optimizer"]["state"][0].items():
        assert torch.equal(decoded["optimizer"]["state"][0][key], value)
    with pytest.raises(ConfigError, match="float"):
        encode_state({1.5: 1})
    with pytest.raises(ConfigError, match="set"):
        encode_state({"a": {1, 2}})


def test_resume_from_checkpoint_is_bit_identical(tmp_path):
    model, optimizer, scheduler = _training()
    inputs = torch.randn(8, 4)
    for _ in range(2):
        _step(model, optimizer, scheduler, inputs)
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(2, model_state=model.state_dict(), optimizer_state=optimizer.state_dict(),
                      scheduler_state=scheduler.state_dict(), extra={"epoch": 1, "tokens": (3, 4)})
    loaded = checkpointer.load()
    assert loaded.step == 2 and loaded.extra == {"epoch": 1, "tokens": (3, 4)}
    assert loaded.scheduler_state["lr_lambdas"] == [None]

    resumed, resumed_optimizer, resumed_scheduler = _training(seed=123)  # different initial weights
    resumed.load_state_dict(loaded.model_state)
    resumed_optimizer.load_state_dict(loaded.optimizer_state)
    resumed_scheduler.load_state_dict(loaded.scheduler_state)
    _step(model, optimizer, scheduler, inputs)
    _step(resumed, resumed_optimizer, resumed_scheduler, inputs)
    for original, restored in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(original, restored)
    assert resumed_scheduler.get_last_lr() == scheduler.get_last_lr()


def test_dtypes_non_contiguous_and_tied_tensors(tmp_path):
    base = torch.randn(4, 6)
    state = {"bf16": base.to(torch.bfloat16), "transposed": base.t(), "tied_a": base, "tied_b": base,
             "slice": base[:, ::2], "ints": torch.arange(5, dtype=torch.int64), "flag": torch.tensor(True)}
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(7, model_state=state, include_rng=False)
    loaded = checkpointer.load()
    assert loaded.rng is None and loaded.optimizer_state is None
    assert loaded.model_state.keys() == state.keys()
    for name, tensor in state.items():
        assert loaded.model_state[name].dtype == tensor.dtype and torch.equal(loaded.model_state[name], tensor)


def test_rng_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    np.random.randn()  # leaves numpy with a cached gaussian, which must round-trip too
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(1, model_state=_tiny())
    expected = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)], np.random.randn(3))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    set_rng_state(*checkpointer.load().rng)
    actual = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)], np.random.randn(3))
    assert torch.equal(actual[0], expected[0])
    assert np.array_equal(actual[1], expected[1]) and np.array_equal(actual[3], expected[3])
    assert actual[2] == expected[2]
    # And directly, without the disk.
    tree, tensors = rng_state()
    first = torch.rand(3)
    set_rng_state(tree, tensors)
    assert torch.equal(torch.rand(3), first)


def test_keep_last_and_latest(tmp_path):
    checkpointer = Checkpointer(tmp_path, keep_last=2)
    for step in (100, 200, 300, 400):
        checkpointer.save(step, model_state=_tiny(step))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["latest", "step_00000300", "step_00000400"]
    assert (tmp_path / "latest").read_text().strip() == "step_00000400"
    assert checkpointer.latest() == tmp_path / "step_00000400"
    assert checkpointer.list() == [tmp_path / "step_00000300", tmp_path / "step_00000400"]
    assert torch.equal(checkpointer.load().model_state["w"], _tiny(400)["w"])


def test_resave_older_step_keeps_what_latest_names(tmp_path):
    checkpointer = Checkpointer(tmp_path, keep_last=1)
    checkpointer.save(1, model_state=_tiny(1))
    checkpointer.save(2, model_state=_tiny(2))
    checkpointer.save(1, model_state=_tiny(10))  # e.g. a rollback: replaces step 1 in place
    assert checkpointer.latest() == tmp_path / "step_00000001"
    assert torch.equal(checkpointer.load().model_state["w"], _tiny(10)["w"])
    assert not any(".replaced-" in p.name or ".deleting-" in p.name for p in tmp_path.iterdir())


def test_non_main_process_writes_nothing(tmp_path):
    path = Checkpointer(tmp_path / "run", is_main_process=False).save(5, model_state=_tiny())
    assert path == tmp_path / "run" / "step_00000005" and not (tmp_path / "run").exists()


def test_stale_partial_is_ignored_then_removed(tmp_path):
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(1, model_state=_tiny())
    stale = tmp_path / "step_00000002.partial-123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"w\":")
    assert checkpointer.latest() == tmp_path / "step_00000001"
    assert checkpointer.list() == [tmp_path / "step_00000001"]
    checkpointer.save(3, model_state=_tiny())
    assert not stale.exists()


def test_truncated_checkpoint_falls_back_and_load_names_the_file(tmp_path):
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(1, model_state=_tiny(1))
    checkpointer.save(2, model_state=_tiny(2))
    model_file = tmp_path / "step_00000002" / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:-7])
    with pytest.warns(UserWarning, match="model.safetensors"):
        assert checkpointer.latest() == tmp_path / "step_00000001"
    with pytest.warns(UserWarning):
        assert torch.equal(checkpointer.load().model_state["w"], _tiny(1)["w"])
    with pytest.raises(DataFormatError, match="model.safetensors"):
        checkpointer.load(tmp_path / "step_00000002")


def test_altered_file_of_same_size_fails_sha256(tmp_path):
    checkpointer = Checkpointer(tmp_path)
    path = checkpointer.save(1, model_state=_tiny(1))
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(DataFormatError, match="model.safetensors.*sha256"):
        checkpointer.load("step_00000001")


@pytest.mark.parametrize("content", [None, "step_00000009\n", "../elsewhere\n"])
def test_bad_latest_pointer_falls_back_with_warning(tmp_path, content):
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(1, model_state=_tiny(1))
    checkpointer.save(2, model_state=_tiny(2))
    if content is None:
        (tmp_path / "latest").unlink()
    else:
        (tmp_path / "latest").write_text(content)
    with pytest.warns(UserWarning, match="latest"):
        assert checkpointer.latest() == tmp_path / "step_00000002"


def test_empty_directory_and_misuse(tmp_path):
    checkpointer = Checkpointer(tmp_path / "nothing")
    assert checkpointer.latest() is None and checkpointer.list() == []
    with pytest.raises(ConfigError):
        checkpointer.load()
    with pytest.raises(ConfigError):
        Checkpointer(tmp_path, keep_last=0)
    with pytest.raises(ConfigError):
        checkpointer.save(-1, model_state=_tiny())
    with pytest.raises(ConfigError):
        checkpointer.save(1, model_state={"w": np.zeros(2)})
    assert not (tmp_path / "nothing").exists()  # bad input fails before anything is written


# Runs in a fresh interpreter; each kill point gets a forked child (one torch import for all) that saves
# step 1, then SIGKILLs itself at that instant of saving step 2. Every instant must leave a resumable run.
_KILL_SCRIPT = textwrap.dedent("""
    import json, os, shutil, signal, sys
    import safetensors.torch, torch
    from hsfm_train.engine.checkpoint import Checkpointer

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def run(point, directory):
        checkpointer = Checkpointer(directory, keep_last=1)
        checkpointer.save(1, model_state={"w": torch.ones(64, 64)}, optimizer_state={"state": {0: torch.zeros(3)}})
        if point == "swap":  # re-saving an existing step: die between moving the old copy aside and the new in
            checkpointer.save(2, model_state={"w": torch.full((64, 64), 2.0)})
        real_save_file, real_replace, real_rmtree = safetensors.torch.save_file, os.replace, shutil.rmtree

        def save_file(tensors, filename, *args, **kwargs):  # die with the file half written
            real_save_file(tensors, filename, *args, **kwargs)
            with open(filename, "r+b") as handle:
                handle.truncate(os.path.getsize(filename) // 2)
            die()

        def replace(source, target):
            name, origin = os.path.basename(target), os.path.basename(source)
            if (point == "install" and name == "step_00000002") or (point == "latest" and name == "latest") \\
                    or (point == "swap" and name == "step_00000002" and ".partial-" in origin):
                die()
            real_replace(source, target)

        def rmtree(path, *args, **kwargs):  # die half way through deleting the old checkpoint
            if point == "cleanup" and ".deleting-" in os.path.basename(path):
                os.remove(os.path.join(path, "model.safetensors"))
                die()
            real_rmtree(path, *args, **kwargs)

        if point == "save_file":
            safetensors.torch.save_file = save_file
        os.replace, shutil.rmtree = replace, rmtree
        checkpointer.save(2, model_state={"w": torch.full((64, 64), 2.0)})

    killed = {}
    for point, directory in zip(sys.argv[1::2], sys.argv[2::2]):
        pid = os.fork()
        if pid == 0:
            try:
                run(point, directory)
            finally:
                os._exit(3)
        _, status = os.waitpid(pid, 0)
        killed[point] = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    print(json.dumps(killed))
""")

# kill point -> (step latest() must return, whether a warning is expected)
_KILL_POINTS = {"save_file": (1, False), "install": (1, False), "latest": (1, False), "cleanup": (2, False),
                "swap": (2, True)}


def test_sigkill_at_any_point_of_a_save_leaves_a_loadable_checkpoint(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    arguments = [item for point in _KILL_POINTS for item in (point, str(tmp_path / point))]
    result = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, *arguments], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == dict.fromkeys(_KILL_POINTS, True)

    for point, (step, warns) in _KILL_POINTS.items():
        directory = tmp_path / point
        checkpointer = Checkpointer(directory, keep_last=1)
        with warnings.catch_warnings(record=True) as caught:
            # Not a fallback rescue: latest must still name a complete checkpoint itself.
            warnings.simplefilter("always")
            found = checkpointer.latest()
            loaded = checkpointer.load()
        assert bool(caught) == warns, (point, [str(w.message) for w in caught])
        assert found.name.startswith(f"step_{step:08d}") and loaded.step == step, point
        assert torch.equal(loaded.model_state["w"], torch.full((64, 64), float(step))), point
        if step == 1:
            assert torch.equal(loaded.optimizer_state["state"][0], torch.zeros(3))
        checkpointer.save(3, model_state=_tiny())  # the next save clears every leftover
        assert sorted(p.name for p in directory.iterdir()) == ["latest", "step_00000003"], point


def test_no_pickle_on_save_or_load(tmp_path, monkeypatch):
    model, optimizer, scheduler = _training()
    _step(model, optimizer, scheduler, torch.randn(8, 4))

    def refuse(*args, **kwargs):
        raise AssertionError("pickle was used")

    for name in ("load", "loads", "dump", "dumps", "Unpickler", "Pickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(torch, "save", refuse)
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(1, model_state=model.state_dict(), optimizer_state=optimizer.state_dict(),
                      scheduler_state=scheduler.state_dict())
    loaded = checkpointer.load()
    set_rng_state(*loaded.rng)
    assert set(loaded.optimizer_state["state"]) == {0, 1}
    source = Path(ckpt.__file__).read_text()
    assert "import pickle" not in source and "torch.load(" not in source and "torch.save(" not in source
