"""The fused Triton spectral-angle kernels (kernels/sam_triton.py) against the PyTorch references, on CPU under
TRITON_INTERPRET=1: values and prediction gradients for every reduction, with and without row weights, chunked
and single-tile rows, low-precision inputs, and the degenerate rows (identical, anti-parallel, zero, B = 1); and
the grouped kernel on images [N, B, H, W] against the grouped reference (groups, padded bands, the affine map,
strides, several band chunks and pixel blocks).

The interpreter is orders of magnitude slower than torch, so every size here is tiny (N <= 16 rows; images of a
few pixels and <= 16 bands)."""
from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys

# Triton decides at decoration time whether a kernel is interpreted: set the flag before the module is loaded.
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from tests.helpers import grouped_angle_case  # noqa: E402
from hsfm_train.kernels.sam_loss import (COSINE_CLAMP, grouped_spectral_angle_reference,  # noqa: E402
                                         spectral_angle_reference)

_MODULE = "hsfm_train.kernels.sam_triton"
sam_triton = importlib.import_module(_MODULE)
if not isinstance(sam_triton._spectral_angle_fwd_kernel, InterpretedFunction):
    # imported earlier in this process without the flag (compiled kernels cannot take CPU tensors): redefine
    sam_triton = importlib.reload(sam_triton)
fused_spectral_angle = sam_triton.fused_spectral_angle
fused_grouped_spectral_angle = sam_triton.fused_grouped_spectral_angle

FP32 = {"rtol": 6e-4, "atol": 2e-3}  # the public kernels' fp32 tolerances (METHODS.md)
TIGHT = {"rtol": 1e-5, "atol": 1e-5}  # what this kernel actually achieves in fp32 (measured max error ~4e-6)
LOW = {"rtol": 3e-2, "atol": 5e-2}  # bf16 / fp16 inputs against the fp32 reference
REDUCTIONS = ("mean", "sum", "none")
PARALLEL_FLOOR = 1e-3  # arccos(fp32(1 - 1e-7)) ~ 4.9e-4 rad: the clamp's floor on identical rows


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _both(prediction, target, weight=None, reduction="mean", grad_output=None, **kwargs):
    """(fused value, fused prediction grad, reference value, reference prediction grad)."""
    results = []
    for function in (fused_spectral_angle, spectral_angle_reference):
        leaf = prediction.detach().clone().requires_grad_(True)
        value = function(leaf, target, weight, reduction, **kwargs) if function is fused_spectral_angle \
            else function(leaf, target, weight, reduction)
        seed = torch.ones_like(value) if grad_output is None else grad_output
        (grad,) = torch.autograd.grad(value, leaf, seed)
        results += [value.detach(), grad]
    return results


def test_kernel_runs_interpreted_and_the_package_stays_triton_free():
    assert os.environ["TRITON_INTERPRET"] == "1"
    assert isinstance(sam_triton._spectral_angle_fwd_kernel, InterpretedFunction)
    code = "import sys, hsfm_train.kernels; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


