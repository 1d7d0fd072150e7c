"""svdkit.calibrate: the statistics against direct computations, sharing, files, and the fit checks of adapt."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch

import svdkit
from svdkit.core.calibration import Calibration, Statistic
from svdkit.adapters.layers import weight_matrix
from svdkit.core.statistics import InputCovariance, MeanGradient
from svdkit.core.targets import select_targets

from conftest import calibration_batches, output_loss, tiny_model


@dataclass(frozen=True)
class CovarianceLoRA(svdkit.LoRA):
    """A data-aware test method (not registered): LoRA that measures input covariances."""

    scale: str = "none"
    uses_calibration = True

    def statistic(self):
        return InputCovariance(scale=self.scale)


@dataclass(frozen=True)
class GradientLoRA(svdkit.LoRA):
    uses_calibration = True

    def statistic(self):
        return MeanGradient()


def _inputs(model, names, batches):
    """Each named module's input rows per batch (captured by hand)."""
    seen = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach()))
             for n in names]  # fmt: skip
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("scale", ["none", "max"])
def test_covariance_is_the_mean_of_per_sequence_gram_matrices(scale):
    model, batches = tiny_model("llama"), calibration_batches()
    stats = svdkit.calibrate(model, batches, CovarianceLoRA(scale=scale), progress=False)
    name = "model.layers.1.mlp.down_proj"
    xs = _inputs(model, [name], batches)[name]
    total, sequences = torch.zeros(64, 64, dtype=torch.float64), 0
    for x, b in zip(xs, batches):
        for i in range(x.shape[0]):
            X = x[i][b["attention_mask"][i].bool()].double()  # padding rows are left out
            if scale == "max":
                X = X / X.max()
            total += X.T @ X
            sequences += 1
    C = stats[name]["covariance"]
    assert C.dtype == torch.float64 and C.shape == (64, 64)
    torch.testing.assert_close(C, total / sequences, rtol=1e-5, atol=1e-7)
    assert stats.samples == 6 and stats.tokens == sum(int(b["attention_mask"].sum()) for b in batches)


def test_modules_reading_one_input_are_measured_once():
    model = tiny_model("llama")
    stats = svdkit.calibrate(model, calibration_batches(), CovarianceLoRA(), progress=False)
    q, k, v = (f"model.layers.0.self_attn.{p}_proj" for p in "qkv")
    gate, up, o = "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.self_attn.o_proj"
    assert stats.aliases[k] == q and stats.aliases[v] == q and stats.aliases[up] == gate
    assert o not in stats.aliases and gate not in stats.aliases
    assert stats[k] is stats[q]
    assert len(stats.tensors) == 2 * 4  # per block: q/k/v, o, gate/up, down
    assert set(stats.names) == {n for n, _ in select_targets(model, "all-linear")}
    assert not torch.equal(stats[o]["covariance"], stats[q]["covariance"])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mean_gradient_equals_the_averaged_weight_gradients(arch):
    model, batches = tiny_model(arch), calibration_batches()
    stats = svdkit.calibrate(model, batches, GradientLoRA(), progress=False)
    name, module = next(iter(select_targets(model, "all-linear")))
    expected = torch.zeros_like(weight_matrix(module))
    for b in batches:
        model.zero_grad()
        model(**b).loss.backward()
        expected += module.weight.grad.T if arch == "gpt2" else module.weight.grad  # Conv1D stores Wᵀ
    model.zero_grad()
    torch.testing.assert_close(stats[name]["gradient"], expected / len(batches), rtol=1e-5, atol=1e-7)
    assert stats.batches == 3 and not stats.aliases  # every weight has its own gradient


def test_the_model_is_left_as_it_was():
    model = tiny_model("gpt2").train()
    model.transformer.wte.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    svdkit.calibrate(model, calibration_batches(), GradientLoRA(), progress=False)
    svdkit.calibrate(model, calibration_batches(), CovarianceLoRA(), progress=False)
    assert model.training and flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_custom_loss_for_models_without_one():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="loss="):
        svdkit.calibrate(model, calibration_batches(), GradientLoRA(), progress=False)
    stats = svdkit.calibrate(model, calibration_batches(), GradientLoRA(), loss=output_loss, progress=False)
    assert all(stats[n]["gradient"].abs().sum() > 0 for n in stats.names)


def test_max_batches_and_early_stop_on_convergence():
    @dataclass(frozen=True)
    class Counter(Statistic):
        after: int = 2
        kind = "counter"

        def start(self, n_in, m_out, device):
            return {"n": torch.zeros(())}

        def update(self, state, x, counts):
            state["n"] += 1

        def converged(self, state):
            return int(state["n"]) >= self.after

        def finish(self, state):
            return {"n": state["n"]}

    @dataclass(frozen=True)
    class CounterLoRA(svdkit.LoRA):
        after: int = 2
        uses_calibration = True

        def statistic(self):
            return Counter(after=self.after)

    model = tiny_model("llama")
    stats = svdkit.calibrate(model, calibration_batches(6), CounterLoRA(after=2), progress=False)
    assert stats.batches == 2 and all(int(stats[n]["n"]) == 2 for n in stats.names)
    stats = svdkit.calibrate(model, calibration_batches(6), CounterLoRA(after=99), max_batches=4, progress=False)
    assert stats.batches == 4
    assert stats.statistic == {"kind": "counter", "after": 99}


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model("llama")
    stats = svdkit.calibrate(model, calibration_batches(), CovarianceLoRA(), progress=False)
    path = stats.save(tmp_path / "sub" / "calib.safetensors")
    back = Calibration.load(path)
    assert back.names == stats.names and back.aliases == stats.aliases and back.statistic == stats.statistic
    assert (back.samples, back.tokens, back.batches) == (stats.samples, stats.tokens, stats.batches)
    for name in stats.names:
        for key, t in stats[name].items():
            assert torch.equal(back[name][key], t)
    assert [p.name for p in path.parent.iterdir()] == ["calib.safetensors"]  # no temporary left behind
    with pytest.raises(FileNotFoundError, match="svdkit.calibrate"):
        Calibration.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an svdkit calibration"):
        Calibration.load(tmp_path / "other.safetensors")


