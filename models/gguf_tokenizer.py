"""Build a `tokenizers` tokenizer (tokenizer.json) and tokenizer_config.json from GGUF metadata.

A GGUF file carries no tokenizer.json: it stores the vocabulary, merges, token types and
special token ids under llama.cpp's `tokenizer.ggml.*` keys. We rebuild the tokenizer the way
llama.cpp runs it (src/llama-vocab.cpp), so ids match what llama.cpp feeds the same model:

- `gpt2`: byte-level BPE. The pre-tokenizer is a chain of regex splits chosen by
  `tokenizer.ggml.pre`, each applied to the pieces the previous one left (llama.cpp's
  `unicode_regex_split`), followed by the GPT-2 byte-to-unicode mapping.
- `llama`: SentencePiece BPE. llama.cpp merges the adjacent pair whose joined piece has the
  highest score, so merges are derived from the vocabulary ranked by that score; characters
  missing from the vocabulary fall back to `<0xNN>` byte tokens.

Tokens typed CONTROL become special added tokens and USER_DEFINED ones plain added tokens, so
text such as `<|im_start|>` is matched whole, as llama.cpp does when it parses special tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE
from volunteer.models.errors import TokenizerError

# llama.cpp's llama_token_type values (gguf-py TokenType).
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

SPIECE_UNDERLINE = "\u2581"

# The regexes below are llama.cpp's, spelled as it spells them (case-insensitive contractions
# written out as [sS] so that Unicode case folding cannot widen them).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TEKKEN = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp's fallback for files converted without a pre-tokenizer name.
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]")
_FALCON = (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]")


def _group(names: str, regexes: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    return dict.fromkeys(names.split(), regexes)


# tokenizer.ggml.pre -> the regex chain llama.cpp applies (llm_tokenizer_bpe).
PRE_TOKENIZER_REGEXES: dict[str, tuple[str, ...]] = {
    **_group("default", _DEFAULT),
    **_group("falcon", _FALCON),
    **_group("smollm starcoder refact command-r codeshell exaone minerva-7b", (r"\p{N}", _GPT2)),
    **_group("gpt2 gpt-2 phi-2 mpt olmo jais exaone4 roberta-bpe", (_GPT2,)),
    **_group(
        "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano dbrx"
        " smaug-bpe glm4 chatglm-bpe",
        (_LLAMA3,),
    ),
    **_group("qwen2 deepseek-r1-qwen kormo f2llmv2 megrez stablelm2 hunyuan solar-open", (_QWEN2,)),
    **_group("qwen35", (_QWEN35,)),
    **_group("tekken", (_TEKKEN,)),
    **_group("gpt-4o llama4 kanana2 talkie minimax-m2", (_GPT4O,)),
}

# Pre-tokenizers for which llama.cpp looks a whole piece up in the vocabulary before merging,
# and adds BOS unless the file says otherwise.
_IGNORE_MERGES = frozenset(
    {
        "llama3",
        "llama-v3",
        "llama-bpe",
        "falcon3",
        "falcon-h1",
        "pixtral",
        "midm-2.0",
        "lfm2",
        "jina-v5-nano",
        "tekken",
    }
)
_ADD_BOS_BY_DEFAULT = _IGNORE_MERGES

_SPECIAL_ID_KEYS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def tokenizer_json_from_gguf(meta: Mapping[str, Any]) -> str:
    """Build the tokenizer.json contents described by a GGUF file's metadata.

    Args:
        meta: GGUF metadata as plain Python values, keyed by GGUF key name. Needs
            `tokenizer.ggml.model` and `tokenizer.ggml.tokens`; `gpt2` models also need
            `tokenizer.ggml.merges` and `llama` models `tokenizer.ggml.scores`.

    Returns:
        The JSON text of a `tokenizers` tokenizer (what a tokenizer.json file holds).

    Raises:
        TokenizerError: A key is missing or malformed, or the tokenizer model or
            pre-tokenizer type is one we do not implement.
    """
    with _malformed_metadata():
        return _tokenizer_json(meta)


def _tokenizer_json(meta: Mapping[str, Any]) -> str:
    kind = meta.get("tokenizer.ggml.model")
    tokens = _tokens(meta)
    types = _token_types(meta, len(tokens))
    if kind == "gpt2":
        backend = _byte_level_bpe(meta, tokens)
    elif kind == "llama":
        backend = _sentencepiece_bpe(meta, tokens, types)
    else:
        raise TokenizerError(
            f"GGUF tokenizer model {kind!r} is not supported (supported: 'gpt2', 'llama')"
        )
    _add_special_tokens(backend, tokens, types)
    _add_post_processor(backend, meta, tokens)
    return backend.to_str()


def tokenizer_config_from_gguf(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Build the tokenizer_config.json contents described by a GGUF file's metadata.

    Args:
        meta: GGUF metadata as plain Python values, keyed by GGUF key name.

    Returns:
        A Hugging Face style config: `bos_token`, `eos_token`, `unk_token` and `pad_token`
        (token strings, or None), `add_bos_token`, `add_eos_token`, and `chat_template`
        when the file has one.

    Raises:
        TokenizerError: The vocabulary is missing or a special token id is out of range.
    """
    with _malformed_metadata():
        return _tokenizer_config(meta)


