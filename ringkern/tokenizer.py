"""RingTokenizer: the HF ``tokenizers`` tokenizer of a Ring model, plus the Ring chat format.

Chat format (SPEC.md section 1). Every message renders as ``<role>{ROLE}</role>{content}`` with the
role upper-cased and ``user`` spelled ``HUMAN``; an assistant turn ends with ``<|endoftext|>``; the
generation prompt is ``<role>ASSISTANT</role>`` followed, with thinking on, by ``<think>\\n``::

    <role>HUMAN</role>What is 2+3?<role>ASSISTANT</role><think>\\n

and the model completes it with ``...\\n</think>\\n\\nThe answer is 5.<|endoftext|>``. This follows SPEC.md
and the chat template published with the earlier Ling/Ring checkpoints (``<role>`` + ROLE + ``</role>``
+ content, user -> HUMAN, no separators, generation prompt ``<role>ASSISTANT</role>``). Ring-flash-2.0's
own tokenizer_config.json could not be consulted here; note that the Ling 2.0 *instruct* templates also
put ``<|role_end|>`` after every turn and a ``detailed thinking on|off`` SYSTEM line first. The
tokenizer keeps ``<|role_end|>`` as a single id (``role_end_token_id``) so such prompts still encode.

The ``tiny`` preset's tokenizer (vocabulary 512) is a byte-level BPE trained on a fixed generated
corpus of arithmetic word problems with worked reasoning; it ships as package data
(``ringkern/assets/tiny_tokenizer.json``, read with :func:`load_tiny_tokenizer`) and
:func:`build_tiny_tokenizer` regenerates it bit for bit (``python -m ringkern.tokenizer`` rewrites it).
"""
from __future__ import annotations

import importlib.resources
import json
import os
import random
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
ROLE_END_TOKEN = "<|role_end|>"
THINK_START, THINK_END = "<think>", "</think>"
ROLE_OPEN, ROLE_CLOSE = "<role>", "</role>"

TOKENIZER_FILE = "tokenizer.json"
TINY_ASSET = "tiny_tokenizer.json"
TINY_VOCAB_SIZE = 512
# Fixed ids of the tiny tokenizer: (token, special). Special tokens are dropped by
# decode(skip_special_tokens=True); the think markers are not, so decoded reasoning keeps them.
TINY_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<unk>", True), (BOS_TOKEN, True), (EOS_TOKEN, True), (ROLE_END_TOKEN, True),
    (ROLE_OPEN, True), (ROLE_CLOSE, True), (THINK_START, False), (THINK_END, False),
)

_ROLE_NAMES = {"user": "HUMAN", "human": "HUMAN", "assistant": "ASSISTANT", "system": "SYSTEM"}


