"""Tiny in-memory models (built from configs, never downloaded) shared by the tests."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch

import svdkit

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core: one thread each, no oversubscription
    torch.set_num_threads(1)

ARCHS = ("llama", "gpt2", "bert")
VOCAB = 128


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A 2-layer model with hidden size 32 and random weights; the same seed gives the same weights."""
    import transformers as tf

    torch.manual_seed(seed)
    if arch in ("llama", "llama-mha"):  # GQA (2 kv heads), or multi-head attention
        cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2 if arch == "llama" else 4, vocab_size=VOCAB, max_position_embeddings=64)
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)
        model = tf.GPT2LMHeadModel(cfg)
    elif arch == "bert":
        cfg = tf.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=VOCAB, max_position_embeddings=64)
        model = tf.BertModel(cfg)
    else:
        raise ValueError(arch)
    with torch.no_grad():  # random-init biases are zero; make them non-zero so bias handling is tested
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    return model.eval()


def model_output(model, ids: torch.Tensor) -> torch.Tensor:
    return model_output_of(model(input_ids=ids))


def perturb_adapters(model, scale: float = 0.05, seed: int = 1) -> None:
    """Move every trainable tensor away from its init, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def calibration_batches(n: int = 3, seed: int = 0) -> list[dict]:
    """Token batches for calibrating tiny models: padding in the second row, unlabelled prompt tokens."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (2, 24), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 21:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :3] = -100
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def output_loss(model, batch: dict) -> torch.Tensor:
    """A loss every tiny model has (BERT has no LM head): mean square of the outputs (and BERT's pooler)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    pooled = getattr(out, "pooler_output", None)
    return model_output_of(out).pow(2).mean() + (0 if pooled is None else pooled.pow(2).mean())


def model_output_of(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def calibration_for(model, cfg):
    """Statistics on calibration_batches when the method is data-aware, else None."""
    if not cfg.uses_calibration:
        return None
    return svdkit.calibrate(model, calibration_batches(), cfg, loss=output_loss, progress=False)


def adapt(model, cfg, **kwargs):
    """svdkit.adapt, calibrating first when the method is data-aware."""
    kwargs.setdefault("calibration", calibration_for(model, cfg))
    return svdkit.adapt(model, cfg, **kwargs)


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def tiny_run_inputs(tmp_path_factory):
    """A tiny Llama (hidden 32) with the SmolLM2 tokenizer saved as a local folder, and a JSONL file."""
    import transformers as tf

    root = tmp_path_factory.mktemp("ft")
    tok = tf.AutoTokenizer.from_pretrained(str(svdkit.core.models.default_model_dir()))
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256)  # fmt: skip
    tf.LlamaForCausalLM(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    lines = [json.dumps({"prompt": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."})
             for a in range(8) for b in range(5)]  # fmt: skip
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return root / "model", root / "data.jsonl"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread is several times faster than two on a shared, loaded CPU (modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_grads(shape, n: int, seed: int = 0) -> list[torch.Tensor]:
    """``n`` seeded Gaussian tensors of ``shape`` (a gradient stream for optimizer tests)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def free_port() -> int:
    """A free TCP port on localhost for a gloo process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
