"""Varied English sentences for the default model's corpus, generated from a small grammar.

Deterministic for a seed, no duplicates, and never one of valle's held-out sentences (those are what
`valle eval` measures the shipped model on). The grammar mixes statements, questions, requests, reported
speech, numbers and names, so the corpus covers English phonemes and sentence melodies rather than one
pattern. Imported by make_corpus.py and by the tests.
"""

from __future__ import annotations

import random


def _words(text: str, sep: str | None = None) -> list[str]:
    return text.split(sep)


NAMES = _words(
    "Anna Ben Clara David Emma Frank Grace Henry Iris Jack Kate Leo Maria Nathan Olivia Peter Quinn Rachel "
    "Samuel Tara Victor Wendy Yusuf Zoe Martha Oscar Lucy George Helen Arthur Nora Felix Ruth Hugo Alice "
    "Walter Ivy Dennis Rosa Tom"
)
NOUNS = _words(
    "apple anchor bicycle blanket bottle bridge bucket cabin camera candle carpet castle chair cloud coat "
    "compass cottage cup desk doctor dog door dragon drum engine farmer feather fence field fisherman flag "
    "flower forest fox garden gate giant guitar hammer harbor hat hill horse island jacket kettle key "
    "kitchen ladder lamp lantern letter library lion map market mirror monkey mountain needle newspaper "
    "orange owl painter parcel pencil piano pillow pilot pocket pony potato puppet rabbit radio river road "
    "robot rope sailor scarf school shadow sheep shell shoe singer soldier spoon station stone storm "
    "student sweater table teacher telescope tent ticket tiger towel tower tractor train tree trumpet "
    "tunnel turtle umbrella valley village violin wagon wall whale wheel window wizard wolf engineer "
    "nurse judge baker butcher clock basket oven boat"
)
MASS = _words(
    "bread butter coffee milk rice sand snow soup sugar tea water honey cheese paper music silence thunder "
    "laughter smoke rain"
)
ADJECTIVES = _words(
    "ancient angry bright broken busy careful cheerful clever cold crooked curious dark dusty eager empty "
    "enormous famous fierce fragile friendly gentle golden green grumpy happy heavy hollow honest huge "
    "hungry icy little lonely loud lucky narrow nervous noisy old patient polite proud purple quiet rapid "
    "red rough round rusty sad shiny silent silver sleepy slow small smooth soft strange strong tall "
    "tiny tired ugly warm wet wide wild wooden yellow young"
)
# (present, past) of verbs that take an object
TRANSITIVE = [
    tuple(p.replace("_", " ").split("/"))
    for p in _words(
        "carry/carried catch/caught clean/cleaned climb/climbed cover/covered draw/drew drop/dropped "
        "fix/fixed follow/followed find/found hide/hid hold/held kick/kicked lift/lifted move/moved open/opened "
        "paint/painted pick_up/picked_up pull/pulled push/pushed sell/sold send/sent shake/shook "
        "borrow/borrowed buy/bought bring/brought build/built chase/chased check/checked choose/chose "
        "wash/washed watch/watched wrap/wrapped forget/forgot steal/stole throw/threw touch/touched "
        "visit/visited mend/mended measure/measured polish/polished greet/greeted notice/noticed "
        "describe/described remember/remembered ignore/ignored admire/admired answer/answered "
        "pack/packed unlock/unlocked"
    )
]
# (present third person, past) of verbs without an object
INTRANSITIVE = [
    tuple(p.replace("_", " ").split("/"))
    for p in _words(
        "laughs/laughed sleeps/slept waits/waited sings/sang dances/danced runs/ran shouts/shouted "
        "whispers/whispered smiles/smiled falls/fell wakes_up/woke_up disappears/disappeared "
        "arrives/arrived trembles/trembled shines/shone rests/rested listens/listened hurries/hurried "
        "wanders/wandered works/worked cries/cried"
    )
]
PLACES = _words(
    "behind the barn|across the bridge|near the station|under the old oak tree|inside the kitchen|on the "
    "roof|at the market|by the river|in the garden|through the forest|along the beach|over the hill|into "
    "the cellar|outside the school|next to the library|at the top of the stairs|beside the fireplace|in "
    "the middle of the road|on the far side of the lake|at the edge of the village|down the narrow "
    "street|in the back of the truck|under the kitchen table|around the corner",
    "|",
)
TIMES = _words(
    "yesterday|this morning|last night|every Sunday|after lunch|before dawn|at midnight|in the "
    "afternoon|on Tuesday|in the spring|a week ago|during the storm|just before dinner|once a "
    "year|at the weekend|later that evening|early on Friday|in the winter|two days ago|at noon",
    "|",
)
ADVERBS = _words(
    "slowly quickly quietly carefully suddenly happily gently loudly proudly nervously calmly eagerly "
    "patiently bravely softly angrily politely secretly"
)
NUMBERS = _words(
    "two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|fifteen|twenty|thirty|forty|fifty|a hundred",
    "|",
)
SAYING_VERBS = _words("said|told us|explained|whispered|insisted|promised|admitted|complained|announced", "|")


