"""CLIP's byte-level BPE tokenizer (the one SD1.x, SD2.x and SDXL share), written for Kiln.

It reproduces ``transformers.CLIPTokenizer`` id for id, without transformers, ftfy or the
``regex`` package at run time. Two text clean-ups are offered because ComfyUI's result depends on
which transformers it runs on (``CLIPTokenizer.from_pretrained`` in ``comfy/sd1_clip.py``):

``"tokenizers"`` (default): transformers >= 5, where ``CLIPTokenizer`` is backed by the
    ``tokenizers`` library. Steps: split out the literal special tokens ``<|startoftext|>`` /
    ``<|endoftext|>`` (case-sensitive, on the raw text); NFC; every run of Unicode White_Space
    becomes one space; lower-case one character at a time (no Greek final-sigma rule); control and
    format characters are kept and byte-encoded like any symbol.
``"basic"``: transformers 4.x's slow ``CLIPTokenizer`` when ftfy is not installed (its
    ``BasicTokenizer(strip_accents=False, do_split_on_punc=False)`` path): control / format /
    unassigned / private-use characters, NUL and U+FFFD are dropped; CJK ideographs become words of
    their own; NFC; ``str.lower()`` per whitespace-separated word; a lower-cased
    ``<|endoftext|>`` written in any case is the special token.

Both then split with CLIP's pattern
``'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`` (letter runs, single digits,
runs of other symbols), map each piece's UTF-8 bytes through GPT-2's byte-to-unicode table, mark
the last symbol with ``</w>`` and apply the BPE merges by rank. ``\\p{L}`` is ``str.isalpha`` and
``\\p{N}`` category ``N*`` (Python's Unicode 14 tables), plus a small table of the letters, digits
and case pairs that the tokenizers library's newer Unicode tables add.

Construct one tokenizer per process (``CLIPTokenizer.from_package()``, ~0.3 s, mostly reading the
merges) and share it; each instance keeps its own bounded cache of BPE results.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from importlib.resources import files
from importlib.resources.abc import Traversable
from itertools import pairwise
from pathlib import Path
from typing import Literal

START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
END_OF_WORD = "</w>"

Cleaning = Literal["tokenizers", "basic"]

_NO_MERGE = 1 << 62
# Entries kept in the per-instance BPE cache before it is emptied (bounds memory on a server).
_CACHE_LIMIT = 100_000
# CJK ideograph blocks that transformers' BasicTokenizer isolates as words ("basic" cleaning).
_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)

# Code points unassigned in Python 3.11's Unicode 14 tables that the tokenizers library (0.23,
# Unicode 16) treats as \p{L} / \p{N}, and its newer lower-case pairs (lo, hi, offset). Measured
# code point by code point against transformers' CLIPTokenizer; Unicode only ever adds these.
_NEWER_LETTERS = (
    (0x1C89, 0x1C8A),
    (0xA7CB, 0xA7CD),
    (0xA7DA, 0xA7DC),
    (0x105C0, 0x105F3),
    (0x10D4A, 0x10D65),
    (0x10D6F, 0x10D85),
    (0x10EC2, 0x10EC4),
    (0x1123F, 0x11240),
    (0x11380, 0x11389),
    (0x1138B, 0x1138B),
    (0x1138E, 0x1138E),
    (0x11390, 0x113B5),
    (0x113B7, 0x113B7),
    (0x113D1, 0x113D1),
    (0x113D3, 0x113D3),
    (0x11BC0, 0x11BE0),
    (0x11F02, 0x11F02),
    (0x11F04, 0x11F10),
    (0x11F12, 0x11F33),
    (0x1342F, 0x1342F),
    (0x13441, 0x13446),
    (0x13460, 0x143FA),
    (0x16100, 0x1611D),
    (0x16D40, 0x16D6C),
    (0x18CFF, 0x18CFF),
    (0x1B132, 0x1B132),
    (0x1B155, 0x1B155),
    (0x1DF25, 0x1DF2A),
    (0x1E030, 0x1E06D),
    (0x1E4D0, 0x1E4EB),
    (0x1E5D0, 0x1E5ED),
    (0x1E5F0, 0x1E5F0),
    (0x2B739, 0x2B739),
    (0x2EBF0, 0x2EE5D),
    (0x31350, 0x323AF),
)
_NEWER_NUMBERS = (
    (0x10D40, 0x10D49),
    (0x116D0, 0x116E3),
    (0x11BF0, 0x11BF9),
    (0x11F50, 0x11F59),
    (0x16130, 0x16139),
    (0x16D70, 0x16D79),
    (0x1CCF0, 0x1CCF9),
    (0x1D2C0, 0x1D2D3),
    (0x1E4F0, 0x1E4F9),
    (0x1E5F1, 0x1E5FA),
)
_NEWER_LOWERCASE = (
    (0x1C89, 0x1C89, 1),
    (0xA7CB, 0xA7CB, -42343),
    (0xA7CC, 0xA7CC, 1),
    (0xA7CE, 0xA7CE, 1),
    (0xA7D2, 0xA7D2, 1),
    (0xA7D4, 0xA7D4, 1),
    (0xA7DA, 0xA7DA, 1),
    (0xA7DC, 0xA7DC, -42561),
    (0x10D50, 0x10D65, 32),
    (0x16EA0, 0x16EB8, 27),
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (256 entries).

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to U+0100 upwards in order.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def _in_ranges(cp: int, ranges: tuple[tuple[int, int], ...]) -> bool:
    return any(lo <= cp <= hi for lo, hi in ranges)


def _piece_class(ch: str) -> str:
    """Stand-in ASCII character for one non-ASCII character: ``a`` = \\p{L}, ``0`` = \\p{N}, ``!`` = other.

    (``a`` is not one of the letters the contraction alternatives look for.)
    """
    cp = ord(ch)
    if ch.isalpha() or _in_ranges(cp, _NEWER_LETTERS):
        return "a"
    if unicodedata.category(ch)[0] == "N" or _in_ranges(cp, _NEWER_NUMBERS):
        return "0"
    return "!"


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


class CLIPTokenizer:
    """CLIP BPE tokenizer: text -> token ids, identical to transformers' ``CLIPTokenizer``.

    ``encode(text)`` gives the ids without start/end tokens (what ComfyUI slices out of
    ``tokenizer(word)["input_ids"][1:-1]``); ``encode_with_special`` adds them.
    """

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        cleaning: Cleaning = "tokenizers",
    ) -> None:
        if cleaning not in ("tokenizers", "basic"):
            raise ValueError(f"unknown cleaning {cleaning!r}; expected 'tokenizers' or 'basic'")
        self.cleaning: Cleaning = cleaning
        self.encoder: dict[str, int] = dict(vocab)
        self.decoder: dict[int, str] = {i: s for s, i in self.encoder.items()}
        self.bpe_ranks: dict[tuple[str, str], int] = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.bos_token_id = self.encoder[START_OF_TEXT]
        self.eos_token_id = self.encoder[END_OF_TEXT]
        self._cache: dict[str, tuple[int, ...]] = {}
        # Lower-casing one character at a time: U+03A3 always to U+03C3 (str.lower() would apply
        # the final-sigma rule), plus the case pairs newer than Python's Unicode tables.
        self._lower_fixups = {0x3A3: "\u03c3"}
        for lo, hi, offset in _NEWER_LOWERCASE:
            for cp in range(lo, hi + 1):
                self._lower_fixups[cp] = chr(cp + offset)

        # CLIP's pattern on text whose only whitespace is " " and whose non-ASCII characters have
        # been replaced by their class stand-ins (see _pieces): [\p{L}] -> [a-z], [\p{N}] -> [0-9].
        body = r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^ a-z0-9]+"
        if cleaning == "basic":
            # transformers 4's slow tokenizer keeps these alternatives and maps them to the ids.
            body = r"<\|startoftext\|>|<\|endoftext\|>|" + body
        self._pattern = re.compile(body)
        self._special_split = re.compile(f"({re.escape(START_OF_TEXT)}|{re.escape(END_OF_TEXT)})")
        # Unicode White_Space (what the tokenizers library's \s matches): str.isspace() minus the
        # four information separators U+001C..U+001F, which are kept as symbols.
        self._whitespace = re.compile(r"[^\S\x1c-\x1f]+")

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_files(
        cls, vocab_path: str | Path, merges_path: str | Path, *, cleaning: Cleaning = "tokenizers"
    ) -> CLIPTokenizer:
        """Build from a ``vocab.json`` and a ``merges.txt`` (first line ``#version`` is skipped)."""
        vocab = json.loads(Path(vocab_path).read_text(encoding="utf-8"))
        return cls(vocab, _parse_merges(Path(merges_path).read_text(encoding="utf-8")), cleaning=cleaning)

    @classmethod
    def from_package(cls, *, cleaning: Cleaning = "tokenizers") -> CLIPTokenizer:
        """Build from the vocabulary shipped in ``engine/data/clip_bpe``."""
        folder = _package_data()
        vocab = json.loads(folder.joinpath("vocab.json").read_text(encoding="utf-8"))
        merges = _parse_merges(folder.joinpath("merges.txt").read_text(encoding="utf-8"))
        return cls(vocab, merges, cleaning=cleaning)

    # ------------------------------------------------------------------ public API

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without start/end tokens."""
        ids: list[int] = []
        for part in self._special_split.split(text):
            if part == START_OF_TEXT:
                ids.append(self.bos_token_id)
            elif part == END_OF_TEXT:
                ids.append(self.eos_token_id)
            elif part:
                for piece in self._pieces(self.normalize(part)):
                    ids.extend(self._bpe_ids(piece))
        return ids

    def encode_with_special(self, text: str) -> list[int]:
        """``[<|startoftext|>] + encode(text) + [<|endoftext|>]`` (transformers' ``input_ids``)."""
        return [self.bos_token_id, *self.encode(text), self.eos_token_id]

    def normalize(self, text: str) -> str:
        """The clean-up applied before splitting into pieces (no special-token handling)."""
        if self.cleaning == "basic":
            return _basic_clean(text)
        if text.isascii():  # NFC leaves ASCII alone
            return self._whitespace.sub(" ", text).lower()
        text = self._whitespace.sub(" ", unicodedata.normalize("NFC", text))
        return text.translate(self._lower_fixups).lower()

    def _pieces(self, text: str) -> list[str]:
        """Split normalised text with CLIP's pattern (letter runs, single digits, symbol runs)."""
        if text.isascii():
            return self._pattern.findall(text)
        # Python's re has no \p{L}/\p{N}: match on a same-length string where each non-ASCII
        # character is replaced by an ASCII character of its class, then slice the real text.
        table = {ord(ch): _piece_class(ch) for ch in set(text) if not ch.isascii()}
        shadow = text.translate(table)
        return [text[m.start() : m.end()] for m in self._pattern.finditer(shadow)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (``</w>`` becomes a space; special tokens are kept as text)."""
        text = "".join(self.decoder[i] for i in ids)
        raw = bytearray(self.byte_decoder.get(ch, ord(" ")) for ch in text.replace(END_OF_WORD, " "))
        return raw.decode("utf-8", errors="replace").strip()

    def token_to_id(self, token: str) -> int | None:
        return self.encoder.get(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.decoder.get(token_id)

    # ------------------------------------------------------------------ BPE

    def _bpe_ids(self, piece: str) -> tuple[int, ...]:
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        if piece in (START_OF_TEXT, END_OF_TEXT):  # only reachable with "basic" cleaning
            ids: tuple[int, ...] = (self.encoder[piece],)
        else:
            symbols = "".join(self.byte_encoder[b] for b in piece.encode("utf-8", "surrogatepass"))
            ids = tuple(self.encoder[s] for s in self._bpe(symbols))
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[piece] = ids
        return ids

    def _bpe(self, symbols: str) -> list[str]:
        """Apply the merges to one byte-encoded piece; returns its BPE tokens."""
        word = [*symbols[:-1], symbols[-1] + END_OF_WORD]
        ranks = self.bpe_ranks
        while len(word) > 1:
            best = min(pairwise(word), key=lambda pair: ranks.get(pair, _NO_MERGE))
            if best not in ranks:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            n = len(word)
            while i < n:
                if i < n - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word


def _package_data() -> Traversable:
    """``engine/data/clip_bpe`` through importlib.resources.

    ``engine`` is a namespace package; under an editable install its search path carries a finder
    hook that ``files()`` rejects, so fall back to the folder next to this module's package.
    """
    try:
        return files("engine") / "data" / "clip_bpe"
    except (NotADirectoryError, TypeError):
        return Path(__file__).resolve().parent.parent / "data" / "clip_bpe"


def _parse_merges(text: str) -> list[tuple[str, str]]:
    merges: list[tuple[str, str]] = []
    for line in text.splitlines():
        if not line or line.startswith("#version"):
            continue
        first, second = line.split()
        merges.append((first, second))
    return merges


def _basic_clean(text: str) -> str:
    """transformers 4's ``BasicTokenizer(strip_accents=False, do_split_on_punc=False)`` + join."""
    out: list[str] = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD:
            continue
        if ch in "\t\n\r" or ch == " ":
            out.append(" ")
            continue
        category = unicodedata.category(ch)
        if category[0] == "C":
            continue
        if category == "Zs":
            out.append(" ")
        elif _is_cjk(cp):
            out.append(f" {ch} ")
        else:
            out.append(ch)
    words = unicodedata.normalize("NFC", "".join(out)).split()
    return " ".join(word.lower() for word in words)