def test_adapt_asks_for_statistics_and_checks_they_fit():
    model, cfg = tiny_model("llama"), CovarianceLoRA(rank=2)
    with pytest.raises(ValueError, match=r"svdkit.calibrate\(model, batches, cfg\).*--calibration-data"):
        svdkit.adapt(model, cfg)
    stats = svdkit.calibrate(model, calibration_batches(), cfg, progress=False)
    with pytest.raises(ValueError, match="does not use calibration"):
        svdkit.adapt(model, svdkit.LoRA(rank=2), calibration=stats)
    with pytest.raises(ValueError, match="computed as .*needs"):
        svdkit.adapt(model, CovarianceLoRA(rank=2, scale="max"), calibration=stats)
    with pytest.raises(ValueError, match="different targets"):
        svdkit.adapt(model, CovarianceLoRA(rank=2, targets="all-linear"),
                     calibration=svdkit.calibrate(model, calibration_batches(), dataclasses.replace(cfg, targets="attention"), progress=False))  # fmt: skip
    with pytest.raises(ValueError, match="different weights"):
        svdkit.adapt(tiny_model("llama", seed=1), cfg, calibration=stats)
    with pytest.raises(TypeError, match="svdkit.Calibration"):
        svdkit.adapt(model, cfg, calibration={"x": 1})
    assert not any(isinstance(m, svdkit.adapters.layers.SpectralLinear) for m in model.modules())  # nothing half-done
    svdkit.adapt(model, cfg, calibration=stats)
    with pytest.raises(ValueError, match="already adapted"):
        svdkit.calibrate(model, calibration_batches(), cfg)


def test_bad_calibration_data():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="empty"):
        svdkit.calibrate(model, [], CovarianceLoRA(), progress=False)
    with pytest.raises(ValueError, match="input_ids"):
        svdkit.calibrate(model, [{"attention_mask": torch.ones(1, 3)}], CovarianceLoRA(), progress=False)
    masked = [{"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": torch.zeros(1, 4, dtype=torch.long)}]
    with pytest.raises(ValueError, match="no non-padding tokens"):
        svdkit.calibrate(model, masked, CovarianceLoRA(), progress=False)
    with pytest.raises(ValueError, match="does not use calibration"):
        svdkit.calibrate(model, calibration_batches(), svdkit.LoRA())
    with pytest.warns(UserWarning, match="rank-deficient"):
        svdkit.calibrate(model, calibration_batches(1), CovarianceLoRA(), progress=False)
    unused = tiny_model("bert")  # the pooler is not part of the hidden-state loss: no gradient reaches it
    loss = lambda m, b: m(input_ids=b["input_ids"]).last_hidden_state.pow(2).mean()  # noqa: E731
    with pytest.raises(ValueError, match=r"got no gradient.*pooler.dense.*exclude"):
        svdkit.calibrate(unused, calibration_batches(), GradientLoRA(), loss=loss, progress=False)


@dataclass(frozen=True)
class RegisteredCovarianceLoRA(CovarianceLoRA):
    name = "test-covariance-lora"
    calibration_samples = 5


def test_finetune_calibrates_saves_and_reuses_the_statistics(tiny_run_inputs, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from svdkit.training.finetune import FinetuneConfig, finetune

    from svdkit.core.registry import _REGISTRY

    monkeypatch.setitem(_REGISTRY, RegisteredCovarianceLoRA.name, RegisteredCovarianceLoRA)
    model, data = tiny_run_inputs
    base = dict(model=str(model), data=str(data), method=RegisteredCovarianceLoRA.name, rank=2, steps=2, batch_size=2,
                eval_every=2, samples=0, max_heldout=4)  # fmt: skip
    finetune(FinetuneConfig(**base), tmp_path / "a", progress=False, log=lambda *_: None)
    stats = Calibration.load(tmp_path / "a" / "calibration.safetensors")
    assert stats.samples == 5 and stats.batches == 3  # the method's default count, in batches of batch_size
    reuse = FinetuneConfig(**base, calibration_file=str(tmp_path / "a" / "calibration.safetensors"))
    finetune(reuse, tmp_path / "b", progress=False, log=lambda *_: None)
    a, b = (load_file(str(tmp_path / d / "adapter" / "adapter.safetensors")) for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    finetune(FinetuneConfig(**base, calibration_samples=3), tmp_path / "c", progress=False, log=lambda *_: None)
    assert Calibration.load(tmp_path / "c" / "calibration.safetensors").samples == 3
    with pytest.raises(ValueError, match="calibration_samples must be positive"):
        FinetuneConfig(**base, calibration_samples=0)


def test_cli_has_the_calibration_options(capsys):
    from svdkit.cli import main

    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = capsys.readouterr().out
    for option in ("--calibration-data", "--calibration-samples", "--calibration-file"):
        assert option in text
