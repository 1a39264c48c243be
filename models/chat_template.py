"""Chat templates rendered the way Hugging Face transformers renders them.

A model's chat template is a Jinja program shipped in tokenizer_config.json (or GGUF
`tokenizer.chat_template`). It is untrusted code, so it runs in Jinja's immutable sandbox. The
environment mirrors transformers' `apply_chat_template`: `trim_blocks` and `lstrip_blocks`,
the loop-control extension, a `{% generation %}` block that renders its body, a `tojson`
filter that does not HTML-escape, and the `raise_exception` and `strftime_now` globals. The
variables are `messages`, `tools`, `documents`, `add_generation_prompt` and the special token
strings (`bos_token`, `eos_token`, ...).

The sandbox stops escapes, not waste: a template can still loop, recurse or build strings
without end. So the source is bounded (`MAX_SOURCE_CHARS`), the rendered text is bounded
(`MAX_RENDERED_CHARS`, counted while it streams out of `generate()`), and every loop
iteration, call and intercepted operator (`*`, `**`, `+`, `%`) counts against a deadline
(`RENDER_TIMEOUT_S`) and a step budget (`MAX_RENDER_STEPS`); the operators also refuse
results that would exceed the output bound before they are built.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import json
import operator
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from volunteer.models.errors import TokenizerError

MAX_SOURCE_CHARS = 256_000
"""Longest template accepted; real ones are a few kilobytes."""
MAX_RENDERED_CHARS = 4_000_000
"""Longest rendered prompt: far beyond any context window, well short of memory trouble."""
RENDER_TIMEOUT_S = 2.0
"""Longest a render may run; real templates take milliseconds."""
MAX_RENDER_STEPS = 2_000_000
"""Loop iterations, calls and intercepted operators one render may take (a bound that
holds even where the clock is coarse)."""
_MAX_INT_BITS = 4096
"""`a ** b` or `a * b` whose result would exceed this many bits is refused before it is
computed (a loop of squarings would otherwise build ever slower numbers)."""

# What a template's own code can raise while it runs; anything else is a bug of ours.
_RENDER_ERRORS = (
    jinja2.TemplateError,
    TypeError,
    ValueError,
    LookupError,
    ArithmeticError,
    AttributeError,
    RecursionError,
)


class _TemplateTooCostly(TokenizerError):
    """The template exceeded a render bound (time, steps or output size)."""


@dataclasses.dataclass
class _Budget:
    deadline: float
    steps_left: int = MAX_RENDER_STEPS

    def spend(self) -> None:
        self.steps_left -= 1
        if self.steps_left < 0:
            raise _TemplateTooCostly(f"chat template took over {MAX_RENDER_STEPS} steps")
        # The clock is read every 1024 steps: cheap, and still well within the deadline.
        if self.steps_left % 1024 == 0 and time.monotonic() > self.deadline:
            raise _TemplateTooCostly(f"chat template ran over {RENDER_TIMEOUT_S:g} s")


_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar(
    "chat_template_budget", default=None
)
"""The budget of the render in progress (None outside a render: compiling is free)."""


def _spend() -> None:
    budget = _budget.get()
    if budget is not None:
        budget.spend()


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
            TokenizerError: The template has a syntax error or is over `MAX_SOURCE_CHARS`.
        """
        if len(source) > MAX_SOURCE_CHARS:
            raise TokenizerError(
                f"chat template is {len(source)} characters, over the limit of {MAX_SOURCE_CHARS}"
            )
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
            TokenizerError: The template rejected the conversation (`raise_exception`),
                failed while rendering it, or exceeded a render bound (time, steps, size).
        """
        context: dict[str, Any] = {"tools": None, "documents": None, **self._special_tokens}
        context.update(variables)
        plain = [_plain_message(message) for message in messages]
        token = _budget.set(_Budget(deadline=time.monotonic() + RENDER_TIMEOUT_S))
        try:
            chunks = self._template.generate(
                messages=plain, add_generation_prompt=add_generation_prompt, **context
            )
            return _bounded_join(chunks)
        except TokenizerError:
            raise
        except _RENDER_ERRORS as exc:
            raise TokenizerError(f"chat template failed to render: {exc}") from exc
        finally:
            _budget.reset(token)


def _bounded_join(chunks: Iterable[str]) -> str:
    """The rendered text, refused once it exceeds `MAX_RENDERED_CHARS`."""
    parts, size = [], 0
    for chunk in chunks:
        size += len(chunk)
        if size > MAX_RENDERED_CHARS:
            raise _TemplateTooCostly(
                f"chat template output is over the limit of {MAX_RENDERED_CHARS} characters"
            )
        _spend()
        parts.append(chunk)
    return "".join(parts)


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


class _CountingCodeGenerator(CodeGenerator):
    """Compiles every `{% for %}` to iterate through `_BoundedEnvironment.counted`, so each
    iteration spends budget even when the loop's body outputs and calls nothing."""

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        counted = nodes.EnvironmentAttribute("counted", lineno=node.lineno)
        node.iter = nodes.Call(counted, [node.iter], [], None, None, lineno=node.lineno)
        super().visit_For(node, frame)


