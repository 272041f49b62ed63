"""Selective scan (Mamba-1, seed 002): the chunked log-depth PyTorch scan and the Triton kernels (run by the
Triton interpreter on CPU) against the sequential fp32 reference, for values and the gradients of every input."""
from __future__ import annotations

import itertools
import os
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports the triton module

import pytest
import torch

from hsfm_train.kernels.selective_scan import (selective_scan_parallel, selective_scan_reference,
                                               selective_scan_triton)

RTOL, ATOL = 6e-4, 2e-3          # fp32, the public kernels' tolerances
RTOL_BF16, ATOL_BF16 = 3e-2, 5e-2
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(batch=2, dim=4, nstate=4, length=37, var_B=True, var_C=True, has_D=True, has_z=True,
                has_bias=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).requires_grad_()

    def positive(*shape, scale=1.0):  # delta > 0 with or without softplus, as in a trained model (dA <= 1)
        return (torch.rand(*shape, generator=g) * scale).to(dtype).requires_grad_()

    u = rand(batch, dim, length)
    delta = positive(batch, dim, length, scale=0.5)
    A = (-0.5 - torch.rand(dim, nstate, generator=g)).to(dtype).requires_grad_()
    B = rand(batch, nstate, length) if var_B else rand(dim, nstate)
    C = rand(batch, nstate, length) if var_C else rand(dim, nstate)
    D = rand(dim) if has_D else None
    z = rand(batch, dim, length) if has_z else None
    bias = positive(dim, scale=0.3) if has_bias else None
    return [u, delta, A, B, C, D, z, bias]


def run(fn, inputs, softplus, last_state, chunk=16, cast=None):
    """Values and the gradients of every input of a loss touching y (and the last state)."""
    args = [None if t is None else (t.detach().to(cast) if cast else t.detach()).requires_grad_()
            for t in inputs]
    out = fn(*args, delta_softplus=softplus, return_last_state=last_state, chunk_size=chunk)
    y, last = out if last_state else (out, None)
    weight = torch.linspace(-1.0, 1.0, y.shape[-1])
    loss = (y.float() * weight).sum()
    if last is not None:
        loss = loss + (last.float() * torch.linspace(-1.0, 1.0, last.numel()).view_as(last)).sum()
    present = [a for a in args if a is not None]
    grads = iter(torch.autograd.grad(loss, present))
    return y, last, [None if a is None else next(grads) for a in args]


def assert_match(got, ref, rtol=RTOL, atol=ATOL, errors=None):
    y, last, grads = got
    y_ref, last_ref, grads_ref = ref
    pairs = [("y", y, y_ref), ("last", last, last_ref)] + [(f"d{n}", a, b) for n, a, b in zip(NAMES, grads, grads_ref)]
    for name, a, b in pairs:
        assert (a is None) == (b is None), name
        if a is None:
            continue
        assert torch.isfinite(a.float()).all(), name
        torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
        if errors is not None:
            errors[name] = max(errors.get(name, 0.0), (a.float() - b.float()).abs().max().item())


# --------------------------------------------------------------------------------------------- parallel (CPU)
BC_MODES = [(True, True), (False, False), (True, False)]


@pytest.mark.parametrize("var_B,var_C", BC_MODES)
@pytest.mark.parametrize("has_D,has_z,has_bias,softplus", list(itertools.product((False, True), repeat=4)))
def test_parallel_matches_reference_values_and_grads(var_B, var_C, has_D, has_z, has_bias, softplus):
    inputs = make_inputs(var_B=var_B, var_C=var_C, has_D=has_D, has_z=has_z, has_bias=has_bias)
    last_state = has_D  # both settings of return_last_state are covered across the grid
    ref = run(selective_scan_reference, inputs, softplus, last_state)
    got = run(selective_scan_parallel, inputs, softplus, last_state, chunk=16)
    assert_match(got, ref)


@pytest.mark.parametrize("chunk", [1, 5, 16, 37, 64, None])
def test_parallel_chunk_sizes(chunk):
    inputs = make_inputs(nstate=3)
    ref = run(selective_scan_reference, inputs, True, True)
    assert_match(run(selective_scan_parallel, inputs, True, True, chunk=chunk), ref)


@pytest.mark.parametrize("var_B,var_C", [(True, True), (False, False)])
def test_parallel_long_sequence_values(var_B, var_C):
    inputs = make_inputs(batch=1, dim=3, nstate=4, length=4096, var_B=var_B, var_C=var_C)
    with torch.no_grad():
        args = [None if t is None else t.detach() for t in inputs]
        y_ref, last_ref = selective_scan_reference(*args, delta_softplus=True, return_last_state=True)
        for chunk in (None, 1000):
            y, last = selective_scan_parallel(*args, delta_softplus=True, return_last_state=True, chunk_size=chunk)
            torch.testing.assert_close(y, y_ref, rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(last, last_ref, rtol=RTOL, atol=ATOL)


def test_parallel_long_sequence_grads():
    inputs = make_inputs(batch=1, dim=2, nstate=3, length=2048)
    ref = run(selective_scan_reference, inputs, True, True)
    assert_match(run(selective_scan_parallel, inputs, True, True, chunk=512), ref)


def test_parallel_is_stable_for_large_decays():
    """delta * A of -1e4 per step (products underflow to 0, no overflow, no NaN)."""
    u, delta, A, B, C, D, z, bias = [None if t is None else t.detach() for t in make_inputs(length=300)]
    delta = delta.abs() * 100 + 50
    A = A * 100
    y_ref = selective_scan_reference(u, delta, A, B, C, D, z, bias, delta_softplus=True)
    y = selective_scan_parallel(u, delta, A, B, C, D, z, bias, delta_softplus=True, chunk_size=128)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_ref, rtol=RTOL, atol=ATOL)


