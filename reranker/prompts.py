"""Prompt formats of causal-LM rerankers that score a pair from yes/no next-token logits."""

from __future__ import annotations

import re

QWEN3_DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"

QWEN3_SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".'
)

QWEN3_RERANKER_PATTERN = re.compile(r"qwen3-reranker", re.IGNORECASE)

# Renders the prompt of the Qwen3-Reranker model card from the query/document messages that
# sentence-transformers builds for a pair; the optional instruction arrives as a system message.
# Message content may be a plain string or a list of {"type": "text", "text": ...} parts.
QWEN3_RERANKER_TEMPLATE = (
    "{%- macro content(message) -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- set ns = namespace(instruction=" + repr(QWEN3_DEFAULT_INSTRUCTION) + ", query='', document='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.instruction = content(message) -%}"
    "{%- elif message['role'] == 'query' -%}{%- set ns.query = content(message) -%}"
    "{%- elif message['role'] == 'document' -%}{%- set ns.document = content(message) -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{- '<|im_start|>system\\n" + QWEN3_SYSTEM.replace('"', '\\"') + "<|im_end|>\\n"
    "<|im_start|>user\\n<Instruct>: ' + ns.instruction + '\\n<Query>: ' + ns.query + "
    "'\\n<Document>: ' + ns.document + "
    "'<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' -}}"
)


def is_qwen3_reranker(model_id: str) -> bool:
    """Whether a hub id or directory name is one of the Qwen3-Reranker checkpoints."""
    return bool(QWEN3_RERANKER_PATTERN.search(model_id))


def qwen3_reranker_prompt(query: str, document: str, instruction: str | None = None) -> str:
    """The exact text the Qwen3-Reranker model card feeds the model for one pair."""
    return (
        f"<|im_start|>system\n{QWEN3_SYSTEM}<|im_end|>\n<|im_start|>user\n"
        f"<Instruct>: {instruction or QWEN3_DEFAULT_INSTRUCTION}\n<Query>: {query}\n<Document>: {document}"
        "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
