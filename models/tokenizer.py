"""Text to token ids and back, chat prompts, and streaming detokenization.

`Tokenizer` wraps a `tokenizers` tokenizer built from a model folder (tokenizer.json,
tokenizer_config.json, generation_config.json) or from GGUF metadata (see
`volunteer.models.gguf_tokenizer`). Added tokens such as `<|im_start|>` are always matched whole in
input text, as both transformers and llama.cpp do by default.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as BackendTokenizer
from volunteer.models.chat_template import ChatTemplate, select_chat_template
from volunteer.models.errors import TokenizerError
from volunteer.models.gguf_tokenizer import tokenizer_config_from_gguf, tokenizer_json_from_gguf

SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)

# Tokens that end a turn or a text; llama.cpp stops generation on these by name.
END_OF_GENERATION_TOKENS = frozenset(
    {
        "<|im_end|>",
        "<|eot_id|>",
        "<|eom_id|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<EOT>",
    }
)


class Tokenizer:
    """A model's tokenizer and chat template."""

    def __init__(
        self,
        *,
        backend: BackendTokenizer,
        special_tokens: Mapping[str, str],
        chat_template: ChatTemplate | None,
        add_bos_token: bool,
        stop_token_ids: frozenset[int],
    ) -> None:
        self._backend = backend
        self._special_tokens = dict(special_tokens)
        self._chat_template = chat_template
        self._add_bos_token = add_bos_token
        self._stop_token_ids = stop_token_ids

    @classmethod
    def from_folder(cls, folder: Path) -> Tokenizer:
        """Load the tokenizer of a Hugging Face style model folder.

        Args:
            folder: Holds tokenizer.json; tokenizer_config.json and generation_config.json
                are read when present.

        Returns:
            The tokenizer.

        Raises:
            TokenizerError: tokenizer.json is missing or unreadable, or a config file is
                not valid JSON.
        """
        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"no tokenizer.json in {folder}; download the model's tokenizer")
        backend = _backend_from_json(path.read_text(encoding="utf-8"), source=str(path))
        config = _read_json(Path(folder) / "tokenizer_config.json")
        generation = _read_json(Path(folder) / "generation_config.json")
        return cls.from_parts(backend=backend, config=config, generation_config=generation)

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """Build the tokenizer a GGUF file describes.

        Args:
            meta: GGUF metadata as plain Python values, keyed by GGUF key name.

        Returns:
            The tokenizer.

        Raises:
            TokenizerError: The metadata does not describe a tokenizer we can build.
        """
        backend = _backend_from_json(tokenizer_json_from_gguf(meta), source="GGUF metadata")
        return cls.from_parts(backend=backend, config=tokenizer_config_from_gguf(meta))

    @classmethod
    def from_parts(
        cls,
        *,
        backend: BackendTokenizer,
        config: Mapping[str, Any],
        generation_config: Mapping[str, Any] | None = None,
    ) -> Tokenizer:
        """Assemble a tokenizer from a backend and the contents of its config files.

        Args:
            backend: The `tokenizers` tokenizer (tokenizer.json).
            config: tokenizer_config.json contents.
            generation_config: generation_config.json contents, for extra `eos_token_id`s.

        Returns:
            The tokenizer.

        Raises:
            TokenizerError: The chat template does not compile.
        """
        special = _special_tokens(config)
        source = select_chat_template(config.get("chat_template"))
        template = None if source is None else ChatTemplate.compile(source, special_tokens=special)
        return cls(
            backend=backend,
            special_tokens=special,
            chat_template=template,
            add_bos_token=bool(config.get("add_bos_token", False)),
            stop_token_ids=_stop_ids(backend, special, generation_config or {}),
        )

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return int(self._backend.get_vocab_size(with_added_tokens=True))

    @property
    def bos_token_id(self) -> int | None:
        """Id of the beginning-of-sequence token, if the model has one."""
        return self._token_id(self._special_tokens.get("bos_token"))

    @property
    def eos_token_id(self) -> int | None:
        """Id of the end-of-sequence token, if the model has one."""
        return self._token_id(self._special_tokens.get("eos_token"))

    @property
    def stop_token_ids(self) -> frozenset[int]:
        """Ids that end generation: eos, generation_config's eos ids, end-of-turn tokens."""
        return self._stop_token_ids

    @property
    def has_chat_template(self) -> bool:
        """Whether the model ships a chat template."""
        return self._chat_template is not None

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; added tokens written in the text become their single ids.

        Args:
            text: The text to encode.
            add_special_tokens: Add what the model puts around a sequence (such as BOS).

        Returns:
            The token ids.
        """
        ids: list[int] = self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens:
            ids = self._with_bos(ids)
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of token ids.

        Args:
            ids: The token ids.
            skip_special_tokens: Leave special tokens such as `<|im_end|>` out of the text.

        Returns:
            The text; byte sequences that are not valid UTF-8 show as U+FFFD.
        """
        return str(self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def apply_chat_template(
        self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True
    ) -> str:
        """Render a conversation with the model's chat template.

        Args:
            messages: Dicts with `role` and `content`.
            add_generation_prompt: End with the header that starts the assistant's turn.

        Returns:
            The prompt text.

        Raises:
            TokenizerError: The model has no chat template, or the template rejected the
                conversation.
        """
        if self._chat_template is None:
            raise TokenizerError("model has no chat template; pass a plain prompt instead")
        return self._chat_template.render(messages, add_generation_prompt=add_generation_prompt)

    def encode_chat(
        self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of a conversation rendered with the chat template.

        Special tokens in the rendered text are parsed. BOS is prepended only when the model
        asks for it (`add_bos_token`) and the template did not already write it.

        Args:
            messages: Dicts with `role` and `content`.
            add_generation_prompt: End with the header that starts the assistant's turn.

        Returns:
            The prompt's token ids.

        Raises:
            TokenizerError: The model has no chat template, or the template rejected the
                conversation.
        """
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        ids: list[int] = self._backend.encode(text, add_special_tokens=False).ids
        return self._with_bos(ids)

    def stream_decoder(self, *, skip_special_tokens: bool = True) -> StreamDecoder:
        """A decoder that turns generated ids into text as they arrive.

        Args:
            skip_special_tokens: Leave special tokens out of the text (the default, since
                the text is meant for a terminal).

        Returns:
            A fresh decoder.
        """
        return StreamDecoder(
            decode=lambda ids: self.decode(ids, skip_special_tokens=skip_special_tokens)
        )

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    def _with_bos(self, ids: list[int]) -> list[int]:
        bos = self.bos_token_id
        if self._add_bos_token and bos is not None and (not ids or ids[0] != bos):
            return [bos, *ids]
        return ids


class StreamDecoder:
    """Incremental detokenization that never prints half a character.

    Byte-level BPE can split one multi-byte character over several tokens, and decoding a
    prefix of them gives U+FFFD. Each push decodes the tokens since the last emitted boundary
    (with one token of context, so decoders that strip a leading space see the same text as a
    full decode) and holds the text back while it ends in an incomplete sequence.
    """

    def __init__(self, *, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, token_id: int) -> str:
        """Add one generated id.

        Args:
            token_id: The id.

        Returns:
            The text completed by this id; empty while a character is still incomplete.
        """
        self._ids.append(token_id)
        return self._advance(is_final=False)

    def flush(self) -> str:
        """Text still held back (an incomplete character shows as U+FFFD).

        Returns:
            The remaining text; the decoder is then empty.
        """
        text = self._advance(is_final=True)
        self._ids.clear()
        self._prefix_offset = self._read_offset = 0
        return text

    def _advance(self, *, is_final: bool) -> str:
        start = self._prefix_offset
        seen = self._decode(self._ids[start : self._read_offset])
        text = self._decode(self._ids[start:])
        if len(text) <= len(seen) or (text.endswith("\ufffd") and not is_final):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return text[len(seen) :]


def _backend_from_json(text: str, *, source: str) -> BackendTokenizer:
    try:
        return BackendTokenizer.from_str(text)
    except Exception as exc:  # the Rust side raises a bare Exception for every parse failure
        raise TokenizerError(f"cannot load tokenizer from {source}: {exc}") from exc


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"cannot read {path}: {exc}") from exc
    if not isinstance(value, dict):
        raise TokenizerError(f"{path} does not hold a JSON object")
    return value


def _special_tokens(config: Mapping[str, Any]) -> dict[str, str]:
    special = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = config.get(name)
        # Older configs store an AddedToken as {"content": ..., "__type": "AddedToken"}.
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            special[name] = value
    return special


def _stop_ids(
    backend: BackendTokenizer, special: Mapping[str, str], generation: Mapping[str, Any]
) -> frozenset[int]:
    eos = special.get("eos_token")
    eos_id = None if eos is None else backend.token_to_id(eos)
    ids: set[int] = set() if eos_id is None else {eos_id}
    extra = generation.get("eos_token_id")
    ids.update(extra if isinstance(extra, list) else [] if extra is None else [extra])
    # Only added tokens: a byte-level vocabulary could spell "<|end|>" as ordinary text.
    for token_id, added in backend.get_added_tokens_decoder().items():
        if added.content in END_OF_GENERATION_TOKENS:
            ids.add(token_id)
    return frozenset(int(i) for i in ids)
