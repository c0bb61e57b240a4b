"""Chat rendering: assistant byte spans under the built-in templates, token masks, row layouts."""

import random

import numpy as np
import pytest
from jinja2.exceptions import TemplateError

from ctdbench.chat import (
    CHATML_TEMPLATE,
    GEMMA_TEMPLATE,
    LLAMA3_TEMPLATE,
    messages_from_row,
    render_chat,
)
from ctdbench.data import Side, span_token_mask
from ctdbench.tokbytes import token_bytes

EOT = {"llama3": "<|eot_id|>", "gemma": "<end_of_turn>", "chatml": "<|im_end|>"}
TEMPLATES = {"llama3": LLAMA3_TEMPLATE, "gemma": GEMMA_TEMPLATE, "chatml": CHATML_TEMPLATE}

# Repeated identical answers, contents that also occur in the scaffolding ("assistant", "model",
# "user"), emoji, CJK, combining marks, surrounding whitespace, an empty answer.
CONVERSATION = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Say yes 🙂"},
    {"role": "assistant", "content": "yes"},
    {"role": "user", "content": "東京は？ Café naïve e\u0301"},
    {"role": "assistant", "content": "yes"},
    {"role": "user", "content": "assistant"},
    {"role": "assistant", "content": "  model\nuser 👩‍🔬 東京 e\u0301\u0301 \n"},
    {"role": "user", "content": "and now nothing"},
    {"role": "assistant", "content": ""},
]


def _assistants(messages):
    return [m["content"] for m in messages if m["role"] == "assistant"]


@pytest.mark.parametrize("include_eot", [True, False])
@pytest.mark.parametrize("name", list(TEMPLATES))
def test_spans_slice_exactly_the_assistant_contents(name, include_eot):
    text, spans = render_chat(CONVERSATION, TEMPLATES[name], include_end_of_turn=include_eot)
    data = text.encode("utf-8")
    eot = EOT[name] if include_eot else ""
    assert [data[a:b].decode("utf-8") for a, b in spans] == [c + eot for c in _assistants(CONVERSATION)]
    assert all(b0 <= a1 for (_, b0), (a1, _) in zip(spans, spans[1:]))  # ordered, disjoint
    assert "You answer in one word." in text  # the system prompt is rendered somewhere


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_rendering_matches_transformers_apply_chat_template(name, tokenizers):
    tok = tokenizers["bytelevel_bpe"]
    text, _ = render_chat(CONVERSATION, TEMPLATES[name], bos="<BOS>")
    expected = tok.apply_chat_template(CONVERSATION, chat_template=TEMPLATES[name], tokenize=False, bos_token="<BOS>")
    assert text == expected


def test_built_in_formats():
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert render_chat(chat, LLAMA3_TEMPLATE, bos="<|begin_of_text|>")[0] == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
    )
    assert render_chat(chat, GEMMA_TEMPLATE, bos="<bos>")[0] == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
    )
    assert render_chat(chat, CHATML_TEMPLATE)[0] == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    )
    system = [{"role": "system", "content": "Terse."}, *chat]
    assert render_chat(system, GEMMA_TEMPLATE)[0].startswith("<start_of_turn>user\nTerse.\n\nHi<end_of_turn>\n")
    assert render_chat(system, CHATML_TEMPLATE)[0].startswith("<|im_start|>system\nTerse.<|im_end|>\n<|im_start|>user")
    with pytest.raises(TemplateError, match="alternate"):
        render_chat([{"role": "assistant", "content": "x"}], GEMMA_TEMPLATE)


def test_no_end_of_turn_after_the_content_gives_the_bare_content():
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} ||{% endfor %}"
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a 🙂"}]
    text, spans = render_chat(chat, template, include_end_of_turn=True)
    assert [text.encode()[a:b] for a, b in spans] == ["a 🙂".encode()]
    text, spans = render_chat(chat, template, special_tokens=[" ||"])
    assert [text.encode()[a:b] for a, b in spans] == ["a 🙂 ||".encode()]


TRIM = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] | trim }}</s>{% endfor %}"


@pytest.mark.parametrize(
    "template, match",
    [
        (TRIM, "assistant message 3 verbatim"),
        ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] | upper }}</s>{% endfor %}", "message 1 verbatim"),
        ("{% for m in messages %}{% if loop.last %}{{ m['content'] }}{% endif %}{% endfor %}", "message 1 0 times"),
        ("{% for m in messages %}{{ m['content'] }}{{ m['content'] }}{% endfor %}", "message 1 2 times"),
    ],
)
def test_a_template_that_does_not_emit_the_content_verbatim_raises(template, match):
    chat = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "answer"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "answer \n"},
    ]
    with pytest.raises(ValueError, match=match):
        render_chat(chat, template)


def test_a_trimming_template_is_fine_when_nothing_needs_trimming():
    chat = [{"role": "user", "content": " q "}, {"role": "assistant", "content": "a"}]
    text, spans = render_chat(chat, TRIM)
    assert text == "<user>q</s><assistant>a</s>" and [text.encode()[a:b] for a, b in spans] == [b"a</s>"]


def test_malformed_messages_raise():
    with pytest.raises(ValueError, match="message 1 needs 'role' and 'content'"):
        render_chat([{"role": "user", "content": "q"}, {"role": "assistant"}], CHATML_TEMPLATE)
    with pytest.raises(ValueError, match="assistant message 0 has non-text content"):
        render_chat([{"role": "assistant", "content": [{"type": "text", "text": "a"}]}], CHATML_TEMPLATE)
    assert render_chat([{"role": "user", "content": "q"}], LLAMA3_TEMPLATE)[1] == []


