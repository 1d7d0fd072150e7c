"""`svdkit compress`: options → a compression config; calibrate, compress, measure, save (no logic of its own
beyond choosing the calibration and held-out text and timing the forward pass)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

HELP = "compress a model's linears into low-rank factors (SVD-LLM, ASVD, FWSVD, WeLore, …) and save it"


def add_parser(sub) -> None:
    p = sub.add_parser("compress", help=HELP)
    p.add_argument("--model", default="default", help="'default', a local Hugging Face folder, or a .gguf file (default: default)")
    p.add_argument("--method", default="svd-llm", help="a method of `svdkit methods --kind compress` (default: svd-llm)")
    p.add_argument("--ratio", type=float, default=0.2, help="fraction of the target linears' parameters removed (default: 0.2)")
    p.add_argument("--calibration-data", default="lee", help="named dataset (lee, chatterbot) or JSONL file; its "
                   "held-out part measures perplexity (default: lee)")  # fmt: skip
    p.add_argument("--calibration-samples", type=int, default=None, help="calibration sequences (default: the method's, 16)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per sequence (default: 128)")
    p.add_argument("--heldout", type=int, default=32, help="held-out sequences for perplexity (default: 32)")
    p.add_argument("--update", action="store_true", help="svd-llm: closed-form least-squares update of the left factors")
    p.add_argument("--targets", default=None, help="all-linear, attention, mlp, or a regex (default: all-linear)")
    p.add_argument("--svd", default=None, help="exact or randomized (default: exact)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration/held-out split and the SVD (default: 0)")
    p.add_argument("--out", required=True, help="output folder (refused if it exists and is not empty, unless --overwrite)")
    p.add_argument("--dense", action="store_true", help="also write OUT/dense/: plain weights from_pretrained loads")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def forward_seconds(model, batch: dict, repeats: int = 5) -> float:
    """Median wall time of one no-grad forward pass on ``batch`` (after one warm-up)."""
    import torch

    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            t = time.perf_counter()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            if i:
                times.append(time.perf_counter() - t)
    return statistics.median(times)


def weight_bytes(model) -> tuple[int, int]:
    """(parameters, bytes) of the model's distinct tensors (tied weights counted once)."""
    seen = {}
    for t in model.state_dict().values():
        seen[(t.data_ptr(), t.shape)] = t
    return sum(t.numel() for t in seen.values()), sum(t.numel() * t.element_size() for t in seen.values())


def run(args) -> int:
    import svdkit
    from svdkit.training import batches, data

    if Path(args.out).is_dir() and any(Path(args.out).iterdir()) and not args.overwrite:
        raise FileExistsError(f"{args.out} exists and is not empty; pass --overwrite or choose another --out.")
    options = {"ratio": args.ratio, "seed": args.seed}
    if args.targets:
        options["targets"] = args.targets
    if args.svd:
        options["svd"] = args.svd
    if args.update:
        options["update"] = True
    cfg = svdkit.config(args.method, **options)
    model, tok = svdkit.load_model(args.model)
    if tok is None:
        raise ValueError(f"{args.model} has no tokenizer; compress needs one to read the calibration/held-out text.")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    examples = data.load_examples(args.calibration_data, tok, max_length=args.max_length)
    train, held = data.split(examples, 0.5, args.seed)  # disjoint halves: calibrate on one, measure on the other
    held = held[: args.heldout]
    n_cal = args.calibration_samples or cfg.calibration_samples
    if len(train) < n_cal:
        raise ValueError(f"{args.calibration_data} gives {len(train)} calibration sequences, fewer than "
                         f"--calibration-samples {n_cal}; pass fewer samples or more text.")  # fmt: skip
    calibration = [batches.collate(train[i: i + 4], pad) for i in range(0, n_cal, 4)] if cfg.uses_calibration else None
    timing = batches.collate(held[:4], pad)
    params0, bytes0 = weight_bytes(model)
    _, ppl0 = batches.eval_loss(model, held, 8, pad)
    t0 = forward_seconds(model, timing)
    report = svdkit.compress(model, cfg, calibration=calibration)
    params1, bytes1 = weight_bytes(model)
    _, ppl1 = batches.eval_loss(model, held, 8, pad)
    t1 = forward_seconds(model, timing)
    t0b = forward_seconds(svdkit.load_model(args.model)[0], timing)  # the original again, side by side
    base = min(t0, t0b)
    cal = f"{n_cal} × ≤{args.max_length} tokens of {args.calibration_data}" if calibration else "none (data-free)"
    summary = "\n".join([
        f"# svdkit compress: {args.method}, ratio {args.ratio}", "",
        f"model {args.model}; calibration {cal}; held-out {len(held)} sequences of the same source, disjoint.", "",
        "| | original | compressed |", "|---|---|---|",
        f"| perplexity (held-out) | {ppl0:.3f} | {ppl1:.3f} |",
        f"| parameters | {params0:,} | {params1:,} |",
        f"| weight bytes | {bytes0:,} | {bytes1:,} |",
        f"| forward time, 4 held-out sequences (median of 5) | {base * 1e3:.1f} ms | {t1 * 1e3:.1f} ms ({t1 / base:.2f}×) |",
        "", f"Targets: {report.removed:.1%} of {report.params_before:,} parameters removed; compression took "
        f"{report.seconds:.1f} s.", "",
    ])  # fmt: skip
    out = svdkit.save_compressed(model, args.out, tokenizer=tok, config=cfg, report=summary + "\n" + report.to_markdown(),
                                 dense=args.dense, overwrite=args.overwrite)  # fmt: skip
    size = (out / "model.safetensors").stat().st_size
    print(summary + f"\nsaved {out} (model.safetensors {size:,} bytes){' with dense/' if args.dense else ''}; report: {out / 'report.md'}")
    return 0
