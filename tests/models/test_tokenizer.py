"""Tokenizer: tiny hand-built vocabularies (fast) and the real SmolLM2 GGUF against transformers."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import pre_tokenizers
from volunteer.models.errors import TokenizerError
from volunteer.models.gguf_tokenizer import tokenizer_config_from_gguf, tokenizer_json_from_gguf
from volunteer.models.tokenizer import StreamDecoder, Tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [
    ("h", "e"),
    ("l", "l"),
    ("he", "ll"),
    ("hell", "o"),
    ("Ġ", "w"),
    ("o", "r"),
    ("Ġw", "or"),
    ("Ġwor", "l"),
    ("Ġworl", "d"),
]
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _tiny_vocab() -> dict[str, int]:
    tokens = SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()) + [a + b for a, b in MERGES]
    return {token: index for index, token in enumerate(tokens)}


def _tiny_tokenizer_json() -> dict[str, Any]:
    """A byte-level BPE tokenizer.json as transformers writes one, with nine merges."""
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": index,
                "content": token,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for index, token in enumerate(SPECIALS)
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": _tiny_vocab(),
            "merges": [list(pair) for pair in MERGES],
        },
    }


def _write_folder(folder: Path, config: dict[str, Any] | None, **extra: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(_tiny_tokenizer_json()), encoding="utf-8")
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    for name, value in extra.items():
        (folder / f"{name}.json").write_text(json.dumps(value), encoding="utf-8")
    return folder


@pytest.fixture
def tiny(tmp_path: Path) -> Tokenizer:
    config = {"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "chat_template": CHATML}
    return Tokenizer.from_folder(_write_folder(tmp_path, config))


def test_from_folder_applies_merges_and_keeps_special_tokens_whole(tiny: Tokenizer) -> None:
    vocab = _tiny_vocab()
    assert tiny.encode("hello world") == [vocab["hello"], vocab["Ġworld"]]
    assert tiny.encode("<|im_start|>hello<|im_end|>") == [1, vocab["hello"], 2]
    assert tiny.decode([1, vocab["hello"], 2]) == "<|im_start|>hello<|im_end|>"
    assert tiny.decode([1, vocab["hello"], 2], skip_special_tokens=True) == "hello"


@pytest.mark.parametrize("text", ["hello world", "  tabs\tand\nnewlines  ", "naïve 世界 🎉", ""])
def test_decode_round_trips(tiny: Tokenizer, text: str) -> None:
    assert tiny.decode(tiny.encode(text)) == text


def test_stop_ids_are_eos_and_end_of_turn_tokens(tiny: Tokenizer) -> None:
    # <|im_end|> is eos; <|endoftext|> ends generation in llama.cpp too; <|im_start|> does not.
    assert tiny.stop_token_ids == frozenset({0, 2})


def test_stop_ids_include_generation_config_eos_ids(tmp_path: Path) -> None:
    folder = _write_folder(tmp_path, {}, generation_config={"eos_token_id": [7, 9]})
    assert Tokenizer.from_folder(folder).stop_token_ids == frozenset({0, 2, 7, 9})


def test_missing_tokenizer_json_raises(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"no tokenizer\.json"):
        Tokenizer.from_folder(tmp_path)


def test_corrupt_tokenizer_json_raises(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match="cannot load tokenizer"):
        Tokenizer.from_folder(tmp_path)


def test_missing_chat_template_raises_only_when_used(tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_folder(_write_folder(tmp_path, None))
    assert tokenizer.encode("hello") == [_tiny_vocab()["hello"]]
    assert not tokenizer.has_chat_template
    with pytest.raises(TokenizerError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_encode_chat_parses_special_tokens(tiny: Tokenizer) -> None:
    messages = [{"role": "user", "content": "hello"}]
    assert tiny.apply_chat_template(messages) == (
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tiny.encode_chat(messages)
    assert ids.count(1) == 2 and ids.count(2) == 1
    assert tiny.decode(ids) == tiny.apply_chat_template(messages)


def test_bos_is_added_once_when_the_model_asks(tmp_path: Path) -> None:
    config = {"bos_token": "<|endoftext|>", "add_bos_token": True, "chat_template": CHATML}
    tokenizer = Tokenizer.from_folder(_write_folder(tmp_path, config))
    hello = _tiny_vocab()["hello"]
    assert tokenizer.encode("hello") == [hello]
    assert tokenizer.encode("hello", add_special_tokens=True) == [0, hello]
    assert tokenizer.encode("<|endoftext|>hello", add_special_tokens=True) == [0, hello]
    assert tokenizer.encode_chat([{"role": "user", "content": "hello"}])[:2] == [0, 1]


def test_stream_decoder_holds_back_split_characters(tiny: Tokenizer) -> None:
    text = "héllo 世界 🎉!"
    ids = tiny.encode(text)
    decoder = tiny.stream_decoder()
    pieces = [decoder.push(token_id) for token_id in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert "" in pieces[:-1]  # some byte did not finish a character and was held back


def test_stream_decoder_flushes_an_incomplete_character_as_replacement() -> None:
    decoder = StreamDecoder(decode=lambda ids: bytes(ids).decode("utf-8", errors="replace"))
    first, second = "é".encode()
    assert decoder.push(ord("a")) == "a"
    assert decoder.push(first) == ""
    assert decoder.flush() == "\ufffd"
    assert decoder.push(first) == "" and decoder.push(second) == "é"


# GGUF metadata -> tokenizer


def _gguf_byte_level(pre: str, **extra: Any) -> dict[str, Any]:
    tokens = [*SPECIALS, "<think>", *sorted(pre_tokenizers.ByteLevel.alphabet())]
    tokens += [a + b for a, b in MERGES]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 3, 3, 4] + [1] * (len(tokens) - 4),
        "tokenizer.ggml.merges": [f"{a} {b}" for a, b in MERGES],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.chat_template": CHATML,
        **extra,
    }


def _pieces(meta: dict[str, Any], text: str) -> list[str]:
    backend = BackendTokenizer.from_str(tokenizer_json_from_gguf(meta))
    assert backend.pre_tokenizer is not None
    return [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text)]


@pytest.mark.parametrize(
    ("pre", "expected"),
    [
        ("smollm", ["x", "1", "2", "3", "4", "5", "Ġ", "6", "Ġa"]),
        ("gpt2", ["x", "12345", "Ġ6", "Ġa"]),
        ("llama-bpe", ["x", "123", "45", "Ġ", "6", "Ġa"]),
        ("qwen2", ["x", "1", "2", "3", "4", "5", "Ġ", "6", "Ġa"]),
        ("default", ["x", "123", "45", "Ġ", "6", "Ġa"]),
    ],
)
def test_gguf_pre_tokenizers_split_like_llama_cpp(pre: str, expected: list[str]) -> None:
    assert _pieces(_gguf_byte_level(pre), "x12345 6 a") == expected


@pytest.mark.parametrize(
    ("key", "value"), [("tokenizer.ggml.pre", "mystery-bpe"), ("tokenizer.ggml.model", "rwkv")]
)
def test_gguf_unknown_model_or_pre_tokenizer_is_named(key: str, value: str) -> None:
    with pytest.raises(TokenizerError, match=f"'{value}' is not supported"):
        tokenizer_json_from_gguf({**_gguf_byte_level("smollm"), key: value})


def test_gguf_rejects_duplicate_tokens_and_bad_ids() -> None:
    meta = _gguf_byte_level("smollm")
    with pytest.raises(TokenizerError, match="repeats"):
        tokenizer_json_from_gguf({**meta, "tokenizer.ggml.tokens": ["a", "b", "a"]})
    with pytest.raises(TokenizerError, match="outside"):
        tokenizer_config_from_gguf({**meta, "tokenizer.ggml.eos_token_id": 10**6})


def test_gguf_control_tokens_are_special_and_user_defined_are_not() -> None:
    tokenizer = Tokenizer.from_gguf_metadata(_gguf_byte_level("smollm"))
    ids = tokenizer.encode("<|im_start|><think>hello")
    assert ids[:2] == [1, 3] and len(ids) == 3
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>hello"
    assert tokenizer.stop_token_ids == frozenset({0, 2})


def test_gguf_config_names_special_tokens() -> None:
    config = tokenizer_config_from_gguf(_gguf_byte_level("smollm"))
    assert config["bos_token"] == "<|im_start|>" and config["eos_token"] == "<|im_end|>"
    assert config["unk_token"] is None and config["add_bos_token"] is False
    assert config["chat_template"] == CHATML


def test_gguf_add_bos_token_adds_bos() -> None:
    meta = _gguf_byte_level("smollm", **{"tokenizer.ggml.add_bos_token": True})
    tokenizer = Tokenizer.from_gguf_metadata(meta)
    assert tokenizer.encode("hello", add_special_tokens=True)[0] == 1
    assert tokenizer.encode("hello")[0] != 1


# SentencePiece ('llama') vocabularies: checked against llama.cpp's merge rule, written out here.

SPM_PIECES = {
    "▁": -1.0,
    "h": -2.0,
    "e": -2.1,
    "l": -2.2,
    "o": -2.3,
    "w": -2.4,
    "r": -2.5,
    "d": -2.6,
    "he": -3.0,
    "ll": -3.1,
    "llo": -3.5,
    "hello": -4.0,
    "▁he": -5.0,
    "▁hello": -3.9,
    "▁w": -4.5,
    "or": -4.6,
    "ld": -4.7,
    "▁wor": -6.0,
    "▁world": -5.5,
}


def _spm_meta() -> dict[str, Any]:
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *SPM_PIECES]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * 259 + list(SPM_PIECES.values()),
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }


def _llama_cpp_spm(text: str, tokens: list[str]) -> list[int]:
    """llama.cpp's SPM rule: join the best-scoring adjacent pair (leftmost on ties), repeat."""
    ids = {token: index for index, token in enumerate(tokens)}
    symbols = list("▁" + text.replace(" ", "▁"))
    while True:
        pairs = [
            (SPM_PIECES.get(a + b), -i) for i, (a, b) in enumerate(itertools.pairwise(symbols))
        ]
        scored = [(score, neg_i) for score, neg_i in pairs if score is not None]
        if not scored:
            break
        i = -max(scored)[1]
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return [i for s in symbols for i in _spm_ids(s, ids)]


