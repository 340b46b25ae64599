"""The experts of a trained dynfuse run, handed back as user experts.

What a user with a dynfuse run does to route over some of its experts with a router of their own; the benchmark
(bench/byo.py) uses it to check that the router-only path reproduces the built-in one over the same experts. An
expert that reads the text gets its own copy of the run's text encoder in front of its chain, since a user expert
brings everything it needs; the router keeps its own small text encoder, trained by ``dynfuse train-router``.

In a user's experts file::

    from models.byo.builtin import expert_from_run

    def late_fusion():
        return expert_from_run("build/default-model/run-default-s0-...", "late_fusion")
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from functools import lru_cache
from pathlib import Path

from models.byo.interface import Component, Expert
from models.specs import ImageSpec, TextSpec

TEXT_ENCODER_OUTPUTS = ("text_tokens", "text_features")


def expert_from_run(run_dir: str | Path, expert_name: str) -> Expert:
    """One expert of a ``dynfuse train`` run, with the run's own preprocessing (word tokenizer, image mean/std)."""
    from models.attribution import ABSENT
    from models.attribution_training import fusion_plans
    from models.training import rebuild_model

    checkpoint = _checkpoint(str(Path(run_dir).resolve()))
    model = rebuild_model(checkpoint)  # a model of its own per expert: experts share no module
    spec = model.expert(expert_name)
    components = model.components
    chain = list(spec.components)
    if {name for c in chain for name in components[c].input_names} & set(TEXT_ENCODER_OUTPUTS):
        chain.insert(0, "text_encoder")
    pre = checkpoint["preprocessing"]
    # A missing modality as the run's Stage I showed it to the expert: zeros where its fusion part reads it.
    plan = fusion_plans(model)[expert_name]
    missing = {m: dict.fromkeys(names, ABSENT) for m, names in plan.inputs.items()} if plan.reads_both else None
    return Expert(
        modalities=spec.modalities,
        labels=list(checkpoint["labels"]),
        image=ImageSpec(pre["image_size"], pre["mean"], pre["std"]) if "image" in spec.modalities else None,
        text=TextSpec(_word_tokenizer_file(checkpoint), model.config.max_tokens) if "text" in spec.modalities else None,
        components=[
            Component(components[c], inputs=components[c].input_names, outputs=components[c].output_names, name=c)
            for c in chain
        ],
        description=f"{expert_name} of the dynfuse run {Path(run_dir).name}",
        missing=missing,
    )


@lru_cache(maxsize=4)
def _checkpoint(run_dir: str) -> dict:
    """A run's checkpoint, read once however many of its experts are asked for."""
    from models.training import load_run

    return load_run(Path(run_dir))


def _word_tokenizer_file(checkpoint: dict) -> Path:
    """The run's word tokenizer as a file (a text spec is a file), named by its content so it is written once."""
    content = json.dumps(checkpoint["tokenizer"], indent=1) + "\n"
    digest = hashlib.sha256(content.encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"dynfuse-word-tokenizer-{digest}.json"
    if not path.is_file():
        path.write_text(content)
    return path
