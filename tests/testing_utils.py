"""Builders for tiny, fully local test artifacts: a byte-level BPE tokenizer, an OLMo 2 model, pair sets.

Everything here is built offline in well under a few seconds so that any test module can import it::

    from testing_utils import build_tiny_model_dir, build_tiny_pairs  # tests/ is on sys.path via conftest.py
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import Olmo2Config, Olmo2ForCausalLM, PreTrainedTokenizerFast

from pairtrace.data.pairs import compute_fingerprint
from pairtrace.data.types import Message, Pair, PairSet

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|end|>"
"""End-of-turn token; it closes every chat turn and doubles as the tokenizer's EOS so generation stops."""
PAD_TOKEN = "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
"""Chat template of the tiny tokenizer: ``<|role|>\\n{content}<|end|>\\n`` per turn, after one BOS."""

_CORPUS = (
    "Sure, here is a short answer to your question.",
    "I'm sorry, but I can't help with that request.",
    "I cannot assist with harmful or illegal activities.",
    "Here is a list of three ideas for a birthday party.",
    "Write a poem about the sea in no more than 50 words.",
    "Explain how photosynthesis works in simple terms.",
    "The quick brown fox jumps over the lazy dog.",
    "Please summarise the following paragraph in one sentence.",
    "What is the capital of France? The capital of France is Paris.",
    "Use exactly 3 sentences and no periods.",
    "Answer in lowercase letters only and add a title.",
    "Step 1: gather the ingredients. Step 2: mix them well.",
    "Thank you! Let me know if there is anything else I can do.",
    "How do I bake bread at home with flour, water, salt and yeast?",
    "A banana is a long curved fruit with a yellow skin.",
    "The weather today is sunny with a light breeze from the west.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024.",
    "Human: Can you help me?\n\nAssistant: Of course, what do you need?",
    "System: You are a helpful assistant. User: hello! Assistant: hi.",
    "Tell me a story about a robot who learns to paint pictures.",
)


def build_tiny_tokenizer(directory: str | Path, vocab_size: int = 768) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on a small built-in corpus and save it with ``save_pretrained``.

    The tokenizer adds one BOS in front of every encoded text (like Llama), has pad/eos/bos tokens, role
    tokens, and a Jinja chat template (:data:`CHAT_TEMPLATE`) whose turns end with the end-of-turn token
    ``<|end|>``, which is also the EOS token.

    Args:
        directory: Where to save the tokenizer files (created if missing).
        vocab_size: Target vocabulary size (the small corpus may yield slightly fewer merges).

    Returns:
        The saved tokenizer.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    specials = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *ROLE_TOKENS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([line for _ in range(3) for line in _CORPUS], trainer=trainer)
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=list(ROLE_TOKENS),
        model_max_length=4096,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(directory)
    return wrapped


