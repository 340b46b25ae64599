"""A user's experts are refused before any training, with a message that names the expert and says what is wrong."""

from __future__ import annotations

import textwrap

import pytest

from models.byo.loading import ExpertError, load_experts, parse_expert_options

LABELS = ["cat", "dog", "fox"]

EXPERTS_FILE = textwrap.dedent(
    """
    import torch
    from torch import nn
    from models.byo import Component, Expert, ImageSpec

    LABELS = ["cat", "dog", "fox"]


    class MeanColour(nn.Module):
        def __init__(self, classes):
            super().__init__()
            self.head = nn.Linear(3, classes)

        def forward(self, pixel_values):
            return self.head(pixel_values.mean((2, 3)))  # (B, K)


    def expert(labels=LABELS, inputs=None):
        return Expert(
            modalities=("image",),
            labels=labels,
            image=ImageSpec(8),
            components=[Component(MeanColour(len(labels)), inputs=inputs or {"pixel_values": "image"})],
        )


    def good():
        return expert()


    def reordered():
        return expert(labels=["fox", "cat", "dog"])


    def other_labels():
        return expert(labels=["cat", "dog", "wolf"])


    def wrong_inputs():
        return expert(inputs=("image",))  # forward takes pixel_values, not image


    def not_an_expert():
        return MeanColour(3)
    """
)


@pytest.fixture
def experts_dir(tmp_path, monkeypatch):
    (tmp_path / "user_experts.py").write_text(EXPERTS_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def load(*options: str):
    return load_experts(list(options), LABELS)


def test_good_experts_load_frozen_and_answer_in_the_datas_label_order(experts_dir):
    import torch

    good, reordered = load("a=user_experts:good", "b=user_experts:reordered")
    assert [good.name, reordered.name] == ["a", "b"]
    module = good.components["a.model"].module
    assert not any(p.requires_grad for p in module.parameters())
    # Expert b declares its columns as fox, cat, dog: its logits come back as cat, dog, fox.
    image_key = next(iter(reordered.specs))
    pixels = torch.randn(4, 3, 8, 8)
    raw = reordered.components["b.model"].module(pixel_values=pixels)
    assert torch.equal(reordered.run({f"image@{image_key}": pixels}), raw[:, [1, 2, 0]])


def test_labels_that_differ_from_the_datas_are_refused_naming_the_expert(experts_dir):
    with pytest.raises(ExpertError, match=r"^expert wolfish: its labels differ .*missing \['fox'\].*\['wolf'\]"):
        load("a=user_experts:good", "wolfish=user_experts:other_labels")


def test_declared_inputs_that_forward_does_not_take_are_refused(experts_dir):
    with pytest.raises(ExpertError) as refused:
        load("a=user_experts:good", "picky=user_experts:wrong_inputs")
    message = str(refused.value)
    assert message.startswith("expert picky, component model: it declares inputs ['image']")
    assert "MeanColour.forward takes (pixel_values)" in message
    assert "required but not declared: ['pixel_values']" in message


def test_a_factory_that_cannot_be_imported_is_refused(experts_dir):
    with pytest.raises(ExpertError, match=r"^expert ghost: cannot import module 'no_such_module' \(ModuleNotFound"):
        load("a=user_experts:good", "ghost=no_such_module:factory")
    with pytest.raises(ExpertError, match=r"^expert typo: module 'user_experts' has no 'godo'"):
        load("a=user_experts:good", "typo=user_experts:godo")
    with pytest.raises(ExpertError, match=r"^expert plain: .* returned a MeanColour, not a models.byo.Expert"):
        load("a=user_experts:good", "plain=user_experts:not_an_expert")


def test_one_expert_is_not_a_choice():
    with pytest.raises(ExpertError, match="at least two"):
        parse_expert_options(["a=user_experts:good"])


def test_experts_are_found_in_the_dynfuse_experts_entry_point_group(experts_dir):
    # What `pip install` of a package declaring [project.entry-points."dynfuse.experts"] leaves on sys.path.
    dist_info = experts_dir / "user_experts-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: user-experts\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[dynfuse.experts]\nshop_cam = user_experts:good\n")
    refs = parse_expert_options(["shop_cam", "b=user_experts:reordered"])
    found = (refs[0].name, refs[0].target, refs[0].origin)
    assert found == ("shop_cam", "user_experts:good", "entry point of user-experts")
    with pytest.raises(ExpertError, match=r"^expert nope: not in the 'dynfuse.experts' entry-point group \(installed: "
                       r"shop_cam\)"):  # fmt: skip
        parse_expert_options(["nope", "b=user_experts:reordered"])