def test_parallel_bf16_against_fp32_reference():
    inputs = make_inputs(dtype=torch.bfloat16)
    ref = run(selective_scan_reference, inputs, True, True, cast=torch.float32)
    got = run(selective_scan_parallel, inputs, True, True)
    assert got[0].dtype == torch.bfloat16 and got[2][0].dtype == torch.bfloat16
    assert_match(got, ref, RTOL_BF16, ATOL_BF16)


def test_shape_errors():
    u, delta, A, B, C, D, z, bias = [None if t is None else t.detach() for t in make_inputs()]
    with pytest.raises(ValueError):
        selective_scan_parallel(u, delta[:, :, :-1], A, B, C)
    with pytest.raises(ValueError):
        selective_scan_reference(u, delta, A, B[:, :2], C)
    with pytest.raises(ValueError):
        selective_scan_parallel(u, delta, A, B, C, D=D[:2])


def test_import_stays_triton_free():
    code = ("import sys; import hsfm_train.kernels, hsfm_train.kernels.selective_scan; "
            "assert 'triton' not in sys.modules, 'triton imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------- Triton (interpreter)
TRITON_CASES = [
    # nstate, dim, var_B, var_C, has_D, has_z, has_bias, softplus, last_state
    (4, 4, True, True, True, True, True, True, True),
    (3, 4, True, True, True, True, True, True, False),
    (4, 4, False, False, True, False, False, False, True),
    (3, 4, True, False, False, True, True, False, False),
    (4, 4, False, True, False, False, True, True, True),
    (3, 20, True, True, True, True, True, True, True),  # two D blocks, D padded
]


@pytest.mark.parametrize("nstate,dim,var_B,var_C,has_D,has_z,has_bias,softplus,last_state", TRITON_CASES)
def test_triton_matches_reference_values_and_grads(nstate, dim, var_B, var_C, has_D, has_z, has_bias, softplus,
                                                   last_state):
    pytest.importorskip("triton")
    inputs = make_inputs(dim=dim, nstate=nstate, var_B=var_B, var_C=var_C, has_D=has_D, has_z=has_z,
                         has_bias=has_bias)
    ref = run(selective_scan_reference, inputs, softplus, last_state)
    got = run(selective_scan_triton, inputs, softplus, last_state, chunk=16)
    assert_match(got, ref)


def test_triton_bf16_against_fp32_reference():
    pytest.importorskip("triton")
    inputs = make_inputs(nstate=3, dtype=torch.bfloat16)
    ref = run(selective_scan_reference, inputs, True, True, cast=torch.float32)
    got = run(selective_scan_triton, inputs, True, True, chunk=16)
    assert got[0].dtype == torch.bfloat16 and got[2][0].dtype == torch.bfloat16
    assert_match(got, ref, RTOL_BF16, ATOL_BF16)


def test_triton_one_chunk_longer_than_sequence():
    pytest.importorskip("triton")
    inputs = make_inputs(length=9)
    ref = run(selective_scan_reference, inputs, True, True)
    assert_match(run(selective_scan_triton, inputs, True, True, chunk=16), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton)")
def test_triton_compiled_on_cuda():
    """The compiled kernels (no interpreter: a fresh process without TRITON_INTERPRET) against the reference."""
    code = r"""
import torch
from hsfm_train.kernels.selective_scan import selective_scan_reference, selective_scan_triton
torch.manual_seed(0)
b, d, n, L = 2, 40, 16, 1000
dev = "cuda"
for var in (True, False):
    u = torch.randn(b, d, L, device=dev); dl = torch.randn(b, d, L, device=dev) * 0.5
    A = -0.5 - torch.rand(d, n, device=dev)
    B = torch.randn(b, n, L, device=dev) if var else torch.randn(d, n, device=dev)
    C = torch.randn(b, n, L, device=dev) if var else torch.randn(d, n, device=dev)
    D = torch.randn(d, device=dev); z = torch.randn(b, d, L, device=dev); bias = torch.randn(d, device=dev) * 0.3
    ins = [t.requires_grad_() for t in (u, dl, A, B, C, D, z, bias)]
    outs = []
    for f in (selective_scan_reference, selective_scan_triton):
        y, last = f(*ins, delta_softplus=True, return_last_state=True, chunk_size=256)
        loss = (y * torch.linspace(-1, 1, L, device=dev)).sum() + last.sum()
        outs.append([y, last, *torch.autograd.grad(loss, ins)])
    for a, r in zip(*outs):
        torch.testing.assert_close(a, r, rtol=6e-4, atol=2e-3)
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stdout + result.stderr
