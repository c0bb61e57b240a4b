"""Varied texts for exactness checks: the scripts, symbols and whitespace real tokenizers split
differently. Deterministic in the seed; used by the tests and ``benchmarks/check_families.py``.

Classes (``CLASSES``): English prose with contractions and capitals, code (indentation, tabs,
``\\r\\n``), CJK with kana and Hangul, emoji with ZWJ sequences, skin tones and flags, combining
marks (decomposed, so NFC changes them), right-to-left scripts with direction marks, digit runs
of several scripts, whitespace runs (Unicode spaces, ``\\r\\n``, trailing), control characters
(NUL, C0, DEL, C1, BOM, zero-width), SentencePiece's ``▁``, special-token strings, code points
from every plane, and a mix of all of them.
"""

from __future__ import annotations

import random
import unicodedata

WORDS = ("the of and to in is that it was for on are with as his they at be this from have or by one had not "
         "but what all were when we there can an your which their said if do will each about how up out them "
         "then she many some so these would other into has more her two like him see time could no make than "
         "first been its who now people my made over did down only way find use may water long little very "
         "after words called just where most know").split()
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "'Re", "n't", "'ſ")
_CJK = [(0x4E00, 0x9FFF), (0x3040, 0x309F), (0x30A0, 0x30FF), (0xAC00, 0xD7A3), (0x3000, 0x303F), (0xFF01, 0xFF5E)]
_EMOJI = [(0x1F300, 0x1F5FF), (0x1F600, 0x1F64F), (0x1F680, 0x1F6FF), (0x1F900, 0x1F9FF), (0x2600, 0x26FF)]
_COMBINING = [(0x0300, 0x036F), (0x0483, 0x0489), (0x0591, 0x05BD), (0x064B, 0x065F), (0x093C, 0x094D),
              (0x0E31, 0x0E3A), (0x1AB0, 0x1ABE), (0x20D0, 0x20F0), (0xFE20, 0xFE2F)]
_BASES = "aeiouncAEIOUNCsyzkgqwxjIJLłøßæœ" + "अकखगतन" + "กขคง" + "ابتث" + "αβγ"
_RTL = [(0x05D0, 0x05EA), (0x0620, 0x064A), (0x0671, 0x06D3), (0x0710, 0x072F)]
_DIGITS = ["0123456789", "٠١٢٣٤٥٦٧٨٩", "۰۱۲۳۴۵۶۷۸۹", "०१२३४५६७८९", "０１２３４５６７８９", "①②③⑽¼½²³"]
_SPACES = [" ", " ", " ", "  ", "\t", "\n", "\r\n", "\r", "\u00a0", "\u2003", "\u3000", "\u2028", "\u000b", "\u000c",
           "\u0085", "\u1680", "\u202f", "\u205f"]
_CONTROL = [chr(c) for c in [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0), 0xFEFF, 0x200B, 0x200C, 0x200D, 0x2060,
                             0x180E, 0x00AD, 0xFFFD]]
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>", "<think>", "<|extra_7|>", "<|endofprompt|>")
CLASSES = ("english", "code", "cjk", "emoji", "combining", "rtl", "digits", "whitespace", "control", "metaspace",
           "specials", "planes", "mixed")


def _pick(rng: random.Random, ranges) -> str:
    lo, hi = rng.choice(ranges)
    return chr(rng.randint(lo, hi))


def _english(rng):
    out = []
    for _ in range(rng.randint(3, 30)):
        w = rng.choice(WORDS)
        w = w.capitalize() if rng.random() < 0.15 else w.upper() if rng.random() < 0.03 else w
        out.append(w + (rng.choice(CONTRACTIONS) if rng.random() < 0.1 else "") + rng.choice(["", "", "", ",", ".", "!",
                                                                                            "?", ";", " --", "'"]))
    return " ".join(out)


def _code(rng):
    lines = []
    for _ in range(rng.randint(1, 8)):
        indent = rng.choice(["", "    ", "        ", "\t", "\t\t", "  "])
        name = rng.choice(WORDS) + rng.choice(["", "_id", "2", "Count", "__"])
        stmt = rng.choice([f"def {name}(x, y=None):", f"{name} = [{rng.randint(0, 99999)}, 0x{rng.randint(0, 65535):x}]",
                           f"if {name} >= 3.14e-2 and not {name}: return {{'{name}': {name}}}",
                           f"for (int i = 0; i < {name}.size(); ++i) {{ a[i] += b[i] * 2; }}",
                           f"// TODO({name}): fix   this  ", f"#include <{name}.h>", f"    print(f\"{{{name}!r}}\")"])
        lines.append(indent + stmt)
    return rng.choice(["\n", "\r\n", "\n\n"]).join(lines) + rng.choice(["", "\n", "\r\n", "  \n"])


