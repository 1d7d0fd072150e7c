"""Fine-tuning data: built-in datasets and JSONL files → token examples and their train/held-out split.

    examples = load_examples("default", tok, max_length=256)     # or "lee", or "my_data.jsonl"
    train, heldout = split(examples, heldout_fraction=0.1, seed=0)

An example is ``{"input_ids": list[int], "labels": list[int]}``, labels -100 (``IGNORE``) where no loss is
taken, aligned with ``input_ids`` (the model shifts them), as in Hugging Face causal LMs. Batching, padding
and the losses over examples are in :mod:`svdkit.training.batches`.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from svdkit.training.batches import IGNORE

JSONL_FORMATS = ('{"prompt": str, "response": str}', '{"messages": [{"role": str, "content": str}, ...]}', '{"text": str}')


@dataclass
class Examples:
    """Tokenized examples and what was left out while loading them."""

    items: list[dict]
    source: str
    dropped_too_long: int = 0
    skipped_malformed: int = 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class Malformed(ValueError):
    """An input record that cannot become an example (the reason is the message)."""


def _bos(tok) -> list[int]:
    """[bos] if the tokenizer prepends one to plain text itself, else []."""
    bos = tok.bos_token_id
    return [bos] if bos is not None and tok("a")["input_ids"][:1] == [bos] else []


def _eos(tok) -> list[int]:
    return [] if tok.eos_token_id is None else [tok.eos_token_id]  # without one, examples just end


def _encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def text_example(tok, text: str) -> dict:
    """Plain language modelling: [bos] + text + eos, every token labelled."""
    ids = _bos(tok) + _encode(tok, text) + _eos(tok)
    return {"input_ids": ids, "labels": list(ids)}


def _plain_chat(tok, messages: list[dict]) -> dict:
    """Without a chat template: each non-assistant turn is "content\\n", each assistant turn content + eos."""
    ids, labels = _bos(tok), [IGNORE] * len(_bos(tok))
    for m in messages:
        mine = m["role"] == "assistant"
        part = _encode(tok, m["content"]) + _eos(tok) if mine else _encode(tok, m["content"] + "\n")
        ids, labels = ids + part, labels + (part if mine else [IGNORE] * len(part))
    return {"input_ids": ids, "labels": labels}


def _label_spans(tok, text: str, spans: list[tuple[int, int]], use_offsets: bool = True) -> dict:
    """Tokenize ``text``; label the tokens overlapping the character ``spans``."""
    ids = _encode(tok, text)
    labels, offsets = [IGNORE] * len(ids), None
    try:
        if use_offsets:
            offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError):  # a slow tokenizer: no offsets
        pass
    if offsets is not None:
        for k, (s, e) in enumerate(offsets):
            if any(s < b and e > a for a, b in spans):
                labels[k] = ids[k]
    else:  # token index of a character position = number of tokens of the text before it
        for a, b in spans:
            for k in range(len(_encode(tok, text[:a])), len(_encode(tok, text[:b]))):
                labels[k] = ids[k]
    return {"input_ids": ids, "labels": labels}


def chat_example(tok, messages: list[dict], use_offsets: bool = True) -> dict:
    """A conversation through the tokenizer's chat template, labelled on the assistant messages only.

    Assistant message i spans the characters between the rendering of messages[:i] with the generation
    prompt and the rendering of messages[:i+1] (trailing whitespace excluded), i.e. its content and the
    end-of-turn token. The tokens overlapping those spans are labelled.
    """
    if not getattr(tok, "chat_template", None):
        return _plain_chat(tok, messages)

    def render(msgs, generation_prompt):
        try:
            return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # e.g. a template that raises on an unexpected role order
            raise Malformed(f"the chat template rejected it ({type(e).__name__}: {e})") from None

    text, spans = render(messages, False), []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start, end = render(messages[:i], True), render(messages[: i + 1], False).rstrip()
            if not (text.startswith(start) and text.startswith(end) and len(start) <= len(end)):
                raise Malformed("the chat template does not render this conversation's prefixes consistently")
            spans.append((len(start), len(end)))
    return _label_spans(tok, text, spans, use_offsets)


def _check_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise Malformed("'messages' must be a non-empty list")
    for j, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise Malformed(f"messages[{j}] must be an object with string 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise Malformed("'messages' has no assistant message (nothing to learn)")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def record_example(tok, record) -> dict:
    """One JSONL record (prompt/response, messages or text) → example; Malformed says why it cannot be.

    An optional string ``"group"`` (a topic, a client, a demographic) is kept as the example's ``group``:
    per-group training and reports (continual tasks ``NAME@GROUP``, federated splits) read it; batching ignores it.
    """
    if not isinstance(record, dict):
        raise Malformed(f"expected a JSON object, got {type(record).__name__}")
    if "group" in record:
        if not isinstance(record["group"], str) or not record["group"]:
            raise Malformed("'group' must be a non-empty string")
        return dict(record_example(tok, {k: v for k, v in record.items() if k != "group"}), group=record["group"])
    if "messages" in record:
        return chat_example(tok, _check_messages(record["messages"]))
    if "prompt" in record or "response" in record:
        prompt, response = record.get("prompt"), record.get("response")
        if not isinstance(prompt, str) or not isinstance(response, str) or not response:
            raise Malformed("'prompt' must be a string and 'response' a non-empty string")
        return chat_example(tok, [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"]:
            raise Malformed("'text' must be a non-empty string")
        return text_example(tok, record["text"])
    raise Malformed(f"unknown format (keys {sorted(record)}); expected one of: {', '.join(JSONL_FORMATS)}")


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)  # located, not imported
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"this dataset comes from the '{pip_name.split('==')[0]}' package, which is not "
                          f"installed: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def chatterbot_conversations() -> list[list[str]]:
    """The English chatterbot corpus (BSD): its conversations, each a list of ≥ 2 non-empty turns."""
    return [turns for _, turns in chatterbot_topics()]


def chatterbot_topics() -> list[tuple[str, list[str]]]:
    """(topic, turns) for each chatterbot conversation: the topic is its file's name (ai, food, science, …)."""
    import yaml

    folder = _package_dir("chatterbot_corpus", "chatterbot-corpus==1.3.3") / "data" / "english"
    conversations = []
    for path in sorted(folder.glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        for conv in (doc.get("conversations") or []) if isinstance(doc, dict) else []:
            if not isinstance(conv, list):  # e.g. a YAML slip that parses as one string
                continue
            turns = [str(t).strip() if isinstance(t, (str, int, float)) else None for t in conv]
            if len(turns) >= 2 and all(turns):
                conversations.append((path.stem, turns))
    return conversations


def _chatterbot(tok, max_length: int) -> tuple[list[dict], int]:
    """Each conversation as alternating user/assistant turns (a trailing user turn is dropped); its topic is
    the example's ``group`` (see :func:`record_example`)."""
    items = []
    for topic, turns in chatterbot_topics():
        turns = turns[: len(turns) // 2 * 2]
        items.append(chat_example(tok, [{"role": ("user", "assistant")[i % 2], "content": t}
                                        for i, t in enumerate(turns)]))
        items[-1]["group"] = topic
    kept = [x for x in items if len(x["input_ids"]) <= max_length]
    return kept, len(items) - len(kept)


def lee_articles() -> list[str]:
    """gensim's Lee background corpus: 300 ABC news articles, one per line."""
    path = _package_dir("gensim", "gensim==4.4.0") / "test" / "test_data" / "lee_background.cor"
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _lee(tok, max_length: int) -> tuple[list[dict], int]:
    """The articles tokenized, joined with eos and cut into blocks of max_length (the remainder is dropped)."""
    stream = _bos(tok)
    for article in lee_articles():
        stream += _encode(tok, article) + _eos(tok)
    blocks = [stream[i: i + max_length] for i in range(0, len(stream) - max_length + 1, max_length)]
    return [{"input_ids": b, "labels": list(b)} for b in blocks], 0


# name → loader(tokenizer, max_length) -> (items, dropped_too_long)
DATASETS: dict[str, Callable[..., tuple[list[dict], int]]] = {"default": _chatterbot, "chatterbot": _chatterbot,
                                                              "lee": _lee}


def _jsonl(path: Path, tok, skip_malformed: bool) -> tuple[list[dict], int]:
    items, skipped = [], 0
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise Malformed(f"invalid JSON ({e.msg})") from None
                items.append(record_example(tok, record))
            except Malformed as e:
                if not skip_malformed:
                    raise ValueError(f"{path}:{lineno}: {e}") from None
                skipped += 1
    return items, skipped


def load_examples(source: str | Path, tokenizer, max_length: int = 256, skip_malformed: bool = False) -> Examples:
    """Examples from a built-in dataset name (see DATASETS) or a .jsonl file.

    Examples longer than ``max_length`` tokens are dropped (never truncated) and counted; malformed JSONL
    lines raise ``ValueError("file:line: reason")`` unless ``skip_malformed``, which skips and counts them.
    """
    if tokenizer is None:
        raise ValueError("load_examples needs a tokenizer")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    name = str(source)
    if name in DATASETS:
        kept, dropped = DATASETS[name](tokenizer, max_length)
        total, skipped = len(kept) + dropped, 0
    else:
        path = Path(name).expanduser()
        if path.is_file() and path.suffix != ".jsonl":
            raise ValueError(f"{path} is not a .jsonl file (one {' or '.join(JSONL_FORMATS)} per line)")
        if not path.is_file():
            error = FileNotFoundError if path.suffix or len(path.parts) > 1 else ValueError
            raise error(f"unknown dataset {name!r}: use one of {sorted(DATASETS)} or a path to an existing "
                        f".jsonl file (one {' or '.join(JSONL_FORMATS)} per line)")
        items, skipped = _jsonl(path, tokenizer, skip_malformed)
        kept = [x for x in items if len(x["input_ids"]) <= max_length]
        total, dropped = len(items), len(items) - len(kept)
    if total == 0:
        more = f" ({skipped} malformed lines skipped)" if skipped else ""
        raise ValueError(f"{name} has no examples{more}")
    if not kept:
        raise ValueError(f"all {dropped} examples of {name} are longer than max_length={max_length} tokens; "
                         "pass a larger max_length")
    return Examples(kept, name, dropped, skipped)


def split(examples, heldout_fraction: float = 0.1, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, heldout) item lists, a random split fixed by ``seed`` alone; both keep the original order.

    The held-out part has round(fraction × n) items, but at least 1 and at most n - 1.
    """
    items = list(examples.items if isinstance(examples, Examples) else examples)
    if len(items) < 2:
        raise ValueError(f"cannot split {len(items)} example(s) into train and held-out parts; need at least 2")
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    n_held = min(max(1, round(heldout_fraction * len(items))), len(items) - 1)
    perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(perm[:n_held])
    return ([x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held])
