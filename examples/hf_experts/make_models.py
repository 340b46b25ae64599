"""Stand-in for "the models you already have": a tiny BERT text classifier and a tiny ViT image classifier.

Both are built from a config with random weights, fine-tuned for a few epochs on the training split of a
manifest directory, and written with ``save_pretrained``, exactly what a model fine-tuned elsewhere looks like on
disk (config.json, model.safetensors, tokenizer.json or preprocessor_config.json). Nothing is downloaded.
With your own models, skip this script: point experts.py at their directories or hub ids.

    python examples/hf_experts/make_models.py --data DATA_DIR --out MODELS_DIR

writes MODELS_DIR/text (BertForSequenceClassification + tokenizer.json) and MODELS_DIR/image
(ViTForImageClassification + preprocessor_config.json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    PreTrainedTokenizerFast,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
)

from models.data.manifest import label_names, load_image_rgb, read_split

MAX_LENGTH = 24  # the captions' longest is about 20 words


def make_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer learnt from the captions, in Hugging Face's format (saved as tokenizer.json)."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


def fine_tune(model: torch.nn.Module, batches, epochs: int, lr: float = 3e-3) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for inputs, labels in batches():
            loss = F.cross_entropy(model(**inputs).logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()


def minibatches(tensors: dict[str, torch.Tensor], labels: torch.Tensor, size: int = 32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)

    def batches():
        for index in torch.randperm(len(labels), generator=generator).split(size):
            yield {k: v[index] for k, v in tensors.items()}, labels[index]

    return batches


def accuracy(model, tensors: dict[str, torch.Tensor], labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(**tensors).logits.argmax(1) == labels).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="manifest directory (train/val .jsonl)")
    parser.add_argument("--out", type=Path, required=True, help="where to save the models")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--image-size", type=int, default=32, help="the ViT's input side")
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()

    train, val = read_split(args.data, "train"), read_split(args.data, "val")
    labels = label_names(train)
    label_config = {"id2label": dict(enumerate(labels)), "label2id": {label: i for i, label in enumerate(labels)}}
    targets = {split: torch.tensor([labels.index(s.label) for s in samples]) for split, samples in
               (("train", train), ("val", val))}  # fmt: skip

    # Text: BERT, four times smaller than bert-tiny.
    tokenizer = make_tokenizer([s.text for s in train])
    text_model = BertForSequenceClassification(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=MAX_LENGTH,
            **label_config,
        )  # fmt: skip
    )

    def encode(samples):
        batch = tokenizer([s.text for s in samples], padding="max_length", truncation=True, max_length=MAX_LENGTH,
                          return_tensors="pt", return_token_type_ids=False)  # fmt: skip
        return dict(batch)

    fine_tune(text_model, minibatches(encode(train), targets["train"]), args.epochs)
    text_dir = args.out / "text"
    text_model.save_pretrained(text_dir)
    tokenizer.save_pretrained(text_dir)
    text_accuracy = accuracy(text_model, encode(val), targets["val"])

    # Image: a ViT with 8x8 patches.
    side = args.image_size
    processor = ViTImageProcessorPil(size={"height": side, "width": side}, image_mean=[0.5] * 3, image_std=[0.25] * 3)
    image_model = ViTForImageClassification(
        ViTConfig(
            image_size=side,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            **label_config,
        )  # fmt: skip
    )

    def pixels(samples):
        images = [load_image_rgb(s) for s in samples]
        return {"pixel_values": torch.from_numpy(np.asarray(processor(images)["pixel_values"], dtype=np.float32))}

    fine_tune(image_model, minibatches(pixels(train), targets["train"]), args.epochs)
    image_dir = args.out / "image"
    image_model.save_pretrained(image_dir)
    processor.save_pretrained(image_dir)
    image_accuracy = accuracy(image_model, pixels(val), targets["val"])

    summary = {"text_val_accuracy": text_accuracy, "image_val_accuracy": image_accuracy,
               "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))  # noqa: T201 - a script's result


if __name__ == "__main__":
    main()