class RingTokenizer:
    """A ``tokenizers.Tokenizer`` plus the Ring special ids and chat template. Never adds tokens implicitly."""

    def __init__(self, tokenizer: Tokenizer, *, bos_token: str = BOS_TOKEN, eos_token: str = EOS_TOKEN,
                 pad_token: str = EOS_TOKEN, role_end_token: str = ROLE_END_TOKEN):
        self.tokenizer = tokenizer
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.role_end_token = role_end_token
        for name in ("bos_token", "eos_token", "pad_token", "role_end_token"):
            if tokenizer.token_to_id(getattr(self, name)) is None:
                raise ValueError(f"RingTokenizer: {name}={getattr(self, name)!r} is not in the vocabulary")

    # ------------------------------------------------------------ files
    @classmethod
    def from_file(cls, path: str | os.PathLike, **kwargs) -> "RingTokenizer":
        """``path``: a tokenizer.json, or a directory (a checkpoint) that holds one."""
        p = Path(path)
        if p.is_dir():
            p = p / TOKENIZER_FILE
        if not p.is_file():
            raise FileNotFoundError(f"RingTokenizer.from_file: no tokenizer file at {p}")
        return cls(Tokenizer.from_file(str(p)), **kwargs)

    @classmethod
    def from_str(cls, json_text: str, **kwargs) -> "RingTokenizer":
        return cls(Tokenizer.from_str(json_text), **kwargs)

    def to_str(self) -> str:
        return self.tokenizer.to_str()

    def save(self, path: str | os.PathLike) -> Path:
        """Write tokenizer.json; ``path`` is the file (``*.json``) or a directory to put it in. Returns the file."""
        p = Path(path)
        if p.suffix != ".json":
            p.mkdir(parents=True, exist_ok=True)
            p = p / TOKENIZER_FILE
        tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
        tmp.write_text(self.tokenizer.to_str(pretty=True), encoding="utf-8")
        os.replace(tmp, p)
        return p

    # ------------------------------------------------------------ ids
    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(token_id)

    @property
    def bos_token_id(self) -> int:
        return self.tokenizer.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.token_to_id(self.pad_token)

    @property
    def role_end_token_id(self) -> int:
        return self.tokenizer.token_to_id(self.role_end_token)

    @property
    def think_start_id(self) -> int | None:
        return self.tokenizer.token_to_id(THINK_START)

    @property
    def think_end_id(self) -> int | None:
        return self.tokenizer.token_to_id(THINK_END)

    # ------------------------------------------------------------ text
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; markup such as ``<role>`` or ``<|endoftext|>`` in the text maps to its id."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------ chat
    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                            enable_thinking: bool = True) -> str:
        """Render ``[{"role": ..., "content": ...}, ...]`` as a Ring prompt (see the module docstring).

        Assistant messages in the history end with ``<|endoftext|>`` (unless their content already
        does), so a conversation renders exactly as prompt + sampled response. With
        ``add_generation_prompt`` the text ends ``<role>ASSISTANT</role>`` + ``<think>\\n`` if thinking.
        """
        parts = []
        for i, msg in enumerate(messages):
            try:
                role, content = msg["role"], msg["content"]
            except (KeyError, TypeError):
                raise ValueError(f"messages[{i}]={msg!r}: expected a dict with 'role' and 'content'") from None
            if not isinstance(content, str):
                raise ValueError(f"messages[{i}]['content']: expected str, got {type(content).__name__}")
            name = _ROLE_NAMES.get(str(role).lower(), str(role).upper())
            parts.append(f"{ROLE_OPEN}{name}{ROLE_CLOSE}{content}")
            if name == "ASSISTANT" and not content.endswith(self.eos_token):
                parts.append(self.eos_token)
        if add_generation_prompt:
            parts.append(f"{ROLE_OPEN}ASSISTANT{ROLE_CLOSE}")
            if enable_thinking:
                parts.append(THINK_START + "\n")
        return "".join(parts)

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                    enable_thinking: bool = True) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, enable_thinking))

    def format_sft_example(self, prompt: str, response: str, *, system: str | None = None,
                           enable_thinking: bool = True) -> tuple[list[int], list[int]]:
        """(prompt_ids, response_ids) of one SFT example; train on response_ids only.

        prompt_ids: the chat prompt with the generation prompt (ending ``<think>\\n`` when thinking).
        response_ids: the assistant's completion followed by ``eos_token_id``. ``response`` may start
        with ``<think>\\n`` (the usual "<think>\\n...\\n</think>\\n\\nanswer" form); that prefix is part of
        the prompt when thinking, so it is not repeated in response_ids.
        """
        messages = ([{"role": "system", "content": system}] if system is not None else [])
        messages.append({"role": "user", "content": prompt})
        prompt_ids = self.encode_chat(messages, add_generation_prompt=True, enable_thinking=enable_thinking)
        head = THINK_START + "\n"
        if enable_thinking and response.startswith(head):
            response = response[len(head):]
        if response.endswith(self.eos_token):
            response = response[: -len(self.eos_token)]
        return prompt_ids, self.encode(response) + [self.eos_token_id]


# ---------------------------------------------------------------- tiny tokenizer
def load_tiny_tokenizer() -> RingTokenizer:
    """The shipped tokenizer of the ``tiny`` preset (package data ``ringkern/assets/tiny_tokenizer.json``)."""
    text = importlib.resources.files("ringkern.assets").joinpath(TINY_ASSET).read_text(encoding="utf-8")
    return RingTokenizer.from_str(text)


