"""LoRA for the student, through ``peft``; merged back into a plain Hugging Face model to save.

``apply_lora`` puts rank-``r`` adapters (scale ``alpha / r``) on every attention projection
(q, k, v, o) and MLP projection (gate, up, down) of the transformer blocks. The paper setting
is r = alpha = 64, no dropout. The module names come from the architecture
(``config.model_type``), or from ``target_modules`` when given.

Embeddings (``train_embeddings=True``): a student moved to a new tokenizer (``ctdbench.fvt``)
has FVT-initialised embeddings that must be trained in full, as tokenkit does. They are not
wrapped in peft's ``modules_to_save``; their own parameters are simply left trainable
(``requires_grad=True``) while peft freezes the rest of the base model. Why not
``modules_to_save``:

* it stores a second, trainable copy of each wrapped module, an extra 128k x 3072 matrix per
  embedding for Llama-3.2-3B;
* a tied embedding and LM head would become two independent copies, and peft can re-tie
  them only for modules named ``embed_tokens`` / ``lm_head`` (not GPT-NeoX's
  ``embed_in`` / ``embed_out``);
* leaving the parameters trainable keeps a tied pair one parameter, and ``merge_lora`` needs
  nothing special.

The cost: ``PeftModel.save_pretrained`` (an adapter-only checkpoint) would not contain the
trained embeddings, so the student is always saved after ``merge_lora``, as a plain model.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGET_MODULES: dict[str, list[str]] = {
    **{t: _LLAMA_LIKE for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo2")},
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    # GPT-2 fuses q, k, v in c_attn; c_proj is both the attention output and the MLP down projection.
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def lora_target_modules(model: PreTrainedModel) -> list[str]:
    """The attention and MLP projection names of ``model``'s architecture.

    Raises:
        ValueError: for an architecture without a known mapping.
    """
    model_type = model.config.model_type
    if model_type not in TARGET_MODULES:
        raise ValueError(f"no LoRA target modules known for model_type {model_type!r} (known: "
                         f"{', '.join(sorted(TARGET_MODULES))}); pass target_modules explicitly")
    return TARGET_MODULES[model_type]


def apply_lora(model: PreTrainedModel, r: int = 64, alpha: float = 64, dropout: float = 0.0,
               target_modules: list[str] | None = None, train_embeddings: bool = True, *, seed: int = 0
               ) -> PeftModel:
    """Wrap ``model`` with LoRA adapters (in place: peft injects them into ``model``'s modules).

    Args:
        model: a Hugging Face causal LM, not already wrapped.
        r: adapter rank.
        alpha: LoRA alpha; the adapter output is scaled by ``alpha / r``.
        dropout: dropout on the adapter input.
        target_modules: module names to adapt; default ``lora_target_modules(model)``.
        train_embeddings: keep the input embeddings and the LM head trainable (see module docstring).
        seed: initialisation seed of the adapters' random half (lora_A; lora_B starts at zero).

    Returns:
        The ``PeftModel``: only the LoRA matrices (and the embeddings when asked) require grad.

    Raises:
        ValueError: for a bad r / alpha / dropout, an already wrapped model, an unknown
            architecture without ``target_modules``, or target names that match no module.
    """
    if isinstance(model, PeftModel):
        raise ValueError("the model is already a PeftModel; merge_lora it before applying LoRA again")
    if r <= 0 or alpha <= 0:
        raise ValueError(f"LoRA r and alpha must be positive, got r={r}, alpha={alpha}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    targets = list(target_modules) if target_modules is not None else lora_target_modules(model)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if missing := [t for t in targets if t not in present]:
        raise ValueError(f"LoRA target modules {missing} match no module of this {model.config.model_type} model")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        bias="none", task_type="CAUSAL_LM")
    # Seeded: every method and every process of a run must start from the same adapters; fork_rng
    # keeps the caller's global RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)  # freezes every base parameter
    if train_embeddings:
        # The base model's own modules (a tied pair shares one parameter): trained in place.
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None:
                module.weight.requires_grad_(True)
    return peft_model


def merge_lora(model: PeftModel) -> PreTrainedModel:
    """Fold the adapters into the base weights: a plain ``transformers`` model, all parameters
    trainable again (as after ``from_pretrained``), whose ``save_pretrained`` has no peft keys.

    Raises:
        ValueError: if ``model`` is not a ``PeftModel``.
    """
    if not isinstance(model, PeftModel):
        raise ValueError(f"merge_lora expects a PeftModel from apply_lora, got {type(model).__name__}")
    merged = model.merge_and_unload()
    merged.requires_grad_(True)
    return merged
