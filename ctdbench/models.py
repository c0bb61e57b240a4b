"""Models: tiny from-scratch Hugging Face causal LMs, or hub checkpoints, by config.

A model spec is either a local architecture::

    {arch: llama | gpt_neox | gpt2, layers, hidden, heads, ffn, tie_embeddings}

or a checkpoint ``{hf: <name or path>, dtype: bfloat16, fvt: true}`` for users with internet and
GPUs; ``fvt`` moves the checkpoint to the given tokenizer by Fast Vocabulary Transfer
(``ctdbench.fvt``), its own tokenizer being loaded from the same name.
From-scratch models are built under a fixed seed, so every method of a pair starts from the
same student initialisation per seed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    PreTrainedModel,
)

ARCHITECTURES = ("llama", "gpt_neox", "gpt2")


def _config(spec: dict, vocab_size: int, max_positions: int, special: dict):
    arch = spec["arch"]
    common = dict(vocab_size=vocab_size, tie_word_embeddings=spec.get("tie_embeddings", True), **special)
    if arch == "llama":
        return LlamaConfig(
            hidden_size=spec["hidden"], intermediate_size=spec["ffn"],
            num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
            num_key_value_heads=spec["heads"], max_position_embeddings=max_positions,
            attention_dropout=0.0, **common,
        )
    if arch == "gpt_neox":
        return GPTNeoXConfig(
            hidden_size=spec["hidden"], intermediate_size=spec["ffn"],
            num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
            max_position_embeddings=max_positions, rotary_pct=1.0,
            hidden_dropout=0.0, attention_dropout=0.0, **common,
        )
    if arch == "gpt2":
        return GPT2Config(
            n_embd=spec["hidden"], n_inner=spec["ffn"], n_layer=spec["layers"], n_head=spec["heads"],
            n_positions=max_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common,
        )
    raise ValueError(f"unknown model arch '{arch}'; available: {', '.join(ARCHITECTURES)}")


def build_model(spec: dict, tokenizer, *, seed: int, max_positions: int) -> PreTrainedModel:
    """A causal LM for ``tokenizer``: fresh weights under ``seed``, or a checkpoint.

    Args:
        spec: the model spec (see module docstring).
        tokenizer: the model's tokenizer; its size fixes the vocabulary of a fresh model.
        seed: initialisation seed (ignored for checkpoints).
        max_positions: longest sequence the model must handle, in tokens.
    """
    if "hf" in spec:
        model = load_model(spec["hf"], dtype=spec.get("dtype"))
        # FVT moves the checkpoint to ``tokenizer`` (paper-scale tokenizer transfer), and also
        # gives it rows for tokens its own vocabulary lacks (chat markers added to it).
        if spec.get("fvt") or len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            from ctdbench.fvt import fvt_transfer
            from ctdbench.tokenizers import load_tokenizer

            fvt_transfer(model, load_tokenizer(spec["hf"]), tokenizer)
        return model
    # Llama makes the pad id its embedding's padding_idx (a zero row that never learns); where
    # the pad token is also BOS/EOS (real families: <|endoftext|>), that row is a real input.
    pad = tokenizer.pad_token_id
    special = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None if pad in (tokenizer.bos_token_id, tokenizer.eos_token_id) else pad,
    )
    config = _config(spec, len(tokenizer), max_positions, special)
    # fork_rng keeps the caller's global RNG untouched: initialising a model must not shift
    # any other random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model


def load_model(name_or_path: str | Path, dtype: str | None = None) -> PreTrainedModel:
    """Load a saved or hub causal LM (fp32 unless ``dtype`` is given)."""
    torch_dtype = getattr(torch, dtype) if dtype else torch.float32
    return AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=torch_dtype)


def non_finite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the parameters holding a NaN or infinity (a model never to save or score)."""
    return [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
