"""Chat templates rendered the way Hugging Face transformers renders them.

A model's chat template is a Jinja program shipped in tokenizer_config.json (or GGUF
`tokenizer.chat_template`). It is untrusted code, so it runs in Jinja's immutable sandbox. The
environment mirrors transformers' `apply_chat_template`: `trim_blocks` and `lstrip_blocks`,
the loop-control extension, a `{% generation %}` block that renders its body, a `tojson`
filter that does not HTML-escape, and the `raise_exception` and `strftime_now` globals. The
variables are `messages`, `tools`, `documents`, `add_generation_prompt` and the special token
strings (`bos_token`, `eos_token`, ...).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from volunteer.models.errors import TokenizerError

# What a template's own code can raise while it runs; anything else is a bug of ours.
_RENDER_ERRORS = (
    jinja2.TemplateError,
    TypeError,
    ValueError,
    LookupError,
    ArithmeticError,
    AttributeError,
)


class ChatTemplate:
    """A compiled chat template, ready to render conversations."""

    def __init__(
        self, *, source: str, template: jinja2.Template, special_tokens: Mapping[str, str]
    ) -> None:
        self.source = source
        self._template = template
        self._special_tokens = dict(special_tokens)

    @classmethod
    def compile(
        cls, source: str, *, special_tokens: Mapping[str, str] | None = None
    ) -> ChatTemplate:
        """Compile a template.

        Args:
            source: The Jinja source of the template.
            special_tokens: Variables such as `bos_token` and `eos_token`, passed to every render.

        Returns:
            The compiled template.

        Raises:
            TokenizerError: The template has a syntax error.
        """
        try:
            template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise TokenizerError(
                f"chat template has a syntax error at line {exc.lineno}: {exc.message}"
            ) from exc
        return cls(source=source, template=template, special_tokens=special_tokens or {})

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        **variables: Any,
    ) -> str:
        """Render a conversation to prompt text.

        Args:
            messages: Dicts with at least `role` and `content`. Keys whose value is None are
                dropped, as transformers does, since many templates test for a key's presence.
            add_generation_prompt: End with the header that starts the assistant's turn.
            **variables: Extra template variables (`tools`, `documents`, ...); they override
                the special tokens of the same name.

        Returns:
            The rendered prompt.

        Raises:
            TokenizerError: The template rejected the conversation (`raise_exception`) or
                failed while rendering it.
        """
        context: dict[str, Any] = {"tools": None, "documents": None, **self._special_tokens}
        context.update(variables)
        plain = [_plain_message(message) for message in messages]
        try:
            return self._template.render(
                messages=plain, add_generation_prompt=add_generation_prompt, **context
            )
        except TokenizerError:
            raise
        except _RENDER_ERRORS as exc:
            raise TokenizerError(f"chat template failed to render: {exc}") from exc


def select_chat_template(value: Any) -> str | None:
    """Pick the default template from a tokenizer_config.json `chat_template` value.

    Args:
        value: A template string, a list of `{"name": ..., "template": ...}` dicts (the older
            multi-template form), or None.

    Returns:
        The default template's source, or None when there is none.

    Raises:
        TokenizerError: The value has some other shape.
    """
    if value is None or (isinstance(value, str) and value):
        return value or None
    if isinstance(value, list):
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
        default = named.get("default")
        return default if isinstance(default, str) else None
    raise TokenizerError(
        f"tokenizer_config.json chat_template is a {type(value).__name__}, "
        "expected a string or a list of named templates"
    )


def _plain_message(message: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(message, Mapping):
        raise TokenizerError(f"chat messages must be dicts, got {type(message).__name__}")
    return {key: value for key, value in message.items() if value is not None}


def _raise_exception(message: str) -> NoReturn:
    raise TokenizerError(f"chat template refused the conversation: {message}")


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes <, > and & for HTML, which would change prompts.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}`: marks assistant text; renders its body."""

    tags = {"generation"}  # noqa: RUF012 (jinja2 declares tags a plain set attribute)

    def parse(self, parser: jinja2.parser.Parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


@functools.lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env
