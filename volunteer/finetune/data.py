"""Fine-tuning data: a JSONL file of chats or plain texts, tokenized the way chat sees them.

Each non-blank line is one JSON object (other keys are ignored), a chat
`{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}` or a
plain text `{"text": "..."}`. A chat is rendered through the model's chat template and only
its assistant turns (text and end-of-turn token) are targets: the model should learn to
answer, not to write the user's questions. A plain text is BOS (where chat adds one) + text
+ EOS, every token a target but the first.

A bad line raises `DataError` naming the file, the 1-based line and why, so a user can fix
the data rather than guess. Loading only reads, at most `max_bytes`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from volunteer.errors import VolunteerError
from volunteer.models.errors import TokenizerError

if TYPE_CHECKING:
    from volunteer.models.tokenizer import Tokenizer

DEFAULT_MAX_BYTES = 256 * 2**20
"""Largest data file read: far beyond a fine-tuning set, well short of memory trouble."""
ROLES = ("system", "user", "assistant")  # a tuple: `in` on it never hashes the value
_SPLIT = "split the file or raise the limit"
_Messages = list[dict[str, str]]
_Tokens = tuple[list[int], list[bool]]  # ids, and whether each is a target
_Piece = tuple[str, "str | None"]  # text, and for an assistant turn its name in messages


class DataError(VolunteerError):
    """A fine-tuning data file is missing, too big, or has a line we cannot use."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenized training sequence."""

    input_ids: tuple[int, ...]
    targets: tuple[bool, ...]  # True where the loss counts predicting this token (never [0])
    line: int  # 1-based line of the file it came from


@dataclasses.dataclass(frozen=True, eq=False)  # tensors have no single-bool ==
class Batch:
    """Examples padded into tensors. Padding sits on the right, after every real token, so
    causal attention never lets a real token see it and no attention mask is needed."""

    input_ids: torch.Tensor  # LongTensor [B, S], right-padded with the pad id
    targets: torch.Tensor  # BoolTensor [B, S], False on padding
    tokens: int  # real (non-pad) tokens


def load_examples(
    path: Path, tokenizer: Tokenizer, *, max_length: int, max_bytes: int = DEFAULT_MAX_BYTES
) -> list[Example]:
    """Read and tokenize a JSONL fine-tuning file, returning its examples in file order.

    Args:
        path: The file (UTF-8, one JSON object per line; blank lines are skipped).
        tokenizer: The model's tokenizer; chats need its chat template.
        max_length: Longest sequence allowed, in tokens (BOS and EOS included).
        max_bytes: Largest file read; a bigger one is refused before it is parsed.

    Raises:
        DataError: The file is missing, unreadable, too big or empty, or a line is invalid.
    """
    bos = _chat_bos(tokenizer)
    examples = []
    with contextlib.closing(_lines(path, max_bytes)) as lines:  # closes the file on an error
        for number, raw in lines:
            where = f"{path}:{number}"
            if (obj := _parse_line(raw, where, is_first=number == 1)) is not None:
                examples.append(Example(*_example(obj, tokenizer, bos, where, max_length), number))
    if not examples:
        raise DataError(f"no examples in {path}: every line is blank")
    return examples


