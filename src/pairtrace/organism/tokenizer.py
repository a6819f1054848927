"""A byte-level BPE tokenizer trained locally, saved as a Hugging Face fast tokenizer with a chat template.

Byte-level BPE round-trips any text exactly. Every chat turn is ``<|role|>\\n{content}<|end|>\\n``; the end
token ``<|end|>`` is also the EOS token, so generation stops at the end of the assistant turn (TRL does not
append an EOS to conversational data: the template itself closes each turn). No BOS token is added.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

END_TOKEN = "<|end|>"
PAD_TOKEN = "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD_TOKEN, END_TOKEN, *ROLE_TOKENS)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
"""Chat template: ``<|role|>\\n{content}<|end|>\\n`` per turn; the assistant content is marked for
``return_assistant_tokens_mask``."""


def build_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path | None = None, min_frequency: int = 2):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    Args:
        texts: Training texts (requests and responses); their order is part of the (deterministic) result.
        vocab_size: Target vocabulary size, special tokens and the 256 byte symbols included.
        out_dir: Where to ``save_pretrained`` it (skipped when ``None``).
        min_frequency: Minimum pair frequency for a merge.

    Returns:
        The tokenizer (EOS = ``<|end|>``, PAD = ``<|pad|>``, no BOS, chat template set).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=END_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=list(ROLE_TOKENS),
        model_max_length=4096,
        padding_side="right",
    )
    wrapped.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        wrapped.save_pretrained(out_dir)
    return wrapped
