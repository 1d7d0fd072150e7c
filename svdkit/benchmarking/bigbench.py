"""BIG-bench `arithmetic` (Apache-2.0) as the bench's accuracy evaluation: download, cache, read, score.

The tasks come from the ``bigbench==1.0.0`` sdist (358 MB, never installed, never used in tests, never
trained on: its files carry a "do not train on this" canary). ``sdist()`` fetches it once into
``$SVDKIT_HOME/bigbench`` with ``pip download --no-deps``; pip ≥ 23 refuses that sdist while reading its
metadata (it declares a direct-URL dependency), so the fallback reads the same file's link on PyPI's
simple index (PEP 503) and checks its sha256. ``tasks()`` copies the arithmetic task.json members out of
the tarball once (reading 16 small members from the 358 MB file takes ~5 s) and reads them from there.

Scoring is BIG-bench's ``exact_str_match`` with the task's ``output_regex`` ``[-+]?\\d+``: the first match
of the regex in the model's greedy output must equal the target string.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

from svdkit.training import data
from svdkit.core.files import write_text
from svdkit.core.models import svdkit_home
from svdkit.benchmarking.arithmetic import prompt_text

VERSION = "1.0.0"
SDIST = f"bigbench-{VERSION}.tar.gz"
SIMPLE_INDEX = "https://pypi.org/simple/bigbench/"
MEMBER = "bigbench-{v}/bigbench/benchmark_tasks/arithmetic/{task}/task.json"
OUTPUT_REGEX = r"[-+]?\d+"
DEFAULT_TASKS = tuple(f"{d}_digit_{op}" for d in (1, 2) for op in ("addition", "subtraction", "multiplication", "division"))


def cache_dir() -> Path:
    return svdkit_home() / "bigbench"


def _from_simple_index(target: Path) -> None:
    import urllib.request

    page = urllib.request.urlopen(SIMPLE_INDEX, timeout=60).read().decode()
    match = re.search(r'href="([^"#]+/' + re.escape(SDIST) + r')#sha256=([0-9a-f]{64})"', page)
    if not match:
        raise FileNotFoundError(f"{SDIST} is not listed on {SIMPLE_INDEX}.")
    part = target.with_suffix(".part")
    urllib.request.urlretrieve(match.group(1), part)
    digest = hashlib.sha256(part.read_bytes()).hexdigest()
    if digest != match.group(2):
        part.unlink()
        raise ValueError(f"{SDIST}: sha256 {digest} does not match the index's {match.group(2)}.")
    part.replace(target)


def sdist(cache: Path | None = None, log=print) -> Path:
    """The cached sdist, downloading it (358 MB) on first use."""
    cache = Path(cache or cache_dir())
    target = cache / SDIST
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    log(f"svdkit bench: downloading {SDIST} (358 MB, once) into {cache} …")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", f"bigbench=={VERSION}", "-d", str(cache)],
                   capture_output=True, text=True)  # fmt: skip
    if not target.is_file():  # pip ≥ 23 rejects the sdist's metadata (a direct-URL dependency)
        _from_simple_index(target)
    return target


def tasks(names=DEFAULT_TASKS, cache: Path | None = None, log=print) -> dict[str, list[dict]]:
    """{task name: its examples ({"input", "target", ...})} for BIG-bench arithmetic subtasks."""
    cache = Path(cache or cache_dir())
    folder = cache / "arithmetic"
    missing = [n for n in names if not (folder / f"{n}.json").is_file()]
    if missing:
        folder.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist(cache, log)) as tar:
            for name in missing:
                try:
                    member = tar.extractfile(MEMBER.format(v=VERSION, task=name))
                except KeyError:
                    raise ValueError(f"BIG-bench arithmetic has no subtask {name!r} (e.g. {DEFAULT_TASKS[0]!r}).") from None
                write_text(folder / f"{name}.json", member.read().decode())
    return {n: json.loads((folder / f"{n}.json").read_text())["examples"] for n in names}


def sample(task_examples: dict[str, list[dict]], per_task: int, seed: int = 0) -> list[dict]:
    """``per_task`` questions of each task, drawn without replacement by ``seed``: [{"question", "target", "task"}]."""
    out = []
    for name in sorted(task_examples):
        rows = task_examples[name]
        picked = random.Random(f"{seed}:{name}").sample(range(len(rows)), min(per_task, len(rows)))
        out += [{"question": rows[i]["input"], "target": str(rows[i]["target"]), "task": name} for i in sorted(picked)]
    return out


def exact_match(output: str, target: str, regex: str = OUTPUT_REGEX) -> bool:
    """BIG-bench exact_str_match after output_regex: the first match in ``output`` equals ``target``."""
    found = re.search(regex, output)
    return found is not None and found.group(0) == target.strip()


@torch.no_grad()
def generate_answers(model, tok, questions: list[str], batch_size: int = 32, max_new_tokens: int = 8) -> list[str]:
    """Greedy continuations of each question's prompt (left-padded batches), decoded without special tokens."""
    was_training = model.training
    model.eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    outs = []
    try:
        for i in range(0, len(questions), batch_size):
            prompts = [data._bos(tok) + data._encode(tok, prompt_text(q)) for q in questions[i : i + batch_size]]
            enc = _left_pad(prompts, pad)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            outs += tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return outs


def _left_pad(prompts: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return {"input_ids": ids, "attention_mask": mask}


def accuracy(model, tok, items: list[dict], batch_size: int = 32, max_new_tokens: int = 8) -> dict:
    """Exact-match accuracy over ``items`` ({"question", "target", "task"}), overall and per task."""
    outputs = generate_answers(model, tok, [x["question"] for x in items], batch_size, max_new_tokens)
    hits = [exact_match(o, x["target"]) for o, x in zip(outputs, items)]
    per_task: dict[str, list[bool]] = {}
    for x, h in zip(items, hits):
        per_task.setdefault(x["task"], []).append(h)
    return {"accuracy": sum(hits) / max(1, len(hits)), "n": len(hits),
            "per_task": {k: sum(v) / len(v) for k, v in per_task.items()},
            "examples": [{"question": x["question"], "target": x["target"], "output": o}
                         for x, o in list(zip(items, outputs))[:3]]}  # fmt: skip