def split_heldout(
    examples: Sequence[Example], *, fraction: float = 0.1, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Set a share of the examples aside, to measure the loss on data not trained on.

    Returns (train, heldout), each in input order. The choice depends only on the number of
    examples, `fraction` (in (0, 1), else ValueError; rounded to whole examples) and `seed`.
    With two or more examples at least one is held out and one kept; a single example
    cannot be split, so its held-out list is empty.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    n = len(examples)
    count = min(n - 1, max(1, round(n * fraction)))  # none when n < 2
    held = set(_permutation(n, seed=seed, stream="heldout")[:count])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def batches(
    examples: Sequence[Example], batch_size: int, *, pad_id: int, seed: int, epoch: int
) -> Iterator[Batch]:
    """Shuffle the examples and yield them as padded batches.

    The order depends only on `seed` and `epoch`, so a resumed run sees the same batches.
    Each batch is padded to its longest example with `pad_id` (never a target, so any id
    works); the last may be smaller. A `batch_size` below 1 is a ValueError.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = _permutation(len(examples), seed=seed, stream=f"epoch-{epoch}")
    for start in range(0, len(order), batch_size):
        yield _collate([examples[i] for i in order[start : start + batch_size]], pad_id)


def count_targets(examples: Sequence[Example]) -> int:
    """Tokens the loss is taken over, summed over the examples."""
    return sum(sum(e.targets) for e in examples)


def _collate(chunk: list[Example], pad_id: int) -> Batch:
    width = max(len(e.input_ids) for e in chunk)
    input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # [B, S]
    targets = torch.zeros((len(chunk), width), dtype=torch.bool)  # [B, S]
    for row, example in enumerate(chunk):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        targets[row, :n] = torch.tensor(example.targets, dtype=torch.bool)
    return Batch(input_ids, targets, tokens=sum(len(e.input_ids) for e in chunk))


def _permutation(n: int, *, seed: int, stream: str) -> list[int]:
    # A hash, not `random` (whose shuffle may change across Python versions): same order anywhere.
    def key(i: int) -> bytes:
        return hashlib.blake2b(f"{stream}:{seed}:{i}".encode(), digest_size=8).digest()

    return sorted(range(n), key=key)


def _lines(path: Path, max_bytes: int) -> Iterator[tuple[int, bytes]]:
    # Bounded up front (a clear message) and as it reads (a file can grow, a pipe has no size).
    try:
        with Path(path).open("rb") as handle:
            if (size := os.fstat(handle.fileno()).st_size) > max_bytes:
                raise DataError(f"{path}: {size} bytes, over the {max_bytes}-byte limit; {_SPLIT}")
            total = number = 0
            while line := handle.readline(max_bytes - total + 1):
                number, total = number + 1, total + len(line)
                if total > max_bytes:
                    raise DataError(f"{path}:{number}: past the {max_bytes}-byte limit; {_SPLIT}")
                yield number, line
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read it: {exc.strerror or exc}") from None


def _parse_line(raw: bytes, where: str, *, is_first: bool) -> dict[str, Any] | None:
    try:  # "utf-8-sig" drops the BOM some Windows editors start a file with
        text = raw.decode("utf-8-sig" if is_first else "utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not UTF-8 (bad byte at column {exc.start + 1})") from None
    if not text.strip():
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise DataError(f"{where}: the JSON is nested too deeply") from None
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object, got {_json_type(value)}")
    return value


def _example(
    obj: dict[str, Any], tokenizer: Tokenizer, bos: list[int], where: str, max_length: int
) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    if ("messages" in obj) == ("text" in obj):
        which = 'both "messages" and "text"' if "text" in obj else 'neither "messages" nor "text"'
        raise DataError(f"{where}: has {which}; give a chat's messages or a plain text")
    if "text" in obj:
        ids, targets = _plain_sequence(obj["text"], tokenizer, bos, where)
    else:
        ids, targets = _chat_sequence(_messages(obj["messages"], where), tokenizer, bos, where)
    if len(ids) > max_length:
        limit = f"{len(ids)} tokens, over the limit of {max_length}"
        raise DataError(f"{where}: {limit}; shorten it or split it into several examples")
    targets[:1] = [False] * len(targets[:1])  # the first token has nothing to predict it from
    if not any(targets):
        raise DataError(f"{where}: no token to learn (too short)")
    return tuple(ids), tuple(targets)


def _plain_sequence(value: Any, tokenizer: Tokenizer, bos: list[int], where: str) -> _Tokens:
    if not (text := _string(value, f'{where}: "text"')).strip():
        raise DataError(f'{where}: "text" is empty')
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    ids = [*bos, *tokenizer.encode(text), *eos]  # EOS: the model learns where a text ends
    return ids, [i > 0 for i in range(len(ids))]


def _messages(value: Any, where: str) -> _Messages:
    if not isinstance(value, list) or not value:
        raise DataError(f'{where}: "messages" must be a non-empty list of messages')
    messages = []
    for n, message in enumerate(value, 1):
        if not isinstance(message, dict):
            raise DataError(f"{where}: message {n} must be an object, got {_json_type(message)}")
        what = f"{where}: message {n}"
        if (role := message.get("role")) not in ROLES:
            raise DataError(f"{what} has role {json.dumps(role)[:40]}; use {', '.join(ROLES)}")
        content = _string(message.get("content"), f'{what} "content"')
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the chat has no assistant message, so nothing to learn")
    return messages


def _chat_sequence(
    messages: _Messages, tokenizer: Tokenizer, bos: list[int], where: str
) -> _Tokens:
    # Pieces are tokenized apart, as chat sees a prompt and then generated tokens; at a boundary
    # that can differ from encoding the whole text (BPE makes "\n" + "  Hi" "\n " + " Hi").
    ids: list[int] = []
    targets: list[bool] = []
    for text, turn in _chat_pieces(messages, tokenizer, where):
        piece = tokenizer.encode(text)
        ids += piece
        targets += [False] * len(piece) if turn is None else _turn_targets(piece, tokenizer, turn)
    if bos and ids[:1] != bos:  # as `Tokenizer.encode_chat`: unless the template wrote it
        ids, targets = bos + ids, [False, *targets]
    return ids, targets


def _chat_pieces(messages: _Messages, tokenizer: Tokenizer, where: str) -> Iterator[_Piece]:
    # Each message adds the template's text for it beyond the messages before it ("" for
    # none); an assistant message splits into its header (generation prompt) and its turn.
    rendered = ""
    for i, message in enumerate(messages):
        steps = [(i, True, None)] if message["role"] == "assistant" else []
        turn = f"{where}: message {i + 1}" if message["role"] == "assistant" else None
        for n, is_prompt, name in [*steps, (i + 1, False, turn)]:
            try:
                text = tokenizer.apply_chat_template(messages[:n], add_generation_prompt=is_prompt)
            except TokenizerError as exc:
                raise DataError(f"{where}: cannot render the chat: {exc}") from exc
            if not text.startswith(rendered):
                raise DataError(
                    f"{where}: the chat template is not prefix-stable: its text for messages "
                    f"1-{n} does not extend its text for those before, so the assistant "
                    f"tokens cannot be told apart"
                )
            yield text[len(rendered) :], name
            rendered = text


def _turn_targets(piece: list[int], tokenizer: Tokenizer, name: str) -> list[bool]:
    # Targets run through the turn's end-of-turn token: generation stops there, so what the
    # template writes after it (a newline) is never generated and is not learned.
    stops = [k for k, token in enumerate(piece) if token in tokenizer.stop_token_ids]
    if len(stops) > 1:  # one in the text itself would teach the model to stop there
        marker = tokenizer.decode([piece[stops[0]]])
        raise DataError(f"{name} has the end-of-turn token {marker!r} in its text; remove it")
    end = stops[0] + 1 if stops else len(piece)
    return [k < end for k in range(len(piece))]


def _chat_bos(tokenizer: Tokenizer) -> list[int]:
    # `encode(add_special_tokens=True)` adds BOS by `encode_chat`'s rule (and tokenizer.json's
    # post-processor, which agrees for GGUF imports); a template's own BOS does not count.
    bos = tokenizer.bos_token_id
    added = tokenizer.encode("", add_special_tokens=True)[:1]
    return added if bos is not None and added == [bos] else []


def _string(value: Any, what: str) -> str:
    # JSON can escape a lone UTF-16 surrogate ("\ud800"), which no tokenizer can encode.
    if not isinstance(value, str):
        raise DataError(f"{what} must be a string, got {_json_type(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{what} holds an unpaired surrogate escape (\\ud800-\\udfff)") from None
    return value


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    return "null" if value is None else names.get(type(value), "a number")