def _run(rng, make, n_lo=1, n_hi=40, sep=0.2):
    return "".join(make() + (rng.choice(_SPACES[:5]) if rng.random() < sep else "") for _ in range(rng.randint(n_lo, n_hi)))


def _emoji(rng):
    def one():
        r = rng.random()
        if r < 0.3:  # ZWJ sequence, optionally with variation selectors and skin tones
            parts = [_pick(rng, _EMOJI) + (chr(rng.randint(0x1F3FB, 0x1F3FF)) if rng.random() < 0.3 else "")
                     + ("\ufe0f" if rng.random() < 0.3 else "") for _ in range(rng.randint(2, 4))]
            return "\u200d".join(parts)
        if r < 0.45:  # flag: two regional indicators
            return chr(rng.randint(0x1F1E6, 0x1F1FF)) + chr(rng.randint(0x1F1E6, 0x1F1FF))
        if r < 0.55:  # keycap
            return rng.choice("0123456789#*") + "\ufe0f\u20e3"
        return _pick(rng, _EMOJI)

    return _run(rng, one, sep=0.3) + (" " + _english(rng) if rng.random() < 0.3 else "")


def _combining(rng):
    return _run(rng, lambda: rng.choice(_BASES) + "".join(_pick(rng, _COMBINING) for _ in range(rng.randint(0, 3))))


TEXT_MAKERS = {
    "english": _english,
    "code": _code,
    "cjk": lambda rng: _run(rng, lambda: _pick(rng, _CJK) if rng.random() < 0.9 else rng.choice(WORDS), sep=0.05),
    "emoji": _emoji,
    "combining": _combining,
    "rtl": lambda rng: _run(rng, lambda: "".join(_pick(rng, _RTL) for _ in range(rng.randint(1, 8)))
                            + rng.choice(["", "", "\u200f", "\u200e", "\u061f", "،", " 123", "."]), sep=0.6),
    "digits": lambda rng: _run(rng, lambda: "".join(rng.choice(rng.choice(_DIGITS)) for _ in range(rng.randint(1, 40)))
                               + rng.choice(["", ".", ",", "-", " ", "e", "x"]), n_hi=8),
    "whitespace": lambda rng: _run(rng, lambda: "".join(rng.choice(_SPACES) for _ in range(rng.randint(1, 30)))
                                   + rng.choice(["", "a", "word", "!", "\u3042"]), n_hi=10, sep=0),
    "control": lambda rng: _run(rng, lambda: rng.choice(_CONTROL) + (rng.choice(WORDS) if rng.random() < 0.5 else ""),
                                sep=0.3),
    "metaspace": lambda rng: _run(rng, lambda: rng.choice(["▁", "▁▁", "▁" + rng.choice(WORDS), rng.choice(WORDS) + "▁",
                                                           " ▁", "▁ "])),
    "specials": lambda rng: _run(rng, lambda: rng.choice([*SPECIALS, rng.choice(WORDS), " ", "\n", "<|", "|>", "<|x|>"]),
                                 n_hi=12),
    "planes": lambda rng: _run(rng, lambda: _any_char(rng), sep=0.1),
}


def _any_char(rng: random.Random) -> str:
    while True:
        c = rng.choice([rng.randint(0x20, 0x2FFF), rng.randint(0x3000, 0xFFFF), rng.randint(0x10000, 0x3FFFF),
                        rng.randint(0xE0000, 0x10FFFF)])
        if not 0xD800 <= c <= 0xDFFF:  # surrogates cannot be encoded
            return chr(c)


def varied_text(rng: random.Random, kind: str) -> str:
    """One text of class ``kind``; ``mixed`` joins two to four texts of other classes."""
    if kind == "mixed":
        return rng.choice(["", " ", "\n"]).join(TEXT_MAKERS[rng.choice(list(TEXT_MAKERS))](rng)
                                                for _ in range(rng.randint(2, 4)))
    return TEXT_MAKERS[kind](rng)


def varied_texts(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (class, text) pairs, the classes in turn."""
    rng = random.Random(seed)
    return [(kind, varied_text(rng, kind)) for kind in (CLASSES[i % len(CLASSES)] for i in range(n))]


def whitespace_free(rng: random.Random, n_bytes: int, kind: str = "cjk") -> str:
    """A text of about ``n_bytes`` UTF-8 bytes without any whitespace or combining mark (NFC leaves
    it as it is): one long pretoken for the regex families (CJK, letters, digits or emoji)."""
    make = {"cjk": lambda: _pick(rng, _CJK[:4]), "letters": lambda: rng.choice("abcdefghijklmnopqrstuvwxyzé"),
            "digits": lambda: rng.choice("0123456789"), "emoji": lambda: _pick(rng, _EMOJI)}[kind]
    out, size = [], 0
    while size < n_bytes:
        c = make()
        if unicodedata.combining(c):  # kana voicing marks would compose under NFC
            continue
        out.append(c)
        size += len(c.encode("utf-8"))
    return "".join(out)
