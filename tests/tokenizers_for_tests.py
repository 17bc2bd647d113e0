"""Tiny tokenizers built locally (no downloads) for the data-pipeline tests.

All variants share one byte-level BPE model trained in a few milliseconds on a handful of sentences, so
decoding is lossless (``decode(encode(text)) == text``) and any string can be encoded.

- :func:`chat_tokenizer`: ChatML-style Jinja ``chat_template`` with a BOS token, role markers and
  ``add_generation_prompt`` support; it is *append-only* (rendering a longer conversation only appends text).
- :func:`plain_tokenizer`: no chat template (exercises the plain-text fallback).
- :func:`thinking_chat_tokenizer`: a Qwen3-like template that renders the *last* assistant message with an
  empty ``<think></think>`` block, so it is **not** append-only for histories.
- :func:`broken_chat_tokenizer`: a template whose generation prompt is not a prefix of the rendered answer.
"""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

_CORPUS = [
    "Hello there, how are you today?",
    "I am fine, thank you. What is the capital of France?",
    "The capital of France is Paris. The answer is forty two.",
    "User: Assistant: System: You are a helpful assistant.",
    "Remember that my favourite colour is blue and my cat is called Tom.",
    "What did I say earlier? You said the code word is banana.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`\n\t",
]
_SPECIAL = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Like Qwen3: assistant turns after the last user message get a <think> block only while they are the last
# message, so appending a message re-renders an earlier one.
THINKING_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages %}{% if m['role'] == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' and loop.last and loop.index0 > ns.last_user -%}"
    "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif -%}"
)

# The generation prompt says "assistant\n" but assistant turns are rendered as "assistant:\n".
BROKEN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant:\n' + message['content'] + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@lru_cache(maxsize=1)
def _backend_json() -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return tok.to_str()


def _wrap(chat_template: str | None) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_backend_json()),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>", "<think>", "</think>"],
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def chat_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE tokenizer with an append-only ChatML-style chat template (BOS first)."""
    return _wrap(CHATML_TEMPLATE)


def plain_tokenizer() -> PreTrainedTokenizerFast:
    """The same tokenizer without any chat template."""
    return _wrap(None)


def thinking_chat_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen3-like template that is not append-only (the last assistant turn gets an empty think block)."""
    return _wrap(THINKING_TEMPLATE)


def broken_chat_tokenizer() -> PreTrainedTokenizerFast:
    """Template whose generation prompt is not a prefix of the rendered assistant turn."""
    return _wrap(BROKEN_TEMPLATE)
