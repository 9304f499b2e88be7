"""The node's one typed configuration object.

Values come, in increasing priority, from the embedded defaults, a TOML file
(``--config FILE`` or ``BRAIN3D_CONFIG``) and environment variables named
``BRAIN3D_<SECTION>__<KEY>`` (lists and tables as JSON). The embedded defaults
need no services: SQLite and the spool under ``./var``, Celery on kombu's
SQLAlchemy transport over SQLite.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from pydicom.datadict import keyword_dict

CONFIG_ENV = "BRAIN3D_CONFIG"
ENV_PREFIX = "BRAIN3D_"
DEFAULT_VAR_DIR = Path("var")
_S = TypeVar("_S", bound="_Sourced")


class ConfigError(ValueError):
    """A configuration that cannot be used; its message is one line naming the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _ae_title_is_valid(value: str) -> str:
    if value != value.strip() or "\\" in value or not value.isascii():
        raise ValueError("must be ASCII without backslash or surrounding spaces")
    return value


#: A DICOM AE title (PS3.5 AE): 1-16 ASCII characters, no backslash; pynetdicom refuses others.
AETitle = Annotated[str, Field(min_length=1, max_length=16), AfterValidator(_ae_title_is_valid)]


class NodeSettings(_Section):
    """The DICOM application entity this node presents."""

    ae_title: AETitle = "BRAIN3D"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    allowed_calling_aes: list[AETitle] = Field(
        default_factory=list, description="Calling AE titles accepted; empty accepts any."
    )
    max_associations: int = Field(25, ge=1, description="Simultaneous associations per receiver process.")
    receiver_processes: int = Field(
        2,
        ge=0,
        description="Processes accepting associations on the port; 0 receives in the node process.",
    )
    max_pdu_size: int = Field(0, ge=0, description="0 means unlimited, as large PDUs are fastest.")


class StorageSettings(_Section):
    """Where received instances and produced SRs are kept on disk."""

    spool_dir: Path = DEFAULT_VAR_DIR / "spool"
    min_free_bytes: int = Field(1 << 30, ge=0)
    retention_hours: float = Field(
        168.0,
        ge=0,
        allow_inf_nan=False,
        description="Spooled series whose jobs ended are removed, with their jobs' working folders, "
        "after this long.",
    )
    work_dir: Path = DEFAULT_VAR_DIR / "work"
    reports_dir: Path = DEFAULT_VAR_DIR / "reports"

    def job_dir(self, job_id: int) -> Path:
        """A job's working folder: the converted series, the model's input, what conversion read.
        Removed with its series' spool by retention."""
        return Path(self.work_dir) / f"job-{job_id}"


class DatabaseSettings(_Section):
    """The SQL database that is the source of truth."""

    url: str = f"sqlite:///{DEFAULT_VAR_DIR / 'brain3d.db'}"
    audit_key_file: Path = DEFAULT_VAR_DIR / "audit.key"
    audit_key: str | None = Field(
        None, description="HMAC key for the audit chain; overrides audit_key_file when set."
    )


class QueueSettings(_Section):
    """The Celery broker and result backend."""

    broker_url: str = f"sqla+sqlite:///{DEFAULT_VAR_DIR / 'broker.db'}"
    result_backend: str = f"db+sqlite:///{DEFAULT_VAR_DIR / 'results.db'}"
    polling_interval: float = Field(0.2, gt=0)


class WorkerSettings(_Section):
    """How jobs run: time limits, attempts, heartbeats and the reconciler."""

    soft_time_limit_s: float = Field(600.0, gt=0)
    hard_time_limit_s: float = Field(900.0, gt=0)
    max_attempts: int = Field(3, ge=1, description="Interrupted starts of one step before the job fails.")
    heartbeat_s: float = Field(5.0, gt=0)
    stale_after_s: float = Field(
        30.0, gt=0, description="A running job without a heartbeat this long is re-run."
    )
    reconcile_every_s: float = Field(10.0, gt=0)
    process_start_timeout_s: float = Field(
        300.0,
        gt=0,
        description="How long a new worker child may take to load the model; Celery's default (4 s) "
        "killed every replacement of a lost child whose model took longer.",
    )

    @model_validator(mode="after")
    def _limits_are_ordered(self) -> WorkerSettings:
        if self.hard_time_limit_s <= self.soft_time_limit_s:
            raise ValueError("hard_time_limit_s must exceed soft_time_limit_s (the soft limit records why)")
        if self.stale_after_s <= self.heartbeat_s:
            raise ValueError("stale_after_s must exceed heartbeat_s, or every running job looks lost")
        return self


class DeliverySettings(_Section):
    """How produced SRs leave the node."""

    shadow_mode: bool = Field(False, description="Process and keep SRs locally; deliver nothing.")
    max_retries: int = Field(30, ge=0)
    retry_backoff_s: float = Field(2.0, gt=0)
    retry_backoff_max_s: float = Field(30.0, gt=0)
    allow_demo_model: bool = Field(
        False, description="Allow the synthetic demo model's SRs to reach destinations off loopback."
    )
    not_analysed_report: bool = Field(False, description="Send a short SR when a series is not analysed.")


