"""Kiln's CLIP tokenizer against transformers' CLIPTokenizer built offline from the same files.

The reference is transformers >= 5, whose CLIPTokenizer is backed by the tokenizers library (what a
current ComfyUI install runs). The "basic" clean-up (transformers 4's slow tokenizer) is checked
with vectors derived by hand below.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engine.models.tokenizer as tokenizer_module
from engine.models.tokenizer import CLIPTokenizer, bytes_to_unicode

DATA = Path(tokenizer_module.__file__).resolve().parent.parent / "data" / "clip_bpe"

transformers = pytest.importorskip("transformers", minversion="5")


@pytest.fixture(scope="module")
def kiln() -> CLIPTokenizer:
    return CLIPTokenizer.from_package()


@pytest.fixture(scope="module")
def basic() -> CLIPTokenizer:
    return CLIPTokenizer.from_package(cleaning="basic")


@pytest.fixture(scope="module")
def reference():
    # transformers >= 5 ignores vocab_file=/merges_file=; vocab=/merges= take the file paths.
    tok = transformers.CLIPTokenizer(vocab=str(DATA / "vocab.json"), merges=str(DATA / "merges.txt"))
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    return tok


HANDWRITTEN = [
    "",
    " ",
    "a photo of a cat",
    "A Photo Of A CAT",
    "masterpiece, best quality, (ultra-detailed:1.2), 1girl, solo, looking at viewer",
    "portrait of a woman, by greg rutkowski and alphonse mucha, artstation, 8k, octane render",
    "It's I'LL we'd they're you've I'm she'd THEY'RE 'S 's'",
    "don't won't can't isn't ''s '''",
    "12,345.678 9 10 100000 1e10 0x1F 3.14159",
    "hello!!! ??? ... --- *** ### @@@ $$$ %%% ^^^ &&& ((( ))) [[[ ]]] {{{ }}} <<< >>>",
    "tab\there\nnewline\r\ncrlf\x0bvt\x0cff",
    "multiple     spaces      here",
    "  leading and trailing  ",
    "café naïve façade résumé Ångström crème brûlée",
    "Straße Größe ÆØÅ æøå Œuvre",
    "ΟΔΟΣ ΣΟΦΙΑ Σ σ ς",
    "İstanbul Iıİi ǅ ǈ ǋ ǲ",
    "Привет мир, как дела?",
    "日本語のテキスト、中文字符、한국어 텍스트",
    "こんにちは世界 你好世界",
    "العربية עברית हिन्दी ไทย",
    "emoji 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇺🇸🇯🇵 ❤️‍🔥 ✨🎨🖌️",
    "<|startoftext|>",
    "<|endoftext|>",
    "a<|endoftext|>b",
    " <|startoftext|> x <|endoftext|> ",
    "<|ENDOFTEXT|> <|StartOfText|>",
    "<|endoftext",
    "\x00\x01\x1c\x1d\x1e\x1f\x7f control",
    "\u200b zero\u200bwidth \ufeff bom \u00ad soft\u00adhyphen",
    "\u00a0nbsp\u3000ideographic\u2028line\u2029para\x85nel\u2007fig",
    "\ufffd replacement \U0010ffff \ue000 private",
    "ⅫⅣ ½ ¾ ² ³ ① ⑩ ٣٤٥ ४५६ 〇",
    "e\u0301 a\u0308 n\u0303 combining",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "embedding:easynegative, (worst quality:1.4), lowres",
    "\\(escaped\\) [brackets] {braces} <lora:foo:0.8> AND | pipe",
    "https://example.com/path?query=1&x=2#frag user@example.com",
    "C:\\Users\\name\\file.png /usr/local/bin",
    "snake_case_words camelCaseWords kebab-case-words",
    "x" * 300,
    "word " * 100,
]


def _generated(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pools = [
        "abcdefghijklmnopqrstuvwxyz",
        "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789",
        " \t\n   ",
        ".,;:!?'\"()[]{}<>|\\/-_=+*&^%$#@~`",
        "éèêëàâäôöûüçñÉÀÇÑßøæœ",
        "αβγδεζηθΑΒΓΔΣσςΩ",
        "абвгдеёжзийАБВГД",
        "中文字日本語한국어ひらがなカタカナ",
        "😀👍🏽🎨🔥❤️\u200d🇺🇸",
        "\u200b\u200d\ufeff\x00\x1c\x1f\x85\xa0\u3000\u2028\ufffd",
        "ⅫⅣ½²³٣٤",
        "\u0301\u0308\u0327",
        "İıŁł",
    ]
    words = ["cat", "dog", "photo", "portrait", "of", "a", "the", "masterpiece", "lighting", "it's"]
    out = []
    for i in range(count):
        if i % 3 == 0:
            out.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 40))))
        else:
            out.append("".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(0, 80))))
    return out


PROMPTS = HANDWRITTEN + _generated(360, seed=1234)


def test_prompt_list_is_varied():
    assert len(PROMPTS) >= 400


@pytest.mark.parametrize("chunk", range(8))
def test_ids_match_transformers(kiln, reference, chunk):
    prompts = PROMPTS[chunk::8]
    mismatches = [
        (p, kiln.encode_with_special(p), reference(p)["input_ids"])
        for p in prompts
        if kiln.encode_with_special(p) != reference(p)["input_ids"]
    ]
    assert not mismatches, mismatches[:3]


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=60))
def test_ids_match_transformers_on_any_text(kiln, reference, text):
    assert kiln.encode_with_special(text) == reference(text)["input_ids"]


def test_special_tokens(kiln):
    assert kiln.bos_token_id == 49406
    assert kiln.eos_token_id == 49407
    assert kiln.vocab_size == 49408
    assert kiln.encode("") == []
    assert kiln.encode_with_special("") == [49406, 49407]
    assert kiln.encode("<|endoftext|>") == [49407]
    # Matched case-sensitively on the raw text: upper case is ordinary text.
    assert 49407 not in kiln.encode("<|ENDOFTEXT|>")


def test_known_ids(kiln):
    assert kiln.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert kiln.encode("It's") == [585, 568]


def test_lowercasing_is_per_character(kiln):
    # No Greek final-sigma rule: capital sigma always becomes σ, as the tokenizers library does.
    assert kiln.encode("ΟΔΟΣ") == kiln.encode("οδοσ")
    assert kiln.encode("ΟΔΟΣ") != kiln.encode("οδος")


def test_bytes_to_unicode_is_a_bijection():
    table = bytes_to_unicode()
    assert len(table) == 256
    assert len(set(table.values())) == 256
    assert table[ord("a")] == "a"
    assert table[0] == "Ā"


def test_decode_round_trip(kiln):
    ids = kiln.encode("a photo of a cat, 8k!")
    assert kiln.decode(ids) == "a photo of a cat , 8 k !"


def test_cache_is_per_instance(kiln):
    other = CLIPTokenizer.from_package()
    kiln.encode("zebra")
    assert "zebra" in kiln._cache
    assert "zebra" not in other._cache


def test_a_75_token_prompt_is_fast(kiln):
    prompt = (
        "a beautiful oil painting of a majestic castle on a hill at sunset, dramatic lighting, highly "
        "detailed, intricate, trending on artstation, by greg rutkowski and alphonse mucha, 8k, octane "
        "render, volumetric fog, cinematic composition, sharp focus, golden hour, vivid colors, epic, "
        "rim light, film grain, bokeh, 35mm"
    )
    assert 60 <= len(kiln.encode(prompt)) <= 75
    for _ in range(5):
        kiln.encode(prompt)
    runs = 200
    start = time.perf_counter()
    for _ in range(runs):
        kiln.encode(prompt)
    per_call = (time.perf_counter() - start) / runs
    assert per_call < 1e-3, f"{per_call * 1e6:.0f} µs per prompt"


# --- "basic": transformers 4's slow CLIPTokenizer without ftfy (vectors derived by hand) ---


def test_basic_matches_default_on_ordinary_text(kiln, basic):
    # Printable ASCII without special-token look-alikes, plus accented Latin, behaves the same.
    ordinary = [p for p in HANDWRITTEN if p.isascii() and p.isprintable() and "<|" not in p]
    ordinary += ["café naïve façade résumé Ångström crème brûlée", "Straße Größe ÆØÅ æøå Œuvre"]
    assert len(ordinary) > 20
    for prompt in ordinary:
        assert basic.encode(prompt) == kiln.encode(prompt), prompt


def test_basic_isolates_cjk_ideographs(kiln, basic):
    assert basic.encode("中文字") == kiln.encode("中 文 字")
    assert kiln.encode("中文字") != kiln.encode("中 文 字")
    # Kana and Hangul are not in the CJK ideograph blocks.
    assert basic.encode("ひらがな") == kiln.encode("ひらがな")


def test_basic_drops_control_and_format_characters(kiln, basic):
    assert basic.encode("a\x00b\u200bc\ufffdd\x1fe") == kiln.encode("abcde")
    assert basic.encode("a\x85b") == kiln.encode("ab")  # NEL is a control character there


def test_basic_applies_python_lowercasing(kiln, basic):
    # str.lower() per word: the final sigma becomes ς.
    assert basic.encode("ΟΔΟΣ") == kiln.encode("οδος")


def test_basic_maps_lowercased_special_tokens(basic):
    assert basic.encode("<|ENDOFTEXT|>") == [49407]
    assert basic.encode("x <|StartOfText|>") == [*basic.encode("x"), 49406]


def test_unknown_cleaning_is_rejected():
    with pytest.raises(ValueError):
        CLIPTokenizer({"<|startoftext|>": 0, "<|endoftext|>": 1}, [], cleaning="ftfy")  # type: ignore[arg-type]