_COMPILE_FOR_SM90 = """
import itertools, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from hsfm_train.kernels import sam_triton
fn = sam_triton._spectral_angle_fwd_kernel
assert isinstance(fn, triton.runtime.jit.JITFunction), type(fn)
for dtype, (single, block_n, block_b), weighted in itertools.product(
        ["fp32", "bf16", "fp16"], [(True, 4, 256), (False, 1, 4096)], [True, False]):
    signature = {"p_ptr": "*" + dtype, "t_ptr": "*" + dtype, "w_ptr": "*fp32",
                 "grad_ptr": "*fp32" if dtype == "fp16" else "*" + dtype, "weighted_ptr": "*fp32",
                 "row_weight_ptr": "*fp32", "N": "i32", "B": "i32", "stride_p": "i32", "stride_t": "i32",
                 "stride_g": "i32", "eps_sq": "fp32", "clamp": "fp32"}
    constants = {"HAS_WEIGHT": weighted, "COMPUTE_GRAD": True, "SINGLE_CHUNK": single, "BLOCK_N": block_n,
                 "BLOCK_B": block_b}
    signature.update({name: "constexpr" for name in constants})
    source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in constants.items()})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    assert ".entry" in kernel.asm["ptx"] and ".local" not in kernel.asm["ptx"]  # no register spills to local
grouped = sam_triton._grouped_spectral_angle_fwd_kernel
assert isinstance(grouped, triton.runtime.jit.JITFunction), type(grouped)
for dtype, groups, affine in itertools.product(["fp32", "bf16", "fp16"], [2, 3], [True, False]):
    signature = {"p_ptr": "*" + dtype, "t_ptr": "*fp32", "group_ptr": "*i32", "scale_ptr": "*fp32",
                 "offset_ptr": "*fp32", "w_ptr": "*fp32", "grad_ptr": "*fp32" if dtype == "fp16" else "*" + dtype,
                 "weighted_ptr": "*fp32", "pixel_weight_ptr": "*fp32", "B": "i32", "HW": "i32", "W": "i32"}
    signature.update({f"stride_{tensor}{dim}": "i32" for tensor in "ptg" for dim in "nbhw"})
    signature.update({"eps_sq": "fp32", "clamp": "fp32"})
    constants = {"GROUPS": groups, "HAS_WEIGHT": True, "HAS_AFFINE": affine, "COMPUTE_GRAD": True,
                 "BLOCK_G": triton.next_power_of_2(groups), "BLOCK_B": 16, "BLOCK_PIX": 128}
    signature.update({name: "constexpr" for name in constants})
    source = ASTSource(grouped, signature,
                       constexprs={(grouped.arg_names.index(k),): v for k, v in constants.items()})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    assert ".entry" in kernel.asm["ptx"] and ".local" not in kernel.asm["ptx"]
print("compiled")
"""


