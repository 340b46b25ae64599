"""Preprocessing specs: how an expert that brings its own preprocessing gets its inputs.

A user's expert (models/byo) declares at most one image spec (side, mean, std) and one text spec (a tokenizer
file and a maximum length). Equal specs are one spec, named by a key drawn from their content, and each of its
tensors is named ``<input>@<key>``: ``image@image224-1f0c2a9b``, ``input_ids@hf32-5e81d7c0``. Components read
those names, so the serving pipeline (export/pipeline.py) computes each spec once per batch, for the rows whose
expert reads it, and training applies the very same functions to its data: both hand an expert the same bits.

A request keeps its picture resized once, at decode, to the largest side any image spec asks for (``SpecSet``'s
``decode_side``, uint8), and its raw text; each image spec resizes from there to its own side and normalizes,
each text spec tokenizes.

Tokenizer files: dynfuse's own word tokenizer (``tokenizer.json`` with ``"type": "word"``) gives ``token_ids``;
a Hugging Face ``tokenizer.json`` (read with the ``tokenizers`` package, imported only then) gives ``input_ids``
and ``attention_mask``, always padded to ``max_length`` so every batch has one shape.

NumPy and Pillow (and ``tokenizers``): no torch, serving imports this.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from models.errors import DynfuseError
from models.preprocess import ImagePreprocessing, to_pixels
from models.tokenizer import PAD_ID, UNK_ID, Tokenizer

WORD, HF = "word", "hf"
# The spec inputs a user's component may read, by the spec that makes them.
IMAGE_INPUTS = ("image",)
TEXT_INPUTS = {WORD: ("token_ids",), HF: ("input_ids", "attention_mask")}
SPEC_INPUTS = frozenset(IMAGE_INPUTS + TEXT_INPUTS[WORD] + TEXT_INPUTS[HF])


class SpecError(DynfuseError, ValueError):
    """A spec that cannot be used: a tokenizer file that is missing or of no known kind, a bad size."""


def tensor_name(input_name: str, key: str) -> str:
    """The name a spec's tensor has in the pipeline and in exported components, e.g. ``image@image64-1f0c2a9b``."""
    return f"{input_name}@{key}"