def _naive_mask(starts, ends, spans):
    return [any(max(s, a) < min(e, b) for a, b in spans) for s, e in zip(starts, ends)]


def test_token_mask_matches_a_naive_loop():
    rng = random.Random(0)
    for _ in range(300):
        n_bytes = rng.randint(0, 60)
        cuts = sorted(rng.sample(range(n_bytes + 1), min(n_bytes + 1, rng.randint(0, 8))))
        spans = [(cuts[k], cuts[k + 1]) for k in range(0, len(cuts) - 1, 2)]  # disjoint, some empty
        rng.shuffle(spans)
        starts = [rng.randint(0, n_bytes) for _ in range(rng.randint(0, 40))]
        ends = [min(n_bytes, s + rng.choice([0, 0, 1, 2, 5, 20])) for s in starts]
        got = span_token_mask(starts, ends, spans)
        assert got.dtype == bool and got.tolist() == _naive_mask(starts, ends, spans)
    assert span_token_mask([0, 1], [1, 2], []).tolist() == [False, False]
    with pytest.raises(ValueError, match="overlap"):
        span_token_mask([0], [1], [(0, 5), (4, 6)])


# The answer continues the scaffold's word ("the" + "re"): both tokenizers merge across the boundary.
STRADDLE_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: the{{ m['content'] }}\n{% endfor %}"
STRADDLE = [{"role": "user", "content": " q"}, {"role": "assistant", "content": "re is the end"}]


@pytest.mark.parametrize("name", [*TEMPLATES, "straddle"])
@pytest.mark.parametrize("kind", ["bytelevel_bpe", "sentencepiece_bpe"])
def test_masked_tokens_cover_exactly_the_assistant_bytes(tokenizers, kind, name):
    """Masked tokens = the tokens sharing a byte with an assistant span, encoded as ctdbench.data does.

    A token straddling a span boundary (" the" + "re" -> " th", "ere") is a target, so the
    masked bytes may reach past a span by at most the straddling tokens; they never skip an
    assistant byte.
    """
    side = Side(tokenizers[kind], token_bytes(tokenizers[kind]))
    if name == "straddle":
        text, spans = render_chat(STRADDLE, STRADDLE_TEMPLATE)
    else:
        text, spans = render_chat(CONVERSATION, TEMPLATES[name])
    data = text.encode("utf-8")
    enc = side.encode(text)  # BOS first with the empty span [0, 0)
    mask = span_token_mask(enc.starts, enc.ends, spans)
    assert not mask[0] and mask.tolist() == _naive_mask(enc.starts, enc.ends, spans)
    covered = np.zeros(len(data), dtype=bool)
    for s, e in zip(np.asarray(enc.starts)[mask], np.asarray(enc.ends)[mask]):
        covered[s:e] = True
    wanted = np.zeros(len(data), dtype=bool)
    for a, b in spans:
        wanted[a:b] = True
    assert not np.any(wanted & ~covered)  # every assistant byte is in a target token
    # Bytes beyond the spans come only from tokens straddling a span boundary.
    straddling = [(s, e) for s, e, m in zip(enc.starts, enc.ends, mask) if m and any(s < a or e > b for a, b in spans
                                                                                    if max(s, a) < min(e, b))]
    assert straddling or name != "straddle"  # the straddle case really exercises the boundary rule
    extra = covered & ~wanted
    for s, e in straddling:
        extra[s:e] = False
    assert not extra.any()
    # Each span's targets are one contiguous run of tokens spelling the bytes around the span.
    for a, b in spans:
        run = [k for k in range(len(enc.ids)) if mask[k] and max(enc.starts[k], a) < min(enc.ends[k], b)]
        if a == b:
            continue
        assert run == list(range(run[0], run[-1] + 1))
        assert enc.starts[run[0]] <= a and enc.ends[run[-1]] >= b
        assert b"".join(side.token_bytes[enc.ids[k]] for k in run) == data[enc.starts[run[0]]:enc.ends[run[-1]]]


def test_messages_from_row_layouts():
    tulu = {"id": "x", "source": "s", "messages": [{"role": "user", "content": "q", "extra": 1},
                                                   {"role": "assistant", "content": "a"}]}
    assert messages_from_row(tulu) == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    pair = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    omi = {"problem": "q", "generated_solution": "a", "expected_answer": "4", "problem_source": "math"}
    assert messages_from_row(omi) == pair
    for user in ("prompt", "question"):
        for answer in ("response", "answer"):
            assert messages_from_row({user: "q", answer: "a"}) == pair
    with pytest.raises(ValueError, match="accepted layouts.*messages.*problem.*generated_solution.*prompt"):
        messages_from_row({"text": "plain"})
    with pytest.raises(ValueError, match="role"):
        messages_from_row({"messages": [{"content": "no role"}]})


def test_corpus_rows_are_rendered_with_the_chat_template():
    from ctdbench.chat import LLAMA3_TEMPLATE, render_chat
    from ctdbench.corpus import documents_from_rows

    rows = [{"id": "a", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
            {"problem": "1+1?", "generated_solution": "2"}]
    docs = documents_from_rows(rows, "llama3")
    assert [d.id for d in docs] == ["a", "1"]
    assert docs[0].text == render_chat(rows[0]["messages"], LLAMA3_TEMPLATE)[0]
    assert "<|start_header_id|>assistant<|end_header_id|>\n\n2<|eot_id|>" in docs[1].text
    assert [d.text for d in documents_from_rows([{"text": "plain"}])] == ["plain"]
    with pytest.raises(ValueError, match="messages"):
        documents_from_rows([{"body": "x"}], "chatml")