def test_kernel_compiles_for_a_gpu_without_one():
    """The interpreter accepts code the compiler rejects (non-constexpr globals, type mismatches): compile the
    real kernels (rows and grouped) to PTX for sm_90 (no GPU or driver needed), in a process without
    TRITON_INTERPRET."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True,
                            timeout=300)
    if result.returncode != 0 and "ptxas" in result.stderr and "not found" in result.stderr.lower():
        pytest.skip("no ptxas in this triton install")
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]


def test_arccos_polynomial_is_accurate_to_1e7():
    """The A&S 4.4.46 arccos (no libdevice under the interpreter), through the kernel: one-band rows give
    cosine +-1 only, so use two-band rows (1, 0) . (cos a, sin a) whose cosine sweeps [-1, 1]."""
    angles = torch.linspace(0, math.pi, 16, dtype=torch.float64)
    target = torch.stack([angles.cos(), angles.sin()], dim=1).float()
    prediction = torch.tensor([[1.0, 0.0]]).expand(16, 2).contiguous()
    fused = fused_spectral_angle(prediction, target, reduction="none")
    expected = spectral_angle_reference(prediction, target, reduction="none")
    torch.testing.assert_close(fused, expected, rtol=0, atol=3e-7)


@pytest.mark.parametrize("bands,block_b", [(1, None), (3, None), (7, None), (64, None), (200, None), (200, 64),
                                           (1100, 256)])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_values_and_gradients_match_the_reference(bands, block_b, weighted):
    generator = _generator(bands)
    rows = 16 if bands <= 200 else 6
    prediction = torch.randn(rows, bands, generator=generator)
    target = prediction * 0.5 + torch.randn(rows, bands, generator=generator)  # spread of angles, not all ~pi/2
    prediction[2] = 0  # an undefined row among the others
    weight = None
    if weighted:
        weight = torch.rand(rows, generator=generator) * 2
        weight[torch.rand(rows, generator=generator) < 0.3] = 0
    for reduction in REDUCTIONS:
        grad_output = torch.rand(rows, generator=generator) + 0.5 if reduction == "none" else torch.tensor(1.7)
        value, grad, ref_value, ref_grad = _both(prediction, target, weight, reduction, grad_output,
                                                 block_b=block_b)
        assert value.dtype == torch.float32 and value.shape == ref_value.shape
        torch.testing.assert_close(value, ref_value, **TIGHT)
        torch.testing.assert_close(grad, ref_grad, **TIGHT)
        torch.testing.assert_close(grad, ref_grad, **FP32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    generator = _generator(1)
    prediction = (torch.rand(16, 200, generator=generator) + 0.05)
    target = prediction + 0.2 * torch.randn(16, 200, generator=generator)
    weight = (torch.rand(16, generator=generator) > 0.25).float()
    for reduction in REDUCTIONS:
        value, grad, ref_value, ref_grad = _both(prediction.to(dtype), target.to(dtype), weight, reduction)
        # the reference on the same low-precision inputs also accumulates in fp32: nearly identical
        torch.testing.assert_close(value, ref_value, **TIGHT)
        assert grad.dtype == dtype and torch.isfinite(grad.float()).all()
        torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=1e-2, atol=1e-3)
        # and against the fp32 reference on the fp32 inputs
        _, _, fp32_value, fp32_grad = _both(prediction, target, weight, reduction)
        torch.testing.assert_close(value, fp32_value, **LOW)
        torch.testing.assert_close(grad.float(), fp32_grad, **LOW)


def test_mixed_input_dtypes_are_cast_inside():
    generator = _generator(3)
    prediction = torch.randn(8, 33, generator=generator)
    target = torch.randn(8, 33, generator=generator).to(torch.bfloat16)
    value, grad, ref_value, ref_grad = _both(prediction, target, reduction="sum")
    torch.testing.assert_close(value, ref_value, **TIGHT)
    torch.testing.assert_close(grad, ref_grad, **TIGHT)
    # float64 inputs are computed in fp32 too (as the reference), the gradient comes back as float64
    value, grad, ref_value, ref_grad = _both(prediction.double(), target.double(), reduction="mean")
    assert value.dtype == torch.float32 and grad.dtype == torch.float64
    torch.testing.assert_close(value, ref_value, **TIGHT)
    torch.testing.assert_close(grad, ref_grad, **TIGHT)


def test_identical_anti_parallel_and_zero_rows():
    target = torch.tensor([[0.2, 0.5, 0.9, 0.1], [0.3, 0.3, 0.3, 0.3], [0.0, 0.0, 0.0, 0.0], [0.4, 0.1, 0.2, 0.8],
                           [1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    prediction = torch.tensor([[0.2, 0.5, 0.9, 0.1], [0.0, 0.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4],
                               [0.1, 0.9, 0.3, 0.2], [-2.0, -4.0, -6.0, -8.0], [0.0, 0.0, 0.0, 0.0],
                               [0.0, 1.0, 0.0, 0.0]])
    # rows: identical, zero prediction, zero target, generic, anti-parallel, both zero, orthogonal
    angles = fused_spectral_angle(prediction, target, reduction="none")
    assert 0 < angles[0].item() < PARALLEL_FLOOR
    assert angles[1].item() == 0.0 and angles[2].item() == 0.0 and angles[5].item() == 0.0
    assert angles[4].item() == pytest.approx(math.pi, abs=PARALLEL_FLOOR)
    assert angles[6].item() == pytest.approx(math.pi / 2, abs=1e-6)
    torch.testing.assert_close(angles, spectral_angle_reference(prediction, target, reduction="none"), **TIGHT)
    leaf = prediction.clone().requires_grad_(True)
    loss = fused_spectral_angle(leaf, target)
    # the mean is over the 4 defined rows (0, 3, 4, 6): the zero rows are left out
    assert loss.item() == pytest.approx((angles[0] + angles[3] + angles[4] + angles[6]).item() / 4, rel=1e-6)
    loss.backward()
    assert torch.isfinite(leaf.grad).all()
    zero_rows = [0, 1, 2, 4, 5]  # clamped (identical, anti-parallel) or undefined
    assert (leaf.grad[zero_rows] == 0).all()
    assert leaf.grad[3].abs().sum() > 0 and leaf.grad[6].abs().sum() > 0
    _, _, _, ref_grad = _both(prediction, target)
    torch.testing.assert_close(leaf.grad, ref_grad, **TIGHT)


def test_one_band_rows():
    prediction = torch.tensor([[2.0], [-1.0], [0.0], [3.0]])
    target = torch.tensor([[1.0], [4.0], [5.0], [0.0]])
    for reduction in REDUCTIONS:
        value, grad, ref_value, ref_grad = _both(prediction, target, reduction=reduction)
        torch.testing.assert_close(value, ref_value, **TIGHT)
        assert (grad == 0).all() and (ref_grad == 0).all()  # |c| = 1 always: the clamp is active


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_zero_give_zero_not_nan(reduction):
    prediction = torch.zeros(5, 9, requires_grad=True)
    target = torch.rand(5, 9, generator=_generator(4))
    loss = fused_spectral_angle(prediction, target, torch.ones(5), reduction)
    assert torch.equal(loss.detach(), spectral_angle_reference(prediction, target, torch.ones(5), reduction))
    assert (loss == 0).all()
    loss.sum().backward()
    assert (prediction.grad == 0).all()
    # nothing selected by the weights: the mean is 0 as well
    assert fused_spectral_angle(torch.ones(3, 4), torch.rand(3, 4), torch.zeros(3)).item() == 0.0


def test_weights_select_and_scale_rows_like_the_reference():
    prediction = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    target = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    weight = torch.tensor([2.0, 1.0, 5.0, 0.0])
    none = fused_spectral_angle(prediction, target, weight, reduction="none")
    torch.testing.assert_close(none, torch.tensor([math.pi, math.pi / 4, 0.0, 0.0]))
    assert fused_spectral_angle(prediction, target, weight, "sum").item() == pytest.approx(1.25 * math.pi)
    assert fused_spectral_angle(prediction, target, weight).item() == pytest.approx(1.25 * math.pi / 3)
    # a bool mask works as the reference's weight.float()
    mask = torch.tensor([True, False, False, False])
    assert fused_spectral_angle(prediction, target, mask).item() == pytest.approx(math.pi / 2)


def test_only_the_prediction_gets_a_gradient():
    generator = _generator(5)
    prediction = torch.randn(4, 6, generator=generator, requires_grad=True)
    target = torch.randn(4, 6, generator=generator, requires_grad=True)
    weight = torch.rand(4, generator=generator, requires_grad=True)
    fused_spectral_angle(prediction, target, weight).backward()
    assert prediction.grad is not None and target.grad is None and weight.grad is None


def test_backward_rescales_the_stored_gradient_and_can_run_twice():
    generator = _generator(6)
    prediction = torch.randn(6, 10, generator=generator, requires_grad=True)
    target = torch.randn(6, 10, generator=generator)
    loss = fused_spectral_angle(prediction, target)
    (first,) = torch.autograd.grad(loss, prediction, torch.tensor(1.0), retain_graph=True)
    (second,) = torch.autograd.grad(loss, prediction, torch.tensor(-3.0))
    torch.testing.assert_close(second, -3.0 * first)  # the stored gradient is not modified in place


def test_no_gradient_buffer_without_grad(monkeypatch):
    calls = []
    original = sam_triton._forward

    def spy(*args):
        weighted, row_weight, grad = original(*args)
        calls.append(grad)
        return weighted, row_weight, grad

    monkeypatch.setattr(sam_triton, "_forward", spy)
    prediction = torch.randn(3, 5, requires_grad=True)
    with torch.no_grad():
        fused_spectral_angle(prediction, torch.randn(3, 5))
    fused_spectral_angle(prediction.detach(), torch.randn(3, 5))
    fused_spectral_angle(prediction, torch.randn(3, 5))
    assert calls[0] is None and calls[1] is None and calls[2] is not None


def test_strided_inputs():
    generator = _generator(7)
    wide = torch.randn(8, 40, generator=generator)
    prediction = wide[:, 3:23]  # row stride 40
    target = torch.randn(8, 40, generator=generator)[:, ::2]  # band stride 2 (copied)
    value, grad, ref_value, ref_grad = _both(prediction, target, reduction="none")
    torch.testing.assert_close(value, ref_value, **TIGHT)
    torch.testing.assert_close(grad, ref_grad, **TIGHT)


def test_empty_batch():
    assert fused_spectral_angle(torch.zeros(0, 5), torch.zeros(0, 5)).item() == 0.0
    assert fused_spectral_angle(torch.zeros(0, 5), torch.zeros(0, 5), reduction="none").shape == (0,)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="expected two"):
        fused_spectral_angle(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="expected two"):
        fused_spectral_angle(torch.ones(2, 3, 1), torch.ones(2, 3, 1))
    with pytest.raises(ValueError, match="reduction"):
        fused_spectral_angle(torch.ones(2, 3), torch.ones(2, 3), reduction="max")
    with pytest.raises(ValueError, match="weight"):
        fused_spectral_angle(torch.ones(2, 3), torch.ones(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="power of two"):
        fused_spectral_angle(torch.ones(2, 3), torch.ones(2, 3), block_b=100)


def test_clamp_constant_is_the_reference_one():
    assert sam_triton.COSINE_CLAMP == COSINE_CLAMP == 1.0 - 1e-7


# ------------------------------------------------------------------------------------------ grouped images


def _small_grouped_case(seed: int, groups: int = 3, bands: int = 11, height: int = 3, width: int = 5):
    """The shared grouped case at interpreter size (the kernel runs as Python here)."""
    return grouped_angle_case(seed, groups, bands, height, width)


def _grouped_both(prediction, target, membership, weight, reduction="mean", grad_output=None, scale=None,
                  offset=None, **blocks):
    """(fused value, fused prediction grad, reference value, reference prediction grad)."""
    results = []
    for function in (fused_grouped_spectral_angle, grouped_spectral_angle_reference):
        leaf = prediction.detach().clone().requires_grad_(True)
        extra = blocks if function is fused_grouped_spectral_angle else {}
        value = function(leaf, target, membership, weight, reduction, scale=scale, offset=offset, **extra)
        seed = torch.ones_like(value) if grad_output is None else grad_output
        (grad,) = torch.autograd.grad(value, leaf, seed)
        results += [value.detach(), grad]
    return results


@pytest.mark.parametrize("groups", [2, 3])
@pytest.mark.parametrize("blocks", [{}, {"block_b": 4, "block_pix": 4}], ids=["default-tiles", "small-tiles"])
@pytest.mark.parametrize("affine", [False, True], ids=["reflectance", "normalised"])
def test_grouped_kernel_matches_the_grouped_reference(groups, blocks, affine):
    """Small tiles: 11 bands in 3 chunks of 4 (the last one partial), 15 pixels in 4 programs of 4 per sample."""
    prediction, target, membership, weight = _small_grouped_case(groups, groups)
    scale = offset = None
    if affine:
        generator = _generator(40)
        scale, offset = 0.05 + torch.rand(2, 11, generator=generator), torch.rand(2, 11, generator=generator)
    for reduction in REDUCTIONS:
        grad_output = torch.rand(weight.shape, generator=_generator(41)) + 0.5 if reduction == "none" \
            else torch.tensor(1.3)
        value, grad, ref_value, ref_grad = _grouped_both(prediction, target, membership, weight, reduction,
                                                         grad_output, scale, offset, **blocks)
        assert value.dtype == torch.float32 and value.shape == ref_value.shape
        torch.testing.assert_close(value, ref_value, **TIGHT)
        torch.testing.assert_close(grad, ref_grad, **TIGHT)
        assert (grad[:, 9:] == 0).all() and grad.abs().sum() > 0  # padded bands: no gradient
    angles = fused_grouped_spectral_angle(prediction, target, membership, weight, "none", scale=scale,
                                          offset=offset)
    if not affine:
        assert angles[0, 1, 1, 1] == 0  # zero-norm prediction in group 1
        assert angles[1, 0, 2, 3] < PARALLEL_FLOOR * 2  # identical in group 0


def test_grouped_kernel_reads_strided_images_and_low_precision():
    prediction, target, membership, weight = _small_grouped_case(7)
    wide = torch.zeros(2, 11, 3, 9)
    wide[..., 2:7] = prediction
    strided_prediction = wide[..., 2:7]  # row stride 9
    channels_last = target.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # band stride 1
    assert not strided_prediction.is_contiguous() and not channels_last.is_contiguous()
    value, grad, ref_value, ref_grad = _grouped_both(strided_prediction, channels_last, membership, weight, "none",
                                                     torch.ones(weight.shape))
    torch.testing.assert_close(value, ref_value, **TIGHT)
    torch.testing.assert_close(grad, ref_grad, **TIGHT)
    for dtype in (torch.bfloat16, torch.float16):
        value, grad, ref_value, ref_grad = _grouped_both(prediction.to(dtype), target, membership, weight)
        torch.testing.assert_close(value, ref_value, **TIGHT)  # both read the same rounded inputs in fp32
        assert grad.dtype == dtype and torch.isfinite(grad.float()).all()
        torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=1e-2, atol=1e-3)


def test_grouped_kernel_gradient_only_for_the_prediction_and_none_without_grad(monkeypatch):
    prediction, target, membership, weight = _small_grouped_case(8, 2)
    leaves = [t.clone().requires_grad_(True) for t in (prediction, target, weight)]
    scale = torch.rand(2, 11, requires_grad=True)
    fused_grouped_spectral_angle(leaves[0], leaves[1], membership, leaves[2], scale=scale).backward()
    assert leaves[0].grad is not None and leaves[1].grad is None and leaves[2].grad is None and scale.grad is None
    calls = []
    original = sam_triton._grouped_forward

    def spy(*args):
        weighted, pixel_weight, grad = original(*args)
        calls.append(grad)
        return weighted, pixel_weight, grad

    monkeypatch.setattr(sam_triton, "_grouped_forward", spy)
    with torch.no_grad():
        fused_grouped_spectral_angle(leaves[0], target, membership, weight)
    fused_grouped_spectral_angle(prediction, target, membership, weight)
    fused_grouped_spectral_angle(leaves[0], target, membership, weight)
    assert calls[0] is None and calls[1] is None and calls[2] is not None


def test_grouped_kernel_degenerate_inputs():
    prediction, target, membership, weight = _small_grouped_case(9, 2)
    assert fused_grouped_spectral_angle(prediction, target, membership, torch.zeros_like(weight)).item() == 0.0
    leaf = torch.zeros_like(prediction, requires_grad=True)
    loss = fused_grouped_spectral_angle(leaf, target, membership, weight)
    loss.backward()
    assert loss.item() == 0.0 and (leaf.grad == 0).all()
    assert fused_grouped_spectral_angle(prediction, target, torch.zeros_like(membership), weight).item() == 0.0
    empty = torch.zeros(0, 11, 3, 5)
    assert fused_grouped_spectral_angle(empty, empty, membership[:0], weight[:0]).item() == 0.0
    with pytest.raises(ValueError, match="membership"):
        fused_grouped_spectral_angle(prediction, target, membership.float(), weight)
    with pytest.raises(ValueError, match="power of two"):
        fused_grouped_spectral_angle(prediction, target, membership, weight, block_pix=6)
