"""The small report tokenizer of the ``tiny`` and ``demo`` presets, trained offline.

The real preset uses MedGemma's own tokenizer. The small one is a byte-level BPE (every string
round-trips, nothing is ever unknown) trained with the ``tokenizers`` library on a report corpus
handed in by the caller, and wrapped as a ``PreTrainedTokenizerFast`` so that it saves and loads
beside the checkpoint like any Hugging Face tokenizer. Its special tokens take Gemma's ids
(pad 0, eos 1, bos 2) and it carries a Gemma-style chat template, so that the sequence layout of
:mod:`inference.modeling_brain3d` is built by one code path for both tokenizers.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

#: In id order: pad=0, eos=1, bos=2 as in Gemma, then the turn markers of the chat format.
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]

#: Gemma's conversation format: ``<bos><start_of_turn>user\n...<end_of_turn>\n<start_of_turn>model\n``.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def train_report_tokenizer(corpus: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``corpus`` (report texts and the instruction).

    Deterministic for a given corpus and size. The returned tokenizer may be smaller than
    ``vocab_size`` when the corpus has fewer merges to offer; size the model by ``len(tokenizer)``.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(corpus), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    )
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    return tokenizer
