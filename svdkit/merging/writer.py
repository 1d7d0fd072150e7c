"""Writing a merged checkpoint tensor by tensor: safetensors shards whose headers are known in advance.

The merge keeps every tensor's shape and dtype, so each shard's header (names, dtypes, shapes, byte offsets)
is written first and the tensors' bytes follow one at a time as they are merged: no shard is ever held in
memory. The file layout is the safetensors format (8-byte little-endian header length, JSON header padded
with spaces to a multiple of 8, then the data), so ``safetensors.safe_open`` and ``from_pretrained`` read it.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch
from torch import Tensor

from svdkit.merging.sources import ST_DTYPES, WEIGHT_FILE, WEIGHT_INDEX

ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
SKIP_FILES = {WEIGHT_INDEX, "pytorch_model.bin.index.json", "README.md", "svdkit_merge.json", "merge.yaml"}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like '2GB', '500MB' (decimal units, as mergekit's --out-shard-size)."""
    if isinstance(size, int):
        return size
    text = size.strip().upper().rstrip("B")
    units = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


class ShardedWriter:
    """Streams tensors, in the planned order, into ``model.safetensors`` or ``model-0000k-of-0000N.safetensors``
    shards of at most ``shard_size`` bytes (a tensor larger than that gets a shard of its own)."""

    def __init__(self, folder: Path, specs: list[tuple[str, tuple[int, ...], torch.dtype]], shard_size: int):
        self.folder, self.shards, current, size = folder, [], [], 0
        for spec in specs:
            b = nbytes(spec[1], spec[2])
            if current and size + b > shard_size:
                self.shards.append(current)
                current, size = [], 0
            current.append(spec)
            size += b
        if current or not self.shards:
            self.shards.append(current)
        n = len(self.shards)
        self.names = [WEIGHT_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.order = [spec[0] for shard in self.shards for spec in shard]
        self.specs = {spec[0]: spec for spec in specs}
        self._shard, self._pos, self._file = -1, 0, None
        self.total = sum(nbytes(s[1], s[2]) for s in specs)

    def _open_next(self) -> None:
        if self._file is not None:
            self._file.close()
        self._shard += 1
        self._pos = 0
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key, shape, dtype in self.shards[self._shard]:
            b = nbytes(shape, dtype)
            header[key] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + b]}
            offset += b
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._file = open(self.folder / self.names[self._shard], "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, key: str, tensor: Tensor) -> None:
        """Append the next tensor; it must be ``key`` in the planned order, with the planned shape and dtype."""
        while self._file is None or self._pos == len(self.shards[self._shard]):
            self._open_next()
        name, shape, dtype = self.shards[self._shard][self._pos]
        if key != name or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(f"merge writer: expected {name} {shape} {dtype}, got {key} {tuple(tensor.shape)} {tensor.dtype}.")
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._pos += 1

    def close(self) -> None:
        while self._shard < len(self.shards) - 1:  # empty trailing shards (none in practice)
            self._open_next()
        if self._file is not None:
            self._file.close()
        if len(self.names) > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {key: self.names[i] for i, shard in enumerate(self.shards) for key, _, _ in shard}}  # fmt: skip
            (self.folder / WEIGHT_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def copy_side_files(source: Path, dest: Path) -> list[str]:
    """Copy the base folder's non-weight files (config, generation config, tokenizer, chat template)."""
    copied = []
    for path in sorted(source.iterdir()):
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and path.name not in SKIP_FILES and not path.name.startswith("."):
            shutil.copy2(path, dest / path.name)
            copied.append(path.name)
    return copied


def write_peft_lora(folder: Path, factors: dict[str, tuple[Tensor, Tensor]], transposed: set[str], task_type: str | None) -> None:
    """A PEFT LoRA folder with ΔW = B A per module (scaling 1: lora_alpha = r, per-module ranks in
    ``rank_pattern``/``alpha_pattern``). ``factors`` are in storage orientation; ``transposed`` names the
    GPT-2 Conv1D weights (PEFT's ``fan_in_fan_out``), whose PEFT factors are (Aᵀ, Bᵀ)."""
    import re
    from collections import Counter

    from safetensors.torch import save_file

    tensors, ranks = {}, {}
    for key, (B, A) in factors.items():
        module = key[: -len(".weight")]
        B, A = (A.mT, B.mT) if key in transposed else (B, A)
        tensors[f"base_model.model.{module}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = B.contiguous()
        ranks[module] = A.shape[0]
    rank = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    pattern = {re.escape(m): r for m, r in ranks.items() if r != rank}
    config = {"peft_type": "LORA", "task_type": task_type, "r": rank, "lora_alpha": rank, "target_modules": sorted(ranks),
              "rank_pattern": pattern, "alpha_pattern": dict(pattern), "use_rslora": False, "fan_in_fan_out": bool(transposed),
              "lora_dropout": 0.0, "bias": "none", "init_lora_weights": True, "inference_mode": True, "modules_to_save": None}  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