def build_tiny_tokenizer() -> RingTokenizer:
    """Train the ``tiny`` tokenizer from scratch (deterministic; equals :func:`load_tiny_tokenizer`).

    Byte-level BPE (any text encodes, no unknown tokens), digits split one per token, vocabulary of
    exactly 512: ids 0-7 are ``<unk> <|startoftext|> <|endoftext|> <|role_end|> <role> </role>
    <think> </think>``, then the 256 byte symbols, then the learned merges.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE, min_frequency=2, show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t, _ in TINY_ADDED_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # Train on the text between the markup tokens: they are single ids already and must not shape merges.
    markup = re.compile("|".join(re.escape(t) for t, _ in TINY_ADDED_TOKENS))
    pieces = (piece for text in tiny_corpus() for piece in markup.split(text) if piece)
    tok.train_from_iterator(pieces, trainer=trainer)
    # The trainer marks all of its tokens special; the think markers must survive skip_special_tokens.
    data = json.loads(tok.to_str())
    special = dict(TINY_ADDED_TOKENS)
    for entry in data["added_tokens"]:
        entry["special"] = special[entry["content"]]
    out = RingTokenizer.from_str(json.dumps(data, ensure_ascii=False))
    ids = [out.token_to_id(t) for t, _ in TINY_ADDED_TOKENS]
    if ids != list(range(len(TINY_ADDED_TOKENS))) or out.vocab_size != TINY_VOCAB_SIZE:
        raise RuntimeError(f"build_tiny_tokenizer: got special ids {ids} and vocab {out.vocab_size}; "
                           f"expected 0..{len(TINY_ADDED_TOKENS) - 1} and {TINY_VOCAB_SIZE}")
    return out


def write_tiny_tokenizer_asset(path: str | os.PathLike | None = None) -> Path:
    """Regenerate the shipped asset (default: ringkern/assets/tiny_tokenizer.json next to this file)."""
    target = Path(path) if path is not None else Path(__file__).parent / "assets" / TINY_ASSET
    return build_tiny_tokenizer().save(target)


_NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Ivy", "Jack", "Kate", "Liam",
          "Mia", "Noah", "Olivia", "Paul", "Sara", "Tom"]
_ITEMS = ["apple", "book", "pencil", "marble", "cookie", "card", "stamp", "flower", "coin", "ball", "egg",
          "shell", "sticker", "toy", "orange", "candy"]
_FILLER = [
    "Let me think step by step.", "First, I need to understand the problem.", "Let me check the result again.",
    "Wait, that is not right. Let me recompute.", "So the total is correct.", "Therefore the answer is clear.",
    "Next, I add the numbers together.", "Finally, I verify the answer.", "This means the value must be",
    "Now I multiply the two numbers.", "The question asks for the number of", "We can write this as an equation.",
]
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _word_problem(rng: random.Random) -> tuple[str, str, int]:
    """One (question, reasoning, answer) arithmetic word problem."""
    name, other = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    a, b = rng.randint(2, 99), rng.randint(2, 30)
    kind = rng.randrange(5)
    if kind == 0:
        q = f"{name} has {a} {item}s and buys {b} more. How many {item}s does {name} have now?"
        ans = a + b
        steps = f"{name} starts with {a} {item}s.\nBuying {b} more gives {a} + {b} = {ans}."
    elif kind == 1:
        a = a + b
        q = f"{name} had {a} {item}s and gave {b} of them to {other}. How many {item}s are left?"
        ans = a - b
        steps = f"{name} had {a} {item}s.\nAfter giving away {b}, {name} has {a} - {b} = {ans}."
    elif kind == 2:
        a = a % 12 + 2
        q = f"A box holds {a} {item}s. How many {item}s are in {b} boxes?"
        ans = a * b
        steps = f"Each box holds {a} {item}s.\nThere are {b} boxes, so {a} * {b} = {ans}."
    elif kind == 3:
        b = b % 9 + 2
        total = a * b
        q = f"{total} {item}s are shared equally among {b} friends. How many {item}s does each friend get?"
        ans = a
        steps = f"We divide {total} by {b}.\n{total} / {b} = {ans}, because {b} * {ans} = {total}."
    else:
        c = rng.randint(2, 9)
        q = f"{name} buys {c} bags with {a} {item}s each, then {other} gives {name} {b} more. How many {item}s in total?"
        ans = c * a + b
        steps = (f"The bags hold {c} * {a} = {c * a} {item}s.\nAdding {b} more gives {c * a} + {b} = {ans}.")
    return q, steps, ans


def _expression(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(0, 999), rng.randint(0, 99)
    op = rng.choice(sorted(_OPS))
    return f"{a} {op} {b}", _OPS[op](a, b)


def tiny_corpus(n_examples: int = 3000, seed: int = 20250917) -> Iterator[str]:
    """The fixed training corpus of the tiny tokenizer: chat-formatted worked arithmetic problems."""
    rng = random.Random(seed)
    for _ in range(n_examples):
        if rng.random() < 0.7:
            q, steps, ans = _word_problem(rng)
        else:
            expr, ans = _expression(rng)
            q, steps = f"Compute {expr}.", f"We need to compute {expr}.\n{expr} = {ans}."
        filler = " ".join(rng.sample(_FILLER, 2))
        system = f"{ROLE_OPEN}SYSTEM{ROLE_CLOSE}You are a helpful assistant." if rng.random() < 0.1 else ""
        yield (f"{system}{ROLE_OPEN}HUMAN{ROLE_CLOSE}{q}{ROLE_OPEN}ASSISTANT{ROLE_CLOSE}{THINK_START}\n"
               f"{filler}\n{steps}\nSo the answer is {ans}.\n{THINK_END}\n\n"
               f"The answer is \\boxed{{{ans}}}.\nAnswer: {ans}{EOS_TOKEN}")


__all__ = ["RingTokenizer", "build_tiny_tokenizer", "load_tiny_tokenizer", "write_tiny_tokenizer_asset",
           "tiny_corpus", "BOS_TOKEN", "EOS_TOKEN", "ROLE_END_TOKEN", "THINK_START", "THINK_END"]


if __name__ == "__main__":  # regenerate the shipped asset
    print(write_tiny_tokenizer_asset())
