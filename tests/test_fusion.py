"""Input fusion (svdkit/adapters/fusion.py): layers reading one input tensor computed as one autograd node.

Fused and unfused models must compute the same function with the same gradients; groups are observed
(q/k/v and gate/up in a Llama block, never o/down); everything that is not certain falls back."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import svdkit
from svdkit.adapters.api import adapted_layers
from svdkit.adapters.fused import SharedInputFn
from svdkit.adapters.fusion import MAX_MISSES

from conftest import perturb_adapters, tiny_model

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))

METHODS = {  # fused: the method's layers take the fused path (plain A and B, or a dense/vector core in B·C)
    "lora": (lambda: svdkit.LoRA(rank=4), True),
    "pissa": (lambda: svdkit.PiSSA(rank=4), True),  # SUBTRACT: stacked [A; A₀] in the group
    "pissa-fold": (lambda: svdkit.PiSSA(rank=4, fold=True), True),  # RESIDUAL
    "sorsa": (lambda: svdkit.config("sorsa", rank=4), True),  # vector core (singular values) in B·C, SUBTRACT
    "svft": (lambda: svdkit.config("svft"), False),  # structured core between frozen bases: composed path
}


def adapted(method: str, arch: str = "llama") -> nn.Module:
    model = tiny_model(arch)
    svdkit.adapt(model, METHODS[method][0](), progress=False)
    svdkit.fuse_shared_inputs(model, True)  # opt-in (off by default)
    perturb_adapters(model)
    return model.train()


def test_fusion_is_off_by_default():
    model = tiny_model("llama")
    svdkit.adapt(model, svdkit.LoRA(rank=4), progress=False)
    step(model.train())
    step(model)
    assert all(not layer.fuse_inputs for _, layer in adapted_layers(model)) and groups(model) == set()


def step(model: nn.Module, ids: torch.Tensor = IDS) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward + backward: the output and every gradient (parameters and the embeddings' output)."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids).logits
    (out.pow(2).mean() + out[..., :7].sum() * 1e-3).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def groups(model: nn.Module) -> set[tuple[str, ...]]:
    found = {}
    for name, layer in adapted_layers(model):
        group = layer.input_fusion.group
        if group is not None:
            found.setdefault(id(group), []).append(name)
    return {tuple(sorted(names)) for names in found.values()}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_fused_equals_unfused_outputs_and_gradients(method):
    fused = adapted(method)
    unfused = svdkit.fuse_shared_inputs(copy.deepcopy(fused), False)
    for _ in range(2):  # the first forward observes, the second runs fused
        (y1, g1), (y0, g0) = step(fused), step(unfused)
        torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
        assert g1.keys() == g0.keys() and len(g0) > 0
        for name in g0:
            torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=name)
    expected = {tuple(f"model.layers.{i}.{p}" for p in parts) for i in range(2)
                for parts in (("mlp.gate_proj", "mlp.up_proj"),
                              ("self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"))}
    assert groups(fused) == (expected if METHODS[method][1] else set())
    assert groups(unfused) == set()


def test_training_steps_fused_equal_unfused():
    """AdamW steps: the trained factors agree (fusion changes no result)."""
    fused = adapted("pissa")
    unfused = svdkit.fuse_shared_inputs(copy.deepcopy(fused), False)
    for model in (fused, unfused):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            step(model)
            opt.step()
    for (n1, p1), (n0, p0) in zip(fused.named_parameters(), unfused.named_parameters()):
        torch.testing.assert_close(p1, p0, rtol=1e-4, atol=1e-5, msg=n1)


def direct(x, members):
    """y_i = x W_iᵀ + b_i + s_i·(x A_iᵀ) B_iᵀ − s_i·(x A₀ᵢᵀ) B₀ᵢᵀ with stock autograd ops."""
    outs = []
    for W, b, A, B, A0, B0, s in members:
        y = (x @ W.T if W is not None else 0) + (b if b is not None else 0) + s * (x @ A.T) @ B.T
        outs.append(y - s * (x @ A0.T) @ B0.T if A0 is not None else y)
    return outs


def test_shared_input_fn_matches_the_equation():
    """Different ranks, scalings, a SUBTRACT member, a member without W, biases, W requiring grad, and a
    member whose output does not reach the loss."""
    g = torch.Generator().manual_seed(3)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    n = 5
    x = r(7, n).requires_grad_(True)
    members = [
        (r(6, n).requires_grad_(True), r(6).requires_grad_(True), r(2, n).requires_grad_(True), r(6, 2).requires_grad_(True), None, None, 0.5),
        (r(3, n), None, r(3, n).requires_grad_(True), r(3, 3).requires_grad_(True), r(3, n), r(3, 3), 2.0),
        (None, r(4), r(1, n).requires_grad_(True), r(4, 1).requires_grad_(True), None, None, 1.5),
        (r(2, n), None, r(2, n).requires_grad_(True), r(2, 2).requires_grad_(True), None, None, 1.0),
    ]  # fmt: skip
    weights = [r(m[3].shape[0]) for m in members]
    leaves = [x] + [t for m in members for t in m[:6] if t is not None and t.requires_grad]

    def loss(outs):  # the last member's output is unused
        return sum((o * w).sum() + o.pow(2).sum() for o, w in zip(outs[:3], weights[:3]))

    expected_out = direct(x, members)
    expected = torch.autograd.grad(loss(expected_out), leaves, allow_unused=True)
    flat = [t for m in members for t in m[:6]]
    outs = SharedInputFn.apply(tuple((m[6], m[4] is not None) for m in members), x, *flat)
    for got, want in zip(outs, expected_out):
        torch.testing.assert_close(got, want)
    got_grads = torch.autograd.grad(loss(outs), leaves, allow_unused=True)
    assert sum(want is None for want in expected) == 2  # the unused member's A and B
    for got, want in zip(got_grads, expected):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want)


def test_groups_are_observed_on_the_second_forward():
    model = adapted("lora")
    assert groups(model) == set()
    step(model)
    names = {n.split(".")[-1] for group in groups(model) for n in group}
    assert names == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}  # never o_proj, down_proj
    bert = tiny_model("bert")
    svdkit.adapt(bert, svdkit.LoRA(rank=4), progress=False)
    svdkit.fuse_shared_inputs(bert, True)
    bert(input_ids=IDS)
    bert(input_ids=IDS)
    assert {tuple(n.split(".")[-1] for n in grp) for grp in groups(bert)} == {("key", "query", "value")}


def test_dropout_and_disabled_adapters_are_not_fused():
    model = tiny_model("llama")
    svdkit.adapt(model, svdkit.LoRA(rank=4, dropout=0.1), progress=False)
    svdkit.fuse_shared_inputs(model, True)
    step(model.train())
    step(model)
    assert groups(model) == set()  # each layer would draw its own mask: x is not shared
    fused = adapted("pissa")
    step(fused)
    base = tiny_model("llama")
    with svdkit.adapters_disabled(fused):
        torch.testing.assert_close(fused(input_ids=IDS).logits, base(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)


class Pair(nn.Module):
    """Two linears on one input, or on two inputs when ``split``."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 5), nn.Linear(6, 3)
        self.split = False

    def forward(self, x):
        return self.a(x), self.b(x + 0 if self.split else x)


