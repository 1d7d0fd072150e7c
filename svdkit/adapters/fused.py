"""The fused autograd function behind SpectralLinear's forward (ADD, SUBTRACT, RESIDUAL, FACTORS modes with
the output side B·C as one matrix): y = x Wᵀ + b + s·(x_d Aᵀ) Bᵀ − s·(x A₀ᵀ) B₀ᵀ with a hand-written backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class AdaptedLinearFn(torch.autograd.Function):
    """y = x Wᵀ + b + s·(x_d Aᵀ) Bᵀ − s·(x A₀ᵀ) B₀ᵀ on 2-D x, with hand-written backward.

    Stock autograd would allocate the output-sized ΔY, s·ΔY and the sum, and in backward a second
    input-sized gradient to add to gout·W. Here the low-rank terms are accumulated into the output and
    into ∂x in place (``addmm_``), and with no dropout the A and A₀ paths share one GEMM through the
    stacked [A; A₀] (h₀ negated so that the output side is the stacked [B, B₀]). ``xd`` is dropout(x),
    or None for no dropout; A = None is the identity; A₀, B₀ are None when nothing is subtracted; W = None
    when the factors stand for the weight (SVFT with fold=True).
    """

    @staticmethod
    def forward(ctx, x, xd, W, bias, A, B, A0, B0, s):
        out = base_output(x, W, bias, B.shape[0])
        joint = A0 is not None and xd is None and A is not None
        if joint:  # h = [x Aᵀ, −x A₀ᵀ]:  out += s·h [B, B₀]ᵀ
            r = A.shape[0]
            h = x @ torch.cat([A, A0]).T
            h[:, r:].neg_()
            out.addmm_(h, torch.cat([B, B0], dim=1).T, alpha=s)
        else:
            src = x if xd is None else xd
            h = src if A is None else src @ A.T
            out.addmm_(h, B.T, alpha=s)
            if A0 is not None:
                out.addmm_(x @ A0.T, B0.T, alpha=-s)
        ctx.s, ctx.joint = s, joint
        ctx.save_for_backward(x, xd, W, A, B, A0, B0, h)
        return out

    @staticmethod
    def backward(ctx, gout):
        x, xd, W, A, B, A0, B0, h = ctx.saved_tensors
        need_x, need_xd, need_W, need_b, need_A, need_B = ctx.needs_input_grad[:6]
        s, r = ctx.s, B.shape[1]
        src = x if xd is None else xd
        gx = gxd = None
        if ctx.joint:
            G = gout @ torch.cat([B, B0], dim=1)  # (n, 2r); ∂h = s·G, and h₀ was negated
            G1 = G[:, :r]
            gA = s * (G1.T @ x) if need_A else None
            if need_x:
                G[:, r:].neg_()
                gx = _grad_input(gout, W, x).addmm_(G, torch.cat([A, A0]), alpha=s)
        else:
            G1 = gout @ B
            gA = s * (G1.T @ src) if need_A else None
            if need_x:
                gx = _grad_input(gout, W, x)
                if xd is None:
                    gx.addmm_(G1, A, alpha=s) if A is not None else gx.add_(G1, alpha=s)
                if A0 is not None:
                    gx.addmm_(gout @ B0, A0, alpha=-s)
            if need_xd and xd is not None:
                gxd = s * (G1 @ A) if A is not None else s * G1
        gB = s * (gout.T @ h[:, :r]) if need_B else None
        gW = gout.T @ x if need_W else None
        gb = gout.sum(0) if need_b else None
        return gx, gxd, gW, gb, gA, gB, None, None, None


def base_output(x: Tensor, W: Tensor | None, bias: Tensor | None, out_features: int) -> Tensor:
    """x Wᵀ + b as a fresh tensor the low-rank terms can be accumulated into (b alone when W is None)."""
    if W is not None:
        return F.linear(x, W, bias)
    out = x.new_zeros(*x.shape[:-1], out_features)
    return out if bias is None else out.add_(bias)


def _grad_input(gout: Tensor, W: Tensor | None, x: Tensor) -> Tensor:
    return gout @ W if W is not None else torch.zeros_like(x)

