"""The compiled Triton kernels against their PyTorch references on a CUDA GPU (no interpreter): values and
gradients of the fused spectral-angle loss (fp32 and bf16, every reduction, with row weights, rows longer than
one tile) and of the selective scan (input-dependent and time-invariant B/C, long sequences). Prints one line per
case with the largest errors, writes them as JSON, and exits 1 if any case is outside its tolerance.

    python benchmarks/gpu_kernel_check.py --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from hsfm_train.kernels.sam_loss import spectral_angle_reference
from hsfm_train.kernels.selective_scan import selective_scan_reference, selective_scan_triton


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def check_sam(device: str) -> list[dict]:
    from hsfm_train.kernels.sam_triton import fused_spectral_angle

    cases = []
    for rows, bands, dtype, reduction, weighted in [(4096, 224, torch.float32, "mean", False),
                                                    (4096, 224, torch.float32, "sum", True),
                                                    (1000, 1100, torch.float32, "none", False),
                                                    (16384, 224, torch.bfloat16, "mean", True)]:
        torch.manual_seed(0)
        prediction = torch.randn(rows, bands, device=device, dtype=dtype)
        target = (prediction.float() + 0.3 * torch.randn(rows, bands, device=device)).to(dtype)
        prediction[:3] = 0  # zero rows: angle 0, no gradient
        weight = torch.rand(rows, device=device) if weighted else None
        outputs = []
        for function in (fused_spectral_angle, spectral_angle_reference):
            leaf = prediction.detach().clone().requires_grad_()
            # the reference accumulates in fp32 whatever the input; compare against it in fp32
            value = function(leaf if function is fused_spectral_angle else leaf.float(), target.float()
                             if function is spectral_angle_reference else target, weight, reduction)
            (value.sum()).backward()
            outputs.append((value.detach(), leaf.grad))
        tolerance = 1e-4 if dtype == torch.float32 else 2e-2
        value_error, grad_error = max_error(outputs[0][0], outputs[1][0]), max_error(outputs[0][1], outputs[1][1])
        cases.append({"kernel": "sam", "rows": rows, "bands": bands, "dtype": str(dtype), "reduction": reduction,
                      "weighted": weighted, "value_error": value_error, "grad_error": grad_error,
                      "ok": value_error <= tolerance and grad_error <= tolerance})
    return cases


def check_scan(device: str) -> list[dict]:
    cases = []
    for variable, length in [(True, 1000), (False, 1000), (True, 4096)]:
        torch.manual_seed(0)
        batch, channels, state = 2, 40, 16
        u = torch.randn(batch, channels, length, device=device)
        delta = torch.randn(batch, channels, length, device=device) * 0.5
        A = -0.5 - torch.rand(channels, state, device=device)
        B = torch.randn(batch, state, length, device=device) if variable else torch.randn(channels, state, device=device)
        C = torch.randn(batch, state, length, device=device) if variable else torch.randn(channels, state, device=device)
        D, z = torch.randn(channels, device=device), torch.randn(batch, channels, length, device=device)
        bias = torch.randn(channels, device=device) * 0.3
        inputs = [t.requires_grad_() for t in (u, delta, A, B, C, D, z, bias)]
        results = []
        for function in (selective_scan_triton, selective_scan_reference):
            y, last = function(*inputs, delta_softplus=True, return_last_state=True, chunk_size=256)
            loss = (y * torch.linspace(-1, 1, length, device=device)).sum() + last.sum()
            results.append([y, last, *torch.autograd.grad(loss, inputs)])
        errors = [max_error(a, b) / max(float(b.abs().max()), 1e-6) for a, b in zip(*results)]
        cases.append({"kernel": "selective_scan", "variable_bc": variable, "length": length,
                      "relative_errors": errors, "ok": max(errors) <= 2e-3})
    return cases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the cases to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_kernel_check: no CUDA device; the compiled kernels need a GPU (CPU runs use the interpreter "
              "tests in tests/)")
        return 0
    cases = check_sam("cuda") + check_scan("cuda")
    for case in cases:
        print(json.dumps(case))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": torch.cuda.get_device_name(), "cases": cases}, handle, indent=1)
    failed = [case for case in cases if not case["ok"]]
    print(f"gpu_kernel_check: {len(cases) - len(failed)} of {len(cases)} cases within tolerance")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
