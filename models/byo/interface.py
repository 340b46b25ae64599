"""What a user writes: an ``Expert`` made of ``Component``s, with its modalities, preprocessing and labels.

A factory, a function of no arguments registered with ``--expert NAME=package.module:factory`` or in the
``dynfuse.experts`` entry-point group, returns one ``Expert``. Example (a Hugging Face text classifier)::

    def text_expert() -> Expert:
        model = BertForSequenceClassification.from_pretrained("models/bert")  # or a hub id, with internet
        return Expert(
            modalities=("text",),
            labels=[model.config.id2label[i] for i in range(model.config.num_labels)],
            text=TextSpec(tokenizer="models/bert/tokenizer.json", max_length=32),
            components=[Component(model, inputs=("input_ids", "attention_mask"), outputs=("logits",))],
        )

An expert that reads both modalities also declares how it sees a modality missing (``missing``): for each modality,
the value of every tensor its fusion part reads from that modality alone (the part from its first component that
reads both). dynfuse attributes each answer to the modalities by asking the expert what it answers with one of
them given that way (two-player Shapley values), so it must be what the expert was trained to see, or a value
that means "nothing" to it (zero logits: a uniform distribution). ``dynfuse train-router`` refuses a
two-modality expert without it, naming the tensors to declare::

    Expert(..., components=[text_part, image_part, fusion_part],
           missing={"text": {"text_logits": 0.0}, "image": {"image_logits": 0.0}})

A component's inputs are the spec tensors (``image`` from the image spec; ``input_ids`` and ``attention_mask``
from a Hugging Face tokenizer, ``token_ids`` from dynfuse's word tokenizer) and the outputs of the components
before it. Each module is called with keyword arguments, so a Hugging Face model is used as it is; it may return
a tensor, a tuple (outputs in order) or a mapping such as a ``ModelOutput`` (outputs picked by name). The last
component outputs ``logits``, one column per label in ``labels``' order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from models.specs import ImageSpec, TextSpec


@dataclass
class Component:
    module: nn.Module
    # Keyword arguments of the module's forward and the tensors they get: ("input_ids", "attention_mask") when
    # the names are the same, {"pixel_values": "image"} to give the image spec's tensor to `pixel_values`.
    inputs: Sequence[str] | Mapping[str, str]
    outputs: Sequence[str] = ("logits",)  # what it returns, in order (or the keys picked from a mapping)
    name: str = "model"  # unique within the expert; the exported file is <expert>.<name>.onnx

    def __post_init__(self) -> None:
        if isinstance(self.inputs, str) or isinstance(self.outputs, str):
            raise TypeError(f"component {self.name!r}: inputs and outputs are sequences of names, not one string")
        pairs = self.inputs.items() if isinstance(self.inputs, Mapping) else ((n, n) for n in self.inputs)
        self.arguments: dict[str, str] = dict(pairs)  # forward's keyword -> tensor name
        self.outputs = tuple(self.outputs)


@dataclass
class Expert:
    modalities: Sequence[str]  # what a request must carry for this expert to run: "text", "image" or both
    components: Sequence[Component]  # run in order; the last outputs "logits"
    labels: Sequence[str]  # the class of each logit column; the same set as the data's labels, in any order
    image: ImageSpec | None = None  # needed when a component reads "image"
    text: TextSpec | None = None  # needed when a component reads token ids
    description: str = ""  # shown in the run's summary
    # Two-modality experts: modality -> {tensor its fusion part reads from that modality alone: the value (a number,
    # or one sample's values as nested lists) that stands for the modality when it is missing}.
    missing: Mapping[str, Mapping[str, float | Sequence]] | None = None
    # Filled by the loader: the expert's name and where it came from (``module:factory``).
    name: str = field(default="", init=False)
    source: str = field(default="", init=False)

    def specs(self) -> list[ImageSpec | TextSpec]:
        return [s for s in (self.image, self.text) if s is not None]
