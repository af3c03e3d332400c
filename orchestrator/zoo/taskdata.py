"""Benchmark data of the demo tasks, drawn deterministically from the synthetic world.

``demo_mmlu``: one subject per relation; rows ``{"subject", "split", "question", "choices",
"answer"}`` in the format of lm-eval's ``mmlu_continuation`` (the question, then ``Answer:``,
each choice's text scored as the continuation). Per subject the entities are split into facts
the knowledge experts are fine-tuned on (``train_qa``, never in the benchmark), ``dev``
(few-shot), ``validation`` (search) and ``test`` (confirmation). Every fact is in the base's
pretraining as plain statements only; the benchmark asks facts no model was ever asked.

``demo_hellaswag``: rows ``{"split", "ctx", "endings", "label"}``: an actor doing the first
steps of a script, and four endings: the true next step and three steps of other scripts of
the closest character length (so ``acc_norm`` means something). ``train`` uses the training
actors, ``validation`` and ``test`` two held-out actors each.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from orchestrator.zoo.world import (SCRIPT_LEN, TEST_ACTORS, TRAIN_ACTORS, VALIDATION_ACTORS,
                                    World, build_world)

MMLU_SPLITS = (("train_qa", 60), ("dev", 5), ("validation", 30), ("test", 35))
HELLASWAG_SIZES = {"train": 800, "validation": 300, "test": 300}
DATA_FILES = ("demo_mmlu.jsonl", "demo_hellaswag.jsonl")


def _rng(*key: object) -> random.Random:
    """A generator seeded from a readable key (str seeds are stable across processes)."""
    return random.Random("/".join(str(k) for k in ("zoo", *key)))


def fact_split(world: World, relation: str, domain: str) -> dict[str, list[str]]:
    """Entities of one subject per split (``train_qa``, ``dev``, ``validation``, ``test``)."""
    entities = list(world.entities[domain])
    _rng("split", relation).shuffle(entities)
    out, start = {}, 0
    for split, size in MMLU_SPLITS:
        out[split] = sorted(entities[start:start + size])
        start += size
    return out


def mmlu_rows(world: World | None = None) -> list[dict]:
    """Benchmark rows of every demo_mmlu subject and split (``train_qa`` excluded)."""
    world = world or build_world()
    rows = []
    for domain, rel in world.relations():
        splits = fact_split(world, rel.name, domain)
        for split in ("dev", "validation", "test"):
            rng = _rng("mmlu", rel.name, split)
            for entity in splits[split]:
                gold = world.facts[(rel.name, entity)]
                others = sorted(v for v in rel.values if v != gold)
                choices = [gold, *rng.sample(others, 3)]
                rng.shuffle(choices)
                question = rng.choice(rel.questions)
                rows.append({"subject": rel.name, "split": split,
                             "question": question.format(e=entity),
                             "choices": choices, "answer": choices.index(gold)})
    return rows


def _distractors(world: World, script: int, gold: str, rng: random.Random) -> list[str]:
    """Three steps of other scripts whose length is closest to the gold step's."""
    pool = sorted({s.told() for i, steps in enumerate(world.scripts) if i != script for s in steps})
    pool.sort(key=lambda s: (abs(len(s) - len(gold)), s))
    return rng.sample(pool[:12], 3)


def hellaswag_rows(world: World | None = None) -> list[dict]:
    """Benchmark rows of demo_hellaswag for every split."""
    world = world or build_world()
    rows = []
    actors = {"train": TRAIN_ACTORS, "validation": VALIDATION_ACTORS, "test": TEST_ACTORS}
    for split, names in actors.items():
        rng = _rng("hellaswag", split)
        slots = [(a, s, j) for a in names for s in range(len(world.scripts))
                 for j in range(1, SCRIPT_LEN)]
        for actor, script, j in sorted(rng.sample(slots, HELLASWAG_SIZES[split])):
            steps = [s.told() for s in world.scripts[script]]
            endings = [steps[j], *_distractors(world, script, steps[j], rng)]
            rng.shuffle(endings)
            ctx = f"{actor} " + " , ".join(steps[:j]) + " ,"
            rows.append({"split": split, "ctx": ctx, "endings": endings,
                         "label": endings.index(steps[j])})
    return rows


def render_task_data() -> dict[str, bytes]:
    """The bytes of every data file (file name -> content), as committed."""
    def dump(rows: list[dict]) -> bytes:
        return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()
    return {"demo_mmlu.jsonl": dump(mmlu_rows()), "demo_hellaswag.jsonl": dump(hellaswag_rows())}


def write_task_data(data_dir: Path) -> list[str]:
    """Write the data files into ``data_dir`` where missing or different; return the names written."""
    data_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in render_task_data().items():
        path = data_dir / name
        if not path.exists() or path.read_bytes() != content:
            path.write_bytes(content)
            written.append(name)
    return written


def data_digest(data_dir: Path) -> str:
    """One sha256 over the data files (for the zoo manifest)."""
    digest = hashlib.sha256()
    for name in DATA_FILES:
        digest.update(name.encode() + b"\0" + (data_dir / name).read_bytes())
    return digest.hexdigest()
