"""Hugging Face ``Trainer`` integration: the methods' regularizers and training-time hooks run under
``transformers.Trainer`` exactly as in svdkit's own loop.

    trainer = svdkit.training.hf.SvdkitTrainer(model=adapted_model, args=..., train_dataset=...)

or, with a Trainer subclass of your own, mix in :class:`RegularizedLossMixin` and pass
``callbacks=[SvdkitCallback()]``.
"""

from __future__ import annotations

from transformers import Trainer, TrainerCallback

from svdkit.adapters import api
from svdkit.training.loop import check_one_stream, schedule_weight_decay
from svdkit.training.batches import select_labelled


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


class SvdkitCallback(TrainerCallback):
    """Runs svdkit.after_clipping (and the method's weight-decay schedule) before each optimizer step and
    svdkit.after_step after it."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        check_one_stream(_unwrap(model), "the Hugging Face Trainer")  # BiLoRA needs two data splits

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        api.after_clipping(_unwrap(model), args.learning_rate)
        if optimizer is not None:  # the method's weight-decay schedule (SoMA), as in svdkit's own loop
            schedule_weight_decay(_unwrap(model), optimizer, state.global_step, state.max_steps)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        api.after_step(_unwrap(model), state.global_step, state.max_steps)


class RegularizedLossMixin:
    """Adds ``svdkit.regularization(model)`` to the Trainer's loss, and for methods with an output-space
    regularizer (BA-LoRA) ``svdkit.output_regularization`` on the logits at the labelled positions (the
    positions whose next token is labelled, as in svdkit's own loop).

    With gradient accumulation over k micro-batches, each micro-batch adds 1/k of both terms to the gradient,
    so one optimizer step sees the regularizer once and the output term averaged over its micro-batches,
    exactly as svdkit's loop: where the Trainer divides the micro-batch loss by k itself the terms are added
    whole, and where it does not (the loss is already normalized by ``num_items_in_batch``: models that take
    loss kwargs, or a ``compute_loss_func``) they are added divided by k.
    """

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        net = _unwrap(model)
        labels = inputs.get("labels")  # before the Trainer may pop it
        with_outputs = api.uses_outputs(net)
        if with_outputs and labels is None:
            raise ValueError(f"{type(api.state(net).config).__name__}'s output regularizer needs `labels` in the batch "
                             "(-100 where no loss is taken) to choose the positions it regularizes.")
        result = super().compute_loss(model, inputs, return_outputs=return_outputs or with_outputs, **kwargs)
        loss, outputs = result if (return_outputs or with_outputs) else (result, None)
        share = 1.0 / _micro_batches(self, kwargs.get("num_items_in_batch")) if model.training else 1.0
        loss = loss + share * api.regularization(net).to(loss.device)
        if with_outputs:
            batch = {k: inputs[k] for k in ("input_ids", "attention_mask") if inputs.get(k) is not None}
            batch["labels"] = labels
            logits = select_labelled(outputs["logits"], labels)
            loss = loss + share * api.output_regularization(net, batch, logits).to(loss.device)
        return (loss, outputs) if return_outputs else loss


def _micro_batches(trainer, num_items_in_batch) -> int:
    """k when the Trainer will not divide this micro-batch's loss by k itself (the rule of its training_step:
    the loss was normalized by ``num_items_in_batch``), else 1."""
    scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
    if scaled is None:
        scaled = (getattr(trainer, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) or (
            getattr(trainer, "compute_loss_func", None) is not None)  # fmt: skip
    k = getattr(trainer, "current_gradient_accumulation_steps", None) or trainer.args.gradient_accumulation_steps
    return int(k) if scaled else 1


class SvdkitTrainer(RegularizedLossMixin, Trainer):
    """``transformers.Trainer`` with svdkit's regularizers and hooks applied automatically."""

    def __init__(self, *args, callbacks=None, **kwargs):
        callbacks = list(callbacks or [])
        if not any(isinstance(c, SvdkitCallback) for c in callbacks):
            callbacks.append(SvdkitCallback())
        super().__init__(*args, callbacks=callbacks, **kwargs)
