"""Chat templates: transformers' Jinja semantics, and SmolLM2's template against transformers."""

from __future__ import annotations

import time
import tracemalloc
from datetime import datetime
from typing import Any

import pytest
from volunteer.models.chat_template import (
    MAX_RENDERED_CHARS,
    MAX_SOURCE_CHARS,
    ChatTemplate,
    select_chat_template,
)
from volunteer.models.errors import TokenizerError
from volunteer.models.tokenizer import Tokenizer

USER = [{"role": "user", "content": "hi"}]


def _render(source: str, messages: list[dict[str, Any]] = USER, **kwargs: Any) -> str:
    return ChatTemplate.compile(source, special_tokens={"bos_token": "<s>"}).render(
        messages, **kwargs
    )


def test_trim_and_lstrip_blocks_drop_block_whitespace() -> None:
    source = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n"
    source += "    {% endif %}\n{% endfor %}\n"
    assert _render(source, USER * 2) == "[hi]\n[hi]\n"


def test_special_tokens_and_generation_prompt_are_variables() -> None:
    source = "{{ bos_token }}{% if add_generation_prompt %}GO{% endif %}"
    assert _render(source) == "<s>GO"
    assert _render(source, add_generation_prompt=False) == "<s>"
    assert _render("{{ bos_token }}", bos_token="[B]") == "[B]"


def test_raise_exception_becomes_tokenizer_error() -> None:
    source = "{% if messages[0].role != 'system' %}"
    source += "{{ raise_exception('need a system turn') }}{% endif %}"
    with pytest.raises(TokenizerError, match="need a system turn"):
        _render(source)


def test_syntax_error_is_a_tokenizer_error_with_the_line() -> None:
    with pytest.raises(TokenizerError, match="line 2"):
        ChatTemplate.compile("ok\n{% for m in messages %}")


@pytest.mark.parametrize(
    "source",
    ["{{ messages.append(1) }}", "{{ messages[0].content.__class__.__mro__ }}", "{{ 1 / 0 }}"],
)
def test_template_failures_and_sandbox_escapes_are_tokenizer_errors(source: str) -> None:
    with pytest.raises(TokenizerError, match="failed to render"):
        _render(source)


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{{ '{0.__class__.__mro__}'.format(messages) }}",
        "{{ (messages|attr('__class__')).__mro__ }}",
        "{{ raise_exception.__globals__['os'] }}",
    ],
)
def test_sandbox_escape_attempts_are_refused(source: str) -> None:
    with pytest.raises(TokenizerError):
        _render(source)


COSTLY = {
    "nested empty loops": "{% for i in range(100000) %}{% for j in range(100000) %}"
    "{% endfor %}{% endfor %}",
    "exponential recursion": "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}"
    "{% endmacro %}{{ f(60) }}",
    "endless recursion": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "huge string": "{{ 'x' * 1000000000 }}",
    "huge power": "{{ 10 ** 100000000 }}",
    "doubling": "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
    "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}",
    "squaring": "{% set ns = namespace(n=3) %}{% for i in range(64) %}"
    "{% set ns.n = ns.n * ns.n %}{% endfor %}{{ ns.n > 0 }}",
    "wide padding": "{{ 'x'|center(1000000000) }}{{ 'x'.ljust(1000000000) }}",
    "long output": "{% for i in range(100000) %}{% for j in range(100) %}"
    "{{ messages }}{% endfor %}{% endfor %}",
}


@pytest.mark.parametrize("source", COSTLY.values(), ids=COSTLY.keys())
def test_costly_templates_are_refused_in_bounded_time(source: str) -> None:
    started = time.monotonic()
    template = ChatTemplate.compile(source)  # compiling never folds the costly constants
    with pytest.raises(TokenizerError, match=r"limit|over|steps|recursion"):
        template.render(USER)
    # The bound is seconds (RENDER_TIMEOUT_S); generous here for a loaded machine.
    assert time.monotonic() - started < 60


WIDE_FORMATS = {
    "percent": "{{ '%900000000s' % 'x' }}",
    "percent star": "{{ '%*s' % (900000000, 'x') }}",
    "named percent": "{{ '%(a)900000000s' % {'a': 'x'} }}",
    "format filter": "{{ '%900000000s'|format('x') }}",
    "str.format": "{{ '{:>900000000}'.format('x') }}",
    "nested str.format": "{{ '{:{w}}'.format('x', w=900000000) }}",
}


