"""Mamba-1 selective scan: the PyTorch reference, a chunked log-depth PyTorch scan for CPU, and the autograd
Function around the Triton kernels (seed 002, METHODS.md).

    delta <- delta + delta_bias[:, None];  delta <- softplus(delta) if delta_softplus
    dA_t  = exp(delta_t A)          (batch, D, N)
    dBu_t = delta_t B_t u_t         (batch, D, N)
    x_t   = dA_t x_{t-1} + dBu_t,   x_0 = 0
    y_t   = <x_t, C_t> + D u_t;     y *= silu(z) when z is given

Shapes: u, delta, z (batch, D, L); A (D, N) real; B, C (batch, N, L) (input-dependent) or (D, N) (time-invariant);
D, delta_bias (D,). Output y (batch, D, L) in u's dtype, plus the last state x_L (batch, D, N, fp32) when
``return_last_state``. Everything accumulates in fp32.

All three entry points share the signature
``(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
chunk_size=None)``:

* ``selective_scan_reference``: a plain sequential loop over L (the ground truth; slow).
* ``selective_scan_parallel``: L is cut into chunks (default 128 steps); inside a chunk the pairs (dA, dBu) are
  combined by a Hillis-Steele scan with (a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2) (log2(chunk) vectorised steps,
  products only, never an exp of a cumulative sum, so nothing overflows), and the state is carried from chunk to
  chunk. Intermediates are bounded by batch*D*N*chunk*O(log chunk) per chunk. Differentiable through autograd
  (CPU training); under autograd every chunk is checkpointed (recomputed in the backward pass), so the memory kept
  for the backward pass is the inputs plus one state per chunk, not batch*D*N*L.
* ``selective_scan_triton``: Triton forward AND backward (kernels in ``selective_scan_triton``, imported lazily
  so that importing this module never imports triton). The forward keeps the state [BLOCK_D, N] in registers,
  loops over L sequentially in chunks and saves the state at every chunk boundary; the backward recomputes each
  chunk's states from its boundary state into a scratch buffer and runs the adjoint state backwards in time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Default chunk lengths. Parallel scan on CPU (2 threads, batch 2, D 256, N 16, L 1024, fwd+bwd): chunk 64-128
# ~0.35 s, 256 ~0.55 s, 1024 ~1.7 s. Triton: the chunk only sets how many boundary states are saved.
DEFAULT_CHUNK_PARALLEL = 128
DEFAULT_CHUNK_TRITON = 256


def _check(u, delta, A, B, C, D, z, delta_bias):
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must be (batch, D, L) of one shape, got {tuple(u.shape)} and "
                         f"{tuple(delta.shape)}")
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (D={dim}, N), got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.shape not in ((batch, n, length), (dim, n)):
            raise ValueError(f"{name} must be (batch, N, L)={(batch, n, length)} or (D, N)={(dim, n)}, "
                             f"got {tuple(t.shape)}")
    if D is not None and D.shape != (dim,):
        raise ValueError(f"D must be ({dim},), got {tuple(D.shape)}")
    if delta_bias is not None and delta_bias.shape != (dim,):
        raise ValueError(f"delta_bias must be ({dim},), got {tuple(delta_bias.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must be {tuple(u.shape)}, got {tuple(z.shape)}")


def _prepare_delta(delta, delta_bias, delta_softplus):
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


def _finish(y, u, D, z):
    if D is not None:
        y = y + D.float()[:, None] * u.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype)


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             return_last_state=False, chunk_size=None):
    """Sequential loop over L in fp32 (``chunk_size`` is accepted and ignored)."""
    _check(u, delta, A, B, C, D, z, delta_bias)
    batch, dim, length = u.shape
    dt = _prepare_delta(delta, delta_bias, delta_softplus)
    uf, Af, Bf, Cf = u.float(), A.float(), B.float(), C.float()
    varying_B, varying_C = Bf.dim() == 3, Cf.dim() == 3
    x = uf.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        dA = torch.exp(dt[:, :, t, None] * Af)                       # (b, d, n)
        b_t = Bf[:, None, :, t] if varying_B else Bf[None]
        x = dA * x + (dt[:, :, t] * uf[:, :, t])[:, :, None] * b_t
        c_t = Cf[:, None, :, t] if varying_C else Cf[None]
        ys.append((x * c_t).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else uf.new_zeros(batch, dim, 0)
    out = _finish(y, u, D, z)
    return (out, x) if return_last_state else out


def _hillis_steele(a: torch.Tensor, b: torch.Tensor):
    """Inclusive scan over the last axis of the affine maps x -> a x + b (earlier first); out of place so autograd
    works. log2(L) steps."""
    length = a.shape[-1]
    offset = 1
    while offset < length:
        a_prev, b_prev = a[..., :-offset], b[..., :-offset]
        a_cur, b_cur = a[..., offset:], b[..., offset:]
        b = torch.cat([b[..., :offset], a_cur * b_prev + b_cur], dim=-1)
        a = torch.cat([a[..., :offset], a_cur * a_prev], dim=-1)
        offset *= 2
    return a, b


def _scan_chunk(x, d_c, u_c, Af, b_c, c_c):
    """One chunk: states from the carried state x (b, d, n) and the chunk's slices; returns (y_chunk, last state).
    b_c / c_c are (b, n, l) slices or the time-invariant (d, n) matrices."""
    a = torch.exp(d_c[:, :, None, :] * Af[None, :, :, None])           # (b, d, n, l)
    b_t = b_c[:, None] if b_c.dim() == 3 else b_c[None, :, :, None]
    bu = (d_c * u_c)[:, :, None, :] * b_t                              # (b, d, n, l)
    a, bu = _hillis_steele(a, bu)
    states = a * x[..., None] + bu                                     # (b, d, n, l)
    c_t = c_c[:, None] if c_c.dim() == 3 else c_c[None, :, :, None]
    return (states * c_t).sum(2), states[..., -1]


def selective_scan_parallel(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                            return_last_state=False, chunk_size=None):
    """Chunked log-depth scan (see the module docstring); same results as the reference to fp32 rounding."""
    _check(u, delta, A, B, C, D, z, delta_bias)
    batch, dim, length = u.shape
    n = A.shape[1]
    chunk = int(chunk_size or DEFAULT_CHUNK_PARALLEL)
    if chunk < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk}")
    dt = _prepare_delta(delta, delta_bias, delta_softplus)
    uf, Af, Bf, Cf = u.float(), A.float(), B.float(), C.float()
    varying_B, varying_C = Bf.dim() == 3, Cf.dim() == 3
    x = uf.new_zeros(batch, dim, n)
    # With autograd, each chunk is checkpointed: only its inputs and the carried state are kept, and its scan is
    # recomputed in the backward pass, so training memory stays O(batch*D*(L + N*L/chunk)) instead of
    # O(batch*D*N*L*log2(chunk)).
    tensors = (dt, uf, Af, Bf, Cf)
    use_checkpoint = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    ys = []
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        b_c = Bf[:, :, start:stop] if varying_B else Bf
        c_c = Cf[:, :, start:stop] if varying_C else Cf
        chunk_args = (x, dt[:, :, start:stop], uf[:, :, start:stop], Af, b_c, c_c)
        if use_checkpoint:
            y_c, x = checkpoint(_scan_chunk, *chunk_args, use_reentrant=False)
        else:
            y_c, x = _scan_chunk(*chunk_args)
        ys.append(y_c)
    y = torch.cat(ys, dim=-1) if ys else uf.new_zeros(batch, dim, 0)
    out = _finish(y, u, D, z)
    return (out, x) if return_last_state else out


class _SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size):
        from hsfm_train.kernels import selective_scan_triton as sst
        y, last, boundaries = sst.forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, boundaries)
        ctx.delta_softplus = delta_softplus
        ctx.chunk_size = chunk_size
        return y, last

    @staticmethod
    def backward(ctx, dy, dlast):
        from hsfm_train.kernels import selective_scan_triton as sst
        u, delta, A, B, C, D, z, delta_bias, boundaries = ctx.saved_tensors
        grads = sst.backward(dy, dlast, u, delta, A, B, C, D, z, delta_bias, boundaries, ctx.delta_softplus,
                             ctx.chunk_size)
        return (*grads, None, None)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, chunk_size=None):
    """Triton forward and backward (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    _check(u, delta, A, B, C, D, z, delta_bias)
    chunk = int(chunk_size or DEFAULT_CHUNK_TRITON)
    if chunk < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk}")
    y, last = _SelectiveScanTriton.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), chunk)
    return (y, last) if return_last_state else y
