"""`svdkit merge RECIPE.yaml --out DIR [--lora-out]`: a recipe → :func:`svdkit.merge_models` (no logic here)."""

from __future__ import annotations

HELP = "merge fine-tuned models / LoRAs into a base with a merge method (YAML recipe in mergekit's spirit)"


def add_parser(sub) -> None:
    p = sub.add_parser("merge", help=HELP, description=HELP + ". Recipe keys: method, base, models: [{model, weight}], parameters.")
    p.add_argument("recipe", help="the YAML recipe (see svdkit.merging.recipe)")
    p.add_argument("--out", required=True, help="output folder: safetensors shards + index + config + tokenizer + the recipe")
    p.add_argument("--lora-out", action="store_true", help="with LoRA inputs: also write OUT/lora, the merged update as a PEFT LoRA "
                   "(exact for knots and core-space; otherwise truncated, error reported)")
    p.add_argument("--shard-size", default="2GB", help="largest output shard (default: 2GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder written by svdkit")


def run(args) -> int:
    import json
    from pathlib import Path

    from svdkit.merging import merge_models
    from svdkit.merging.recipe import read_recipe

    r = read_recipe(args.recipe)
    out = merge_models(r["base"], r["models"], r["cfg"], r["weights"], out=args.out, overwrite=args.overwrite,
                       lora_out=args.lora_out, shard_size=args.shard_size, recipe=r["text"])  # fmt: skip
    report = json.loads((Path(out) / "svdkit_merge.json").read_text())
    print(f"svdkit merge: {r['cfg'].name} of {len(r['models'])} models -> {out} ({report['tensors_changed']} of "
          f"{report['tensors']} tensors changed, {len(report['shards'])} shard(s), {report['seconds']:.1f} s)")
    if report["lora"]:
        lora = report["lora"]
        what = "exact" if lora["exact"] else f"truncated: max relative error {lora['max_relative_error']:.3g}"
        print(f"merged LoRA: {out}/lora ({lora['modules']} modules, {what})")
    return 0