def test_train_router_refuses_a_bad_expert_before_training(experts_dir, tmp_path, capsys):
    from models.data.synthetic import SynthConfig, generate
    from service.cli import main

    data = tmp_path / "data"
    generate(data, SynthConfig(size=60, seed=0, image_size=16, ood_size=0), progress=False)
    code = main(["train-router", "--expert", "a=user_experts:good", "--expert", "ghost=no_such_module:f",
                 "--data", str(data), "--out", str(tmp_path / "run"), "--quiet"])  # fmt: skip
    assert code == 1
    assert "dynfuse train-router: error: expert ghost: cannot import module 'no_such_module'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


BOTH_FILE = textwrap.dedent(
    """
    import torch
    from torch import nn
    from models.byo import Component, Expert, ImageSpec, TextSpec

    LABELS = ["cat", "dog", "fox"]


    class Words(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(16, 4)

        def forward(self, token_ids):
            return self.embedding(token_ids).mean(1)  # (B, 4)


    class Colour(nn.Module):
        def forward(self, pixel_values):
            return pixel_values.mean((2, 3))  # (B, 3)


    class Fusion(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(7, 3)

        def forward(self, words, colour):
            return self.head(torch.cat([words, colour], 1))


    def both(missing):
        return Expert(
            modalities=("text", "image"),
            labels=LABELS,
            image=ImageSpec(8),
            text=TextSpec(TOKENIZER, 6),
            components=[
                Component(Words(), inputs=("token_ids",), outputs=("words",), name="text"),
                Component(Colour(), inputs={"pixel_values": "image"}, outputs=("colour",), name="image"),
                Component(Fusion(), inputs=("words", "colour"), outputs=("logits",), name="fusion"),
            ],
            missing=missing,
        )


    def declared():
        return both({"text": {"words": 0.0}, "image": {"colour": [0.0, 0.0, 0.0]}})


    def undeclared():
        return both(None)


    def misnamed():
        return both({"text": {"token_ids": 0}, "image": {"colour": 0.0}})


    def misshapen():
        return both({"text": {"words": [0.0, 0.0]}, "image": {"colour": 0.0}})
    """
)


@pytest.fixture
def both_dir(tmp_path, monkeypatch):
    from models.tokenizer import Tokenizer

    tokenizer = tmp_path / "words.json"
    Tokenizer.build(["a cat", "a dog", "a fox"], max_tokens=6).save(tokenizer)
    (tmp_path / "two_modalities.py").write_text(BOTH_FILE.replace("TOKENIZER", repr(str(tokenizer))))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_a_two_modality_expert_without_its_missing_representation_is_refused_saying_what_to_declare(both_dir):
    with pytest.raises(ExpertError) as refused:
        load("a=two_modalities:declared", "b=two_modalities:undeclared")
    message = str(refused.value)
    assert message.startswith("expert b: it reads text and image")
    assert "its fusion part (fusion) reads from the text ['words'] and from the image ['colour']" in message
    assert "Expert(..., missing={'text': {'words': ...}, 'image': {'colour': ...}})" in message

    misnamed = r"^expert c: missing declares .*'token_ids'.*reads from the text \['words'\]"
    with pytest.raises(ExpertError, match=misnamed):
        load("a=two_modalities:declared", "c=two_modalities:misnamed")
    with pytest.raises(ExpertError, match=r"^expert d: missing\['text'\] gives 'words' a value of the wrong shape"):
        load("a=two_modalities:declared", "d=two_modalities:misshapen")


def test_a_declared_representation_is_kept_by_the_names_the_pipeline_uses(both_dir):
    first, _ = load("a=two_modalities:declared", "b=two_modalities:declared")
    assert first.missing() == {"text": {"a.text.words": 0.0}, "image": {"a.image.colour": [0.0, 0.0, 0.0]}}
    assert first.fusion_plan().components == ("a.fusion",)