def _tokenizer_config(meta: Mapping[str, Any]) -> dict[str, Any]:
    tokens = _tokens(meta)
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "add_bos_token": _add_bos(meta),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
    }
    for name, key in _SPECIAL_ID_KEYS.items():
        token_id = _optional_id(meta, key, len(tokens))
        config[name] = None if token_id is None else tokens[token_id]
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str) and template:
        config["chat_template"] = template
    return config


def _tokens(meta: Mapping[str, Any]) -> list[str]:
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, Sequence) or isinstance(tokens, str) or not tokens:
        raise TokenizerError(
            "GGUF metadata has no tokenizer.ggml.tokens: the file has no vocabulary"
        )
    seen: dict[str, int] = {}
    for index, token in enumerate(tokens):
        if not isinstance(token, str):
            raise TokenizerError(f"GGUF token {index} is not a string; the file is corrupt")
        # llama.cpp renames empty tokens the same way, so they stay distinct and unreachable.
        token = token or f"[EMPTY_{index}]"
        if token in seen:
            raise TokenizerError(
                f"GGUF vocabulary repeats {token!r} (ids {seen[token]} and {index}); "
                "the file is corrupt"
            )
        seen[token] = index
    return list(seen)


def _token_types(meta: Mapping[str, Any], n_tokens: int) -> list[int]:
    types = meta.get("tokenizer.ggml.token_type")
    if types is None:
        return [TOKEN_TYPE_NORMAL] * n_tokens
    if len(types) != n_tokens:
        raise TokenizerError(
            f"GGUF tokenizer.ggml.token_type has {len(types)} entries for {n_tokens} tokens"
        )
    return [int(t) for t in types]


def _optional_id(meta: Mapping[str, Any], key: str, n_tokens: int) -> int | None:
    value = meta.get(key)
    if value is None:
        return None
    token_id = int(value)
    if not 0 <= token_id < n_tokens:
        raise TokenizerError(f"GGUF {key} = {token_id} is outside the {n_tokens}-token vocabulary")
    return token_id


def _add_bos(meta: Mapping[str, Any]) -> bool:
    value = meta.get("tokenizer.ggml.add_bos_token")
    if value is not None:
        return bool(value)
    # llama.cpp's defaults when the file is silent.
    if meta.get("tokenizer.ggml.model") == "llama":
        return True
    return meta.get("tokenizer.ggml.pre") in _ADD_BOS_BY_DEFAULT


def _merges(meta: Mapping[str, Any]) -> list[tuple[str, str]]:
    merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(merges, Sequence) or isinstance(merges, str):
        raise TokenizerError("GGUF metadata has no tokenizer.ggml.merges, which a BPE model needs")
    pairs = []
    for merge in merges:
        # Split at the first space after the first character, as llama.cpp does.
        cut = merge.find(" ", 1) if isinstance(merge, str) else -1
        if cut < 0:
            raise TokenizerError(f"GGUF merge {merge!r} is not of the form 'left right'")
        pairs.append((merge[:cut], merge[cut + 1 :]))
    return pairs


