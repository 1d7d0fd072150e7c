"""svdkit.training.data: JSONL/built-in datasets → labelled token examples, splits, batches, evaluation."""

from __future__ import annotations

import json
import math

import pytest
import torch

import svdkit
from svdkit.training import data
from svdkit.training.batches import batch_at, collate, epoch_order, eval_loss, shard

from conftest import tiny_model

IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def tok():
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(svdkit.core.models.default_model_dir()))


def write_jsonl(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def labelled_spans(tok, ex) -> list[str]:
    """The decoded runs of consecutive labelled tokens."""
    spans, run = [], []
    for t in ex["labels"] + [data.IGNORE]:
        if t != data.IGNORE:
            run.append(t)
        elif run:
            spans.append(tok.decode(run))
            run = []
    return spans


def check_aligned(ex):
    assert len(ex["input_ids"]) == len(ex["labels"])
    assert all(lab in (data.IGNORE, t) for t, lab in zip(ex["input_ids"], ex["labels"]))


# ---------------------------------------------------------------- JSONL formats

def test_prompt_response_uses_the_chat_template_and_labels_only_the_response(tok, tmp_path):
    rec = {"prompt": "What is 2+2?", "response": "It is 4, of course."}
    ex = data.load_examples(write_jsonl(tmp_path / "a.jsonl", [rec]), tok).items[0]
    check_aligned(ex)
    msgs = [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["response"]}]
    assert ex["input_ids"] == tok.apply_chat_template(msgs)["input_ids"]
    assert labelled_spans(tok, ex) == [rec["response"] + IM_END]
    prefix = tok.apply_chat_template(msgs[:1], add_generation_prompt=True)["input_ids"]
    assert ex["labels"][: len(prefix)] == [data.IGNORE] * len(prefix) and ex["labels"][len(prefix)] != data.IGNORE


def test_messages_label_every_assistant_turn_and_nothing_else(tok, tmp_path):
    msgs = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there!"}, {"role": "user", "content": "And 3 * 7?"},
            {"role": "assistant", "content": "21\nDone."}, {"role": "user", "content": "thanks"}]
    ex = data.load_examples(write_jsonl(tmp_path / "m.jsonl", [{"messages": msgs}]), tok).items[0]
    check_aligned(ex)
    assert ex["input_ids"] == tok.apply_chat_template(msgs)["input_ids"]
    assert labelled_spans(tok, ex) == ["Hello there!" + IM_END, "21\nDone." + IM_END]
    assert tok.decode(ex["input_ids"]).count("Be terse.") == 1
    assert data.chat_example(tok, msgs, use_offsets=False) == ex  # the offset-free fallback agrees


def test_text_records_are_plain_lm_with_eos(tok, tmp_path):
    text = "The quick brown fox jumps over the lazy dog."
    ex = data.load_examples(write_jsonl(tmp_path / "t.jsonl", [{"text": text}]), tok).items[0]
    assert ex["labels"] == ex["input_ids"] and ex["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(ex["input_ids"][:-1]) == text


def test_without_a_chat_template_prompt_newline_response_eos(tok, monkeypatch):
    monkeypatch.setattr(tok, "chat_template", None)
    ex = data.record_example(tok, {"prompt": "Hi", "response": "Yo there"})
    assert tok.decode(ex["input_ids"]) == "Hi\nYo there" + tok.eos_token
    assert labelled_spans(tok, ex) == ["Yo there" + tok.eos_token]


def test_examples_object_and_blank_lines(tok, tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "a b"}, "", "   ", {"prompt": "", "response": "ok"}])
    ex = data.load_examples(path, tok)
    assert isinstance(ex, data.Examples) and len(ex) == 2 and ex.source == path
    assert (ex.dropped_too_long, ex.skipped_malformed) == (0, 0)


# ---------------------------------------------------------------- errors

MALFORMED = [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ({"prompt": "only a prompt"}, "'response'"),
    ({"prompt": 1, "response": "b"}, "'prompt'"),
    ({"prompt": "a", "response": ""}, "non-empty"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant"),
    ({"messages": [{"role": "user", "content": 3}]}, r"messages\[0\]"),
    ({"text": 5}, "'text'"),
    ({"question": "q", "answer": "a"}, "unknown format"),
]


@pytest.mark.parametrize("bad,reason", MALFORMED)
def test_malformed_line_names_file_and_line(tok, tmp_path, bad, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, "", bad, {"text": "also fine"}])
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: .*{reason}"):
        data.load_examples(path, tok)


def test_a_chat_template_error_is_a_malformed_line(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(tok, "chat_template", "{{ raise_exception('roles must alternate') }}")
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "a", "response": "b"}])
    with pytest.raises(ValueError, match=r"r\.jsonl:1: the chat template rejected it .*roles must alternate"):
        data.load_examples(path, tok)


