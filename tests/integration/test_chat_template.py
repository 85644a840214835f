"""Chat prompts through the tokenizer's chat template (router/chat.py), on the zoo's
tokenizer: its template is used, and special tokens are never doubled — also with a
tokenizer whose post-processor prepends BOS to everything it encodes."""

from __future__ import annotations

import copy

import pytest

from specfleet.router.chat import NoChatTemplate, render_chat

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " hi "}]


@pytest.fixture(scope="module")
def tokenizer(tiny_zoo):
    from specfleet.models.loading import load_tokenizer

    return load_tokenizer("zoo:tiny/target")


def test_the_zoo_template_renders_roles_then_the_assistant_prompt(tokenizer):
    ids = render_chat(tokenizer, MESSAGES)
    assert tokenizer.decode(ids) == "<|endoftext|>system: Be brief.\nuser: hi\nassistant:"
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


def test_bos_is_not_doubled_by_a_tokenizer_that_adds_it(tokenizer):
    from tokenizers.processors import TemplateProcessing

    adds_bos = copy.deepcopy(tokenizer)
    bos = adds_bos.bos_token
    adds_bos.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, adds_bos.bos_token_id)])
    assert adds_bos.encode("hi")[0] == adds_bos.bos_token_id  # it does add BOS on its own
    ids = render_chat(adds_bos, MESSAGES)
    assert ids == render_chat(tokenizer, MESSAGES)
    assert ids.count(adds_bos.bos_token_id) == 1


def test_a_tokenizer_without_a_template_is_refused(tokenizer):
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(NoChatTemplate):
        render_chat(bare, MESSAGES)


def test_a_template_that_raises_is_a_value_error(tokenizer):
    strict = copy.deepcopy(tokenizer)
    strict.chat_template = "{{ raise_exception('only user messages') }}"
    with pytest.raises(ValueError, match="only user messages"):
        render_chat(strict, MESSAGES)
