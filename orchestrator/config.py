"""Typed configuration: the Hydra schema of ``conf/`` as dataclasses.

Hydra composes ``conf/``; ``load_config`` merges the result into these schemas (unknown keys
and wrong types fail at start, with the key named) and returns plain dataclass instances.
Below this module no code sees a DictConfig.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
SPACES_DIR = REPO_ROOT / "search_spaces"


@dataclass
class CandidatesConfig:
    """The models to merge. ``zoo`` ('demo' or 'micro') builds the demo zoo first when missing."""

    models: dict[str, str] = field(default_factory=dict)
    base: str | None = None
    zoo: str | None = None
    dtype: str = "float32"
    tokenizer_source: str | None = None


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
    """Evaluation: tasks, rung sizes (items per task), batch size, device."""

    tasks: list[TaskConfig] = field(default_factory=list)
    rungs: list[int] = field(default_factory=lambda: [50, 150, 400])
    batch_size: int = 64
    num_fewshot: int = 0
    include: list[str] = field(default_factory=list)
    device: str = "cpu"
    allow_search_on_confirm_split: bool = False


@dataclass
class SamplerConfig:
    name: str = "tpe"
    seed: int = 0
    n_startup_trials: int = 8
    multivariate: bool = True
    grid_points: int = 3


@dataclass
class PrunerConfig:
    name: str = "successive_halving"
    reduction_factor: int = 3
    n_startup_trials: int = 4
    p_threshold: float = 0.1


@dataclass
class StudyConfig:
    name: str = "demo"
    n_trials: int = 30
    timeout_s: float | None = None
    storage: str | None = None
    seed: int = 0
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    multi_objective: bool = False
    baselines: bool = True
    save_best: bool = True


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None
    experiment: str = "merge-orchestrator"


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
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            return hydra_compose("config", overrides=list(overrides or []))
    except (HydraException, OmegaConfBaseException) as err:
        raise UserError(f"bad config override: {_first_line(err)}") from None


def to_sweep_config(cfg: Any) -> SweepConfig:
    """Check a composed DictConfig against the schema and convert it to dataclasses."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.merge(OmegaConf.structured(SweepConfig), cfg)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        where = f" at {key}" if key else ""
        raise UserError(f"invalid config{where}: {_first_line(err)}") from None


def load_config(overrides: list[str] | None = None, config_dir: Path | str | None = None) -> SweepConfig:
    return to_sweep_config(compose(overrides, config_dir))


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return " ".join(line.strip() for line in text[:3] if line.strip() and not line.startswith("    "))
