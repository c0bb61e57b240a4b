"""LoRA through peft: which parameters train, identity at init, exact merge, plain save / reload."""

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ctdbench.lora import apply_lora, lora_target_modules, merge_lora
from ctdbench.models import build_model

ARCHS = ["llama", "gpt_neox"]


def _model(tokenizers, arch, tie=True):
    spec = {"arch": arch, "layers": 1, "hidden": 32, "heads": 2, "ffn": 64, "tie_embeddings": tie}
    return build_model(spec, tokenizers["bytelevel_bpe"], seed=0, max_positions=256)


def _batch(tokenizers):
    ids = tokenizers["bytelevel_bpe"](["the cat sat on the mat and then it ran away"])["input_ids"]
    return torch.tensor(ids)


def _embedding_params(model):
    return {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings())}


def _train_step(model, ids, lr=1e-2):
    """One AdamW step; LoRA B starts at zero, so one step is what makes the adapters non-trivial."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("train_embeddings", [True, False])
@pytest.mark.parametrize("tie", [True, False])
def test_only_lora_and_embeddings_train(tokenizers, arch, train_embeddings, tie):
    base = _model(tokenizers, arch, tie)
    embeddings = _embedding_params(base)
    wrapped = apply_lora(base, r=8, alpha=16, train_embeddings=train_embeddings)
    targets = lora_target_modules(base)
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    for name, p in wrapped.named_parameters():
        expected = "lora_" in name or (train_embeddings and id(p) in embeddings)
        assert p.requires_grad == expected, name
    # Every target projection of every block got an adapter.
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in trainable if ".lora_A" in n}
    assert adapted == set(targets)

    before = {n: p.detach().clone() for n, p in wrapped.named_parameters()}
    _train_step(wrapped, _batch(tokenizers))
    for name, p in wrapped.named_parameters():
        changed = not torch.equal(before[name], p)
        # LoRA A gets no gradient at the first step (B is zero), so only "trainable => may change".
        assert changed <= (name in trainable), name
        if ".lora_B" in name or (train_embeddings and id(p) in embeddings):
            assert changed, name
    if tie:  # the tied pair is still one parameter
        assert base.get_output_embeddings().weight is base.get_input_embeddings().weight


@pytest.mark.parametrize("arch", ARCHS)
def test_wrapped_model_equals_base_at_init(tokenizers, arch):
    base, ids = _model(tokenizers, arch), _batch(tokenizers)
    with torch.no_grad():
        expected = base(ids).logits.clone()
        wrapped = apply_lora(base)
        torch.testing.assert_close(wrapped(ids).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tie", [True, False])
def test_merge_equals_wrapped_after_a_step_and_saves_plain(tokenizers, arch, tie, tmp_path):
    ids, base = _batch(tokenizers), _model(tokenizers, arch, tie)
    with torch.no_grad():
        initial = base(ids).logits.clone()
    wrapped = apply_lora(base, r=64, alpha=64)
    _train_step(wrapped, ids)
    wrapped.eval()
    with torch.no_grad():
        expected = wrapped(ids).logits.clone()
        assert (expected - initial).abs().max() > 1e-3  # the step moved the model: the merge is not trivial
        merged = merge_lora(wrapped)
        assert not isinstance(merged, PeftModel)
        assert not any("lora_" in n or "base_layer" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(ids).logits, expected, rtol=0, atol=1e-5)

    merged.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert not any("lora" in k or "base_model" in k or "base_layer" in k for k in keys)
    assert not (tmp_path / "adapter_config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is type(merged)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=1e-5)


def test_explicit_target_modules(tokenizers):
    wrapped = apply_lora(_model(tokenizers, "llama"), r=4, alpha=4, target_modules=["q_proj", "v_proj"])
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in wrapped.named_parameters() if ".lora_A" in n}
    assert adapted == {"q_proj", "v_proj"}


@pytest.mark.parametrize("kwargs, match", [
    ({"r": 0}, "r and alpha must be positive"),
    ({"alpha": -1}, "r and alpha must be positive"),
    ({"dropout": 1.0}, "dropout"),
    ({"target_modules": ["q_proj", "nope"]}, r"\['nope'\] match no module"),
])
def test_bad_arguments_are_refused(tokenizers, kwargs, match):
    with pytest.raises(ValueError, match=match):
        apply_lora(_model(tokenizers, "llama"), **kwargs)


def test_wrapping_twice_and_merging_a_plain_model_are_refused(tokenizers):
    wrapped = apply_lora(_model(tokenizers, "llama"))
    with pytest.raises(ValueError, match="already a PeftModel"):
        apply_lora(wrapped)
    with pytest.raises(ValueError, match="expects a PeftModel"):
        merge_lora(_model(tokenizers, "llama"))


def test_unknown_architecture_needs_target_modules(tokenizers):
    model = _model(tokenizers, "llama")
    model.config.model_type = "mystery"
    with pytest.raises(ValueError, match="no LoRA target modules known for model_type 'mystery'"):
        apply_lora(model)


def test_adapters_start_the_same_under_a_seed(tokenizers):
    """Every method (and every process of a multi-GPU run) starts from the same adapters."""
    a = apply_lora(_model(tokenizers, "llama"), seed=3)
    torch.rand(7)  # another global random state
    b = apply_lora(_model(tokenizers, "llama"), seed=3)
    c = apply_lora(_model(tokenizers, "llama"), seed=4)
    lora_a = lambda m: [v for k, v in m.state_dict().items() if "lora_A" in k]
    assert all(torch.equal(x, y) for x, y in zip(lora_a(a), lora_a(b)))
    assert not all(torch.equal(x, y) for x, y in zip(lora_a(a), lora_a(c)))
