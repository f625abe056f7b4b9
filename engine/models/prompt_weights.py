"""ComfyUI's prompt syntax: ``(text)``, ``(text:1.3)``, escapes and ``embedding:name`` words.

Behaviour follows ``comfy/sd1_clip.py`` (``escape_important``, ``parse_parentheses``,
``token_weights``, ``unescape_important`` and the word loop of ``SDTokenizer.tokenize_with_weights``),
including the parts people often assume otherwise:

* ``(text)`` multiplies the enclosing weight by 1.1; nesting multiplies: ``((a))`` = 1.1 * 1.1.
* ``(text:w)`` *replaces* the weight with ``w``; it is not multiplied by the enclosing weight:
  ``((a:1.5))`` is 1.5, not 1.65, and ``((a):1.5)`` gives ``a`` 1.5 * 1.1.
* The weight is whatever follows the *last* ``:`` inside the group, parsed with Python's
  ``float()`` (so ``" 1.2 "``, ``"1e-1"``, ``"1_0"``, ``"inf"`` and ``"nan"`` are weights). A ``:``
  at position 0, or text that ``float()`` rejects, leaves the ``:`` in the text and the group at
  enclosing * 1.1: ``(a:b)`` is the text ``a:b`` at 1.1.
* Square brackets mean nothing: ``[text]`` is tokenized literally, brackets included (no 1/1.1).
  ``{}``, ``|``, ``<lora:...>`` and ``AND`` are literal text too.
* Only ``\\(`` and ``\\)`` are escapes (the backslash is removed); any other backslash stays.
* Unbalanced parentheses are not errors: a ``)`` with no opener drives the depth negative and is
  kept as text (together with what follows until the depth is back to zero); an unclosed ``(``
  keeps its text, the ``(`` included, at the enclosing weight.
* Spaces are not trimmed and words are not split here: each weighted segment is tokenized as a
  whole (only ``embedding:`` words are cut out, see :func:`split_embedding_words`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

EMBEDDING_PREFIX = "embedding:"
GROUP_MULTIPLIER = 1.1

_ESCAPED_CLOSE = "\0\1"
_ESCAPED_OPEN = "\0\2"
_EMBEDDING_SPLIT = re.compile(f" {EMBEDDING_PREFIX}|\n{EMBEDDING_PREFIX}")

T = TypeVar("T")


def escape_important(text: str) -> str:
    """Hide ``\\)`` and ``\\(`` from the parenthesis parser (ComfyUI's placeholders)."""
    return text.replace("\\)", _ESCAPED_CLOSE).replace("\\(", _ESCAPED_OPEN)


def unescape_important(text: str) -> str:
    """Turn the placeholders of :func:`escape_important` back into literal ``)`` and ``(``."""
    return text.replace(_ESCAPED_CLOSE, ")").replace(_ESCAPED_OPEN, "(")


def parse_parentheses(text: str) -> list[str]:
    """Split ``text`` into top-level runs: plain text and whole ``(...)`` groups, in order."""
    items: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in text:
        if ch == "(":
            if depth == 0:
                if current:
                    items.append("".join(current))
                current = ["("]
            else:
                current.append(ch)
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                current.append(")")
                items.append("".join(current))
                current = []
            else:
                current.append(ch)
        else:
            current.append(ch)
    if current:
        items.append("".join(current))
    return items


def token_weights(text: str, weight: float = 1.0) -> list[tuple[str, float]]:
    """(segment, weight) pairs of already-escaped ``text``, left to right.

    Iterative (an explicit stack), so deeply nested input cannot exhaust Python's recursion limit.
    """
    out: list[tuple[str, float]] = []
    # Each entry: (text, weight, is_group_body). Pushed in reverse so pops run left to right.
    stack: list[tuple[str, float, bool]] = [(text, weight, True)]
    while stack:
        segment, seg_weight, is_body = stack.pop()
        if not is_body:
            out.append((segment, seg_weight))
            continue
        children: list[tuple[str, float, bool]] = []
        for item in parse_parentheses(segment):
            if len(item) >= 2 and item[0] == "(" and item[-1] == ")":
                inner = item[1:-1]
                inner_weight = seg_weight * GROUP_MULTIPLIER
                colon = inner.rfind(":")
                if colon > 0:
                    try:
                        inner_weight = float(inner[colon + 1 :])
                        inner = inner[:colon]
                    except ValueError:
                        pass
                children.append((inner, inner_weight, True))
            else:
                children.append((item, seg_weight, False))
        stack.extend(reversed(children))
    return out


def parse_prompt_weights(text: str) -> list[tuple[str, float]]:
    """The weighted segments of a prompt, escapes resolved: ComfyUI's parse before tokenizing."""
    return [(unescape_important(seg), w) for seg, w in token_weights(escape_important(text), 1.0)]


def split_embedding_words(segment: str) -> list[str]:
    """Cut a segment before each ``embedding:`` that follows a space or a newline.

    The pieces after the first keep their ``embedding:`` prefix; empty pieces are dropped. An
    ``embedding:`` glued to other text (``a,embedding:x``) is not cut out and stays plain text.
    """
    parts = _EMBEDDING_SPLIT.split(segment)
    words = [parts[0], *(EMBEDDING_PREFIX + part for part in parts[1:])]
    return [word for word in words if word != ""]


def resolve_embedding_word(word: str, lookup: Callable[[str], T | None]) -> tuple[T | None, str]:
    """Resolve a word that starts with ``embedding:``; returns (embedding or None, leftover text).

    As ComfyUI: the name is the first whitespace-separated word after the prefix and the rest is
    leftover text to tokenize. When that name is not found and has leading/trailing commas, the
    name without them is tried and the commas go back to the leftover text. A name that is never
    found is dropped from the prompt (it is not tokenized as text). An empty name finds nothing
    (ComfyUI raises IndexError there).
    """
    name = word[len(EMBEDDING_PREFIX) :].strip("\n")
    parts = name.split()
    if not parts:
        return None, ""
    first, leftover = parts[0], " ".join(parts[1:])
    found = lookup(first)
    if found is None:
        stripped = first.strip(",")
        if len(stripped) < len(first):
            found = lookup(stripped) if stripped else None
            return found, f"{first[len(stripped) :]} {leftover}"
    return found, leftover
