"""Hugging Face ``Trainer`` integration: the methods' regularizers and training-time hooks run under
``transformers.Trainer`` exactly as in svdkit's own loop.

    trainer = svdkit.hf.SvdkitTrainer(model=adapted_model, args=..., train_dataset=...)

or, with a Trainer subclass of your own, mix in :class:`RegularizedLossMixin` and pass
``callbacks=[SvdkitCallback()]``.
"""

from __future__ import annotations

from transformers import Trainer, TrainerCallback

from . import api


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


class SvdkitCallback(TrainerCallback):
    """Runs svdkit.after_clipping before each optimizer step and svdkit.after_step after it."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        api.after_clipping(_unwrap(model), args.learning_rate)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        api.after_step(_unwrap(model), state.global_step, state.max_steps)


class RegularizedLossMixin:
    """Adds ``svdkit.regularization(model)`` to the Trainer's loss."""

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        loss, outputs = result if return_outputs else (result, None)
        loss = loss + api.regularization(_unwrap(model)).to(loss.device)
        return (loss, outputs) if return_outputs else loss


class SvdkitTrainer(RegularizedLossMixin, Trainer):
    """``transformers.Trainer`` with svdkit's regularizers and hooks applied automatically."""

    def __init__(self, *args, callbacks=None, **kwargs):
        callbacks = list(callbacks or [])
        if not any(isinstance(c, SvdkitCallback) for c in callbacks):
            callbacks.append(SvdkitCallback())
        super().__init__(*args, callbacks=callbacks, **kwargs)
