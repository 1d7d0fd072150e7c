"""`svdkit inspect MODEL [--base BASE] [--data NAME|FILE] --out DIR`: spectrum.csv, spectrum.json, report.html.

MODEL / BASE: ``default``, a Hugging Face folder, a ``.gguf`` file, a ``svdkit finetune`` run folder (its
base model with the run's adapter loaded: compared with its own base) or a PEFT adapter folder (loaded
onto the base its adapter_config.json names, which must be a local path). No logic here beyond loading.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

HELP = "weight spectra of a model (and what fine-tuning changed): spectrum.csv/json and report.html"


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help=HELP)
    p.add_argument("model", help="'default', a Hugging Face folder, a .gguf file, a finetune run folder or a PEFT adapter folder")
    p.add_argument("--base", help="the model MODEL was fine-tuned from (same kinds of input)")
    p.add_argument("--data", help="a named dataset or JSONL file: adds gradient spectra and the matrix nuclear norm")
    p.add_argument("--samples", type=int, default=16, help="--data: examples used (default 16)")
    p.add_argument("--k", type=int, default=10, help="top-k singular directions checked for intruders (default 10)")
    p.add_argument("--eps", type=float, default=0.5, help="intruder threshold on the best |cos| (default 0.5)")
    p.add_argument("--device", help="where the SVDs run: cpu, cuda, ... (default: where the weights are)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder svdkit wrote")


def load(source: str):
    """(model, tokenizer, kind) for any MODEL form the command accepts."""
    from svdkit.core.models import load_model

    path = Path(source).expanduser()
    if (path / "adapter" / "svdkit.json").is_file() and (path / "config.json").is_file():
        from svdkit.adapters.saving import load_adapter
        from svdkit.training.finetune import FinetuneConfig

        cfg = FinetuneConfig.from_file(path / "config.json")
        model, tok = load_model(cfg.model)
        load_adapter(model, path / "adapter")
        return model, tok, f"svdkit run ({cfg.method}, rank {cfg.rank}) on {cfg.model}"
    if (path / "adapter_config.json").is_file():
        import peft

        base_name = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base_name or not (Path(base_name).is_dir() or base_name == "default"):
            raise FileNotFoundError(f"{path}/adapter_config.json names base model {base_name!r}, which is not a local "
                                    "folder; svdkit never downloads. Edit base_model_name_or_path to a local path.")  # fmt: skip
        model, tok = load_model(base_name)
        return peft.PeftModel.from_pretrained(model, str(path)), tok, f"PEFT adapter on {base_name}"
    model, tok = load_model(source)
    return model, tok, "model"


def _signals(model, tok, data_name: str, samples: int) -> dict:
    from svdkit.inspection.signals import gradient_spectrum, nuclear_norm_score
    from svdkit.training import data
    from svdkit.training.batches import collate, epoch_order

    if tok is None:
        raise ValueError("--data needs a tokenizer, and the model has none.")
    model = _merged(model)  # gradients of the effective weights W₀ + ΔW, as plain linear layers
    items = data.load_examples(data_name, tok, max_length=128)
    chosen = [items[j] for j in epoch_order(len(items), 0, 0)[:samples]]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batches = [collate(chosen[i : i + 4], pad) for i in range(0, len(chosen), 4)]
    return {"data": data_name, "examples": len(chosen), "nuclear_norm_score": nuclear_norm_score(model, batches),
            "gradient_spectrum": gradient_spectrum(model, batches)}  # fmt: skip


def _merged(model):
    from svdkit.adapters.api import adapted_layers, merge

    if hasattr(model, "merge_and_unload"):  # PEFT
        return model.merge_and_unload()
    if next(adapted_layers(model), None) is not None:
        merge(model)
    return model


def run(args) -> int:
    from svdkit.inspection.report import write_report
    from svdkit.inspection.spectrum import spectrum

    start = time.perf_counter()
    model, tok, kind = load(args.model)
    base = load(args.base)[0] if args.base else None
    rows = spectrum(model, base=base, k=args.k, eps=args.eps, device=args.device)
    meta = {"model": args.model, "kind": kind, "base": args.base or "", "k": args.k, "eps": args.eps,
            "spectrum_seconds": round(time.perf_counter() - start, 2)}  # fmt: skip
    signals = _signals(model, tok, args.data, args.samples) if args.data else None
    out = write_report(rows, args.out, meta, signals, overwrite=args.overwrite)
    print(f"svdkit inspect: {len(rows)} matrices → {out}/report.html, spectrum.csv, spectrum.json")
    return 0
