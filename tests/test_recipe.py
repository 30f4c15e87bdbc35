"""recipes/default-model: the sentence grammar and the corpus plan behind the shipped default model."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from valle_cli.assets import sentences as shipped
from valle_cli.metrics import normalize_text

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "default-model"


def _module(name: str):
    sys.path.insert(0, str(RECIPE))
    try:
        spec = importlib.util.spec_from_file_location(name, RECIPE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and worker processes look modules up by name
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(RECIPE))


def key(text: str) -> str:
    return " ".join(normalize_text(text))


def test_sentences_are_varied_distinct_reproducible_and_never_held_out():
    grammar = _module("sentences")
    held_out = shipped("held-out")
    made = grammar.generate(3000, seed=0, exclude=set(held_out))
    assert len({key(s) for s in made}) == 3000
    assert not {key(s) for s in made} & {key(s) for s in held_out}
    assert grammar.generate(3000, seed=0, exclude=set(held_out)) == made
    assert grammar.generate(50, seed=1) != made[:50]
    # variety: questions and statements, many words, sentence lengths that make 1.5-5 s of speech
    assert sum(s.endswith("?") for s in made) > 300 and sum(s.endswith(".") for s in made) > 2000
    assert len({w for s in made for w in normalize_text(s)}) > 400
    lengths = [len(s.split()) for s in made]
    assert min(lengths) >= 4 and max(lengths) <= 20
    # an excluded sentence is never produced, even one the grammar makes
    banned = made[0].upper()
    assert key(made[0]) not in {key(s) for s in grammar.generate(3000, seed=0, exclude={banned})}
    assert grammar._plural("fox") == "foxes" and grammar._plural("pony") == "ponies"
    assert grammar._plural("wolf") == "wolves" and grammar._bare("hurries") == "hurry"


def test_corpus_plan_holds_out_the_evaluation_voice_and_sentences(tmp_path):
    from valle_cli.audio.speech import mbrola_voices

    corpus = _module("make_corpus")
    if not {"us1", "us2", "us3", "en1"} <= set(mbrola_voices()):
        pytest.skip("needs the mbrola us1, us2, us3 and en1 voices (scripts/install-system-deps.sh)")
    plan = corpus.jobs(tmp_path, scale=0.05)
    train = [j for j in plan if "voices" in j[4].parts]
    evaluation = [j for j in plan if "eval" in j[4].parts]
    held_out = {key(s) for s in shipped("held-out")}
    assert train and not any(key(text) in held_out for text, *_ in train)
    assert not any(voice == "mbrola:us2" for _, voice, *_ in train)
    assert len({j[4].parent for j in train}) >= 25  # speakers
    refs = [j for j in evaluation if "refs" in j[4].parts]
    assert len(refs) == 20 and {j[1] for j in refs} == {"mbrola:us2"}
    impostor_voices = {j[4].parent.name for j in evaluation if "impostors" in j[4].parts}
    assert impostor_voices == {j[4].parent.name for j in train}
    # what it writes is what `valle eval --texts --refs` reads: the ground truth is found for every sentence
    corpus.speak_all(refs[:2], workers=1)
    from valle_cli.eval.items import from_refs, read_texts

    items = from_refs(read_texts(tmp_path / "eval" / "texts.txt")[:2], tmp_path / "eval" / "refs")
    assert [it.truth.name for it in items] == ["00.wav", "01.wav"]
    assert all(it.prompt != it.truth for it in items)
