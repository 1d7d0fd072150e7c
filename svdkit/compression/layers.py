"""The modules that replace compressed linears, and how each is described in svdkit.json and rebuilt.

``LowRankLinear`` (every SVD method): y = second(first(x)).

    first:  nn.Linear(n → k, no bias), weight B = Σ_k^{1/2} V_kᵀ S⁻¹   (k × n)
    second: nn.Linear(k → m, bias b),   weight A = U_k Σ_k^{1/2}        (m × k)

Both are plain ``nn.Linear`` modules, so PEFT/svdkit LoRA, quantizers and ``svdkit finetune`` adapt them
like any other linear (``targets="all-linear"`` selects ``….q_proj.first`` and ``….q_proj.second``; SVD-LLM's
LoRA "parameter update" trains exactly these). The dense W' = A·B is never formed in the forward pass.

``PrunedValue`` / ``PrunedOutput`` (``clover-prune``): a value projection that computes only the kept value
dimensions and scatters them into zeros of the attention's width, and an output projection that gathers the
kept columns before a smaller linear. The attention between them runs unchanged at the full head size (the
Hugging Face attention needs it): parameters shrink, the attention compute and KV cache do not.

Every type has ``spec()`` (what svdkit.json records), ``from_spec(spec, dtype, device)`` (an empty module of
that shape, its tensors then assigned from the safetensors file) and ``dense()`` (the plain ``nn.Linear`` it
computes, for the dense export); :data:`TYPES` maps the recorded ``type`` to the class.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LowRankLinear(nn.Module):
    """A rank-``rank`` factorization of an (out × in) linear map; the drop-in for nn.Linear / GPT-2 Conv1D."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 dtype: torch.dtype | None = None, device=None):  # fmt: skip
        super().__init__()
        if not 0 < rank:
            raise ValueError(f"LowRankLinear: rank must be positive, got {rank}.")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.conv1d = False  # it replaced a GPT-2 Conv1D (the dense export writes that type back)
        self.first = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.second = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    @classmethod
    def from_factors(cls, A: Tensor, B: Tensor, bias: Tensor | None, dtype: torch.dtype) -> "LowRankLinear":
        """The module computing x ↦ A (B x) + bias, stored in ``dtype`` on A's device."""
        (m, k), n = A.shape, B.shape[1]
        layer = cls(n, m, k, bias=bias is not None, dtype=dtype, device=A.device)
        with torch.no_grad():
            layer.first.weight.copy_(B)
            layer.second.weight.copy_(A)
            if bias is not None:
                layer.second.bias.copy_(bias)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))

    def dense_weight(self) -> Tensor:
        """W' = A·B (out × in): only for exporting plain dense weights."""
        return self.second.weight @ self.first.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"

    def spec(self) -> dict:
        return {"type": "low-rank", "in": self.in_features, "out": self.out_features, "rank": self.rank,
                "bias": self.second.bias is not None, "conv1d": self.conv1d}  # fmt: skip

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype, device) -> "LowRankLinear":
        layer = cls(spec["in"], spec["out"], spec["rank"], spec["bias"], dtype=dtype, device=device)
        layer.conv1d = bool(spec.get("conv1d", False))
        return layer

    def dense(self) -> nn.Linear:
        return _linear(self.dense_weight(), self.second.bias)


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """An nn.Linear holding copies of ``weight`` (out × in) and ``bias``."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def _check_index(index: Tensor, width: int, what: str) -> Tensor:
    index = torch.as_tensor(index, dtype=torch.long)
    if index.ndim != 1 or not len(index) or int(index.min()) < 0 or int(index.max()) >= width or len(index.unique()) != len(index):
        raise ValueError(f"{what}: index must be distinct positions in [0, {width}), got {index.tolist()[:8]}….")
    return index


class PrunedValue(nn.Module):
    """y = scatter(proj(x)): ``proj`` = nn.Linear(in → kept, no bias) computes the kept value dimensions, placed
    at positions ``index`` (a buffer, saved) of an all-zero output of width ``out_features`` (H_kv·d)."""

    def __init__(self, in_features: int, out_features: int, index: Tensor, dtype=None, device=None):
        super().__init__()
        index = _check_index(index, out_features, "PrunedValue")
        self.in_features, self.out_features = in_features, out_features
        self.proj = nn.Linear(in_features, len(index), bias=False, dtype=dtype, device=device)
        self.register_buffer("index", index.to(device=device if device != "meta" else "cpu"))

    def forward(self, x: Tensor) -> Tensor:
        z = self.proj(x)
        return z.new_zeros(*z.shape[:-1], self.out_features).index_copy(-1, self.index.to(z.device), z)

    def spec(self) -> dict:
        return {"type": "pruned-value", "in": self.in_features, "out": self.out_features, "kept": len(self.index)}

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype, device) -> "PrunedValue":
        return cls(spec["in"], spec["out"], torch.arange(spec["kept"]), dtype=dtype, device=device)

    def dense(self) -> nn.Linear:
        W = self.proj.weight.new_zeros(self.out_features, self.in_features)
        W[self.index.to(W.device)] = self.proj.weight.detach()
        return _linear(W, None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kept={len(self.index)}"


class PrunedOutput(nn.Module):
    """y = proj(x[..., index]): the kept input columns ``index`` (a buffer, saved) of an ``in_features``-wide
    input (H·d) feed ``proj`` = nn.Linear(kept → out, with the original bias)."""

    def __init__(self, in_features: int, out_features: int, index: Tensor, bias: bool = True, dtype=None, device=None):
        super().__init__()
        index = _check_index(index, in_features, "PrunedOutput")
        self.in_features, self.out_features = in_features, out_features
        self.proj = nn.Linear(len(index), out_features, bias=bias, dtype=dtype, device=device)
        self.register_buffer("index", index.to(device=device if device != "meta" else "cpu"))

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x.index_select(-1, self.index.to(x.device)))

    def spec(self) -> dict:
        return {"type": "pruned-output", "in": self.in_features, "out": self.out_features, "kept": len(self.index),
                "bias": self.proj.bias is not None}  # fmt: skip

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype, device) -> "PrunedOutput":
        return cls(spec["in"], spec["out"], torch.arange(spec["kept"]), spec["bias"], dtype=dtype, device=device)

    def dense(self) -> nn.Linear:
        W = self.proj.weight.new_zeros(self.out_features, self.in_features)
        W[:, self.index.to(W.device)] = self.proj.weight.detach()
        return _linear(W, None if self.proj.bias is None else self.proj.bias.detach())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kept={len(self.index)}"


TYPES: dict[str, type[nn.Module]] = {"low-rank": LowRankLinear, "pruned-value": PrunedValue, "pruned-output": PrunedOutput}
