"""ComfyUI's prompt-weight syntax, as test vectors worked out from comfy/sd1_clip.py's formulas."""

from __future__ import annotations

import math

import pytest

from engine.models.prompt_weights import (
    escape_important,
    parse_parentheses,
    parse_prompt_weights,
    resolve_embedding_word,
    split_embedding_words,
    token_weights,
    unescape_important,
)

# (prompt, expected [(segment, weight)]). Weights are the exact floats ComfyUI computes:
# a bare group multiplies the enclosing weight by 1.1, "(x:w)" replaces it with float(w).
VECTORS = [
    ("a cat", [("a cat", 1.0)]),
    ("(a cat)", [("a cat", 1.1)]),
    ("((a))", [("a", 1.0 * 1.1 * 1.1)]),  # 1.2100000000000002
    ("(((a)))", [("a", 1.0 * 1.1 * 1.1 * 1.1)]),
    ("(a:1.5)", [("a", 1.5)]),
    ("((a:1.5))", [("a", 1.5)]),  # replaced, not 1.65
    ("((a):1.5)", [("a", 1.5 * 1.1)]),
    ("(a (b:0.5) c)", [("a ", 1.1), ("b", 0.5), (" c", 1.1)]),
    ("x (a:1.2) y", [("x ", 1.0), ("a", 1.2), (" y", 1.0)]),
    ("(a:1.2)(b:0.8)", [("a", 1.2), ("b", 0.8)]),
    ("(a:1.2:1.3)", [("a:1.2", 1.3)]),  # the last colon wins
    ("(a:b)", [("a:b", 1.1)]),  # not a number: the colon stays, weight 1.1
    ("(:1.5)", [(":1.5", 1.1)]),  # a colon at position 0 is not a weight
    ("(a: 2 )", [("a", 2.0)]),  # float() strips spaces
    ("(a:1e-1)", [("a", 0.1)]),
    ("(a:1_0)", [("a", 10.0)]),  # float() accepts underscores
    ("(a:-1)", [("a", -1.0)]),
    ("(a:0)", [("a", 0.0)]),
    ("[a]", [("[a]", 1.0)]),  # square brackets are literal text
    ("[(a)]", [("[", 1.0), ("a", 1.1), ("]", 1.0)]),
    ("{a|b}", [("{a|b}", 1.0)]),
    ("\\(a\\)", [("(a)", 1.0)]),  # escaped parentheses
    ("(\\(a\\):1.3)", [("(a)", 1.3)]),
    ("a\\[b\\]", [("a\\[b\\]", 1.0)]),  # only \( and \) are escapes
    ("a) (b)", [("a) (b)", 1.0)]),  # unmatched ")" keeps the rest as text
    ("(a", [("(a", 1.0)]),  # unclosed group: text, "(" included
    ("a (b", [("a ", 1.0), ("(b", 1.0)]),
    ("()", []),  # an empty group yields nothing
    ("(a)()", [("a", 1.1)]),
    ("", []),
    ("  spaced  (out)  ", [("  spaced  ", 1.0), ("out", 1.1), ("  ", 1.0)]),
    ("line\n(break:1.1)", [("line\n", 1.0), ("break", 1.1)]),
]


@pytest.mark.parametrize(("prompt", "expected"), VECTORS)
def test_vectors(prompt, expected):
    assert parse_prompt_weights(prompt) == expected


def test_special_float_weights():
    ((seg, w),) = parse_prompt_weights("(a:inf)")
    assert seg == "a" and math.isinf(w)
    ((seg, w),) = parse_prompt_weights("(a:nan)")
    assert seg == "a" and math.isnan(w)


def test_weights_multiply_in_comfyui_order():
    # ((((a)))) is ((1.0 * 1.1) * 1.1) * 1.1 * 1.1, evaluated left to right in float64.
    assert parse_prompt_weights("((((a))))") == [("a", 1.0 * 1.1 * 1.1 * 1.1 * 1.1)]
    assert parse_prompt_weights("((a:0.5))") == [("a", 0.5)]
    assert parse_prompt_weights("(((a):0.5))") == [("a", 0.5 * 1.1)]


def test_deep_nesting_does_not_recurse():
    depth = 1500  # beyond Python's default recursion limit
    out = parse_prompt_weights("(" * depth + "a" + ")" * depth)
    assert len(out) == 1 and out[0][0] == "a"
    assert out[0][1] == pytest.approx(1.1**depth, rel=1e-9) or math.isinf(out[0][1])


def test_parse_parentheses():
    assert parse_parentheses("a (b) c") == ["a ", "(b)", " c"]
    assert parse_parentheses("(a (b) c)") == ["(a (b) c)"]
    assert parse_parentheses("a)b(c") == ["a)b(c"]
    assert parse_parentheses("") == []


def test_escape_round_trip():
    text = "a \\(b\\) c"
    escaped = escape_important(text)
    assert "(" not in escaped and ")" not in escaped
    assert unescape_important(escaped) == "a (b) c"
    assert token_weights(escaped, 1.0) == [(escaped, 1.0)]


def test_split_embedding_words():
    assert split_embedding_words("a photo") == ["a photo"]
    assert split_embedding_words("a embedding:foo b") == ["a", "embedding:foo b"]
    assert split_embedding_words("embedding:foo") == ["embedding:foo"]
    assert split_embedding_words(" embedding:foo") == ["embedding:foo"]
    assert split_embedding_words("a\nembedding:foo") == ["a", "embedding:foo"]
    assert split_embedding_words("a,embedding:foo") == ["a,embedding:foo"]  # glued: stays text
    assert split_embedding_words("x embedding:a embedding:b") == ["x", "embedding:a", "embedding:b"]


def test_resolve_embedding_word():
    known = {"foo": "FOO", "bar": "BAR"}
    lookup = known.get
    assert resolve_embedding_word("embedding:foo", lookup) == ("FOO", "")
    assert resolve_embedding_word("embedding:foo and more", lookup) == ("FOO", "and more")
    assert resolve_embedding_word("embedding:foo\n", lookup) == ("FOO", "")
    # Trailing commas: retried without them, commas go back to the text.
    assert resolve_embedding_word("embedding:foo,", lookup) == ("FOO", ", ")
    assert resolve_embedding_word("embedding:foo, x", lookup) == ("FOO", ", x")
    # Not found: dropped, the leftover text remains.
    assert resolve_embedding_word("embedding:nope", lookup) == (None, "")
    assert resolve_embedding_word("embedding:nope x", lookup) == (None, "x")
    assert resolve_embedding_word("embedding:nope, x", lookup) == (None, ", x")
    # ComfyUI raises IndexError on an empty name; Kiln finds nothing.
    assert resolve_embedding_word("embedding:", lookup) == (None, "")
    assert resolve_embedding_word("embedding:,,,", lookup) == (None, ",,, ")