def _spm_ids(symbol: str, ids: dict[str, int]) -> Iterator[int]:
    if symbol in ids:
        yield ids[symbol]
    else:
        yield from (ids[f"<0x{b:02X}>"] for b in symbol.encode())


@pytest.mark.parametrize("text", ["hello world", "hello", "held", "world hello  hello", "héllo"])
def test_gguf_sentencepiece_matches_llama_cpp_merge_rule(text: str) -> None:
    meta = _spm_meta()
    tokenizer = Tokenizer.from_gguf_metadata(meta)
    assert tokenizer.encode(text) == _llama_cpp_spm(text, meta["tokenizer.ggml.tokens"])
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_gguf_sentencepiece_adds_bos_and_space_prefix_after_special_tokens() -> None:
    meta = _spm_meta()
    tokenizer = Tokenizer.from_gguf_metadata(meta)
    hello = meta["tokenizer.ggml.tokens"].index("▁hello")
    assert tokenizer.encode("hello", add_special_tokens=True) == [1, hello]
    # llama.cpp prefixes a space to every text fragment that follows a special token.
    assert tokenizer.encode("<s>hello</s>hello") == [1, hello, 2, hello]
    assert tokenizer.decode([1, hello], skip_special_tokens=True) == "hello"


def test_gguf_sentencepiece_without_scores_raises() -> None:
    meta = {**_spm_meta(), "tokenizer.ggml.scores": None}
    with pytest.raises(TokenizerError, match=r"tokenizer\.ggml\.scores"):
        tokenizer_json_from_gguf(meta)