#: Header keywords a count rule may match: read from every instance on the C-STORE path.
COUNT_RULE_KEYWORDS = (
    "Modality",
    "Manufacturer",
    "ManufacturerModelName",
    "StationName",
    "SeriesDescription",
    "ProtocolName",
)


class CountRule(_Section):
    """A site rule for series whose headers do not state their size: series matching every
    ``match`` entry (keyword -> case-insensitive glob, as routing rules) have ``instances``
    instances, so they complete on the count instead of waiting for the timer."""

    match: dict[str, str] = Field(min_length=1)
    instances: int = Field(ge=1)
    reason: str = ""

    @field_validator("match")
    @classmethod
    def _keywords_are_read_at_ingest(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(COUNT_RULE_KEYWORDS))
        if unknown:
            raise ValueError(f"cannot match on {', '.join(unknown)}; use {', '.join(COUNT_RULE_KEYWORDS)}")
        return value


class CompletionSettings(_Section):
    """When a series counts as complete."""

    stable_seconds: float = Field(10.0, gt=0)
    check_interval: float = Field(0.5, gt=0)
    count_rules: list[CountRule] = Field(
        default_factory=list,
        description="Instance counts for series whose headers give none; the first matching rule wins.",
    )


class RoutingRule(_Section):
    """A site rule: series matching every given header value are forced in or out."""

    action: Literal["include", "exclude"]
    match: dict[str, str] = Field(min_length=1)
    reason: str = ""

    @field_validator("match")
    @classmethod
    def _keywords_are_dicom(cls, value: dict[str, str]) -> dict[str, str]:
        """A misspelt keyword would read as an absent attribute: an exclude rule on it never
        fires, and a ``*`` pattern on it matches every series."""
        unknown = sorted(keyword for keyword in value if keyword not in keyword_dict)
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not a DICOM keyword (e.g. SeriesDescription)")
        return value


class RoutingSettings(_Section):
    """Which series Brain3D reads."""

    rules: list[RoutingRule] = Field(default_factory=list)
    min_inversion_time_ms: float = 1500.0
    min_echo_time_ms: float = 70.0
    min_repetition_time_ms: float = 4000.0


class DestinationSettings(_Section):
    """A DICOM peer that receives the Structured Reports (``dicom_node.dispatch.DicomDestination``)."""

    host: str
    port: int = Field(ge=1, le=65535)
    ae_title: AETitle
    name: str = Field("", description="How deliveries and audit events name it; default AE@host:port.")


class ModelSettings(_Section):
    """The Brain3D checkpoint the workers run."""

    path: Path = Path(__file__).resolve().parent.parent / "inference" / "checkpoints" / "demo"
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    max_new_tokens: int = Field(160, ge=1)
    cpu_threads: int = Field(
        1,
        ge=1,
        description="torch threads for inference on the CPU (one per worker child is fastest under load).",
    )


class _Sourced(BaseSettings):
    """Settings read, in increasing priority, from the TOML file named by ``BRAIN3D_CONFIG``,
    environment variables ``BRAIN3D_<SECTION>__<KEY>`` and keyword arguments."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", frozen=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = os.environ.get(CONFIG_ENV)
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(toml_file)))
        return tuple(sources)


class Settings(_Sourced):
    """The effective configuration of a node, its workers and its tools."""

    model_config = SettingsConfigDict(extra="forbid")

    node: NodeSettings = NodeSettings()
    storage: StorageSettings = StorageSettings()
    database: DatabaseSettings = DatabaseSettings()
    queue: QueueSettings = QueueSettings()
    completion: CompletionSettings = CompletionSettings()
    routing: RoutingSettings = RoutingSettings()
    destinations: list[DestinationSettings] = Field(default_factory=list)
    delivery: DeliverySettings = DeliverySettings()
    model: ModelSettings = ModelSettings()
    worker: WorkerSettings = WorkerSettings()


class DatabaseSection(_Sourced):
    """The ``database`` section read alone, ignoring every other: where a service whose
    configuration is refused can still record that refusal in the audit trail."""

    model_config = SettingsConfigDict(extra="ignore")

    database: DatabaseSettings = DatabaseSettings()


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(root)"
    return f"configuration key '{key}': {first['msg']}"


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Load the effective settings, raising ConfigError with one readable line."""
    return _load(Settings, config_file, **overrides)


def load_database_section(config_file: Path | str | None = None) -> DatabaseSettings:
    """The ``database`` section of a configuration whose other sections may be invalid."""
    return _load(DatabaseSection, config_file).database


def _load(cls: type[_S], config_file: Path | str | None, **overrides: Any) -> _S:
    path = Path(config_file) if config_file else None
    if path is None and os.environ.get(CONFIG_ENV):
        path = Path(os.environ[CONFIG_ENV])
    previous = os.environ.get(CONFIG_ENV)
    try:
        if path is not None:
            if not path.is_file():
                raise ConfigError(f"configuration file {path} does not exist")
            try:
                tomllib.loads(path.read_text())
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None
            os.environ[CONFIG_ENV] = str(path)
        try:
            return cls(**overrides)
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from None
        except ValueError as exc:  # malformed JSON in an environment variable
            raise ConfigError(f"configuration: {exc}".splitlines()[0]) from None
    finally:
        if previous is None:
            os.environ.pop(CONFIG_ENV, None)
        else:
            os.environ[CONFIG_ENV] = previous