HABITS = _words("every day|every morning|on Sundays|at night|most evenings|now and then|in the summer", "|")
IRREGULAR_PLURALS = {"wolf": "wolves", "sheep": "sheep", "potato": "potatoes", "shelf": "shelves"}


def _plural(noun: str) -> str:
    if noun in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[noun]
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _np(r: random.Random, definite: bool | None = None) -> str:
    noun = r.choice(NOUNS)
    if r.random() < 0.55:
        noun = f"{r.choice(ADJECTIVES)} {noun}"
    if definite is None:
        definite = r.random() < 0.6
    return f"the {noun}" if definite else _article(noun)


def _subject(r: random.Random) -> str:
    return r.choice(NAMES) if r.random() < 0.35 else _np(r, definite=True)


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _templates(r: random.Random) -> str:
    kind = r.randrange(16)
    tv, tv_past = r.choice(TRANSITIVE)
    iv, iv_past = r.choice(INTRANSITIVE)
    if kind == 0:
        return f"{_cap(_subject(r))} {tv_past} {_np(r)} {r.choice(PLACES)}."
    if kind == 1:
        return f"{_cap(r.choice(TIMES))}, {_subject(r)} {tv_past} {_np(r)}."
    if kind == 2:
        return f"{_cap(_subject(r))} {r.choice(ADVERBS)} {iv_past} {r.choice(PLACES)}."
    if kind == 3:
        return f"Did {_subject(r)} really {tv} {_np(r)} {r.choice(TIMES)}?"
    if kind == 4:
        return f"Please {tv} {_np(r, True)} before {r.choice(NAMES)} comes home."
    if kind == 5:
        return f"{r.choice(NAMES)} {r.choice(SAYING_VERBS)} that {_np(r, True)} {iv_past} {r.choice(TIMES)}."
    if kind == 6:
        return f"There were {r.choice(NUMBERS)} {_plural(r.choice(NOUNS))} {r.choice(PLACES)}."
    if kind == 7:
        return f"Why does {_np(r, True)} always {_bare(iv)} {r.choice(PLACES)}?"
    if kind == 8:
        return f"If it rains {r.choice(TIMES)}, we will {tv} {_np(r, True)} instead."
    if kind == 9:
        return f"{_cap(_np(r, True))} looked {r.choice(ADJECTIVES)}, and {_np(r, True)} seemed {r.choice(ADJECTIVES)}."
    if kind == 10:
        return f"How many {_plural(r.choice(NOUNS))} did {r.choice(NAMES)} {tv} {r.choice(TIMES)}?"
    if kind == 11:
        return f"We need {r.choice(NUMBERS)} cups of {r.choice(MASS)} and {_article(r.choice(NOUNS))}."
    if kind == 12:
        return f"{_cap(_subject(r))} {iv_past} while {_subject(r)} {tv_past} {_np(r, True)}."
    if kind == 13:
        return (
            f"Nobody knew where {_np(r, True)} had gone, so {r.choice(NAMES)} {r.choice(ADVERBS)} {iv_past}."
        )
    if kind == 14:
        return f"{_cap(_np(r, True))} {iv} {r.choice(PLACES)} {r.choice(HABITS)}."
    return f"Is {_np(r, True)} still {r.choice(PLACES)}, or did {r.choice(NAMES)} {tv} it?"


def _bare(third_person: str) -> str:
    """'hurries' -> 'hurry', 'wakes up' -> 'wake up', 'dances' -> 'dance'."""
    verb, _, rest = third_person.partition(" ")
    if verb.endswith("ies"):
        verb = verb[:-3] + "y"
    elif verb.endswith(("shes", "ches", "sses")):
        verb = verb[:-2]
    elif verb.endswith("s"):
        verb = verb[:-1]
    return f"{verb} {rest}".strip()


def generate(n: int, seed: int = 0, exclude: set[str] | None = None) -> list[str]:
    """`n` distinct sentences, none in `exclude` (compared case- and punctuation-insensitively)."""
    from valle_cli.metrics import normalize_text

    r = random.Random(seed)
    banned = {" ".join(normalize_text(s)) for s in (exclude or ())}
    seen: set[str] = set()
    out: list[str] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n:
            raise RuntimeError(f"the grammar cannot make {n} distinct sentences")
        s = _templates(r)
        key = " ".join(normalize_text(s))
        if key in seen or key in banned:
            continue
        seen.add(key)
        out.append(s)
    return out
