"""The fused autograd functions behind SpectralLinear's forward (ADD, SUBTRACT, RESIDUAL, FACTORS modes with
the output side B·C as one matrix): y = x Wᵀ + b + s·(x_d Aᵀ) Bᵀ − s·(x A₀ᵀ) B₀ᵀ with a hand-written backward,
for one layer (:class:`AdaptedLinearFn`) or for several layers that read the same x (:class:`SharedInputFn`,
used by input fusion, fusion.py)."""

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



class SharedInputFn(torch.autograd.Function):
    """Several adapted layers that read the same input x, as one autograd node (see fusion.py):

        y_i = x W_iᵀ + b_i + s_i·(x A_iᵀ) B_iᵀ − s_i·(x A₀,ᵢᵀ) B₀,ᵢᵀ,   i = 1..k

    Forward: h = x [A_1; A₀,₁; A_2; …]ᵀ is ONE GEMM for every member's input side (k of them unfused),
    each y_i then accumulates s_i·h_i [B_i, B₀,ᵢ]ᵀ in place, the A₀ columns of h negated as in
    :class:`AdaptedLinearFn`. Backward, with G_i = s_i·∂y_i [B_i, B₀,ᵢ] (its A₀ columns negated):
    ∂x = Σ_i ∂y_i W_i + [G_1, G_2, …][A_1; A₀,₁; …] (the base terms accumulated in place with ``addmm_``,
    the low-rank ones in ONE GEMM), ∂[A_1; A_2; …] = [G_1[:, :r_1], G_2[:, :r_2], …]ᵀ x (ONE GEMM, split by
    rows), ∂B_i = s_i·∂y_iᵀ h_i[:, :r_i]. ``members`` holds each member's ``(s, has_A0)``; ``tensors`` its
    (W, bias, A, B, A0, B0) in turn, B being the output side B·C, W = None when the factors stand for it.
    No dropout: the members must share x itself.
    """

    @staticmethod
    def forward(ctx, members, x, *tensors):
        ctx.set_materialize_grads(False)
        groups = [tensors[6 * i: 6 * i + 6] for i in range(len(members))]
        rows = [torch.cat([A, A0]) if A0 is not None else A for _, _, A, _, A0, _ in groups]
        A_all = torch.cat(rows) if len(rows) > 1 else rows[0]
        h_all = x @ A_all.T
        outs, sides, spans, start = [], [], [], 0
        for (s, _), (W, bias, A, B, A0, B0), a in zip(members, groups, rows):
            span = (start, start + A.shape[0], start + a.shape[0])  # A rows, then A₀ rows, of this member
            start = span[2]
            if A0 is not None:
                h_all[:, span[1]:span[2]].neg_()
                B = torch.cat([B, B0], dim=1)
            out = base_output(x, W, bias, B.shape[0])
            outs.append(out.addmm_(h_all[:, span[0]:span[2]], B.T, alpha=s))
            sides.append(B)
            spans.append(span)
        ctx.members, ctx.spans = members, spans
        ctx.save_for_backward(x, A_all, h_all, *(g[0] for g in groups), *sides)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *gouts):
        x, A_all, h_all, *rest = ctx.saved_tensors
        k = len(ctx.members)
        Ws, sides, need = rest[:k], rest[k:], ctx.needs_input_grad
        grads: list = [None] * (6 * k)
        gx, Gs, gA_rows = None, [], []
        for i, (gout, (s, _), W, side, span) in enumerate(zip(gouts, ctx.members, Ws, sides, ctx.spans)):
            if gout is None:  # this member's output did not reach the loss
                continue
            if need[1] and W is not None:
                gx = gout @ W if gx is None else gx.addmm_(gout, W)
            r = span[1] - span[0]
            G = (gout @ side).mul_(s)
            G[:, r:].neg_()
            Gs.append((G, span))
            if need[2 + 6 * i]:
                grads[6 * i] = gout.T @ x
            if need[3 + 6 * i]:
                grads[6 * i + 1] = gout.sum(0)
            if need[4 + 6 * i]:
                gA_rows.append((G[:, :r], i))
            if need[5 + 6 * i]:
                grads[6 * i + 3] = s * (gout.T @ h_all[:, span[0]:span[1]])
        if need[1] and Gs:
            gx = torch.zeros_like(x) if gx is None else gx
            if len(Gs) == k:  # every member's ∂h: one GEMM against the stacked input sides
                gx.addmm_(torch.cat([G for G, _ in Gs], dim=1), A_all)
            else:
                for G, span in Gs:
                    gx.addmm_(G, A_all[span[0]:span[2]])
        if gA_rows:
            gA = torch.cat([G for G, _ in gA_rows], dim=1).T @ x
            start = 0
            for G, i in gA_rows:
                grads[6 * i + 2], start = gA[start:start + G.shape[1]], start + G.shape[1]
        return (None, gx, *grads)