_SIZED = (str, list, tuple)
_BINOPS = {"*": operator.mul, "**": operator.pow, "+": operator.add, "%": operator.mod}


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, with every call, loop iteration and `*`, `**`, `+`, `%` counted and
    sized."""

    code_generator_class = _CountingCodeGenerator
    # Intercepted operators are also never folded at compile time (`{{ 10 ** 100000000 }}`).
    intercepted_binops = frozenset(_BINOPS)

    @staticmethod
    def counted(iterable: Iterable[Any]) -> Iterator[Any]:
        for item in iterable:
            _spend()
            yield item

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _spend()
        _check_sizes(args, kwargs)
        # The sandbox hands out str.format wrapped (`__wrapped__` is the bound method).
        method = getattr(__obj, "__wrapped__", __obj)
        if getattr(method, "__name__", None) in ("format", "format_map"):
            owner = getattr(method, "__self__", None)
            if isinstance(owner, str):
                _check_format(owner, args)
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _spend()
        _check_binop_size(operator, left, right)
        return _BINOPS[operator](left, right)


def _check_binop_size(op: str, left: Any, right: Any) -> None:
    """Refuses an operation whose result would be too large, before it is computed."""
    too_big = False
    if op == "*" and isinstance(left, _SIZED) and isinstance(right, int):
        too_big = len(left) * right > MAX_RENDERED_CHARS
    elif op == "*" and isinstance(right, _SIZED) and isinstance(left, int):
        too_big = len(right) * left > MAX_RENDERED_CHARS
    elif op == "+" and isinstance(left, _SIZED) and isinstance(right, _SIZED):
        too_big = len(left) + len(right) > MAX_RENDERED_CHARS
    elif op == "*" and isinstance(left, int) and isinstance(right, int):
        too_big = left.bit_length() + right.bit_length() > _MAX_INT_BITS
    elif op == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
        too_big = right > 0 and abs(left).bit_length() * right > _MAX_INT_BITS
    if too_big:
        raise _TemplateTooCostly(f"chat template computed a value over the size limit ({op})")
    if op == "%" and isinstance(left, str):
        _check_format(left, right if isinstance(right, tuple) else (right,))


_PRINTF_SPEC_RE = re.compile(r"%(?:\([^)]*\))?[#0 +\-]*(\*|\d+)?(?:\.(\*|\d+))?")
_BRACE_FIELD_RE = re.compile(r"\{[^{}]*\}")
_DIGITS_RE = re.compile(r"\d+")


def _format_widths(fmt: str) -> Iterator[str]:
    """The widths and precisions of a format string: digits, or "*" (from the values)."""
    for match in _PRINTF_SPEC_RE.finditer(fmt):
        yield from (group for group in match.groups() if group)
    for match in _BRACE_FIELD_RE.finditer(fmt):
        _, colon, spec = match.group()[1:-1].partition(":")
        if colon:
            yield from _DIGITS_RE.findall(spec)


def _check_format(fmt: str, values: Sequence[Any]) -> None:
    """Refuses `"%900000000s" % x`, `"{:900000000}".format(x)` and `"%*s" % (n, x)` with a
    width past the output bound: formatting builds that text before the bound sees it."""
    limit = len(str(MAX_RENDERED_CHARS))
    for width in _format_widths(fmt):
        if width == "*":
            _check_sizes(values, {})
        elif len(width) > limit or int(width) > MAX_RENDERED_CHARS:
            raise _TemplateTooCostly(f"chat template formats a width of {width}, over the limit")


def _check_sizes(args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    """Refuses a width or count past the output bound (`"x".ljust(n)`, `center(n)`): the
    call would build that much text before the output bound could see it."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and abs(value) > MAX_RENDERED_CHARS:
            raise _TemplateTooCostly(f"chat template passed {value}, over the size limit")


def _checked_filter(function: Callable[..., Any]) -> Callable[..., Any]:
    # The filtered value comes first (after the context or environment where the filter
    # asks for one): only the filter's own arguments are widths or counts.
    skip = 2 if hasattr(function, "jinja_pass_arg") else 1

    # functools.wraps copies jinja's pass_context/pass_environment marker with __dict__.
    @functools.wraps(function)
    def checked(*args: Any, **kwargs: Any) -> Any:
        _spend()
        _check_sizes(args[skip:], kwargs)
        return function(*args, **kwargs)

    return checked


def _checked_format_filter(function: Callable[..., Any]) -> Callable[..., Any]:
    """`format` takes its format string as the filtered value, not as an argument."""

    @functools.wraps(function)
    def checked(value: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(value, str):
            _check_format(value, args)
        return function(value, *args, **kwargs)

    return checked


@functools.lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = _BoundedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.filters["format"] = _checked_format_filter(env.filters["format"])
    env.filters = {name: _checked_filter(function) for name, function in env.filters.items()}
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env
