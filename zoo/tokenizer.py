"""The zoo's shared tokenizer: byte-level BPE trained on the zoo corpus.

Where it sits: trained once per zoo build, then saved next to every zoo model so
``AutoTokenizer.from_pretrained(model_dir)`` works on any of them alone. Drafters
and the target share it token for token, which is what lets a drafter's proposals
be checked by the target without re-tokenizing (cross-tokenizer drafting is later
work; ``specfleet.models.loading.check_same_vocabulary`` refuses mismatches).

Byte-level, so every string round-trips and no input is ever unknown.

It ships a chat template (``CHAT_TEMPLATE``) so that ``/v1/chat/completions`` works
on the zoo. The zoo's models are not instruction-tuned: the template only gives a
conversation a plain, stable text form (a BOS, then ``role: content`` lines, then
``assistant:``), which the target continues like any other text.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"  # document separator, also used as BOS (GPT-2 convention)
PAD = "<|pad|>"  # distinct from EOS so padded batches never look like finished text

# Jinja, as Hugging Face chat templates are; rendered by ``apply_chat_template``. The
# BOS is written by the template itself (the tokenizer adds no special tokens).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] + ': ' + message['content'] | trim + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],  # ids 0 and 1
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 30,  # the model config's max_position_embeddings is the limit
        chat_template=CHAT_TEMPLATE,
    )
