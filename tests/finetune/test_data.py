"""Fine-tuning data: JSONL chats and texts tokenized as chat sees them, on the real SmolLM2
tokenizer; bad lines named by file and line; deterministic splits and batches."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer as BackendTokenizer
from volunteer.models.tokenizer import Tokenizer

from volunteer.finetune.data import (
    DataError,
    Example,
    batches,
    count_targets,
    load_examples,
    split_heldout,
)

CHAT = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_folder: Path) -> Tokenizer:
    return Tokenizer.from_folder(smollm2_folder)


@pytest.fixture(scope="module")
def bos_tokenizer(smollm2_folder: Path) -> Tokenizer:
    """SmolLM2's tokenizer told to put a BOS ("<|endoftext|>") before every sequence, as
    Llama-style models do; its template does not write that token itself."""
    config = json.loads((smollm2_folder / "tokenizer_config.json").read_text())
    config.update(add_bos_token=True, bos_token="<|endoftext|>")
    backend = BackendTokenizer.from_file(str(smollm2_folder / "tokenizer.json"))
    return Tokenizer.from_parts(backend=backend, config=config)


def write(path: Path, *lines: Any) -> Path:
    """A JSONL file: dicts and lists are dumped as JSON, str and bytes written as they are."""
    data = b""
    for line in lines:
        if isinstance(line, (dict, list)):
            line = json.dumps(line)
        data += (line.encode() if isinstance(line, str) else line) + b"\n"
    path.write_bytes(data)
    return path


def load(path: Path, tokenizer: Tokenizer, **kwargs: Any) -> list[Example]:
    return load_examples(path, tokenizer, max_length=kwargs.pop("max_length", 512), **kwargs)


def target_runs(example: Example) -> list[list[int]]:
    """The targets' ids, one list per contiguous run."""
    runs: list[list[int]] = []
    for k, (token, is_target) in enumerate(zip(example.input_ids, example.targets, strict=True)):
        if is_target:
            if k == 0 or not example.targets[k - 1]:
                runs.append([])
            runs[-1].append(token)
    return runs


def test_chat_targets_are_the_assistant_turns_and_their_end_marker(
    tmp_path: Path, tokenizer: Tokenizer
) -> None:
    (example,) = load(write(tmp_path / "d.jsonl", {"messages": CHAT}), tokenizer)
    assert example.line == 1
    runs = [tokenizer.decode(run) for run in target_runs(example)]
    assert runs == ["Paris.<|im_end|>", "Rome.<|im_end|>"]
    # System and user text and the assistant header are context: none of it is a target.
    pairs = zip(example.input_ids, example.targets, strict=True)
    context = tokenizer.decode([token for token, is_target in pairs if not is_target])
    assert context == (
        "<|im_start|>system\nYou answer in one word.<|im_end|>\n"
        "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"
        "\n<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n\n"
    )
    # Here every piece boundary falls next to a special token, where BPE splits anyway, so
    # the pieces concatenate to exactly what chat encodes for the whole conversation.
    assert list(example.input_ids) == tokenizer.encode_chat(CHAT, add_generation_prompt=False)
    assert count_targets([example]) == sum(len(run) for run in target_runs(example))


def test_a_reply_is_tokenized_as_the_model_would_generate_it(
    tmp_path: Path, tokenizer: Tokenizer
) -> None:
    # A reply starting with spaces: tokenizing the whole text merges the header's "\n" with
    # a space, but at chat time the prompt ends at "\n" and the model generates the spaces
    # as tokens of their own. We learn the latter; the text is the same either way.
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  Hi there"}]
    (example,) = load(write(tmp_path / "d.jsonl", {"messages": chat}), tokenizer)
    full = tokenizer.apply_chat_template(chat, add_generation_prompt=False)
    assert list(example.input_ids) != tokenizer.encode_chat(chat, add_generation_prompt=False)
    assert tokenizer.decode(example.input_ids) == full
    prompt = tokenizer.encode_chat(chat[:1], add_generation_prompt=True)
    assert list(example.input_ids[: len(prompt)]) == prompt
    assert target_runs(example) == [tokenizer.encode("  Hi there<|im_end|>")]


def test_a_chat_without_system_message_gets_the_templates_default_one(
    tmp_path: Path, tokenizer: Tokenizer
) -> None:
    # SmolLM2's template writes its own system prompt when the first message is not one:
    # chat sends it too, so it is context here, never a target.
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    (example,) = load(write(tmp_path / "d.jsonl", {"messages": chat}), tokenizer)
    assert "You are a helpful AI assistant named SmolLM" in tokenizer.decode(example.input_ids)
    assert [tokenizer.decode(run) for run in target_runs(example)] == ["Hello!<|im_end|>"]