def _digest(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


@dataclass(frozen=True)
class ImageSpec:
    """An expert's image preprocessing: resized to ``size`` x ``size`` (bilinear), x / 255, minus mean, over std."""

    size: int  # square side the expert reads
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per channel, on the 0..1 scale
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    kind = "image"  # not a field: every image spec is of this kind

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.size < 1 or len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise SpecError(
                f"image spec: size {self.size}, mean {self.mean}, std {self.std}: "
                "need a size >= 1, three means and three positive stds"
            )
        # The normalizer shares ImagePreprocessing's arithmetic (and its lookup table), the built-in models' own.
        object.__setattr__(self, "_normalizer", ImagePreprocessing(self.size, self.mean, self.std))

    @property
    def key(self) -> str:
        return f"image{self.size}-{_digest(json.dumps(self.to_dict(), sort_keys=True).encode())[:8]}"

    @property
    def input_names(self) -> tuple[str, ...]:
        return IMAGE_INPUTS

    def apply(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 (N, L, L, 3) at the decode side -> {"image": float32 (N, 3, size, size)}."""
        if pixels.shape[1] != self.size:
            pixels = np.stack([to_pixels(Image.fromarray(p), self.size) for p in pixels])
        return {"image": self._normalizer.normalize(pixels)}  # type: ignore[attr-defined]

    def to_dict(self) -> dict:
        return {"kind": "image", "image_size": self.size, "mean": list(self.mean), "std": list(self.std)}


@dataclass(frozen=True)
class TextSpec:
    """An expert's tokenizer: a file, dynfuse's word tokenizer or a Hugging Face ``tokenizer.json``, and the
    length every text is truncated or padded to."""

    tokenizer: Path | str  # the tokenizer file
    max_length: int
    kind: str = field(init=False)  # "word" | "hf", from the file's content
    sha256: str = field(init=False)  # of the file's bytes: the store verifies it, the key includes it

    def __post_init__(self) -> None:
        path = Path(self.tokenizer)
        object.__setattr__(self, "tokenizer", path)
        if self.max_length < 1:
            raise SpecError(f"text spec {path}: max_length must be >= 1, got {self.max_length}")
        try:
            data = path.read_bytes()
            content = json.loads(data)
        except (OSError, ValueError) as error:
            raise SpecError(f"tokenizer file {path} cannot be read as JSON: {error}") from error
        if isinstance(content, dict) and content.get("type") == WORD:
            kind, encoder = WORD, _WordEncoder(Tokenizer.from_dict(content), self.max_length)
        elif isinstance(content, dict) and "model" in content:
            kind, encoder = HF, _HuggingFaceEncoder(path, self.max_length)
        else:
            raise SpecError(
                f'tokenizer file {path}: neither dynfuse\'s word tokenizer ("type": "word") nor a Hugging Face '
                'tokenizer.json (a "model" entry); save a Hugging Face tokenizer with tokenizer.save(path)'
            )
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "sha256", _digest(data))
        object.__setattr__(self, "_encoder", encoder)

    @property
    def key(self) -> str:
        return f"{self.kind}{self.max_length}-{_digest(self.sha256.encode(), str(self.max_length).encode())[:8]}"

    @property
    def input_names(self) -> tuple[str, ...]:
        return TEXT_INPUTS[self.kind]

    @property
    def vocab_size(self) -> int:
        return self._encoder.vocab_size  # type: ignore[attr-defined]

    @property
    def pad_id(self) -> int:
        return self._encoder.pad_id  # type: ignore[attr-defined]

    @property
    def first_word_id(self) -> int:
        """The lowest id a random example may use: above the special tokens where the vocabulary says so."""
        return self._encoder.first_word_id  # type: ignore[attr-defined]

    def apply(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Texts -> int64 (N, max_length) arrays, one per input name."""
        return self._encoder(texts)  # type: ignore[attr-defined]

    def to_dict(self, file_name: str | None = None) -> dict:
        tokenizer = file_name or str(self.tokenizer)
        return {"kind": self.kind, "tokenizer": tokenizer, "max_length": self.max_length, "sha256": self.sha256}


Spec = ImageSpec | TextSpec


def spec_from_dict(entry: dict, base_dir: Path) -> Spec:
    """A spec from its model.json (or run checkpoint) entry; tokenizer files are relative to ``base_dir``."""
    if entry["kind"] == "image":
        return ImageSpec(int(entry["image_size"]), tuple(entry["mean"]), tuple(entry["std"]))
    spec = TextSpec(Path(base_dir) / entry["tokenizer"], int(entry["max_length"]))
    if spec.kind != entry["kind"]:
        raise SpecError(f"{spec.tokenizer}: a {spec.kind} tokenizer where a {entry['kind']} one was recorded")
    return spec


class _WordEncoder:
    def __init__(self, tokenizer: Tokenizer, max_length: int):
        self.tokenizer = Tokenizer(tokenizer.vocab, max_length)
        self.vocab_size, self.pad_id, self.first_word_id = tokenizer.vocab_size, PAD_ID, UNK_ID + 1

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        ids = np.asarray([self.tokenizer.encode(t) for t in texts], dtype=np.int64)
        return {"token_ids": ids.reshape(len(texts), -1)}


class _HuggingFaceEncoder:
    def __init__(self, path: Path, max_length: int):
        try:
            from tokenizers import Tokenizer as HuggingFaceTokenizer
        except ImportError as error:
            raise SpecError(f"{path} is a Hugging Face tokenizer: pip install 'dynfuse[hf]' to read it") from error
        tokenizer = HuggingFaceTokenizer.from_file(str(path))
        padding = tokenizer.padding or {}
        pad_token = padding.get("pad_token") or next(
            (t for t in ("[PAD]", "<pad>", "<|pad|>") if tokenizer.token_to_id(t) is not None), None
        )
        self.pad_id = int(padding.get("pad_id", tokenizer.token_to_id(pad_token) if pad_token else 0))
        # Every text to one length, whatever the file says: the exported components have a fixed sequence axis.
        tokenizer.enable_truncation(max_length)
        tokenizer.enable_padding(length=max_length, pad_id=self.pad_id, pad_token=pad_token or "[PAD]")
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        specials = [i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special]
        self.first_word_id = min(max([*specials, self.pad_id]) + 1, self.vocab_size - 1)

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        encodings = self.tokenizer.encode_batch(texts)
        return {
            "input_ids": np.asarray([e.ids for e in encodings], dtype=np.int64).reshape(len(texts), -1),
            "attention_mask": np.asarray([e.attention_mask for e in encodings], dtype=np.int64).reshape(len(texts), -1),
        }


class SpecSet:
    """The distinct specs of a model's experts, by key: what a request keeps, and each spec's tensors per batch."""

    def __init__(self, specs: dict[str, Spec] | None = None):
        self.specs = dict(specs or {})
        sides = [s.size for s in self.specs.values() if isinstance(s, ImageSpec)]
        self.decode_side: int | None = max(sides) if sides else None  # None: no expert reads its own image
        self.keeps_text = any(isinstance(s, TextSpec) for s in self.specs.values())
        # tensor name -> the key of the spec that makes it
        self.source_of = {tensor_name(i, key): key for key, spec in self.specs.items() for i in spec.input_names}

    def __bool__(self) -> bool:
        return bool(self.specs)

    def prepare_image(self, image: Image.Image) -> np.ndarray | None:
        """What a request keeps of its picture for the specs: uint8 (L, L, 3) at the decode side, or None."""
        return None if self.decode_side is None else to_pixels(image, self.decode_side)

    def apply(self, key: str, texts: list[str] | None, pixels: np.ndarray | None) -> dict[str, np.ndarray]:
        """One spec's tensors, named ``<input>@<key>``, for the rows given (their texts or decode-side pixels)."""
        spec = self.specs[key]
        values = spec.apply(pixels) if isinstance(spec, ImageSpec) else spec.apply(texts)
        return {tensor_name(name, key): value for name, value in values.items()}
