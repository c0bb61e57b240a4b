"""Chat data: render conversations with a chat template and mark the assistant bytes.

The loss of chat SFT data (Tulu-3, OpenMathInstruct-2) is on assistant turns only. Because the two
sides of a pair tokenize differently, the mask is defined on *bytes*, not tokens: ``render_chat``
returns the rendered text and the UTF-8 byte spans of the assistant contents; the corpus stores
them with each document (``loss_spans``) and ``ctdbench.data.Side.encode`` turns them into a
per-token loss mask for either side's tokenization.

Finding the spans. The template is rendered once with every assistant content replaced by a unique
sentinel (private-use characters around the message index), which gives the scaffolding and where
each content goes even when two assistant messages are identical (``str.find`` would match the first
twice). Splicing the real contents into that skeleton gives the expected text; the template is then
rendered with the real contents and must produce exactly that text. If it does not (the template
trims, rewrites, drops or branches on a content), a ValueError names the assistant message: a
span is only trusted when the template provably emits the content verbatim.

Rendering uses ``transformers``' own ``render_jinja_template`` (HF's sandboxed Jinja environment,
``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``tojson``...), so Hub templates behave as
under ``tokenizer.apply_chat_template(tokenize=False)``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from transformers.utils.chat_template_utils import render_jinja_template

# End-of-turn markers recognised right after an assistant content (longest match wins).
END_OF_TURN_TOKENS: tuple[str, ...] = (
    "<|eot_id|>", "<end_of_turn>", "<|im_end|>", "<|end|>", "<|endoftext|>", "</s>", "<eos>",
)

# Simplified official formats: no tool calls, no system-prompt date injection (Llama-3.1), and no
# ``| trim`` of the contents (Llama-3 and Gemma trim them officially; we keep contents verbatim so
# the spans are exact: strip them beforehand to reproduce the official rendering). ``bos_token`` is
# emitted where the official template does; ``render_chat`` defaults it to "" because
# ``Side.encode`` already puts the BOS id in front.
LLAMA3_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)
"""Llama-3 instruct format (simplified, see above)."""

GEMMA_TEMPLATE = (
    "{{- bos_token -}}"
    # Gemma has no system role: Gemma-3 prepends the system prompt to the first user turn.
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set prefix = messages[0]['content'] + '\\n\\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set prefix = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' + role + '\\n' + (prefix if loop.first else '') + message['content'] + '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)
"""Gemma-2/3 format (simplified, see above; the system prompt goes into the first user turn)."""

CHATML_TEMPLATE = (
    # Qwen2.5 injects its default system prompt when the conversation has none.
    "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
"""ChatML as in Qwen2.5 (simplified, see above; keeps Qwen's default system prompt)."""


def _render(messages: list[dict], template: str, variables: dict) -> str:
    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template, **variables)
    return rendered[0]