def test_a_broken_group_falls_back_and_dissolves():
    torch.manual_seed(0)
    pair = Pair()
    svdkit.adapt(pair, svdkit.LoRA(rank=2, targets=["a", "b"]), progress=False)
    svdkit.fuse_shared_inputs(pair, True)
    perturb_adapters(pair)
    plain = svdkit.fuse_shared_inputs(copy.deepcopy(pair), False)
    x = torch.randn(4, 6)
    pair(x)
    pair(x)  # observed: a and b read one tensor
    assert pair.a.input_fusion.group is pair.b.input_fusion.group is not None
    group = pair.a.input_fusion.group
    pair.split = plain.split = True  # b now reads another tensor: a's precomputed output for b is a miss
    for i in range(MAX_MISSES + 1):
        for got, want in zip(pair(x), plain(x)):
            torch.testing.assert_close(got, want)
    assert group.misses == MAX_MISSES and pair.a.input_fusion.group is None and not group.pending


def test_stale_input_or_grad_mode_is_recomputed():
    torch.manual_seed(0)
    pair = Pair()
    svdkit.adapt(pair, svdkit.LoRA(rank=2, targets=["a", "b"]), progress=False)
    svdkit.fuse_shared_inputs(pair, True)
    perturb_adapters(pair)
    x = torch.randn(4, 6)
    pair(x)
    pair(x)
    direct_b = lambda t: nn.functional.linear(t, pair.b.merged_weight(), pair.b.bias)  # noqa: E731
    pair.a(x)  # the group computes b's output for x, with grad …
    with torch.no_grad():  # … asked for without grad: recomputed, no graph
        out = pair.b(x)
        assert not out.requires_grad
        torch.testing.assert_close(out, direct_b(x))
    x2 = torch.randn(4, 6)
    pair.a(x2)  # b's output for x2 …
    x2.mul_(2)  # … then x2 changes in place: b must not take it
    with torch.no_grad():
        torch.testing.assert_close(pair.b(x2), direct_b(x2))


