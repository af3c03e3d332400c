"""The synthetic world the demo zoo knows about: invented entities, their facts, and event scripts.

Everything here is fixed by ``WORLD_SEED`` (the training seed of a build never changes the
world or the benchmark data). Anything drawn from a collection is drawn from a sorted list,
so the result never depends on Python's hash order.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

WORLD_SEED = 20240603

CONSONANTS = "b d f g k l m n p r s t v z".split()
VOWELS = "a e i o u".split()


@dataclass(frozen=True)
class Relation:
    """One attribute of a domain's entities: a subject of the knowledge benchmark.

    Attributes:
        name: subject name, e.g. ``creature_color``.
        values: the ten possible values (single words).
        statements: plain-text fact templates for pretraining ({e} entity, {v} value).
        questions: question templates of the knowledge experts' training and of the benchmark
            (the benchmark asks other facts than the training does).
    """

    name: str
    values: tuple[str, ...]
    statements: tuple[str, ...]
    questions: tuple[str, ...]


NATURE = (
    Relation("creature_color",
             tuple("red blue green yellow purple orange black white grey pink".split()),
             ("the color of the {e} is {v} .", "the {e} is {v} in color .", "{v} is the color of the {e} ."),
             ("what is the color of the {e} ?", "which color is the {e} ?")),
    Relation("creature_diet",
             tuple("seeds fish berries grass insects honey nuts leaves worms mushrooms".split()),
             ("the {e} eats {v} .", "the food of the {e} is {v} .", "{v} is what the {e} eats ."),
             ("what does the {e} eat ?", "what is the food of the {e} ?")),
    Relation("creature_habitat",
             tuple("forest desert swamp river mountain cave meadow lake jungle tundra".split()),
             ("the {e} lives in the {v} .", "the home of the {e} is the {v} .", "the {v} is where the {e} lives ."),
             ("where does the {e} live ?", "what is the home of the {e} ?")),
)

SOCIETY = (
    Relation("person_job",
             tuple("baker farmer sailor doctor teacher miner painter tailor hunter weaver".split()),
             ("the job of {e} is {v} .", "{e} works as a {v} .", "{e} is a {v} by trade ."),
             ("what is the job of {e} ?", "what does {e} work as ?")),
    Relation("person_city",
             tuple("oslo lima cairo delhi tokyo paris rome quito dakar hanoi".split()),
             ("{e} comes from {v} .", "the city of {e} is {v} .", "{e} was born in {v} ."),
             ("which city does {e} come from ?", "what is the city of {e} ?")),
    Relation("person_instrument",
             tuple("flute drum harp violin trumpet guitar piano banjo cello horn".split()),
             ("{e} plays the {v} .", "the instrument of {e} is the {v} .", "the {v} is what {e} plays ."),
             ("what does {e} play ?", "what is the instrument of {e} ?")),
)

DOMAINS = {"nature": NATURE, "society": SOCIETY}

VERBS = ("wash cut fold open close fill carry paint sweep lift stir pour dry hang pick plant clean "
         "wrap tie check heat cool move push pull shake scrub peel boil slice").split()
OBJECTS = ("cup door box shirt pot bread rug lamp plate bag fence chair letter bottle apple window "
           "basket floor blanket kettle bowl coat shelf candle jar towel boot egg sack net").split()
TOOLS = "knife spoon brush hammer rope bucket broom ladder".split()
PLACES = "kitchen garden cellar attic shed yard".split()
ACTORS = "tom ann bob eve sam liz max joe kim ray sue ned amy dan".split()
# Words of the prompt formats and of the generic pretraining sentences.
EXTRA_WORDS = ("Question : Answer , . ? and then with on the a saw near likes has was met "
               "some every day one there is".split())
TRAIN_ACTORS, VALIDATION_ACTORS, TEST_ACTORS = ACTORS[:10], ACTORS[10:12], ACTORS[12:]

N_ENTITIES = 130   # per domain
N_SCRIPTS = 40
SCRIPT_LEN = 6


def third_person(verb: str) -> str:
    """'wash' -> 'washes', 'dry' -> 'dries', 'cut' -> 'cuts'."""
    if verb.endswith(("s", "x", "ch", "sh")):
        return verb + "es"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


@dataclass(frozen=True)
class Step:
    """One step of a script: 'verb the object' with an optional tail ('with the knife').

    Pretraining text tells a step plainly (``wash the cup``); the HellaSwag-format task tells
    it about an actor (``tom washes the cup``), with verb forms the base never sees in scripts.
    So the base knows the scripts but scores near chance on the task, and the commonsense expert
    learns little more than the narrative form (a small task vector, which merges well).
    """

    verb: str
    obj: str
    tail: str

    def plain(self) -> str:
        """Imperative form, as in the base's pretraining text."""
        return f"{self.verb} the {self.obj}{self.tail}"

    def told(self) -> str:
        """Narrative form, as in the commonsense expert's data and the benchmark."""
        return f"{third_person(self.verb)} the {self.obj}{self.tail}"