def test_plain_text_is_text_then_eos_all_targets_but_the_first(
    tmp_path: Path, tokenizer: Tokenizer
) -> None:
    path = write(tmp_path / "d.jsonl", "", {"text": "The sky is blue.", "id": 7}, "  ")
    (example,) = load(path, tokenizer)
    # SmolLM2's chat adds no BOS (its template writes "<|im_start|>" itself), so none here.
    eos = tokenizer.eos_token_id
    assert list(example.input_ids) == [*tokenizer.encode("The sky is blue."), eos]
    assert example.targets == (False,) + (True,) * (len(example.input_ids) - 1)
    assert example.line == 2


def test_a_byte_order_mark_and_escaped_emoji_are_fine(tmp_path: Path, tokenizer: Tokenizer) -> None:
    # json.dumps escapes an emoji as a surrogate pair ("\ud83d\ude00"): valid, unlike a lone one.
    path = write(
        tmp_path / "d.jsonl", b"\xef\xbb\xbf" + json.dumps({"text": "hi \U0001f600"}).encode()
    )
    (example,) = load(path, tokenizer)
    assert tokenizer.decode(example.input_ids) == "hi \U0001f600<|im_end|>"


def test_bos_is_added_where_chat_adds_it(tmp_path: Path, bos_tokenizer: Tokenizer) -> None:
    path = write(tmp_path / "d.jsonl", {"messages": CHAT}, {"text": "Hello"})
    chat, text = load(path, bos_tokenizer)
    bos = bos_tokenizer.bos_token_id
    chat_ids = bos_tokenizer.encode_chat(CHAT, add_generation_prompt=False)
    assert chat_ids[0] == bos and list(chat.input_ids) == chat_ids
    assert not chat.targets[0]
    assert list(text.input_ids) == [bos, *bos_tokenizer.encode("Hello"), bos_tokenizer.eos_token_id]


GOOD = {"text": "fine"}
BAD_LINES = [
    (b'{"text": "caf\xe9"}', "not UTF-8"),
    ('{"text": "x"', "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got an array"),
    ('{"txt": "x"}', 'has neither "messages" nor "text"'),
    ({"text": "x", "messages": CHAT}, 'has both "messages" and "text"'),
    ({"messages": []}, '"messages" must be a non-empty list'),
    ({"messages": "hi"}, '"messages" must be a non-empty list'),
    ({"messages": ["hi"]}, "message 1 must be an object, got a string"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 'message 1 has role "tool"'),
    ({"messages": [{"role": ["user"], "content": "x"}]}, "message 1 has role"),
    ({"messages": [CHAT[1], {"role": "assistant"}]}, 'message 2 "content" must be a string'),
    ({"messages": [CHAT[1], {"role": "assistant", "content": 5}]}, "got a number"),
    ({"messages": CHAT[:2]}, "no assistant message"),
    ({"text": ""}, '"text" is empty'),
    ({"text": 3}, '"text" must be a string, got a number'),
    ({"text": None}, '"text" must be a string, got null'),
    (r'{"text": "a\ud800b"}', '"text" holds an unpaired surrogate'),
    ({"messages": [CHAT[1], {"role": "assistant", "content": "\udfff"}]}, "unpaired surrogate"),
    ("[" * 100_000, "not valid JSON|nested too deeply"),
    (
        {"messages": [CHAT[1], {"role": "assistant", "content": "Paris.<|im_end|>more"}]},
        "message 2 (assistant) has the end-of-turn token '<|im_end|>'",
    ),
    # SmolLM2's template inserts its default system prompt before a first message that is
    # not a system one, so a chat opening with the assistant does not extend the header.
    ({"messages": [{"role": "assistant", "content": "Hi"}]}, "not prefix-stable"),
]


@pytest.mark.parametrize(("line", "why"), BAD_LINES, ids=[why for _, why in BAD_LINES])
def test_a_bad_line_is_named_by_file_and_line(
    tmp_path: Path, tokenizer: Tokenizer, line: Any, why: str
) -> None:
    path = write(tmp_path / "d.jsonl", GOOD, "", line, GOOD)
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:3: ") as raised:
        load(path, tokenizer)
    assert any(part in str(raised.value) for part in why.split("|")), raised.value