def _byte_level_bpe(meta: Mapping[str, Any], tokens: list[str]) -> BackendTokenizer:
    pre = meta.get("tokenizer.ggml.pre") or "default"
    regexes = PRE_TOKENIZER_REGEXES.get(pre)
    if regexes is None:
        raise TokenizerError(
            f"GGUF pre-tokenizer {pre!r} is not supported; supported: "
            + ", ".join(sorted(PRE_TOKENIZER_REGEXES))
        )
    model = BPE(
        vocab={token: index for index, token in enumerate(tokens)},
        merges=_merges(meta),
        ignore_merges=pre in _IGNORE_MERGES,
    )
    backend = BackendTokenizer(model)
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(
    meta: Mapping[str, Any], tokens: list[str], types: list[int]
) -> BackendTokenizer:
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise TokenizerError(
            "GGUF 'llama' tokenizer needs tokenizer.ggml.scores, one per token; the file lacks them"
        )
    unk_id = _optional_id(meta, "tokenizer.ggml.unknown_token_id", len(tokens))
    model = BPE(
        vocab={token: index for index, token in enumerate(tokens)},
        merges=_merges_from_scores(tokens, types, [float(s) for s in scores]),
        unk_token=None if unk_id is None else tokens[unk_id],
        fuse_unk=True,
        byte_fallback=True,
    )
    backend = BackendTokenizer(model)
    add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    # A normalizer (not Metaspace) so that, like llama.cpp, the space prefix is added to every
    # piece of text, including text that follows a special token.
    steps = [normalizers.Replace(" ", SPIECE_UNDERLINE)]
    if add_space_prefix:
        steps.insert(0, normalizers.Prepend(SPIECE_UNDERLINE))
    backend.normalizer = normalizers.Sequence(steps)
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace(SPIECE_UNDERLINE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            *([decoders.Strip(" ", 1, 0)] if add_space_prefix else []),
        ]
    )
    return backend


def _merges_from_scores(
    tokens: list[str], types: list[int], scores: list[float]
) -> list[tuple[str, str]]:
    """Every split of a normal token into two normal tokens, best joined score first.

    llama.cpp's SPM tokenizer repeatedly joins the adjacent pair whose joined piece scores
    highest; BPE with merges ranked by that score makes the same choices.
    """
    normal = {t: i for i, t in enumerate(tokens) if types[i] == TOKEN_TYPE_NORMAL}
    ranked = []
    for token, index in normal.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[index], normal[left], normal[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _add_special_tokens(backend: BackendTokenizer, tokens: list[str], types: list[int]) -> None:
    control = [
        AddedToken(token, special=True, normalized=False)
        for token, kind in zip(tokens, types, strict=True)
        if kind == TOKEN_TYPE_CONTROL
    ]
    user = [
        AddedToken(token, special=False, normalized=False)
        for token, kind in zip(tokens, types, strict=True)
        if kind == TOKEN_TYPE_USER_DEFINED
    ]
    # Every one is already in the vocabulary, so each keeps its GGUF id.
    backend.add_special_tokens(control)
    backend.add_tokens(user)


def _add_post_processor(
    backend: BackendTokenizer, meta: Mapping[str, Any], tokens: list[str]
) -> None:
    bos_id = _optional_id(meta, "tokenizer.ggml.bos_token_id", len(tokens))
    eos_id = _optional_id(meta, "tokenizer.ggml.eos_token_id", len(tokens))
    use_bos = _add_bos(meta) and bos_id is not None
    use_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos_id is not None
    if not (use_bos or use_eos):
        return
    prefix = [tokens[bos_id]] if use_bos and bos_id is not None else []
    suffix = [tokens[eos_id]] if use_eos and eos_id is not None else []
    special = {tokens[i]: i for i in (bos_id, eos_id) if i is not None}
    backend.post_processor = processors.TemplateProcessing(
        single=[*prefix, "$A", *suffix],
        pair=[*prefix, "$A", *suffix, *prefix, "$B:1", *suffix],
        special_tokens=list(special.items()),
    )


@contextlib.contextmanager
def _malformed_metadata() -> Iterator[None]:
    """Turns what a wrongly typed metadata value raises into a TokenizerError."""
    try:
        yield
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
        raise TokenizerError(f"malformed GGUF tokenizer metadata: {exc!r}") from exc