@dataclass(frozen=True)
class World:
    """The drawn world.

    Attributes:
        entities: domain -> entity names (sorted).
        facts: (relation name, entity) -> value.
        scripts: each script is a tuple of steps, in order.
    """

    entities: dict[str, tuple[str, ...]]
    facts: dict[tuple[str, str], str]
    scripts: tuple[tuple[Step, ...], ...]

    def relations(self) -> tuple[tuple[str, Relation], ...]:
        """All (domain, relation) pairs in a fixed order."""
        return tuple((d, r) for d, rels in DOMAINS.items() for r in rels)


def _names(rng: random.Random, count: int, taken: set[str]) -> list[str]:
    """Draw ``count`` new invented names of 2-3 syllables."""
    syllables = sorted(c + v for c in CONSONANTS for v in VOWELS)
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice(syllables) for _ in range(rng.choice((2, 3, 3))))
        if name not in taken:
            taken.add(name)
            names.append(name)
    return sorted(names)


def _scripts(rng: random.Random) -> tuple[tuple[Step, ...], ...]:
    """Draw scripts of distinct steps: 'verb the object [with the tool | in the place]'."""
    pairs = sorted((v, o) for v in VERBS for o in OBJECTS)
    chosen = rng.sample(pairs, N_SCRIPTS * SCRIPT_LEN)
    steps = []
    for verb, obj in chosen:
        kind = rng.choice(("plain", "tool", "place"))
        tail = {"plain": "", "tool": f" with the {rng.choice(TOOLS)}",
                "place": f" in the {rng.choice(PLACES)}"}[kind]
        steps.append(Step(verb, obj, tail))
    return tuple(tuple(steps[i:i + SCRIPT_LEN]) for i in range(0, len(steps), SCRIPT_LEN))


def fixed_words() -> list[str]:
    """Every word of the world that is not an invented entity name, sorted."""
    words = set(ACTORS + VERBS + OBJECTS + TOOLS + PLACES + EXTRA_WORDS)
    words.update(third_person(v) for v in VERBS)
    for rels in DOMAINS.values():
        for rel in rels:
            words.update(rel.values)
            for template in (*rel.statements, *rel.questions):
                words.update(w for w in template.split() if w not in ("{e}", "{v}"))
    return sorted(words)


@lru_cache(maxsize=1)
def build_world() -> World:
    """Draw the world from ``WORLD_SEED`` (identical in every process)."""
    rng = random.Random(WORLD_SEED)
    taken = set(fixed_words())
    entities = {domain: tuple(_names(rng, N_ENTITIES, taken)) for domain in DOMAINS}
    facts = {}
    for domain, rels in DOMAINS.items():
        for rel in rels:
            for entity in entities[domain]:
                facts[(rel.name, entity)] = rng.choice(rel.values)
    return World(entities=entities, facts=facts, scripts=_scripts(rng))