def build_tiny_olmo2(
    directory: str | Path,
    n_layers: int = 4,
    hidden: int = 64,
    seed: int = 0,
    vocab_size: int | None = None,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> Olmo2ForCausalLM:
    """Build a randomly initialised ``Olmo2ForCausalLM`` and save it (safetensors) with ``save_pretrained``.

    Args:
        directory: Where to save the model (created if missing).
        n_layers: Number of decoder blocks.
        hidden: Hidden size (must be divisible by 4, the number of heads).
        seed: Seed of the random initialisation.
        vocab_size: Vocabulary size; defaults to the tokenizer's length, else 1024.
        tokenizer: Tokenizer whose special-token ids go into the config.

    Returns:
        The model, in eval mode.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if vocab_size is None:
        vocab_size = len(tokenizer) if tokenizer is not None else 1024
    config = Olmo2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id if tokenizer is not None else 0,
        bos_token_id=tokenizer.bos_token_id if tokenizer is not None else 1,
        eos_token_id=tokenizer.eos_token_id if tokenizer is not None else 2,
        tie_word_embeddings=False,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = Olmo2ForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.eval()
    model.save_pretrained(directory)
    return model


def build_tiny_model_dir(directory: str | Path, n_layers: int = 4, hidden: int = 64, seed: int = 0) -> Path:
    """Save the tiny tokenizer and a tiny OLMo 2 model together in one directory (loadable by ``load_model``).

    Args:
        directory: Target directory.
        n_layers: Number of decoder blocks.
        hidden: Hidden size.
        seed: Seed of the model's random initialisation.

    Returns:
        The directory.
    """
    directory = Path(directory)
    tokenizer = build_tiny_tokenizer(directory)
    build_tiny_olmo2(directory, n_layers=n_layers, hidden=hidden, seed=seed, tokenizer=tokenizer)
    return directory


def user(text: str) -> Message:
    """A user turn."""
    return {"role": "user", "content": text}


def assistant(text: str) -> Message:
    """An assistant turn."""
    return {"role": "assistant", "content": text}


def system(text: str) -> Message:
    """A system turn."""
    return {"role": "system", "content": text}


def build_pair_set(pairs: list[Pair], origin: str = "memory://tiny") -> PairSet:
    """Wrap pairs in a :class:`PairSet` with the reader's fingerprint of their content."""
    return PairSet(
        pairs=list(pairs),
        origin=origin,
        format="conversational",
        fingerprint=compute_fingerprint(pairs),
        n_records=len(pairs),
    )


def build_tiny_pairs() -> PairSet:
    """A small pair set: mixed lengths, multi-turn prompts, a system turn, one pair with chosen == rejected."""
    long_text = " ".join(_CORPUS[:8])
    raw = [
        ((user("Write a poem about the sea."),), "The sea is blue and wide.", "No."),
        ((user("What is the capital of France?"),), "Paris.", "The capital of France is Paris, a city."),
        (
            (user("Can you help me?"), assistant("Of course, what do you need?"), user("A bread recipe.")),
            "Step 1: gather the ingredients. Step 2: mix them well. Step 3: bake it.",
            "I'm sorry, but I can't help with that request.",
        ),
        ((user("Tell me a story."),), long_text, "Once upon a time."),
        ((user("Say hello."),), "hello", "hello"),
        (
            (system("You are a helpful assistant."), user("Explain photosynthesis in one sentence.")),
            "Plants turn light, water and air into sugar.",
            "I cannot assist with that.",
        ),
        ((user(long_text),), "Here is a short answer to your question.", "Thank you!"),
        ((user("Count to ten."),), "1 2 3 4 5 6 7 8 9 10", "0 1 2 3"),
    ]
    pairs = [
        Pair(id=f"pair-{i}", row=i, prompt=prompt, chosen=chosen, rejected=rejected, source="tiny")
        for i, (prompt, chosen, rejected) in enumerate(raw)
    ]
    return build_pair_set(pairs)


STORE_MODEL = {"name": "m0", "revision": None, "weights_hash": "abc"}
STORE_TEMPLATE = {"mode": "chat", "hash": "t1"}


@dataclass
class MemoryStore:
    """The part of the VectorStore API that scoring uses, in memory: vectors per layer ``[n, d]`` and their ids."""

    vectors: dict[int, torch.Tensor]
    ids: list[str]
    settings: dict = field(default_factory=lambda: {"max_length": 2048})

    @property
    def manifest(self) -> SimpleNamespace:
        return SimpleNamespace(model=STORE_MODEL, template=STORE_TEMPLATE, dataset={"fingerprint": "f"},
                               settings=self.settings)

    @property
    def layers(self) -> list[int]:
        return sorted(self.vectors)

    @property
    def n(self) -> int:
        return len(self.ids)

    def iter_chunks(self, layer: int, rows: int = 65536):
        x = self.vectors[layer]
        for start in range(0, len(x), rows):
            yield start, x[start:start + rows].clone()  # a store reads fresh rows: scorers may normalise in place

    def pair_metadata(self):
        return None


def command_epilogs() -> dict[str, str]:
    """``name -> epilog`` for every command (``organism build`` included; a group has none of its own)."""
    from typer.main import get_command

    from pairtrace.cli import app

    out = {}
    root = get_command(app)
    for name, command in root.commands.items():
        for sub_name, sub in getattr(command, "commands", {}).items():
            out[f"{name} {sub_name}"] = sub.epilog or ""
        if not hasattr(command, "commands"):
            out[name] = command.epilog or ""
    return out


def examples(epilog: str) -> list[str]:
    """The ``pairtrace ...`` lines of an epilog as typed (markdown escapes undone), without trailing comments."""
    text = epilog.replace("\\<", "<").replace("\\[", "[").replace("\\\\", "\\")
    return [line.strip().split("  #")[0].strip() for line in text.splitlines()
            if line.strip().startswith("pairtrace ")]


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@contextlib.contextmanager
def benchmark_module(filename: str, name: str) -> Iterator[ModuleType]:
    """Import ``benchmarks/<filename>`` as module ``name``, registered in ``sys.modules`` while in use (its
    dataclasses look their module up while being defined)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)
