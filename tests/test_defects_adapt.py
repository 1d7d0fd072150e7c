"""Regression tests for issue 11 (adapting): modes, the CLI's method defaults, CLOVER's head size, config
validation and loading an adapter onto the same weights in another dtype."""

from __future__ import annotations

import argparse
import dataclasses
import warnings

import pytest
import torch

import svdkit
from svdkit.core.registry import config, methods

from conftest import adapt, model_output, perturb_adapters, tiny_model


# -- item 2: new modules take the mode of the module they replace ----------------------------------------
def _modes(model) -> set[bool]:
    return {m.training for m in model.modules()}


def test_adapt_in_eval_mode_is_deterministic_and_keeps_every_mode(ids):
    model = tiny_model("llama").eval()
    svdkit.adapt(model, svdkit.MiLoRA(rank=4, dropout=0.5))
    assert _modes(model) == {False}
    with torch.no_grad():
        assert torch.equal(model_output(model, ids), model_output(model, ids))  # no dropout in eval mode
    model.train()
    assert _modes(model) == {True}


@pytest.mark.parametrize("leave", ["merge", "unadapt", "load"])
def test_merge_unadapt_and_load_keep_the_mode(leave, tmp_path):
    for training in (False, True):
        model = tiny_model("llama").train(training)
        svdkit.adapt(model, svdkit.PiSSA(rank=2, dropout=0.1))
        if leave == "load":
            svdkit.save_adapter(model, tmp_path / f"a{training}")
            model = svdkit.load_adapter(tiny_model("llama").train(training), tmp_path / f"a{training}")
        else:
            getattr(svdkit, leave)(model)
        assert _modes(model) == {training}, (leave, training)


# -- item 3: `svdkit finetune` keeps each method's own defaults --------------------------------------------
def _cli_method_config(name: str):
    from svdkit.cli import finetune as cli

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["finetune", "--method", name])
    return cli.finetune_config(args).adapter_config()


@pytest.mark.parametrize("name", methods("adapt"))
def test_the_cli_without_options_builds_the_methods_own_config(name):
    built, own = _cli_method_config(name), config(name)
    assert dataclasses.replace(built, seed=own.seed) == own


def test_the_readme_main_job_is_still_pissa_rank_16():
    from svdkit.training.finetune import FinetuneConfig

    assert FinetuneConfig().adapter_config() == svdkit.PiSSA(rank=16)
    assert FinetuneConfig(method="effort").adapter_config().rank == 1  # not 16
    assert FinetuneConfig(method="lora-one", rank=4).adapter_config().rank == 4  # a given rank still applies


# -- item 9: CLOVER reads the head size from the model's config --------------------------------------------
def _llama(head_dim: int):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=2 * head_dim, intermediate_size=4 * head_dim, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)  # fmt: skip
    return tf.LlamaForCausalLM(cfg).eval()


def test_clover_takes_the_models_head_size():
    model = _llama(16)  # head size 16, not the old constant 64
    svdkit.adapt(model, svdkit.CLOVER(targets="q_proj", vo_pair=None))
    layer = model.model.layers[0].self_attn.q_proj
    assert tuple(layer.core.value.shape) == (2, 16, 16)  # 2 heads of 16 rows
    assert model._svdkit.config.head_dim == 16  # saved with the adapter


def test_clover_head_size_from_hidden_over_heads_and_disagreement_is_an_error():
    cfg = svdkit.CLOVER()
    assert cfg.for_model(argparse.Namespace(hidden_size=256, num_attention_heads=2)).head_dim == 128
    with pytest.raises(ValueError, match="head_dim=64 disagrees with the model's head size 16"):
        svdkit.adapt(_llama(16), svdkit.CLOVER(head_dim=64, targets="q_proj"))
    with pytest.raises(ValueError, match="no config giving its head size.*pass head_dim"):
        svdkit.adapt(torch.nn.Sequential(torch.nn.Linear(8, 8)), svdkit.CLOVER(targets="0"))


# -- item 13: configs validate types and ranges at construction ---------------------------------------------
@pytest.mark.parametrize("options,match", [
    (dict(alpha=float("inf")), "alpha must be a positive finite number"),
    (dict(alpha=float("nan")), "alpha must be a positive finite number"),
    (dict(alpha=True), "alpha must be"),
    (dict(niter=2.5), "niter must be an integer"),
    (dict(oversample="8"), "oversample must be an integer"),
    (dict(seed=0.5), "seed must be an integer"),
    (dict(fold="no"), "fold must be True or False"),
    (dict(use_rslora=1), "use_rslora must be True or False"),
    (dict(dropout="0.1"), "dropout must be a number"),
    (dict(targets=("q_proj", 3)), "targets must be"),
    (dict(exclude=5), "exclude must be a regex"),
    (dict(overrides={"q_proj": {"rank": 2.5}}), "override 'q_proj': .*rank must be a positive integer"),
])  # fmt: skip
def test_configs_reject_bad_types_and_ranges(options, match):
    with pytest.raises(ValueError, match=match):
        svdkit.PiSSA(**options)


# -- item 8: the same weights in another dtype load (and say so) --------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_an_fp32_adapter_loads_onto_the_same_weights_in_another_dtype(dtype, tmp_path, ids):
    model = adapt(tiny_model("llama"), svdkit.PiSSA(rank=2))
    perturb_adapters(model)
    svdkit.save_adapter(model, tmp_path / "a")
    with pytest.warns(UserWarning, match=r"same weights, different dtype.*float32 → " + str(dtype)[6:]):
        served = svdkit.load_adapter(tiny_model("llama").to(dtype), tmp_path / "a")
    with torch.no_grad():
        y, y_served = model_output(model, ids), model_output(served, ids).float()
    assert (y_served - y).abs().max() < 0.05 * y.abs().max()


def test_other_weights_in_another_dtype_are_still_refused(tmp_path):
    model = svdkit.adapt(tiny_model("llama"), svdkit.PiSSA(rank=2))
    svdkit.save_adapter(model, tmp_path / "a")
    other = tiny_model("llama", seed=1).to(torch.bfloat16)
    with pytest.raises(svdkit.adapters.saving.FingerprintMismatch, match="different base model"):
        svdkit.load_adapter(other, tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the exact weights: no warning
        svdkit.load_adapter(tiny_model("llama"), tmp_path / "a")