# The real SmolLM2 GGUF against transformers' GGUF tokenizer.

CORPUS = [
    "Hello, world! How are you today?",
    "Ça va? Ñandú, naïve café, Grüße, Łódź",
    "日本語のテキストと中文，한국어",
    "emoji 🙂🎉👨‍👩‍👧‍👦 🏳️‍🌈 flags",
    "مرحبا بالعالم — שלום עולם",
    "def f(x):\n    if x:\n\treturn  x  # tab\n\nclass A:\n        pass\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more <repo_name>name",
    "a   b    c\n\n\n  d \t\te  ",
    "a1b22",
    "3.14159",
    "1,000,000",
    "x=12345;",
    "I'm can't we've THEY'RE o'clock",
    "\u00a0nbsp\u2003em\u200bzw",
    "",
    "\n",
]
# Where we differ from transformers, on purpose. llama.cpp's smollm pre-tokenizer, like SmolLM2's
# own tokenizer.json (Digits(individual_digits) then ByteLevel), cuts every \p{N} character out
# first: "x  42" is "x", "  ", "4", "2" and "ĠĠ" is one token. transformers' GGUF converter uses a
# plain ByteLevel regex that joins the last space to the number (" 42"), so a run of spaces before
# a number splits differently, and " ½" (non-ASCII numerics) merges its space into other tokens.
DIGIT_SPLIT = ["  12345", "x  42", "½ ² ③ ٣ Ⅻ", "a ½"]


