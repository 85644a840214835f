"""Chat messages → prompt tokens, through the tokenizer's own chat template.

Where it sits: ``/v1/chat/completions`` (``http_api.py``) renders a request's
messages here, then hands the token ids to the servicer like any token prompt.
Instruction-tuned checkpoints only answer well in the format they were trained on,
which their tokenizer's ``chat_template`` (Jinja, in tokenizer_config.json) states;
the zoo's tokenizer ships a simple one (``specfleet.zoo.tokenizer.CHAT_TEMPLATE``).

Special tokens are never doubled: a template writes the tokens it wants (a BOS, role
markers) into the text itself, so the text is encoded *without* the tokenizer's
automatic special tokens — otherwise a tokenizer whose post-processor prepends BOS
would start every chat prompt with two.
"""

from __future__ import annotations

from collections.abc import Sequence


class NoChatTemplate(ValueError):
    """The tokenizer has no chat template (use /v1/completions with a formatted prompt)."""


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
    """The prompt tokens of ``messages`` ({role, content} dicts), ready for the
    assistant's reply. Raises ``NoChatTemplate``, or ValueError for messages the
    template refuses (Jinja's ``raise_exception``)."""
    if not has_chat_template(tokenizer):
        raise NoChatTemplate("this model's tokenizer has no chat template; "
                             "send a formatted prompt to /v1/completions instead")
    try:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=True)
    except Exception as exc:  # jinja2's TemplateError (raise_exception in a template)
        raise ValueError(f"the chat template refused these messages: {exc}") from None
    return list(tokenizer.encode(text, add_special_tokens=False))
