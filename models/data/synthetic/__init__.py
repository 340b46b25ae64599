"""The synthetic image+text benchmark the embedded default model is trained on (generator version 2).

Pictures of coloured shapes (3 colours x 4 shapes = 12 classes, labels like ``red_circle``) with captions. Routing
only means something if no one path, and no one modality, is always enough, so samples come in five kinds:

- ``text_sufficient``: one clean object, and a caption that names colour and shape: the text path is enough.
- ``image_needed``: one clean object and a vague caption (generic, or naming only the colour or only the shape):
  the picture decides, and a cheap look at it is usually enough.
- ``noisy_image``: a clear caption, but the picture is wrecked (channels permuted so colours lie, heavy noise,
  blur and/or an occluding block): the text is reliable, the image is not.
- ``image_decides``: a caption that says nothing, and a picture whose difficulty decides the path: one large clean
  object (``easy``: a low-resolution look is enough) or one small object among grey clutter (``hard``: only the
  full image encoder finds it). Here the image router is the decisive one.
- ``cross_modal``: two or three objects of different colours and shapes; the caption points at one of them, by
  position ("the object on the left") or by one attribute ("the red one", "the circle"), and the label is that
  object's class. Pooling each modality on its own (late fusion) loses where things are; experts in which text and
  image attend to each other do not.

Every split follows the mix; ``test_ood`` has the same pictures and mix with captions from a held-out family
(``captions.py``). The output is the manifest format of ``models.data.manifest`` (``train.jsonl``, ``val.jsonl``,
``test.jsonl``, ``test_ood.jsonl`` and ``img/``; each line also carries its ``kind`` and scene ``variant``) plus
``synth.json`` describing what was generated. Everything derives from the seed through per-sample random
generators, so the same seed and config give byte-identical files whatever order samples are made in. No torch
here: numpy and Pillow only.
"""

from models.data.synthetic.captions import (
    CLEAR_TEMPLATES,
    COLOUR_ONLY_TEMPLATES,
    COLOUR_QUERY_TEMPLATES,
    COLOUR_WORDS,
    GENERIC_CAPTIONS,
    NOISY_TEMPLATES,
    OOD_COLOUR_WORDS,
    OOD_SHAPE_WORDS,
    POSITION_TEMPLATES,
    SHAPE_ONLY_TEMPLATES,
    SHAPE_QUERY_TEMPLATES,
    SHAPE_WORDS,
    make_caption,
)
from models.data.synthetic.config import (
    COLOURS,
    DEFAULT_MIX,
    GENERATOR_VERSION,
    KINDS,
    LABELS,
    OOD_SPLIT,
    SHAPES,
    SPLITS,
    SynthConfig,
)
from models.data.synthetic.scenes import VARIANTS, render_image, variant_of
from models.data.synthetic.writer import OutputExistsError, generate, plan

__all__ = [
    "CLEAR_TEMPLATES",
    "COLOURS",
    "COLOUR_ONLY_TEMPLATES",
    "COLOUR_QUERY_TEMPLATES",
    "COLOUR_WORDS",
    "DEFAULT_MIX",
    "GENERATOR_VERSION",
    "GENERIC_CAPTIONS",
    "KINDS",
    "LABELS",
    "NOISY_TEMPLATES",
    "OOD_COLOUR_WORDS",
    "OOD_SHAPE_WORDS",
    "OOD_SPLIT",
    "POSITION_TEMPLATES",
    "SHAPES",
    "SHAPE_ONLY_TEMPLATES",
    "SHAPE_QUERY_TEMPLATES",
    "SHAPE_WORDS",
    "SPLITS",
    "VARIANTS",
    "OutputExistsError",
    "SynthConfig",
    "generate",
    "make_caption",
    "plan",
    "render_image",
    "variant_of",
]