@pytest.mark.parametrize("source", WIDE_FORMATS.values(), ids=WIDE_FORMATS.keys())
def test_a_huge_format_width_is_refused_before_it_is_built(source: str) -> None:
    template = ChatTemplate.compile(source)
    tracemalloc.start()
    try:
        with pytest.raises(TokenizerError, match="limit"):
            template.render(USER)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Formatting first and bounding the output after would allocate the whole width.
    assert peak < 64 * 2**20


def test_honest_format_widths_still_render() -> None:
    source = "{{ '%-6s|%5.2f' % ('ab', 1.5) }}{{ '{:>4}'.format(7) }}{{ '%3d'|format(4) }}"
    assert ChatTemplate.compile(source).render(USER) == "ab    | 1.50   7  4"


def test_an_oversized_template_is_refused_at_compile() -> None:
    with pytest.raises(TokenizerError, match="over the limit"):
        ChatTemplate.compile("x" * (MAX_SOURCE_CHARS + 1))


def test_a_long_honest_conversation_still_renders() -> None:
    source = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
    messages = [{"role": "user", "content": "y" * 1000}] * 1000
    rendered = _render(source, messages)
    assert len(rendered) == 1000 * (len("<user>") + 1001) < MAX_RENDERED_CHARS


def test_tojson_keeps_unicode_and_html_characters() -> None:
    messages = [{"role": "user", "content": "<b>é & ü</b>"}]
    assert _render("{{ messages[0] | tojson }}", messages) == (
        '{"role": "user", "content": "<b>é & ü</b>"}'
    )
    assert _render("{{ messages[0] | tojson(indent=1) }}", messages).startswith('{\n "role"')


def test_strftime_now_formats_the_current_date() -> None:
    assert _render("{{ strftime_now('%Y') }}") in {
        str(datetime.now().year - 1),
        str(datetime.now().year),
    }


def test_loop_controls_and_generation_block() -> None:
    source = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
    source += "{% generation %}<{{ m.content }}>{% endgeneration %}{% endfor %}"
    assert _render(source, USER * 3) == "<hi>"


def test_none_valued_keys_are_dropped_like_transformers() -> None:
    messages = [{"role": "user", "content": "x", "tool_calls": None}]
    assert _render("{{ 'tool_calls' in messages[0] }}", messages) == "False"


def test_select_chat_template_accepts_both_config_forms() -> None:
    assert select_chat_template("{{ 1 }}") == "{{ 1 }}"
    assert select_chat_template(None) is None
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    assert select_chat_template(named) == "D"
    with pytest.raises(TokenizerError, match="chat_template is a int"):
        select_chat_template(3)


# SmolLM2's template: rendered text and ids equal transformers' apply_chat_template.

CONVERSATIONS = {
    "single user": [{"role": "user", "content": "What is the capital of France?"}],
    "system and user": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Colour of the sky?"},
    ],
    "multi-turn": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello! 👋 How can I help?"},
        {"role": "user", "content": "Écris un haïku sur 東京.\n  Indented\tline"},
        {"role": "assistant", "content": "def f():\n    return 42\n"},
        {"role": "user", "content": "Thanks <3"},
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_smollm2_template_matches_transformers(
    smollm2_tokenizer: Tokenizer, hf_smollm2_tokenizer: Any, name: str, add_generation_prompt: bool
) -> None:
    messages = CONVERSATIONS[name]
    text = smollm2_tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt
    )
    expected = hf_smollm2_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert text == expected
    expected_ids = hf_smollm2_tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt
    )
    assert smollm2_tokenizer.encode_chat(
        messages, add_generation_prompt=add_generation_prompt
    ) == list(expected_ids)


@pytest.mark.slow
def test_smollm2_chat_prompt_ends_with_assistant_header(smollm2_tokenizer: Tokenizer) -> None:
    ids = smollm2_tokenizer.encode_chat(CONVERSATIONS["single user"])
    assert ids[0] == 1  # the template writes <|im_start|> itself; no extra BOS
    assert smollm2_tokenizer.decode(ids).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert ids.count(1) == 3  # system, user, assistant turns
    assert ids.count(2) == 2  # <|im_end|> closes the default system turn and the user turn
