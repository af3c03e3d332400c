"""Typed configuration: the Hydra schema of ``conf/`` as dataclasses.

Hydra composes ``conf/``; ``load_config`` merges the result into these schemas (unknown keys
and wrong types fail at start, with the key named) and returns plain dataclass instances.
Below this module no code sees a DictConfig.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
SPACES_DIR = REPO_ROOT / "search_spaces"


@dataclass
class CandidatesConfig:
    """The models to merge. ``zoo`` ('demo' or 'micro') builds the demo zoo first when missing.

    ``allow_pickle``: also read ``pytorch_model.bin`` checkpoints (pickles can run code when
    loaded; off by default, safetensors only). ``knots``: LoRA adapter candidates are merged
    in their joint SVD basis (KnOTS, arXiv 2410.19735) by every method.
    """

    models: dict[str, str] = field(default_factory=dict)
    base: str | None = None
    zoo: str | None = None
    dtype: str = "float32"
    tokenizer_source: str | None = None
    allow_pickle: bool = False
    knots: bool = False


@dataclass
class MethodConfig:
    """Which merge methods the study compares; each has ``search_spaces/<name>.yaml``."""

    methods: list[str] = field(default_factory=lambda: ["ties"])
    spaces_dir: str | None = None


@dataclass
class TaskConfig:
    """One benchmark task in the objective."""

    name: str = "???"
    metric: str | None = None
    weight: float = 1.0
    search_split: str | None = None
    confirm_split: str | None = None


@dataclass
class EvalConfig:
    """Evaluation: tasks, rung sizes (items per task), batch size, device.

    ``rungs``: items per task at each rung of the search split, strictly increasing; the last
    may exceed a task's split (it then evaluates the whole split). ``confirm_seeds``: methods
    that draw random masks (DARE, DELLA) are confirmed on this many seeds (the study's seed and
    the next ones); their confirm score is the mean.

    ``threads``: torch CPU threads of this worker (null: torch's default, one per core). Tiny
    models on CPU do best with 1. Scoring the demo test split on 2 cores beside two busy
    processes took 6.8-9.1 s with 1 thread and 8.8-25.5 s with 2 (3 runs each, interleaved);
    idle, the two were within noise (4.9-6.8 s). N workers on one machine should share the
    cores (cores / N each).
    """

    tasks: list[TaskConfig] = field(default_factory=list)
    rungs: list[int] = field(default_factory=lambda: [50, 150, 400])
    batch_size: int = 64
    num_fewshot: int = 0
    include: list[str] = field(default_factory=list)
    device: str = "cpu"
    allow_search_on_confirm_split: bool = False
    threads: int | None = None
    confirm_seeds: int = 5


@dataclass
class StudyConfig:
    """The Optuna study. Workers started with the same ``name`` and ``storage`` share it.

    ``n_trials`` is the study's total over all workers. ``compare``: ``fair`` (several methods
    get equal shares of the trials, each with its own sampler; the default) or ``free`` (one
    sampler chooses the method). ``sampler``/``pruner``: a mapping with ``name`` and that
    entry's options (``orchestrator.study.samplers``/``pruners``); after ``load_config`` a
    ``SamplerChoice``/``PrunerChoice``. ``heartbeat_s``: how often a running
    trial proves its worker alive; after ``grace_s`` (default 3 x heartbeat_s) of silence the
    trial is failed and queued again, at most ``max_retry`` times.
    """

    name: str = "demo"
    n_trials: int = 30
    timeout_s: float | None = None
    storage: str | None = None
    seed: int = 0
    compare: str = "fair"
    sampler: Any = field(default_factory=lambda: {"name": "tpe", "seed": 0})
    pruner: Any = field(default_factory=lambda: {"name": "successive_halving"})
    multi_objective: bool = False
    baselines: bool = True
    save_best: bool = True
    heartbeat_s: int = 30
    grace_s: int | None = None
    max_retry: int = 3


@dataclass
class TrackingConfig:
    """MLflow. ``prompts``: answered greedily by the best merge and the parents, side by side,
    at most ``max_new_tokens`` each; ``register``: put the best merge in the Model Registry
    (copied into the run's artifacts up to ``register_copy_mb``, else referenced)."""

    enabled: bool = True
    uri: str | None = None
    experiment: str = "merge-orchestrator"
    prompts: list[str] = field(default_factory=list)
    max_new_tokens: int = 24
    register: bool = True
    register_copy_mb: float = 500.0


@dataclass
class SweepConfig:
    candidates: CandidatesConfig = field(default_factory=CandidatesConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    runs_dir: str = "runs"
    experiment: str | None = None


def compose(overrides: list[str] | None = None, config_dir: Path | str | None = None) -> Any:
    """Compose ``conf/config.yaml`` with Hydra overrides; returns the DictConfig."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    config_dir = Path(config_dir or CONF_DIR).resolve()
    if not (config_dir / "config.yaml").is_file():
        raise UserError(f"config folder {config_dir} has no config.yaml")
    for override in overrides or []:
        _check_key(override)
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            return hydra_compose("config", overrides=[_schema_override(o) for o in overrides or []])
    except (HydraException, OmegaConfBaseException) as err:
        raise UserError(f"bad config override: {_first_line(err)}") from None
    except ValueError as err:  # e.g. a malformed override that Hydra's parser rejects late
        raise UserError(f"bad config override: {_first_line(err)}") from None


def _options() -> dict[tuple[str, ...], set[str]]:
    """Schema fields typed ``Any`` whose keys come from a registry (sampler and pruner options)."""
    from orchestrator.study import pruners, samplers

    return {("study", "sampler"): samplers.option_names(), ("study", "pruner"): pruners.option_names()}


def _schema_override(override: str) -> str:
    """``key=value`` for a schema key the YAML files leave out becomes ``++key=value``.

    Hydra can only override keys present in the composed YAML; the dataclass schema has
    defaults for more (``study.heartbeat_s``, ``eval.device``, every sampler option ...).
    Config-group choices (``method=ties``), typos and Hydra's own prefixes are left alone.
    """
    key, sep, _ = override.partition("=")
    if not sep or key[:1] in "+~" or "." not in key or _unknown_part(key.split(".")) is not None:
        return override
    return "++" + override


def _check_key(override: str) -> None:
    """One line for a key the schema does not have, with the closest valid key."""
    key, sep, _ = override.partition("=")
    key = key.lstrip("+~")
    if not sep or "." not in key or key.split(".")[0] not in _fields(SweepConfig):
        return
    path = key.split(".")
    bad = _unknown_part(path)
    if bad is None:
        return
    known = sorted(_known_keys(path[:bad]))
    where = ".".join(path[:bad])
    close = difflib.get_close_matches(path[bad], known, n=1)
    if close:
        raise UserError(f"unknown key {key}; did you mean {where}.{close[0]}?")
    raise UserError(f"unknown key {key}; valid keys under {where}: {', '.join(known)}")


def _fields(node: Any) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(node)


def _unknown_part(path: list[str]) -> int | None:
    """The index of the first part of ``path`` the schema does not know (None: all known)."""
    import dataclasses
    import typing

    node: Any = SweepConfig
    for i, part in enumerate(path):
        options = _options().get(tuple(path[:i]))
        if options is not None:
            return None if part in options and i == len(path) - 1 else i
        if not dataclasses.is_dataclass(node):
            return None if (typing.get_origin(node) is dict or node is dict) else i
        hints = _fields(node)
        if part not in hints:
            return i
        node = hints[part]
    return None


def _known_keys(prefix: list[str]) -> set[str]:
    import dataclasses

    options = _options().get(tuple(prefix))
    if options is not None:
        return options
    node: Any = SweepConfig
    for part in prefix:
        node = _fields(node)[part]
    return set(_fields(node)) if dataclasses.is_dataclass(node) else set()


def to_sweep_config(cfg: Any) -> SweepConfig:
    """Check a composed DictConfig against the schema and convert it to dataclasses.

    ``study.sampler`` and ``study.pruner`` become the registries' checked choices.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    from orchestrator.study.pruners import parse_pruner
    from orchestrator.study.samplers import parse_sampler

    try:
        merged = OmegaConf.merge(OmegaConf.structured(SweepConfig), cfg)
        out = OmegaConf.to_object(merged)
    except ConfigKeyError as err:
        _check_key(f"{getattr(err, 'full_key', '')}=?")
        raise UserError(f"invalid config: {_first_line(err)}") from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        where = f" at {key}" if key else ""
        raise UserError(f"invalid config{where}: {_first_line(err)}") from None
    for field_name, parse in (("sampler", parse_sampler), ("pruner", parse_pruner)):
        raw = getattr(out.study, field_name)
        if not isinstance(raw, dict):
            raise UserError(f"study.{field_name} must be a mapping with a name, got {raw!r}")
        setattr(out.study, field_name, parse(raw))
    check_study(out.study)
    check_eval(out.eval)
    return out


def check_eval(cfg: EvalConfig) -> None:
    """Range checks of the evaluation settings."""
    if cfg.threads is not None and cfg.threads < 1:
        raise UserError(f"eval.threads must be >= 1 or null, got {cfg.threads}")
    if cfg.confirm_seeds < 1:
        raise UserError(f"eval.confirm_seeds must be >= 1, got {cfg.confirm_seeds}")


def check_study(study: StudyConfig) -> None:
    """Range checks of the study settings (the rule, the value, the key)."""
    rules = [(study.n_trials >= 0, "study.n_trials must be >= 0", study.n_trials),
             (study.timeout_s is None or study.timeout_s > 0, "study.timeout_s must be > 0 or null",
              study.timeout_s),
             (study.heartbeat_s >= 1, "study.heartbeat_s must be an integer >= 1", study.heartbeat_s),
             (study.grace_s is None or study.grace_s > study.heartbeat_s,
              f"study.grace_s must be > study.heartbeat_s ({study.heartbeat_s}) or null", study.grace_s),
             (study.max_retry >= 0, "study.max_retry must be >= 0", study.max_retry),
             (study.compare in ("fair", "free"), "study.compare must be 'fair' or 'free'", study.compare),
             (bool(study.name) and "/" not in study.name and study.name.strip() == study.name,
              "study.name must be a non-empty name without '/' or surrounding spaces", study.name)]
    for ok, rule, value in rules:
        if not ok:
            raise UserError(f"{rule}, got {value!r}")


def load_config(overrides: list[str] | None = None, config_dir: Path | str | None = None) -> SweepConfig:
    return to_sweep_config(compose(overrides, config_dir))


def _first_line(err: Exception) -> str:
    """Hydra's message on one line; an indented list of options becomes ``a, b, c``."""
    lines = [line for line in str(err).split("Config search path:")[0].strip().splitlines() if line.strip()]
    head = " ".join(line.strip() for line in lines[:3] if not line.startswith((" ", "\t")))
    options = [line.strip() for line in lines if line.startswith((" ", "\t"))]
    if options and head.rstrip().endswith(":"):
        head = f"{head} {', '.join(options[:20])}"
    return head