def test_saved_tensors_not_larger_than_unfused():
    """Peak memory: the fused node saves no more than the per-layer nodes (h side by side, small stacks)."""
    fused = adapted("pissa")
    unfused = svdkit.fuse_shared_inputs(copy.deepcopy(fused), False)
    sizes = {}
    for name, model in (("fused", fused), ("unfused", unfused)):
        step(model)
        seen: dict[int, int] = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=IDS).logits.sum().backward()
        sizes[name] = sum(seen.values())
    assert sizes["fused"] <= sizes["unfused"] * 1.01


def test_save_load_merge_unadapt_export_unchanged(tmp_path):
    model = adapted("pissa")
    step(model)
    step(model)  # fused now
    y = model(input_ids=IDS).logits.detach()
    svdkit.save_adapter(model, tmp_path / "ad")
    other = svdkit.load_adapter(tiny_model("llama"), tmp_path / "ad").train()
    assert not groups(other) and not any(layer.fuse_inputs for _, layer in adapted_layers(other))  # off by default
    svdkit.fuse_shared_inputs(other, True)
    step(other)
    torch.testing.assert_close(step(other)[0], y, rtol=1e-5, atol=1e-6)
    assert groups(other)
    svdkit.export_peft(model, tmp_path / "peft")
    assert (tmp_path / "peft" / "adapter_config.json").exists()
    merged = svdkit.merge(copy.deepcopy(model))
    assert not any(True for _ in adapted_layers(merged))
    torch.testing.assert_close(merged(input_ids=IDS).logits, y, rtol=1e-4, atol=1e-5)
    base = svdkit.unadapt(model)
    for (n, p), (_, q) in zip(base.state_dict().items(), tiny_model("llama").state_dict().items()):
        assert torch.equal(p, q), n


def test_copies_observe_their_own_groups():
    model = adapted("lora")
    step(model)
    twin = copy.deepcopy(model)
    assert groups(twin) == set()  # a copy starts unobserved, never points at the original's layers
    step(twin)
    assert len(groups(twin)) == 4
    torch.save(model, io.BytesIO())  # a whole-model pickle (not svdkit's format) still works once groups exist
    rebuild, args = model.model.layers[0].self_attn.q_proj.input_fusion.__reduce__()
    assert rebuild(*args).group is None  # … and unpickles to unobserved slots


def test_switch_errors():
    with pytest.raises(TypeError, match="True or False"):
        svdkit.fuse_shared_inputs(adapted("lora"), "yes")
    with pytest.raises(ValueError, match="no svdkit adapted layers"):
        svdkit.fuse_shared_inputs(tiny_model("llama"))