def test_skip_malformed_counts_them(tok, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, *(b for b, _ in MALFORMED), {"text": "ok"}])
    ex = data.load_examples(path, tok, skip_malformed=True)
    assert len(ex) == 2 and ex.skipped_malformed == len(MALFORMED)
    only_bad = write_jsonl(tmp_path / "all_bad.jsonl", ["{", "[]"])
    with pytest.raises(ValueError, match=r"all_bad\.jsonl has no examples \(2 malformed"):
        data.load_examples(only_bad, tok, skip_malformed=True)


def test_too_long_examples_are_dropped_and_counted(tok, tmp_path):
    long_text = " ".join(["word"] * 100)
    path = write_jsonl(tmp_path / "l.jsonl", [{"text": "a short one"}, {"text": long_text},
                                              {"prompt": "q", "response": long_text}])
    ex = data.load_examples(path, tok, max_length=64)
    assert len(ex) == 1 and ex.dropped_too_long == 2 and len(ex.items[0]["input_ids"]) <= 64
    assert len(data.load_examples(path, tok, max_length=512)) == 3
    with pytest.raises(ValueError, match=r"all 3 examples .* longer than max_length=3 .*larger max_length"):
        data.load_examples(path, tok, max_length=3)


def test_empty_file(tok, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl has no examples"):
        data.load_examples(tmp_path / "empty.jsonl", tok)


def test_unknown_name_or_missing_file_lists_the_choices(tok, tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'nope'.*'chatterbot'.*'default'.*'lee'.*\.jsonl"):
        data.load_examples("nope", tok)
    with pytest.raises(FileNotFoundError, match=r"'chatterbot'.*\.jsonl"):
        data.load_examples(tmp_path / "missing.jsonl", tok)
    (tmp_path / "d.json").write_text('{"text": "hi"}\n')
    with pytest.raises(ValueError, match=r"d\.json is not a \.jsonl file"):
        data.load_examples(tmp_path / "d.json", tok)


def test_missing_dataset_package_names_the_pip_command(tok, monkeypatch):
    real = data.importlib.util.find_spec
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name, *a: None if name == "gensim" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install --no-deps gensim==4\.4\.0"):
        data.load_examples("lee", tok)


def test_chatterbot_odd_entries(tok, tmp_path, monkeypatch):
    folder = tmp_path / "data" / "english"
    folder.mkdir(parents=True)
    (folder / "x.yml").write_text(
        "categories: [x]\nconversations:\n- - Q1\n  - A1\n  - Q2\n- just a string\n- - only one turn\n"
        "- - year?\n  - 1984\n- - has null\n  - null\n- - {a: 1}\n  - b\n- - ''\n  - empty\n")
    (folder / "empty.yml").write_text("")
    monkeypatch.setattr(data, "_package_dir", lambda *a: tmp_path)
    assert data.chatterbot_conversations() == [["Q1", "A1", "Q2"], ["year?", "1984"]]
    ex = data.load_examples("chatterbot", tok)
    assert [labelled_spans(tok, e) for e in ex.items] == [["A1" + IM_END], ["1984" + IM_END]]
    assert "Q2" not in tok.decode(ex.items[0]["input_ids"])  # a trailing user turn is dropped


# ---------------------------------------------------------------- split, batch_at, shard, collate

def numbered(n):
    return [{"input_ids": [i], "labels": [i]} for i in range(n)]


def test_split_is_deterministic_and_a_partition():
    items = numbered(50)
    train, held = data.split(items, 0.1, seed=3)
    assert (train, held) == data.split(data.Examples(items, "x"), 0.1, seed=3)
    assert len(held) == 5 and len(train) == 45
    ids = sorted(x["input_ids"][0] for x in train + held)
    assert ids == list(range(50))
    assert data.split(items, 0.1, seed=4)[1] != held
    assert held == sorted(held, key=lambda x: x["input_ids"][0])  # original order kept
    assert [len(p) for p in data.split(numbered(2), 0.01)] == [1, 1]
    assert [len(p) for p in data.split(numbered(3), 0.99)] == [1, 2]
    with pytest.raises(ValueError, match="at least 2"):
        data.split(numbered(1))
    with pytest.raises(ValueError, match="heldout_fraction"):
        data.split(numbered(5), 1.0)


def test_batch_at_epochs_are_permutations_and_reproducible():
    items, bs, seed = numbered(10), 3, 7
    ids = lambda b: [x["input_ids"][0] for x in b]  # noqa: E731
    epochs = [[ids(batch_at(items, e * 4 + i, bs, seed)) for i in range(4)] for e in range(3)]
    for batches in epochs:
        assert [len(b) for b in batches] == [3, 3, 3, 1]  # ceil(10/3) steps; the last one short
        assert sorted(sum(batches, [])) == list(range(10))  # every item exactly once per epoch
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    # a pure function of (step, seed): resuming at step 6 sees what an uninterrupted run saw
    assert ids(batch_at(items, 6, bs, seed)) == epochs[1][2]
    assert ids(batch_at(items, 6, bs, seed + 1)) != epochs[1][2] or \
        ids(batch_at(items, 4, bs, seed + 1)) != epochs[1][0]
    assert ids(batch_at(items, 0, 100, seed)) == epoch_order(10, 0, seed)
    with pytest.raises(ValueError):
        batch_at(items, -1, bs, seed)


def test_batch_at_groups_similar_lengths_within_a_window():
    items = [{"input_ids": [i] * (1 + (i * 7) % 11), "labels": [i]} for i in range(20)]
    lengths = lambda b: [len(x["input_ids"]) for x in b]  # noqa: E731
    order = epoch_order(20, 0, 5)
    for group in (1, 2, 7):
        batches = [batch_at(items, i, 3, 5, group=group) for i in range(7)]  # one epoch: 6 × 3 + 2
        assert sorted(x["labels"][0] for b in batches for x in b) == list(range(20))
        for w in range(0, 7, group):  # window w..w+group-1 holds the same items as the shuffled order, sorted
            got = [x for b in batches[w : w + group] for x in b]
            expected = [items[j] for j in order[w * 3 : (w + group) * 3]]
            assert lengths(got) == sorted(lengths(expected)) if group > 1 else got == expected
    assert batch_at(items, 9, 3, 5, group=7) == batch_at(items, 9, 3, 5, group=7)  # pure
    with pytest.raises(ValueError, match="group"):
        batch_at(items, 0, 3, 5, group=0)


@pytest.mark.parametrize("n,world", [(8, 4), (7, 3), (2, 4), (0, 2), (5, 1)])
def test_shard_covers_the_batch_exactly(n, world):
    batch = list(range(n))
    shares = [shard(batch, r, world) for r in range(world)]
    assert sum(shares, []) == batch
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError):
        shard(batch, world, world)


def test_collate_pads_on_the_right():
    items = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    b = collate(items, pad_id=0)
    assert {k: v.shape for k, v in b.items()} == {k: (2, 3) for k in ("input_ids", "attention_mask", "labels")}
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(v.dtype == torch.long for v in b.values())


# ---------------------------------------------------------------- eval_loss

def test_eval_loss_is_token_weighted_and_restores_training_mode():
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    items = []
    for n, n_labelled in [(12, 10), (4, 2), (7, 3), (20, 19)]:
        ids = torch.randint(3, 128, (n,), generator=g).tolist()
        items.append({"input_ids": ids, "labels": [-100] * (n - n_labelled) + ids[n - n_labelled:]})
    total, count, per_item = 0.0, 0, []
    with torch.no_grad():
        for x in items:  # by hand, one unpadded example at a time
            logp = torch.log_softmax(model(torch.tensor([x["input_ids"]])).logits[0].double(), -1)
            losses = [-logp[t - 1, x["input_ids"][t]].item() for t in range(1, len(x["labels"]))
                      if x["labels"][t] != -100]
            total, count = total + sum(losses), count + len(losses)
            per_item.append(sum(losses) / len(losses))
    expected = total / count
    model.train()
    for bs in (1, 2, 3, 4):
        loss, ppl = eval_loss(model, items, batch_size=bs, pad_id=0)
        assert loss == pytest.approx(expected, rel=1e-5) and ppl == pytest.approx(math.exp(expected), rel=1e-5)
    assert model.training
    assert abs(sum(per_item) / len(per_item) - expected) > 1e-3  # a mean of means would differ
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------- the built-in datasets

def test_chatterbot_dataset(tok):
    ex = data.load_examples("default", tok, max_length=256)
    assert ex.source == "default" and len(ex) > 1000 and len(ex) + ex.dropped_too_long > 2000
    assert all(len(x["input_ids"]) <= 256 for x in ex.items)
    assert all(any(t != data.IGNORE for t in x["labels"][1:]) for x in ex.items)
    assert all(labelled_spans(tok, x)[-1].endswith(IM_END) for x in ex.items[:50])
    assert data.DATASETS["default"] is data.DATASETS["chatterbot"]


def test_lee_dataset(tok):
    ex = data.load_examples("lee", tok, max_length=256)
    assert len(ex) > 250 and all(len(x["input_ids"]) == 256 and x["labels"] == x["input_ids"] for x in ex.items)
    stream = sum((x["input_ids"] for x in ex.items), [])
    assert stream.count(tok.eos_token_id) >= 290  # articles joined with eos
    assert tok.decode(ex.items[0]["input_ids"]).startswith("Hundreds of people have been forced to vacate")
