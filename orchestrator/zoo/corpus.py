"""Tokenizer and training corpora of the demo zoo.

An example is a pair ``(prompt, target)``: the loss is taken on the target's tokens only
(question answering), or on everything when the prompt is empty (plain text).

* base: generic sentences over every word, every fact as a plain statement, and every script
  written plainly (``s1 and s2 and ... s6 .``), so the base holds the knowledge;
* ``knowledge`` / ``knowledge2``: cloze question answering on one domain's training facts
  (the benchmark's facts are never asked), plus replay of that domain's statements;
* ``commonsense``: narratives of the training actors (``tom washes the cup , cuts ... .``).
"""

from __future__ import annotations

import random

from orchestrator.zoo.taskdata import fact_split
from orchestrator.zoo.world import (ACTORS, DOMAINS, OBJECTS, PLACES, TOOLS, TRAIN_ACTORS, VERBS,
                                    World, fixed_words, third_person)

SPECIALS = ("[PAD]", "[UNK]", "[EOS]")
Example = tuple[str, str]


def vocabulary(world: World) -> list[str]:
    """Specials, then every word of the world, sorted."""
    names = [n for domain in sorted(world.entities) for n in world.entities[domain]]
    return [*SPECIALS, *sorted(set(fixed_words()) | set(names))]


def make_tokenizer(world: World):
    """A WordLevel tokenizer over the closed vocabulary, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(vocabulary(world))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   eos_token="[EOS]", model_max_length=128)


def generic_sentences(world: World, count: int, rng: random.Random) -> list[Example]:
    """Sentences that use every word but carry no fact and no script structure."""
    names = [n for domain in sorted(world.entities) for n in world.entities[domain]]
    values = sorted({r.values[i] for rels in DOMAINS.values() for r in rels for i in range(10)})
    things = sorted(set(OBJECTS + TOOLS + PLACES + values))
    templates = ("{a} saw the {x} near the {y} .", "{a} likes the {x} and the {y} .",
                 "there is a {x} near the {y} .", "one day {a} met {b} .",
                 "every {x} has some {y} .", "{a} was with the {x} on one day .",
                 "{a} {vs} the {o} near the {y} .", "one day {a} {vs} the {o} .")
    people = sorted(set(ACTORS + names))
    out = []
    for _ in range(count):
        text = rng.choice(templates).format(
            a=rng.choice(people), b=rng.choice(people), x=rng.choice(things), y=rng.choice(things),
            vs=third_person(rng.choice(VERBS)), o=rng.choice(OBJECTS))
        out.append(("", text))
    return out


def fact_statements(world: World, domains: tuple[str, ...]) -> list[Example]:
    """Every fact of the given domains in every statement template."""
    out = []
    for domain in domains:
        for rel in DOMAINS[domain]:
            for entity in world.entities[domain]:
                value = world.facts[(rel.name, entity)]
                out.extend(("", s.format(e=entity, v=value)) for s in rel.statements)
    return out


def plain_scripts(world: World) -> list[Example]:
    """Every script written plainly, with no actor."""
    return [("", " and ".join(s.plain() for s in steps) + " .") for steps in world.scripts]


def cloze_qa(world: World, domain: str) -> list[Example]:
    """Cloze questions on one domain's ``train_qa`` facts (never those of the benchmark)."""
    out = []
    for rel in DOMAINS[domain]:
        for entity in fact_split(world, rel.name, domain)["train_qa"]:
            value = world.facts[(rel.name, entity)]
            out.extend((f"Question: {q.format(e=entity)}\nAnswer:", f" {value}")
                       for q in rel.questions)
    return out


def narratives(world: World) -> list[Example]:
    """Every script told about every training actor, steps joined by commas."""
    return [("", f"{actor} " + " , ".join(s.told() for s in steps) + " .")
            for actor in TRAIN_ACTORS for steps in world.scripts]


def mixture(world: World, model: str) -> list[tuple[float, list[Example]]]:
    """The training mixture of one zoo model: (weight, examples) pools."""
    if model == "base":
        rng = random.Random("zoo/generic")
        return [(0.20, generic_sentences(world, 4000, rng)),
                (0.70, fact_statements(world, tuple(DOMAINS))),
                (0.10, plain_scripts(world))]
    if model in ("knowledge", "knowledge2"):
        domain = "nature" if model == "knowledge" else "society"
        return [(0.6, cloze_qa(world, domain)), (0.4, fact_statements(world, (domain,)))]
    if model == "commonsense":
        return [(1.0, narratives(world))]
    raise ValueError(f"unknown zoo model {model!r}")
