"""The bad input catalogue: every mistake gives one clear line, exit 2, before the first trial.

Each row is a ``python -m orchestrator sweep ...`` subprocess with one thing wrong (a config,
a search space, a model folder, a task, a storage or tracking URL). All rows run at once in a
small thread pool (module fixture); each test then checks its row: exit code 2, exactly one
line on stderr starting ``error:`` and naming the problem, no traceback, and nothing left
behind (the case folder unchanged but for lock files, no trial in any storage).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import pg

pytestmark = pytest.mark.slow

WRONG_PASSWORD = "Wr0ng-pa55-xyz"


@dataclass(frozen=True)
class Case:
    """One bad input: overrides (``{zoo}``, ``{case}``, ``{spaces}`` ... filled in) and the expected words."""

    id: str
    overrides: tuple[str, ...]
    expect: str
    spaces: dict[str, str] = field(default_factory=dict)
    needs_pg: bool = False


SPACE_TIES = "method: ties\nper_model:\n  weight: {low: 0.1, high: 1.0}\n  density: {low: 0.1, high: 1.0}\n"
CASES = [
    # --- configs and command line
    Case("bad override syntax", ("study.name=[oops",), "bad config override"),
    Case("unknown config group option", ("method=nosuch",), "Could not find 'method/nosuch'"),
    Case("unknown config key", ("study.n_trail=5",), "unknown key study.n_trail; did you mean study.n_trials?"),
    Case("unknown config key with +", ("+study.n_trail=5",), "did you mean study.n_trials?"),
    Case("wrong value type", ("study.n_trials=many",), "study.n_trials"),
    Case("negative n_trials", ("study.n_trials=-3",), "study.n_trials must be >= 0"),
    Case("unknown sampler", ("study.sampler.name=annealing",), "unknown sampler 'annealing'"),
    Case("unknown pruner", ("study.pruner.name=hyperband",), "unknown pruner 'hyperband'"),
    Case("grid over several methods", ("study.sampler.name=grid", "study.compare=free"), "searches one method's grid"),
    Case("cmaes choosing the method", ("study.sampler.name=cmaes", "study.compare=free"), "at random"),
    Case("unknown sampler option", ("study.sampler.n_startup=3",), "did you mean study.sampler.n_startup_trials?"),
    Case("bad compare mode", ("study.compare=equal",), "study.compare must be 'fair' or 'free'"),
    Case("rungs not increasing", ("eval.rungs=[60,20]",), "strictly increasing"),
    Case("rungs past the split", ("eval.rungs=[100,200,300]",), "every rung must evaluate more items"),
    Case("zero confirm seeds", ("eval.confirm_seeds=0",), "eval.confirm_seeds must be >= 1"),
    Case("multirun", ("-m", "method=ties,linear"), "no Hydra multirun"),
    Case("heartbeat of zero", ("study.heartbeat_s=0",), "study.heartbeat_s must be"),
    Case("unwritable runs dir", ("runs_dir={case}/a_file/runs",), "cannot create runs folder"),
    # --- search spaces
    Case("empty search space", ("method.methods=[ties]", "method.spaces_dir={spaces}"), "is empty",
         spaces={"ties": "method: ties\nfixed:\n  weight: 1.0\n"}),
    Case("space key not a parameter", ("method.methods=[ties]", "method.spaces_dir={spaces}"),
         "'densty' is not a per-model parameter", spaces={"ties": SPACE_TIES.replace("density", "densty")}),
    Case("weights sum to zero with normalize", ("method.methods=[linear]", "method.spaces_dir={spaces}"),
         "sum to zero", spaces={"linear": "method: linear\nper_model:\n  weight: {low: 0.0, high: 0.0}\n"
                                          "fixed:\n  normalize: true\n"}),
    Case("range outside the method's bounds", ("method.methods=[ties]", "method.spaces_dir={spaces}"),
         "invalid for method 'ties'", spaces={"ties": SPACE_TIES.replace("high: 1.0}\n", "high: 1.5}\n")}),
    Case("unknown merge method", ("method.methods=[frobnicate]",), "frobnicate"),
    Case("slerp with three models", ("method=slerp", "+candidates.models.knowledge2={zoo}/knowledge2"),
         "method 'slerp' merges"),
    # --- models
    Case("missing model folder", ("candidates.models.knowledge={case}/nowhere",), "candidates.models.knowledge"),
    Case("different architectures", ("candidates.models.knowledge={zoo}/arch",), "different layer counts"),
    Case("mismatched vocabularies", ("candidates.models.knowledge={zoo}/vocab",), "vocab size mismatch"),
    Case("corrupt safetensors", ("candidates.models.knowledge={zoo}/corrupt",), "corrupt or truncated"),
    Case("truncated safetensors", ("candidates.models.knowledge={zoo}/truncated",), "corrupt or truncated"),
    Case("missing tokenizer", ("candidates.base={zoo}/notok",), "has no tokenizer"),
    Case("pickle weights without allow_pickle", ("candidates.models.knowledge={zoo}/pickle",),
         "candidates.allow_pickle=true"),
    Case("not a model folder", ("candidates.models.knowledge={zoo}/noconfig",), "not a model folder"),
    # --- LoRA adapters as candidates
    Case("adapter without a base", ("candidates.base=null", "candidates.models.knowledge={zoo}/adapter"),
         "is a LoRA adapter; set candidates.base"),
    Case("adapter of another base", ("method=adapters", "candidates.models.knowledge={zoo}/wide_adapter"),
         "wide_adapter"),
    Case("DoRA adapter", ("candidates.models.knowledge={zoo}/dora",), "uses DoRA"),
    # --- tasks
    Case("unknown task", ("eval.tasks=[{name: nosuch_task}]",), "unknown lm-eval task 'nosuch_task'"),
    Case("dataset not available offline", ("eval.tasks=[{name: hellaswag, metric: acc_norm}]",),
         "not available locally"),
    Case("no rungs", ("eval.rungs=[]",), "rungs"),
    Case("unknown device", ("eval.device=abacus",), "abacus"),
    # --- storage and tracking
    Case("unreachable database", ("study.storage=postgresql+psycopg2://postgres@127.0.0.1:{closed}/optuna",),
         "cannot open study storage"),
    Case("database does not exist", ("study.storage={pg_nodb}",), "does not exist", needs_pg=True),
    Case("wrong database password", ("study.storage={pg_badpw}",), "password authentication failed",
         needs_pg=True),
    Case("storage is not a URL", ("study.storage=optuna-db",), "is not a URL"),
    Case("unknown database dialect", ("study.storage=nosuchdb://host/x",), "cannot open study storage"),
    Case("sqlite folder missing", ("study.storage=sqlite:///{case}/nowhere/o.db",), "folder does not exist"),
    Case("journal folder missing", ("study.storage=journal://{case}/nowhere/j.log",), "folder does not exist"),
    Case("unreachable tracking server", ("tracking.uri=http://127.0.0.1:{closed}",), "cannot reach MLflow"),
    Case("study exists with other objectives", ("study.multi_objective=true",), "already exists with 1 objective"),
]


# ----------------------------------------------------------------------------- broken models


def _variants(zoo: Path) -> None:
    """Broken copies of the knowledge expert (and a base without tokenizer) next to the good ones."""
    import torch
    from safetensors.torch import load_file, save_file

    def variant(name: str, fix) -> None:
        shutil.copytree(zoo / "knowledge", zoo / name)
        fix(zoo / name)

    def weights(d: Path, edit) -> None:
        tensors = edit(load_file(d / "model.safetensors"))
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})

    def config(d: Path, **updates) -> None:
        (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()), **updates}))

    def truncate(d: Path) -> None:
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) // 2])

    variant("corrupt", lambda d: (d / "model.safetensors").write_bytes(b"not a safetensors file" * 50))
    variant("truncated", truncate)
    variant("arch", lambda d: (weights(d, lambda t: {k: v for k, v in t.items() if "layers.1." not in k}),
                               config(d, num_hidden_layers=1)))
    variant("vocab", lambda d: (weights(d, lambda t: {**t, "model.embed_tokens.weight": torch.cat(
        [t["model.embed_tokens.weight"], torch.zeros(8, t["model.embed_tokens.weight"].shape[1])])}),
        config(d, vocab_size=json.loads((d / "config.json").read_text())["vocab_size"] + 8)))
    variant("pickle", lambda d: (torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin"),
                                 (d / "model.safetensors").unlink()))
    variant("noconfig", lambda d: (d / "config.json").unlink())
    shutil.copytree(zoo / "base", zoo / "notok")
    _adapters(zoo)


def _adapters(zoo: Path) -> None:
    """A LoRA adapter on the base, a DoRA copy of it, and one made for a model of another width."""
    from tests.tiny import make_adapter
    from tests.tiny import make_tiny_llama

    targets = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    make_adapter(zoo / "base", zoo / "adapter", seed=1, **targets)
    shutil.copytree(zoo / "adapter", zoo / "dora")
    config = json.loads((zoo / "dora" / "adapter_config.json").read_text())
    (zoo / "dora" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    make_adapter(make_tiny_llama(zoo / "narrow", seed=3, hidden=16), zoo / "wide_adapter", seed=2, **targets)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (zoo / "notok" / name).unlink()


# ----------------------------------------------------------------------------- running the table


def _prepare(case: Case, root: Path, zoo: Path, fill: dict[str, str]) -> tuple[Path, list[str]]:
    folder = root / "".join(c if c.isalnum() else "_" for c in case.id)
    folder.mkdir()
    (folder / "a_file").write_text("a file, not a folder\n")
    if case.spaces:
        (folder / "spaces").mkdir()
        for name, text in case.spaces.items():
            (folder / "spaces" / f"{name}.yaml").write_text(text)
    if case.id == "study exists with other objectives":
        import optuna

        (folder / "runs").mkdir()
        optuna.create_study(study_name="debug", storage=f"sqlite:///{folder / 'runs' / 'optuna.db'}")
    values = {**fill, "zoo": str(zoo), "case": str(folder), "spaces": str(folder / "spaces")}
    args = ["experiment=debug", f"runs_dir={folder / 'runs'}", "candidates.zoo=null",
            f"candidates.base={zoo / 'base'}", f"candidates.models.knowledge={zoo / 'knowledge'}",
            f"candidates.models.commonsense={zoo / 'commonsense'}", "eval.threads=1"]
    return folder, args + [_fill(o, values) for o in case.overrides]


def _fill(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if not p.name.endswith(".mo-lock")}


def _run(folder: Path, args: list[str]) -> dict:
    before, start = _listing(folder), time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "sweep", *args], capture_output=True,
                          text=True, timeout=300)
    return {"rc": proc.returncode, "stderr": proc.stderr, "stdout": proc.stdout, "args": args,
            "new": sorted(_listing(folder) - before), "folder": folder, "seconds": time.perf_counter() - start}


@pytest.fixture(scope="module")
def results(micro_zoo, tmp_path_factory):
    """Every case run once, three at a time (the slow ones first)."""
    zoo = tmp_path_factory.mktemp("bad_zoo") / "zoo"
    shutil.copytree(micro_zoo, zoo)
    _variants(zoo)
    root = tmp_path_factory.mktemp("cases")
    with ExitStack() as stack:
        cluster = stack.enter_context(pg.postgres_server(dbnames=("exists",), password="Right-pa55")) \
            if pg.available() else None
        fill = {"closed": str(pg.free_port())}
        if cluster:
            fill.update(pg_nodb=cluster.url("no_such_db"),
                        pg_badpw=cluster.url("exists").replace("Right-pa55", WRONG_PASSWORD))
        cases = [case for case in CASES if cluster or not case.needs_pg]
        jobs = [(case, *_prepare(case, root, zoo, fill)) for case in cases]
        jobs.sort(key=lambda job: "task" not in job[0].id)  # the unknown-task search is slowest
        with ThreadPoolExecutor(max_workers=3) as pool:
            futures = {case.id: pool.submit(_run, folder, args) for case, folder, args in jobs}
            out = {name: future.result() for name, future in futures.items()}
        out["_pg_tables"] = _tables(cluster) if cluster else None
    return out


def _tables(cluster) -> int:
    import sqlalchemy

    engine = sqlalchemy.create_engine(cluster.admin_url("exists"))
    with engine.connect() as conn:
        query = "select count(*) from information_schema.tables where table_schema = 'public'"
        return conn.execute(sqlalchemy.text(query)).scalar()


# ----------------------------------------------------------------------------- the checks


def test_catalogue_is_large_and_covers_every_area():
    assert len(CASES) >= 20 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_in_one_line_before_the_first_trial(results, case):
    if case.id not in results:
        pytest.skip("PostgreSQL is not installed")
    r = results[case.id]
    lines = r["stderr"].strip().splitlines()
    assert r["rc"] == 2, (r["args"], r["stderr"][-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), r["stderr"][-2000:]
    assert case.expect in lines[0], lines[0]
    assert "Traceback" not in r["stderr"] + r["stdout"]
    assert WRONG_PASSWORD not in r["stderr"] + r["stdout"]
    assert r["new"] == [], f"left behind: {r['new']}"
    study_db = r["folder"] / "runs" / "optuna.db"
    if study_db.exists():  # only the pre-existing study of one case
        import optuna

        assert optuna.load_study(study_name="debug", storage=f"sqlite:///{study_db}").trials == []


def test_no_tables_were_created_in_a_database_we_could_not_log_into(results):
    if results["_pg_tables"] is None:
        pytest.skip("PostgreSQL is not installed")
    assert results["_pg_tables"] == 0


# ----------------------------------------------------------------------------- small units


@pytest.mark.parametrize("text,secret", [
    ("postgresql+psycopg2://mo:S3cret@127.0.0.1:5432/optuna", "S3cret"),
    ("study.storage=postgresql://u:p4ss@h/db tracking.uri=http://a:b0b@h:5000", "p4ss"),
    ("http://a:b0b@h:5000/x", "b0b"),
    ("host=h dbname=d password=hunter2 user=u", "hunter2"),
    ("postgresql://u@h/db?password=qwerty&sslmode=require", "qwerty"),
])
def test_redact_masks_passwords_in_urls_and_free_text(text, secret):
    from orchestrator.errors import redact_text

    assert secret not in redact_text(text) and "***" in redact_text(text)


def test_redact_leaves_urls_without_passwords_alone():
    from orchestrator.errors import redact_text

    for text in ("sqlite:////tmp/x/optuna.db", "http://127.0.0.1:5000/a@b", "journal:///shared/s.log"):
        assert redact_text(text) == text


def test_cfg_printout_masks_the_password(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "sweep", "--cfg",
                           "study.storage=postgresql+psycopg2://mo:Secr3t-x@127.0.0.1:1/optuna"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "Secr3t-x" not in proc.stdout and "mo:***@" in proc.stdout


def test_a_schema_key_absent_from_the_yaml_can_be_overridden():
    from orchestrator.config import load_config

    cfg = load_config(["experiment=debug", "eval.device=cpu", "study.heartbeat_s=5", "eval.threads=1",
                       "candidates.allow_pickle=true"])
    assert (cfg.study.heartbeat_s, cfg.eval.threads, cfg.candidates.allow_pickle) == (5, 1, True)
    assert cfg.candidates.allow_pickle is True and load_config([]).candidates.allow_pickle is False
