"""Triton kernels for the Mamba-1 selective scan (forward and backward); the only module here that imports triton.

Grid (batch, cdiv(D, BLOCK_D)). Each program keeps the state x [BLOCK_D, BLOCK_N] (N padded to a power of two,
masked) in fp32 registers and walks L sequentially in chunks of CHUNK steps.

* forward: stores the state at the start of every chunk (``boundaries``, (batch, n_chunks, D, N) fp32), y and the
  last state.
* backward: walks the chunks from last to first; for each chunk it recomputes the states from the saved boundary
  state into a per-program scratch buffer (CHUNK x BLOCK_D x BLOCK_N fp32), then runs the adjoint state
  h_t = C_t dy_t + dA_{t+1} h_{t+1} backwards in time and accumulates every gradient. Reductions across programs
  (dA, dD, dB, dC over batch and/or D blocks) go to per-program partial buffers summed in PyTorch (deterministic,
  no atomics).

Inputs are converted to contiguous fp32 by the wrappers; the PyTorch reference is
``hsfm_train.kernels.selective_scan.selective_scan_reference``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _softplus(x):
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))), x)


@triton.jit
def _fwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, last_ptr, bnd_ptr,
                dim, length, nstate, n_chunks,
                HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                VAR_B: tl.constexpr, VAR_C: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_N: tl.constexpr):
    pid_b = tl.program_id(0).to(tl.int64)  # 64-bit offsets for large batch * D * L
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask_n = offs_n < nstate
    mask_dn = mask_d[:, None] & mask_n[None, :]
    dn = offs_d[:, None] * nstate + offs_n[None, :]
    A = tl.load(A_ptr + dn, mask=mask_dn, other=0.0)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0)
    if not VAR_B:
        Bm = tl.load(B_ptr + dn, mask=mask_dn, other=0.0)
    if not VAR_C:
        Cm = tl.load(C_ptr + dn, mask=mask_dn, other=0.0)
    row = pid_b * dim * length + offs_d * length
    bn_row = pid_b * nstate * length + offs_n * length
    x = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    for c in range(0, n_chunks):
        tl.store(bnd_ptr + (pid_b * n_chunks + c) * dim * nstate + dn, x, mask=mask_dn)
        for tt in range(0, CHUNK):
            t = c * CHUNK + tt
            valid = t < length
            m = mask_d & valid
            uu = tl.load(u_ptr + row + t, mask=m, other=0.0)
            dd = tl.load(delta_ptr + row + t, mask=m, other=0.0)
            if HAS_BIAS:
                dd = dd + bias
            if SOFTPLUS:
                dd = _softplus(dd)
            dd = tl.where(m, dd, 0.0)
            if VAR_B:
                bt = tl.load(B_ptr + bn_row + t, mask=mask_n & valid, other=0.0)[None, :]
            else:
                bt = Bm
            if VAR_C:
                ct = tl.load(C_ptr + bn_row + t, mask=mask_n & valid, other=0.0)[None, :]
            else:
                ct = Cm
            dA = tl.exp(dd[:, None] * A)
            x = dA * x + (dd * uu)[:, None] * bt
            yt = tl.sum(x * ct, axis=1)
            if HAS_D:
                yt = yt + Dv * uu
            if HAS_Z:
                zz = tl.load(z_ptr + row + t, mask=m, other=0.0)
                yt = yt * zz * tl.sigmoid(zz)
            tl.store(y_ptr + row + t, yt, mask=m)
    tl.store(last_ptr + pid_b * dim * nstate + dn, x, mask=mask_dn)


@triton.jit
def _bwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dy_ptr, dlast_ptr, bnd_ptr,
                scratch_ptr, du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dD_ptr, dB_ptr, dC_ptr,
                dim, length, nstate, n_chunks, n_dblocks,
                HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                VAR_B: tl.constexpr, VAR_C: tl.constexpr, HAS_DLAST: tl.constexpr, CHUNK: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_b = tl.program_id(0).to(tl.int64)  # 64-bit offsets for large batch * D * L
    pid_d = tl.program_id(1)
    local_d = tl.arange(0, BLOCK_D)
    offs_d = pid_d * BLOCK_D + local_d
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask_n = offs_n < nstate
    mask_dn = mask_d[:, None] & mask_n[None, :]
    dn = offs_d[:, None] * nstate + offs_n[None, :]
    A = tl.load(A_ptr + dn, mask=mask_dn, other=0.0)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0)
    if not VAR_B:
        Bm = tl.load(B_ptr + dn, mask=mask_dn, other=0.0)
    if not VAR_C:
        Cm = tl.load(C_ptr + dn, mask=mask_dn, other=0.0)
    row = pid_b * dim * length + offs_d * length
    bn_row = pid_b * nstate * length + offs_n * length
    # partial buffers for input-dependent B/C gradients: (batch, n_dblocks, N, L)
    part_row = (pid_b * n_dblocks + pid_d) * nstate * length + offs_n * length
    scratch = scratch_ptr + (pid_b * n_dblocks + pid_d) * CHUNK * BLOCK_D * BLOCK_N \
        + local_d[:, None] * BLOCK_N + offs_n[None, :]
    if HAS_DLAST:
        h = tl.load(dlast_ptr + pid_b * dim * nstate + dn, mask=mask_dn, other=0.0)
    else:
        h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dA_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dB_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dC_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for cc in range(0, n_chunks):
        c = n_chunks - 1 - cc
        # 1) recompute this chunk's states; scratch[tt] holds the state before step tt
        x = tl.load(bnd_ptr + (pid_b * n_chunks + c) * dim * nstate + dn, mask=mask_dn, other=0.0)
        for tt in range(0, CHUNK):
            t = c * CHUNK + tt
            valid = t < length
            m = mask_d & valid
            tl.store(scratch + tt * BLOCK_D * BLOCK_N, x)
            uu = tl.load(u_ptr + row + t, mask=m, other=0.0)
            dd = tl.load(delta_ptr + row + t, mask=m, other=0.0)
            if HAS_BIAS:
                dd = dd + bias
            if SOFTPLUS:
                dd = _softplus(dd)
            dd = tl.where(m, dd, 0.0)
            if VAR_B:
                bt = tl.load(B_ptr + bn_row + t, mask=mask_n & valid, other=0.0)[None, :]
            else:
                bt = Bm
            x = tl.exp(dd[:, None] * A) * x + (dd * uu)[:, None] * bt
        tl.debug_barrier()
        # 2) adjoint backwards in time
        for tt2 in range(0, CHUNK):
            tt = CHUNK - 1 - tt2
            t = c * CHUNK + tt
            valid = t < length
            m = mask_d & valid
            xprev = tl.load(scratch + tt * BLOCK_D * BLOCK_N)
            uu = tl.load(u_ptr + row + t, mask=m, other=0.0)
            draw = tl.load(delta_ptr + row + t, mask=m, other=0.0)
            if HAS_BIAS:
                draw = draw + bias
            if SOFTPLUS:
                dd = _softplus(draw)
            else:
                dd = draw
            dd = tl.where(m, dd, 0.0)
            if VAR_B:
                bt = tl.load(B_ptr + bn_row + t, mask=mask_n & valid, other=0.0)[None, :]
            else:
                bt = Bm
            if VAR_C:
                ct = tl.load(C_ptr + bn_row + t, mask=mask_n & valid, other=0.0)[None, :]
            else:
                ct = Cm
            dA = tl.exp(dd[:, None] * A)
            xt = dA * xprev + (dd * uu)[:, None] * bt
            g = tl.load(dy_ptr + row + t, mask=m, other=0.0)
            if HAS_Z:
                zz = tl.load(z_ptr + row + t, mask=m, other=0.0)
                ypre = tl.sum(xt * ct, axis=1)
                if HAS_D:
                    ypre = ypre + Dv * uu
                sig = tl.sigmoid(zz)
                tl.store(dz_ptr + row + t, g * ypre * sig * (1.0 + zz * (1.0 - sig)), mask=m)
                g = g * zz * sig
            if HAS_D:
                dD_acc += g * uu
                du = g * Dv
            else:
                du = tl.zeros([BLOCK_D], dtype=tl.float32)
            if VAR_C:
                tl.store(dC_ptr + part_row + t, tl.sum(g[:, None] * xt, axis=0), mask=mask_n & valid)
            else:
                dC_acc += g[:, None] * xt
            h = h + g[:, None] * ct
            s = tl.sum(h * bt, axis=1)
            ddelta = s * uu
            du += s * dd
            if VAR_B:
                tl.store(dB_ptr + part_row + t, tl.sum(h * (dd * uu)[:, None], axis=0), mask=mask_n & valid)
            else:
                dB_acc += h * (dd * uu)[:, None]
            hx = h * xprev * dA
            ddelta += tl.sum(hx * A, axis=1)
            dA_acc += hx * dd[:, None]
            h = h * dA
            if SOFTPLUS:
                ddelta = ddelta * tl.sigmoid(draw)
            tl.store(du_ptr + row + t, du, mask=m)
            tl.store(ddelta_ptr + row + t, ddelta, mask=m)
        tl.debug_barrier()
    tl.store(dA_ptr + pid_b * dim * nstate + dn, dA_acc, mask=mask_dn)
    tl.store(dD_ptr + pid_b * dim + offs_d, dD_acc, mask=mask_d)
    if not VAR_B:
        tl.store(dB_ptr + pid_b * dim * nstate + dn, dB_acc, mask=mask_dn)
    if not VAR_C:
        tl.store(dC_ptr + pid_b * dim * nstate + dn, dC_acc, mask=mask_dn)


def _blocks(dim: int, nstate: int):
    block_n = max(triton.next_power_of_2(nstate), 2)
    block_d = max(min(triton.next_power_of_2(dim), 16), 2)
    return block_d, block_n


def _f32(t):
    return None if t is None else t.float().contiguous()


def forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk):
    """Returns y (u's dtype), the last state (batch, D, N) fp32 and the chunk-boundary states."""
    batch, dim, length = u.shape
    nstate = A.shape[1]
    uf, df, Af, Bf, Cf, Df, zf, bf = map(_f32, (u, delta, A, B, C, D, z, delta_bias))
    n_chunks = triton.cdiv(length, chunk)
    y = torch.empty(batch, dim, length, device=u.device, dtype=torch.float32)
    last = torch.zeros(batch, dim, nstate, device=u.device, dtype=torch.float32)
    bnd = torch.empty(batch, n_chunks, dim, nstate, device=u.device, dtype=torch.float32)
    block_d, block_n = _blocks(dim, nstate)
    grid = (batch, triton.cdiv(dim, block_d))
    dummy = uf
    _fwd_kernel[grid](uf, df, Af, Bf, Cf, Df if Df is not None else dummy, zf if zf is not None else dummy,
                      bf if bf is not None else dummy, y, last, bnd, dim, length, nstate, n_chunks,
                      HAS_D=Df is not None, HAS_Z=zf is not None, HAS_BIAS=bf is not None,
                      SOFTPLUS=bool(delta_softplus), VAR_B=Bf.dim() == 3, VAR_C=Cf.dim() == 3, CHUNK=chunk,
                      BLOCK_D=block_d, BLOCK_N=block_n)
    return y.to(u.dtype), last, bnd


def backward(dy, dlast, u, delta, A, B, C, D, z, delta_bias, bnd, delta_softplus, chunk):
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias), each in its input's dtype (None where absent)."""
    batch, dim, length = u.shape
    nstate = A.shape[1]
    uf, df, Af, Bf, Cf, Df, zf, bf = map(_f32, (u, delta, A, B, C, D, z, delta_bias))
    dyf = dy.float().contiguous() if dy is not None else torch.zeros_like(uf)
    n_chunks = bnd.shape[1]
    block_d, block_n = _blocks(dim, nstate)
    n_dblocks = triton.cdiv(dim, block_d)
    dev, f32 = u.device, torch.float32
    scratch = torch.empty(batch * n_dblocks * chunk * block_d * block_n, device=dev, dtype=f32)
    du = torch.empty(batch, dim, length, device=dev, dtype=f32)
    ddelta = torch.empty_like(du)
    dz = torch.empty_like(du) if zf is not None else du
    dA = torch.empty(batch, dim, nstate, device=dev, dtype=f32)
    dD = torch.empty(batch, dim, device=dev, dtype=f32)
    var_b, var_c = Bf.dim() == 3, Cf.dim() == 3
    dB = torch.zeros(batch, n_dblocks, nstate, length, device=dev, dtype=f32) if var_b else torch.empty_like(dA)
    dC = torch.zeros(batch, n_dblocks, nstate, length, device=dev, dtype=f32) if var_c else torch.empty_like(dA)
    dummy = uf
    grid = (batch, n_dblocks)
    _bwd_kernel[grid](uf, df, Af, Bf, Cf, Df if Df is not None else dummy, zf if zf is not None else dummy,
                      bf if bf is not None else dummy, dyf,
                      dlast.float().contiguous() if dlast is not None else dummy, bnd, scratch,
                      du, ddelta, dz, dA, dD, dB, dC, dim, length, nstate, n_chunks, n_dblocks,
                      HAS_D=Df is not None, HAS_Z=zf is not None, HAS_BIAS=bf is not None,
                      SOFTPLUS=bool(delta_softplus), VAR_B=var_b, VAR_C=var_c, HAS_DLAST=dlast is not None,
                      CHUNK=chunk, BLOCK_D=block_d, BLOCK_N=block_n)
    dB = dB.sum(1) if var_b else dB.sum(0)
    dC = dC.sum(1) if var_c else dC.sum(0)
    return (du.to(u.dtype), ddelta.to(delta.dtype), dA.sum(0).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            None if D is None else dD.sum(0).to(D.dtype), None if z is None else dz.to(z.dtype),
            None if delta_bias is None else ddelta.sum((0, 2)).to(delta_bias.dtype))
