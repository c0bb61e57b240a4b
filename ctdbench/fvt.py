"""Fast Vocabulary Transfer (FVT; Gee et al., 2022): move a causal LM onto a new tokenizer.

Every row of the new embedding matrix (and of the LM head when it is not tied) is built from the
old matrix, as tokenkit and the ALM paper initialise a student on a new tokenizer:

* a new token whose exact bytes are one old token copies that old row;
* any other ordinary token gets the mean of the old rows of the old tokenizer's tokenization of
  its bytes;
* a special token copies the old special token with the same role (bos, eos, pad, unk), else
  the old token with the same string (chat markers shared by both vocabularies), else it gets
  the mean of all old rows.

How a token's bytes are tokenized by the old tokenizer (the principled choice): the bytes are
spelled in the old tokenizer's own alphabet and passed to its *model* (the BPE / Unigram step,
``backend_tokenizer.model.tokenize``), not through the full pipeline. A token is one unit, so
the pipeline's extras would change it: the SentencePiece dummy prefix would turn ``"ing"`` into
``" ing"``, and a normalizer could rewrite it. The spelling is exact for any byte string, also
for a byte-level token holding a partial UTF-8 character (no lossy ``errors="replace"``):

* byte-level old tokenizer: every byte is one character of GPT-2's byte alphabet;
* SentencePiece-style old tokenizer: valid UTF-8 runs are text with " " spelled "▁"; a byte
  that is not valid UTF-8 on its own is the old token with exactly that byte (the ``<0xNN>``
  byte-fallback piece). Pieces without bytes (``<unk>``: a character the old vocabulary lacks,
  no byte fallback) are dropped; a token left with no old pieces gets the mean of all old rows.

The averaging is one ``embedding_bag(mode="mean")`` over a flat index list, in float32 (bf16
means over many rows lose precision), cast back to the model's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from ctdbench.tokbytes import byte_to_unicode, token_bytes, tokenizer_family

_ROLES = ("bos", "eos", "pad", "unk")


def _spell_bytes(data: bytes, old, family: str, old_ids: dict[bytes, int]) -> list[int]:
    """The old ids that spell ``data`` (see the module docstring), ``<unk>``-like ids included."""
    model = old.backend_tokenizer.model
    if family == "bytelevel":
        b2u = byte_to_unicode()
        return [t.id for t in model.tokenize("".join(b2u[b] for b in data))]
    # surrogateescape keeps every byte: an invalid byte becomes one lone surrogate U+DC80..U+DCFF.
    text = data.decode("utf-8", errors="surrogateescape")
    ids: list[int] = []
    run: list[str] = []
    for ch in [*text, None]:  # None flushes the last run
        if ch is not None and not 0xDC80 <= ord(ch) <= 0xDCFF:
            run.append(ch)
            continue
        if run:
            ids += [t.id for t in model.tokenize("".join(run).replace(" ", "▁"))]
            run = []
        if ch is not None and (byte := bytes([ord(ch) - 0xDC00])) in old_ids:
            ids.append(old_ids[byte])
    return ids


def fvt_sources(old_tokenizer, new_tokenizer, n_old_rows: int | None = None) -> list[list[int]]:
    """For every new id, the old ids whose rows it averages; ``[]`` means the mean of all old rows."""
    family = tokenizer_family(old_tokenizer)
    old_table = token_bytes(old_tokenizer, n_old_rows)
    old_ids: dict[bytes, int] = {}
    for i, b in enumerate(old_table):
        if b is not None:
            old_ids.setdefault(b, i)  # duplicates (e.g. "A" and "<0x41>"): the lowest id
    old_vocab = old_tokenizer.get_vocab()
    n_old = len(old_tokenizer)
    sources: list[list[int]] = []
    for i, data in enumerate(token_bytes(new_tokenizer)):
        if data is None:  # a special token: same role, else same string, else the global mean
            role = next((r for r in _ROLES if getattr(new_tokenizer, f"{r}_token_id") == i
                         and getattr(old_tokenizer, f"{r}_token_id") is not None), None)
            same = old_vocab.get(new_tokenizer.convert_ids_to_tokens(i))
            old = getattr(old_tokenizer, f"{role}_token_id") if role else same
            sources.append([old] if old is not None and old < n_old else [])
            continue
        spelled = [j for j in _spell_bytes(data, old_tokenizer, family, old_ids) if old_table[j] is not None]
        # A token present verbatim copies its row, even if the old model would split it.
        if data in old_ids and not (len(spelled) == 1 and old_table[spelled[0]] == data):
            spelled = [old_ids[data]]
        sources.append(spelled)
    return sources


@torch.no_grad()
def _transfer_rows(old: torch.Tensor, sources: list[list[int]], n_old: int) -> torch.Tensor:
    """New matrix (``len(sources)`` rows; a 1-D ``old`` is a bias) averaged from ``old``'s rows."""
    matrix = old.float().reshape(old.shape[0], -1)
    flat = torch.tensor([j for s in sources for j in s], dtype=torch.long, device=old.device)
    lengths = torch.tensor([len(s) for s in sources], dtype=torch.long, device=old.device)
    offsets = lengths.cumsum(0) - lengths  # bag k starts where bags 0..k-1 end
    new = F.embedding_bag(flat, matrix, offsets, mode="mean")  # an empty bag gives zeros...
    empty = torch.tensor([not s for s in sources], device=old.device)
    new[empty] = matrix[:n_old].mean(0)  # ...overwritten by the mean of all real old rows
    return new.reshape(len(sources), *old.shape[1:]).to(old.dtype)