def test_a_sequence_over_max_length_says_its_length_and_the_limit(
    tmp_path: Path, tokenizer: Tokenizer
) -> None:
    path = write(tmp_path / "d.jsonl", {"text": "one two"}, {"messages": CHAT})
    with pytest.raises(DataError, match=r":2: \d+ tokens, over the limit of 20; shorten it"):
        load(path, tokenizer, max_length=20)


def test_file_level_errors(tmp_path: Path, tokenizer: Tokenizer) -> None:
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file"):
        load(tmp_path / "missing.jsonl", tokenizer)
    with pytest.raises(DataError, match="cannot read it"):
        load(tmp_path, tokenizer)
    for name, lines in [("empty.jsonl", ()), ("blank.jsonl", ("", " \t", "\r"))]:
        with pytest.raises(DataError, match=f"no examples in {re.escape(str(tmp_path / name))}"):
            load(write(tmp_path / name, *lines), tokenizer)
    big = write(tmp_path / "big.jsonl", GOOD, GOOD)
    with pytest.raises(DataError, match=f"{re.escape(str(big))}: 34 bytes, over the 33-byte"):
        load(big, tokenizer, max_bytes=33)
    assert len(load(big, tokenizer, max_bytes=34)) == 2


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_reading_stops_at_max_bytes_even_without_a_newline(tokenizer: Tokenizer) -> None:
    # /dev/zero claims size 0 and never ends a line: only the read bound stops it.
    with pytest.raises(DataError, match="/dev/zero:1: past the 1000000-byte limit"):
        load(Path("/dev/zero"), tokenizer, max_bytes=1_000_000)


def test_loading_only_reads(tmp_path: Path, tokenizer: Tokenizer) -> None:
    path = write(tmp_path / "d.jsonl", {"messages": CHAT}, GOOD)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.iterdir()}
    load(path, tokenizer)
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.iterdir()} == before


def examples(n: int, *, length: int = 3) -> list[Example]:
    """n distinct examples; example i has i % 4 + length tokens, all ids i."""
    return [
        Example((i,) * (i % 4 + length), (False,) + (True,) * (i % 4 + length - 1), i + 1)
        for i in range(n)
    ]


def test_split_is_deterministic_and_sized() -> None:
    data = examples(50)
    train, held = split_heldout(data, fraction=0.1, seed=3)
    assert (train, held) == split_heldout(data, fraction=0.1, seed=3)
    assert len(held) == 5 and sorted(train + held, key=lambda e: e.line) == data
    assert [e.line for e in train] == sorted(e.line for e in train)
    assert split_heldout(data, fraction=0.1, seed=4)[1] != held
    assert [len(split_heldout(examples(n))[1]) for n in (0, 1, 2, 3, 19)] == [0, 0, 1, 1, 2]
    assert len(split_heldout(examples(4), fraction=0.9)[0]) == 1  # one is always kept
    with pytest.raises(ValueError, match="fraction"):
        split_heldout(data, fraction=1.0)


def test_batches_are_padded_shuffled_and_deterministic() -> None:
    data = examples(10)
    got = list(batches(data, 4, pad_id=99, seed=1, epoch=0))
    assert [b.input_ids.shape[0] for b in got] == [4, 4, 2]
    seen = []
    for batch in got:
        assert batch.input_ids.dtype == torch.long and batch.targets.dtype == torch.bool
        assert batch.targets.shape == batch.input_ids.shape
        real = batch.input_ids != 99
        assert batch.tokens == int(real.sum())
        assert not batch.targets[~real].any()
        lengths = real.sum(dim=1)
        assert batch.input_ids.shape[1] == int(lengths.max())  # padded to its own longest
        for row, n in zip(batch.input_ids, lengths.tolist(), strict=True):
            assert (row[n:] == 99).all()  # right-padded
            seen.append(data[int(row[0])])
            assert tuple(row[:n].tolist()) == seen[-1].input_ids
    assert sorted(seen, key=lambda e: e.line) == data  # each example once
    again = list(batches(data, 4, pad_id=99, seed=1, epoch=0))
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(got, again, strict=True))
    order = [b.input_ids[:, 0].tolist() for b in got]
    other = [b.input_ids[:, 0].tolist() for b in batches(data, 4, pad_id=99, seed=1, epoch=1)]
    assert order != other
    assert list(batches([], 4, pad_id=0, seed=0, epoch=0)) == []
    with pytest.raises(ValueError, match="batch_size"):
        next(batches(data, 0, pad_id=0, seed=0, epoch=0))
