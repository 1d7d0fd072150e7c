"""Offline English text for training from scratch (`svdkit pretrain`): documents from Debian's ``dict-gcide``
(Webster's 1913 entries), ``fortunes``, ``wordnet-base`` glosses and gensim's ``lee_background.cor``, a
held-out split by document, a byte-level BPE vocabulary trained on the training split with ``tokenizers``,
and the token streams packed into fixed-length blocks. Built once per (sources, budget, vocabulary) and
cached as ``tokenizer.json`` + ``tokens.safetensors`` (written atomically).

Install the Debian sources with ``apt-get install -y dict-gcide fortunes wordnet-base``; a missing source is
an error that says so (pass ``sources=`` to use fewer).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path

import torch

from svdkit.core.files import atomic_dir

SOURCES = ("gcide", "fortunes", "wordnet", "lee")
EOS = "<|endoftext|>"
_PATHS = {"gcide": Path("/usr/share/dictd/gcide.dict.dz"), "fortunes": Path("/usr/share/games/fortunes"),
          "wordnet": Path("/usr/share/wordnet")}  # fmt: skip
_PACKAGES = {"gcide": "dict-gcide", "fortunes": "fortunes", "wordnet": "wordnet-base"}


def _require(source: str) -> Path:
    path = _PATHS[source]
    if not path.exists():
        raise FileNotFoundError(f"text source {source!r} needs the Debian package {_PACKAGES[source]} ({path} is missing): "
                                f"apt-get install -y {_PACKAGES[source]}, or leave {source!r} out of sources.")  # fmt: skip
    return path


def _gcide() -> list[str]:
    """One document per dictionary entry: pronunciation marks (\\...\\) and source tags ([1913 Webster]) removed."""
    text = gzip.open(_require("gcide"), "rt", encoding="utf-8", errors="replace").read()
    docs = []
    for entry in text.split("\n\n"):
        entry = re.sub(r"\\[^\\\n]*\\", "", entry)
        entry = re.sub(r"\[(?:[^\]]*Webster[^\]]*|PJC|WordNet[^\]]*|Century[^\]]*)\]", "", entry)
        entry = " ".join(entry.split())
        if len(entry) > 40 and not entry.startswith("00-database"):
            docs.append(entry)
    return docs


def _fortunes() -> list[str]:
    """One document per quote of the top-level fortune files (the ``off/`` subfolder is not read)."""
    docs = []
    for path in sorted(_require("fortunes").iterdir()):
        if path.is_file() and not path.suffix and not path.is_symlink():
            for quote in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
                if quote.strip():
                    docs.append(quote.strip())
    return docs


def _wordnet() -> list[str]:
    """One document per synset: its words and gloss ("dog, domestic dog: a member of the genus Canis ...")."""
    docs = []
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (_require("wordnet") / f"data.{pos}").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith(" ") or "|" not in line:
                continue  # the licence header
            fields, gloss = line.split("|", 1)
            parts = fields.split()
            words = [parts[4 + 2 * i].replace("_", " ") for i in range(int(parts[3], 16))]
            docs.append(f"{', '.join(words)}: {gloss.strip()}")
    return docs


def _lee() -> list[str]:
    from svdkit.training.data import lee_articles

    return lee_articles()


_READERS = {"gcide": _gcide, "fortunes": _fortunes, "wordnet": _wordnet, "lee": _lee}


def heldout_doc(text: str, fraction: float) -> bool:
    """A document is held out when its text hashes into the first ``fraction`` of [0, 1): the split does not
    depend on the order, the sources chosen or the budget."""
    h = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") / 2**64
    return h < fraction


def documents(sources=SOURCES, chars_per_source: int = 2_000_000) -> list[str]:
    """Up to ``chars_per_source`` characters of documents from each source, taken evenly across the source
    (every k-th document, so the dictionary is not cut at the letter A)."""
    docs = []
    for source in sources:
        if source not in _READERS:
            raise ValueError(f"unknown text source {source!r}; sources: {', '.join(SOURCES)}.")
        items = _READERS[source]()
        total = sum(len(d) for d in items)
        stride = max(1, round(total / chars_per_source))
        taken, size = [], 0
        for d in items[::stride]:
            if size >= chars_per_source:
                break
            taken.append(d)
            size += len(d)
        docs.extend(taken)
    return docs


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2's pre-tokenizer, every byte in the alphabet, so nothing is out of vocabulary)
    with ``vocab_size`` entries including the end-of-text token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    return tok


def _stream(tok, texts: list[str]) -> torch.Tensor:
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int32)


def build(cache: Path, sources=SOURCES, chars_per_source: int = 2_000_000, vocab_size: int = 4096,
          heldout_fraction: float = 0.05) -> dict:  # fmt: skip
    """The tokenized corpus, from ``cache`` if it was built with the same settings, else built there.

    Returns ``{"tokenizer": tokenizers.Tokenizer, "train": int32 ids, "heldout": int32 ids, "info": {...}}``:
    documents joined by the end-of-text token; the tokenizer is trained on the training documents only.
    """
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer

    info = {"sources": list(sources), "chars_per_source": chars_per_source, "vocab_size": vocab_size,
            "heldout_fraction": heldout_fraction, "version": 1}  # fmt: skip
    key = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(cache) / f"corpus-{key}"
    if not (folder / "tokens.safetensors").is_file():
        docs = documents(sources, chars_per_source)
        train = [d for d in docs if not heldout_doc(d, heldout_fraction)]
        held = [d for d in docs if heldout_doc(d, heldout_fraction)]
        tok = train_tokenizer(train, vocab_size)
        tensors = {"train": _stream(tok, train), "heldout": _stream(tok, held)}
        info.update(documents=len(docs), heldout_documents=len(held), train_tokens=len(tensors["train"]),
                    heldout_tokens=len(tensors["heldout"]), characters=sum(len(d) for d in docs))  # fmt: skip
        with atomic_dir(folder, overwrite=True) as tmp:
            tok.save(str(tmp / "tokenizer.json"))
            save_file(tensors, str(tmp / "tokens.safetensors"))
            (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    tensors = load_file(str(folder / "tokens.safetensors"))
    return {"tokenizer": Tokenizer.from_file(str(folder / "tokenizer.json")), "train": tensors["train"],
            "heldout": tensors["heldout"], "info": json.loads((folder / "info.json").read_text()), "folder": folder}  # fmt: skip


def blocks(ids: torch.Tensor, length: int) -> torch.Tensor:
    """The stream cut into non-overlapping (n, length) int64 blocks (the tail shorter than a block dropped)."""
    n = len(ids) // length
    if n == 0:
        raise ValueError(f"the token stream ({len(ids)} tokens) is shorter than one block of {length}; use more text.")
    return ids[: n * length].view(n, length).long()