def fvt_transfer(model: PreTrainedModel, old_tokenizer, new_tokenizer) -> PreTrainedModel:
    """Move ``model`` from ``old_tokenizer`` to ``new_tokenizer`` by FVT, in place; returns it.

    Resizes the input embeddings (and an untied LM head; a tied one stays tied) to
    ``len(new_tokenizer)`` and sets the special-token ids of the config and generation config.

    Raises:
        ValueError: if the model has fewer embedding rows than the old tokenizer has ids.
        UnsupportedTokenizerError: if either tokenizer is not byte-level / SentencePiece-style.
    """
    emb_in, emb_out = model.get_input_embeddings(), model.get_output_embeddings()
    n_old, n_rows = len(old_tokenizer), emb_in.weight.shape[0]
    if n_rows < n_old:
        raise ValueError(f"the model has {n_rows} embedding rows but the old tokenizer has {n_old} ids: "
                         "is old_tokenizer really the model's tokenizer?")
    tied = emb_out is not None and emb_out.weight is emb_in.weight
    sources = fvt_sources(old_tokenizer, new_tokenizer, n_rows)
    new_in = _transfer_rows(emb_in.weight, sources, n_old)
    untied = {} if emb_out is None or tied else {"weight": _transfer_rows(emb_out.weight, sources, n_old)}
    if untied and getattr(emb_out, "bias", None) is not None:
        untied["bias"] = _transfer_rows(emb_out.bias, sources, n_old)

    n_new = len(new_tokenizer)
    # mean_resizing=False: the rows are overwritten next, no need to sample them.
    model.resize_token_embeddings(n_new, mean_resizing=False)
    emb_in, emb_out = model.get_input_embeddings(), model.get_output_embeddings()
    with torch.no_grad():
        emb_in.weight.copy_(new_in)
        for name, value in untied.items():
            getattr(emb_out, name).copy_(value)
    if getattr(emb_in, "padding_idx", None) is not None:
        # padding_idx zeroes that row's gradient: it must follow the pad token to its new id.
        emb_in.padding_idx = new_tokenizer.pad_token_id
    model.config.get_text_config().vocab_size = n_new
    for config in (model.config, model.config.get_text_config(), getattr(model, "generation_config", None)):
        if config is not None:
            for role in ("bos", "eos", "pad"):
                setattr(config, f"{role}_token_id", getattr(new_tokenizer, f"{role}_token_id"))
    return model
