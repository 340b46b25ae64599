"""Word-level tokenizer built from the training captions.

It is pure Python on purpose: the serving process tokenizes requests without torch, and must split
text exactly as training did, so both import this one module. The vocabulary travels with the model
as ``tokenizer.json``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PAD_ID = 0  # padding; the text encoder masks these positions out
UNK_ID = 1  # any word not seen in training
_SPECIALS = ("<pad>", "<unk>")
_WORD = re.compile(r"[a-z0-9]+")


def split_words(text: str) -> list[str]:
    """Lower-case alphanumeric words; punctuation and whitespace separate them."""
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class Tokenizer:
    vocab: tuple[str, ...]  # index = token id; the first two are <pad> and <unk>
    max_tokens: int  # every encoding is padded or truncated to this length

    def __post_init__(self) -> None:
        assert self.vocab[: len(_SPECIALS)] == _SPECIALS, f"vocab must start with {_SPECIALS}, got {self.vocab[:2]}"
        assert self.max_tokens > 0, f"max_tokens must be positive, got {self.max_tokens}"
        object.__setattr__(self, "_ids", {word: i for i, word in enumerate(self.vocab)})

    @classmethod
    def build(cls, texts: Iterable[str], *, max_tokens: int, min_count: int = 1) -> Tokenizer:
        """Vocabulary of every word seen at least ``min_count`` times, most frequent first (ties by word)."""
        counts = Counter(word for text in texts for word in split_words(text))
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(vocab=_SPECIALS + tuple(words), max_tokens=max_tokens)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        """Token ids, truncated and right-padded to ``max_tokens``."""
        ids = [self._ids.get(word, UNK_ID) for word in split_words(text)[: self.max_tokens]]  # type: ignore[attr-defined]
        return ids + [PAD_ID] * (self.max_tokens - len(ids))

    def to_dict(self) -> dict:
        return {"type": "word", "max_tokens": self.max_tokens, "vocab": list(self.vocab)}

    @classmethod
    def from_dict(cls, data: dict) -> Tokenizer:
        if data.get("type") != "word":
            raise ValueError(f"unsupported tokenizer type {data.get('type')!r}; this version reads 'word'")
        return cls(vocab=tuple(data["vocab"]), max_tokens=int(data["max_tokens"]))

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> Tokenizer:
        return cls.from_dict(json.loads(Path(path).read_text()))