@pytest.fixture(scope="module")
def original(hf_smollm2_tokenizer: Any) -> BackendTokenizer:
    """The same vocabulary with the pre-tokenizer of SmolLM2's own tokenizer.json."""
    backend = BackendTokenizer.from_str(hf_smollm2_tokenizer.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return backend


@pytest.mark.slow
@pytest.mark.parametrize("text", CORPUS)
def test_smollm2_ids_match_transformers(
    smollm2_tokenizer: Tokenizer, hf_smollm2_tokenizer: Any, text: str
) -> None:
    ids = smollm2_tokenizer.encode(text)
    assert ids == hf_smollm2_tokenizer.encode(text, add_special_tokens=False)
    assert smollm2_tokenizer.decode(ids) == text


@pytest.mark.slow
@pytest.mark.parametrize("text", CORPUS + DIGIT_SPLIT)
def test_smollm2_ids_match_original_digit_split(
    smollm2_tokenizer: Tokenizer, original: BackendTokenizer, text: str
) -> None:
    assert smollm2_tokenizer.encode(text) == original.encode(text, add_special_tokens=False).ids


@pytest.mark.slow
def test_smollm2_isolates_every_digit_like_llama_cpp(smollm2_tokenizer: Tokenizer) -> None:
    pieces = [smollm2_tokenizer.decode([i]) for i in smollm2_tokenizer.encode("  12345 ½")]
    assert pieces == ["  ", "1", "2", "3", "4", "5", " ", "½"]
    assert smollm2_tokenizer.decode(smollm2_tokenizer.encode(" ".join(DIGIT_SPLIT))) == " ".join(
        DIGIT_SPLIT
    )


@pytest.mark.slow
def test_smollm2_stops_on_im_end(smollm2_tokenizer: Tokenizer) -> None:
    assert smollm2_tokenizer.eos_token_id == 2 and smollm2_tokenizer.bos_token_id == 1
    assert smollm2_tokenizer.stop_token_ids == frozenset({0, 2})  # <|im_end|>, <|endoftext|>


@pytest.mark.slow
def test_smollm2_stream_decoder_never_prints_replacement(smollm2_tokenizer: Tokenizer) -> None:
    text = "Grüße 世界! 🎉👨‍👩‍👧 ok 🙂\nनमस्ते"
    ids = smollm2_tokenizer.encode(text)
    decoder = smollm2_tokenizer.stream_decoder()
    pieces = [decoder.push(token_id) for token_id in ids] + [decoder.flush()]
    assert "".join(pieces) == smollm2_tokenizer.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert "" in pieces[:-1]


def test_gguf_files_written_to_a_folder_load_the_same(tmp_path: Path) -> None:
    meta = _gguf_byte_level("smollm")
    (tmp_path / "tokenizer.json").write_text(tokenizer_json_from_gguf(meta), encoding="utf-8")
    config = json.dumps(tokenizer_config_from_gguf(meta))
    (tmp_path / "tokenizer_config.json").write_text(config, encoding="utf-8")
    loaded, direct = Tokenizer.from_folder(tmp_path), Tokenizer.from_gguf_metadata(meta)
    messages = [{"role": "user", "content": "hello world 42"}]
    assert loaded.encode_chat(messages) == direct.encode_chat(messages)
    assert loaded.stop_token_ids == direct.stop_token_ids


@pytest.mark.parametrize(
    "change",
    [
        {"tokenizer.ggml.token_type": 7},
        {"tokenizer.ggml.eos_token_id": [1, 2]},
        {"tokenizer.ggml.merges": 5},
    ],
)
def test_wrongly_typed_gguf_metadata_is_a_tokenizer_error(change: dict[str, Any]) -> None:
    from volunteer.models.gguf_tokenizer import tokenizer_config_from_gguf, tokenizer_json_from_gguf

    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": ["a", "b", "ab"],
        "tokenizer.ggml.merges": ["a b"],
        **change,
    }
    with pytest.raises(TokenizerError):
        tokenizer_json_from_gguf(meta)
        tokenizer_config_from_gguf(meta)