def render_chat(
    messages: Sequence[Mapping],
    template: str,
    *,
    bos: str = "",
    special_tokens: Iterable[str] = END_OF_TURN_TOKENS,
    include_end_of_turn: bool = True,
    template_vars: Mapping | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` with ``template``; return the text and the assistant byte spans.

    Args:
        messages: ``[{"role": ..., "content": ...}, ...]``; assistant contents must be strings.
        template: a Jinja chat template (``LLAMA3_TEMPLATE``, a Hub ``tokenizer.chat_template``...).
        bos: the template's ``bos_token`` (default "": ``Side.encode`` adds the BOS id itself).
        special_tokens: end-of-turn markers that may follow an assistant content.
        include_end_of_turn: extend a span over the marker that directly follows the content, so
            the model learns to stop (the scaffolding after the marker, e.g. "\\n", is not included).
        template_vars: further template variables (``eos_token``, ...).

    Returns:
        ``(text, spans)``: one half-open ``[start, end)`` span into ``text.encode("utf-8")`` per
        assistant message, in message order.

    Raises:
        ValueError: a malformed message, or a template that does not emit an assistant content
            exactly once and verbatim (the message index is named).
    """
    messages = [dict(m) for m in messages]
    for i, m in enumerate(messages):
        if "role" not in m or "content" not in m:
            raise ValueError(f"message {i} needs 'role' and 'content', got keys {sorted(m)}")
        if m["role"] == "assistant" and not isinstance(m["content"], str):
            raise ValueError(f"assistant message {i} has non-text content {type(m['content']).__name__}")
    variables = {"bos_token": bos, **(template_vars or {})}
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    # A private-use character absent from the template and every content delimits the sentinels.
    seen = template + "".join(str(m["content"]) for m in messages)
    mark = next(chr(c) for c in range(0xE000, 0xF8FF) if chr(c) not in seen)
    skeleton = _render([{**m, "content": f"{mark}{i}{mark}"} if i in assistant else m
                        for i, m in enumerate(messages)], template, variables)
    found = re.compile(f"{mark}(\\d+){mark}").findall(skeleton)
    for i in assistant:
        if found.count(str(i)) != 1:
            raise ValueError(f"the template emits assistant message {i} {found.count(str(i))} times, not once")
    markers = sorted(special_tokens, key=len, reverse=True)
    # Splice the contents into the skeleton, tracking char and byte offsets of each span.
    parts = re.split(f"{mark}(\\d+){mark}", skeleton)  # [scaffold, index, scaffold, index, ...]
    out, spans, content_end = [parts[0]], {}, {}
    nchars, nbytes = len(parts[0]), len(parts[0].encode("utf-8"))
    for k in range(1, len(parts), 2):
        i, after = int(parts[k]), parts[k + 1]
        content = messages[i]["content"]
        end = nbytes + len(content.encode("utf-8"))
        eot = next((t for t in markers if after.startswith(t)), "") if include_end_of_turn else ""
        spans[i] = (nbytes, end + len(eot.encode("utf-8")))
        content_end[i] = nchars + len(content)
        out += [content, after]
        nchars, nbytes = content_end[i] + len(after), end + len(after.encode("utf-8"))
    expected = "".join(out)
    text = _render(messages, template, variables)
    if text != expected:
        at = next((k for k, (a, b) in enumerate(zip(text, expected)) if a != b), min(len(text), len(expected)))
        # Blame the first assistant message whose content ends at or after the divergence.
        i = next((i for i in assistant if content_end[i] >= at), assistant[-1] if assistant else None)
        raise ValueError(
            f"the template does not emit the content of assistant message {i} verbatim (does it strip or rewrite "
            f"it?): at character {at} it renders {text[at:at + 30]!r} where {expected[at:at + 30]!r} was expected"
        )
    return text, [spans[i] for i in assistant]


def messages_from_row(row: Mapping) -> list[dict]:
    """A dataset row as ``[{"role", "content"}, ...]``.

    Accepted layouts, in this order: ``{"messages": [...]}`` (Tulu-3 SFT mixture),
    ``{"problem", "generated_solution"}`` (OpenMathInstruct-2), ``{"prompt" | "question",
    "response" | "answer"}`` (a single user/assistant exchange). Only role and content are kept.
    """
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, Sequence) or not all(isinstance(m, Mapping) and {"role", "content"} <= m.keys()
                                                      for m in msgs):
            raise ValueError("row['messages'] must be a list of {'role', 'content'} dicts")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    pairs = [("problem", "generated_solution"), *((p, r) for p in ("prompt", "question") for r in ("response", "answer"))]
    for user, answer in pairs:
        if user in row and answer in row:
            return [{"role": "user", "content": row[user]}, {"role": "assistant", "content": row[answer]}]
    raise ValueError(
        f"unrecognised chat row with keys {sorted(row)}; accepted layouts: {{'messages': [...]}} (Tulu-3), "
        "{'problem', 'generated_solution'} (OpenMathInstruct-2), {'prompt' or 'question', 'response' or 'answer'}"
    )


BUILTIN_TEMPLATES = {"llama3": LLAMA3_TEMPLATE, "gemma": GEMMA_TEMPLATE, "chatml": CHATML_TEMPLATE}


def resolve_template(name: str) -> str:
    """A built-in template (llama3, gemma, chatml), or the chat template of a tokenizer (hub name
    or local path)."""
    if name in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[name]
    from transformers import AutoTokenizer

    template = AutoTokenizer.from_pretrained(name).chat_template
    if not isinstance(template, str):
        raise ValueError(f"corpus.chat_template: tokenizer {name!r} has no (single) chat template; "
                         f"name one of {', '.join(BUILTIN_TEMPLATES)} or another tokenizer")
    return template
