"""Kernel benchmarks: the fused spectral-angle loss and the selective scan against their PyTorch counterparts.

GPU (CUDA): times with ``triton.testing.do_bench`` (median ms), peak memory per case.
* SAM, rows [N, B]: forward, backward and full step (forward + backward) of the fused Triton kernel vs eager
  PyTorch (the reference) vs ``torch.compile`` of the reference; achieved GB/s of the full step counted as the
  minimum traffic (read prediction + target, write the gradient in the forward; read + write it in the backward)
  against the device's memory bandwidth.
* grouped SAM, images [N, B, H, W] with spectral groups, as the pretraining objective calls it (normalised
  images, the per-band affine map to reflectance folded in): the grouped kernel vs the grouped PyTorch reference
  vs the per-group masked row copies that the objective built before, full step, same GB/s count.
* selective scan: the Triton scan vs the sequential reference and the parallel PyTorch scan (and the mamba-ssm
  CUDA kernel when ``mamba_ssm`` is importable), forward + backward, across sequence lengths and state sizes.
CPU: plain timing (median of repeats): SAM eager vs ``torch.compile`` (the Triton kernel needs a GPU; the
interpreter is for correctness only), grouped SAM reference vs per-group row copies, and the parallel scan vs the
sequential one.

    python benchmarks/bench_kernels.py            # everything the device supports
    python benchmarks/bench_kernels.py --quick    # small sizes, a smoke run
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from typing import Any, Callable

import torch

from hsfm_train.kernels.sam_loss import grouped_spectral_angle_reference, spectral_angle_reference

# HBM bandwidth in GB/s for the roofline (vendor figures)
BANDWIDTH_GBPS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100-SXM4-80GB": 2039.0,
                  "A100": 1555.0, "L40S": 864.0, "A10G": 600.0}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--repeats", type=int, default=None, help="CPU timing repeats (default 10, quick 3)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to build on CPU)")
    parser.add_argument("--json", default=None, help="write every number to this file")
    parser.add_argument("--threads", type=int,
                        help="torch intra-op threads on CPU (default: torch's; 1 is steadier on a busy machine)")
    return parser.parse_args()


def timer(cuda: bool, repeats: int) -> Callable[[Callable[[], Any]], float]:
    """Median milliseconds of fn(): do_bench on CUDA, perf_counter on CPU (after three warm-up calls)."""
    if cuda:
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, warmup=25, rep=100))

    def measure(fn: Callable[[], Any]) -> float:
        for _ in range(3):  # thread pools and allocator caches warm up over the first calls
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    return measure


def peak_mb(cuda: bool, fn: Callable[[], Any]) -> float | None:
    if not cuda:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((gbps for key, gbps in BANDWIDTH_GBPS.items() if key in name), None)


def bench_sam(device: torch.device, args: argparse.Namespace, measure, results: dict) -> None:
    cuda = device.type == "cuda"
    shapes = [(4096, 224), (16384, 224), (65536, 224), (16384, 1000)] if cuda else [(4096, 224), (16384, 224)]
    if args.quick:
        shapes = shapes[:1]
    dtypes = [torch.float32, torch.bfloat16] if cuda else [torch.float32]
    variants: dict[str, Callable] = {"eager": spectral_angle_reference}
    if cuda:
        from hsfm_train.kernels.sam_triton import fused_spectral_angle

        variants["fused triton"] = fused_spectral_angle
    if not args.no_compile:
        try:
            variants["torch.compile"] = torch.compile(spectral_angle_reference, dynamic=False)
        except Exception as error:  # noqa: BLE001 - a benchmark reports what it cannot run
            print(f"torch.compile unavailable: {error}")
    peak = bandwidth(device)
    print(f"\nSAM loss, reduction mean (device bandwidth: {f'{peak:.0f} GB/s' if peak else 'unknown'})")
    print(f"{'rows x bands':>14s} {'dtype':>9s} {'variant':>14s} {'fwd ms':>8s} {'bwd ms':>8s} {'full ms':>8s} "
          f"{'GB/s':>8s} {'roofline':>8s} {'vs eager':>8s} {'peak MB':>8s}")
    for rows, bands in shapes:
        for dtype in dtypes:
            generator = torch.Generator(device="cpu").manual_seed(0)
            target = torch.rand(rows, bands, generator=generator).to(device, dtype)
            base = (target.float() + 0.05 * torch.randn(rows, bands, generator=generator).to(device)).to(dtype)
            element = target.element_size()
            traffic = 5 * rows * bands * element  # fwd: read p, t, write grad; bwd: read grad, write grad
            eager_full = None
            for name, function in variants.items():
                prediction = base.clone().requires_grad_(True)

                def forward():
                    with torch.no_grad():
                        return function(prediction, target)

                def full():
                    loss = function(prediction, target)
                    loss.backward()
                    prediction.grad = None

                try:
                    # backward = full - forward; both medians, so on a noisy CPU it can come out slightly off
                    total, fwd = measure(full), measure(forward)
                except Exception as error:  # noqa: BLE001
                    print(f"{rows:>7d} x {bands:<5d} {str(dtype)[6:]:>9s} {name:>14s}  failed: {error}")
                    continue
                eager_full = total if name == "eager" else eager_full
                gbps = traffic / (total * 1e-3) / 1e9
                row = {"rows": rows, "bands": bands, "dtype": str(dtype), "variant": name, "forward_ms": fwd,
                       "backward_ms": total - fwd, "full_ms": total, "gbps": gbps,
                       "roofline": gbps / peak if peak else None, "vs_eager": (eager_full / total) if eager_full else None,
                       "peak_mb": peak_mb(cuda, full)}
                results["sam"].append(row)
                roofline = f"{row['roofline']:.0%}" if row["roofline"] else "-"
                speedup = f"{row['vs_eager']:.2f}x" if row["vs_eager"] else "-"
                memory = f"{row['peak_mb']:.0f}" if row["peak_mb"] is not None else "-"
                print(f"{rows:>7d} x {bands:<5d} {str(dtype)[6:]:>9s} {name:>14s} {fwd:8.3f} {total - fwd:8.3f} "
                      f"{total:8.3f} {gbps:8.1f} {roofline:>8s} {speedup:>8s} {memory:>8s}")


def per_group_row_copies(prediction, target, membership, weight, scale, offset):
    """What the objective computed before the grouped implementations: reflectance images, then per group copies
    with the other bands zeroed, permuted to rows [N*H*W, B] and concatenated."""
    prediction = prediction.float() * scale[:, :, None, None] + offset[:, :, None, None]
    target = target * scale[:, :, None, None] + offset[:, :, None, None]
    predicted, true = [], []
    for group in range(membership.shape[2]):
        member = membership[..., group].float()[:, :, None, None]
        predicted.append((prediction * member).permute(0, 2, 3, 1).reshape(-1, prediction.shape[1]))
        true.append((target * member).permute(0, 2, 3, 1).reshape(-1, target.shape[1]))
    return spectral_angle_reference(torch.cat(predicted), torch.cat(true), weight.transpose(0, 1).flatten())


def bench_grouped_sam(device: torch.device, args: argparse.Namespace, measure, results: dict) -> None:
    cuda = device.type == "cuda"
    # (batch, bands, tile): bench_pretrain.py's default step, then a larger one
    shapes = [(16, 224, 32), (64, 224, 64)] if cuda else [(16, 224, 32)]
    if args.quick:
        shapes = shapes[:1]
    variants: dict[str, Callable] = {"reference": grouped_spectral_angle_reference}
    if cuda:
        from hsfm_train.kernels.sam_triton import fused_grouped_spectral_angle

        variants = {"fused triton": fused_grouped_spectral_angle, **variants}
    print("\ngrouped SAM loss, normalised images with the affine map folded in, 2 groups, full step (fwd + bwd)")
    print(f"{'N x B x H x W':>20s} {'variant':>15s} {'full ms':>8s} {'GB/s':>8s} {'vs rows':>8s} {'peak MB':>8s}")
    for n, bands, tile in shapes:
        generator = torch.Generator(device="cpu").manual_seed(0)
        target = torch.randn(n, bands, tile, tile, generator=generator).to(device)
        base = target + 0.3 * torch.randn(n, bands, tile, tile, generator=generator).to(device)
        scale = (0.05 + 0.1 * torch.rand(n, bands, generator=generator)).to(device)
        offset = (0.2 + 0.3 * torch.rand(n, bands, generator=generator)).to(device)
        membership = torch.zeros(n, bands, 2, dtype=torch.bool, device=device)
        membership[:, : bands // 2, 0] = True
        membership[:, bands // 2:, 1] = True
        weight = (torch.rand(n, 2, tile, tile, generator=generator) > 0.25).float().to(device)
        traffic = 5 * target.numel() * target.element_size()
        calls = {name: (lambda p, f=function: f(p, target, membership, weight, "mean", scale=scale, offset=offset))
                 for name, function in variants.items()}
        calls["per-group rows"] = lambda p: per_group_row_copies(p, target, membership, weight, scale, offset)
        rows = []
        for name, call in calls.items():
            prediction = base.clone().requires_grad_(True)

            def full():
                call(prediction).backward()
                prediction.grad = None

            try:
                total = measure(full)
            except Exception as error:  # noqa: BLE001
                print(f"{n:>4d} x {bands} x {tile} x {tile} {name:>15s}  failed: {error}")
                continue
            rows.append({"batch": n, "bands": bands, "tile": tile, "variant": name, "full_ms": total,
                         "gbps": traffic / (total * 1e-3) / 1e9, "peak_mb": peak_mb(cuda, full)})
        baseline = next((row["full_ms"] for row in rows if row["variant"] == "per-group rows"), None)
        for row in rows:
            row["vs_rows"] = baseline / row["full_ms"] if baseline else None
            speedup = f"{row['vs_rows']:.2f}x" if row["vs_rows"] else "-"
            memory = f"{row['peak_mb']:.0f}" if row["peak_mb"] is not None else "-"
            print(f"{n:>4d} x {bands} x {tile} x {tile} {row['variant']:>15s} {row['full_ms']:8.3f} "
                  f"{row['gbps']:8.1f} {speedup:>8s} {memory:>8s}")
        results["grouped_sam"] += rows


def bench_scan(device: torch.device, args: argparse.Namespace, measure, results: dict) -> None:
    from hsfm_train.kernels import selective_scan as scan

    cuda = device.type == "cuda"
    batch, channels = (2, 256) if cuda else (1, 32)
    lengths = [256, 1024, 2048, 4096] if cuda else [256, 1024, 2048]
    states = [16, 64] if cuda else [16]
    if args.quick:
        lengths, states = lengths[:2], states[:1]
    variants: dict[str, Callable] = {"sequential ref": scan.selective_scan_reference,
                                     "parallel torch": scan.selective_scan_parallel}
    if cuda:
        variants["triton"] = scan.selective_scan_triton
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as mamba_scan

            variants["mamba-ssm cuda"] = mamba_scan
        except ImportError:
            print("mamba-ssm is not importable: its CUDA kernel is left out")
    print(f"\nselective scan, forward + backward, batch {batch}, D {channels}, input-dependent B/C, softplus, D and z")
    print(f"{'L':>6s} {'N':>4s} {'variant':>16s} {'ms':>9s} {'vs sequential':>14s} {'peak MB':>8s}")
    for length in lengths:
        for state in states:
            generator = torch.Generator(device="cpu").manual_seed(0)

            def make(*shape, scale=1.0):
                return (torch.randn(*shape, generator=generator) * scale).to(device)

            inputs = dict(u=make(batch, channels, length), delta=make(batch, channels, length, scale=0.5),
                          A=-torch.rand(channels, state, generator=generator).to(device) - 0.5,
                          B=make(batch, state, length), C=make(batch, state, length), D=make(channels),
                          z=make(batch, channels, length), delta_bias=make(channels, scale=0.1))
            sequential = None
            for name, function in variants.items():
                leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}

                def step():
                    out = function(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"],
                                   leaves["D"], leaves["z"], leaves["delta_bias"], True)
                    out = out[0] if isinstance(out, tuple) else out
                    out.sum().backward()
                    for leaf in leaves.values():
                        leaf.grad = None

                try:
                    ms = measure(step)
                except Exception as error:  # noqa: BLE001
                    print(f"{length:>6d} {state:>4d} {name:>16s}  failed: {error}")
                    continue
                sequential = ms if name == "sequential ref" else sequential
                row = {"L": length, "N": state, "variant": name, "ms": ms,
                       "vs_sequential": sequential / ms if sequential else None, "peak_mb": peak_mb(cuda, step)}
                results["scan"].append(row)
                memory = f"{row['peak_mb']:.0f}" if row["peak_mb"] is not None else "-"
                print(f"{length:>6d} {state:>4d} {name:>16s} {ms:9.2f} {row['vs_sequential']:13.1f}x {memory:>8s}")


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    repeats = args.repeats or (3 if args.quick else 10)
    name = torch.cuda.get_device_name() if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"device: {device.type} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    results: dict[str, Any] = {"device": name, "torch": torch.__version__, "sam": [], "grouped_sam": [], "scan": []}
    measure = timer(device.type == "cuda", repeats)
    bench_sam(device, args, measure, results)
    bench_grouped_sam(device, args, measure, results)
    bench_scan(device, args, measure, results)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
