"""What one worker process holds for its lifetime: settings, database, audit trail, model.

Built lazily once per process; after a prefork fork the child builds its own (database
connections must not cross a fork). The model is loaded by ``worker_process_init`` in
processes that serve the ``gpu`` queue and then stays warm.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from dicom_node.audit import AuditTrail
from dicom_node.config import Settings, load_settings
from dicom_node.db import Database

if TYPE_CHECKING:
    from worker.inference import LoadedModel, ModelIdentity

logger = logging.getLogger("brain3d.worker")


@dataclass
class Runtime:
    settings: Settings
    pid: int = field(default_factory=os.getpid)
    _model_lock: threading.Lock = field(default_factory=threading.Lock)
    _model: LoadedModel | None = None

    @cached_property
    def database(self) -> Database:
        return Database(self.settings.database.url)

    @cached_property
    def audit(self) -> AuditTrail:
        return AuditTrail.from_settings(self.settings, self.database)

    @cached_property
    def model_identity(self) -> ModelIdentity:
        """The configured checkpoint's identity (hashing it once per process, no weights loaded)."""
        from worker.inference import identify_model

        return identify_model(self.settings.model)

    def model(self) -> LoadedModel:
        """The Brain3D model of this process, loaded on first use and kept warm."""
        from worker.inference import load_model

        with self._model_lock:
            if self._model is None:
                self._model = load_model(self.settings.model, self.model_identity)
            return self._model


_runtime: Runtime | None = None


def configure(settings: Settings) -> Runtime:
    """Install ``settings`` as this process's runtime (the worker command and tests call this)."""
    global _runtime
    _runtime = Runtime(settings)
    return _runtime


def get_runtime() -> Runtime:
    """This process's runtime, rebuilt after a fork."""
    global _runtime
    if _runtime is None:
        _runtime = Runtime(load_settings())
    elif _runtime.pid != os.getpid():
        _runtime = Runtime(_runtime.settings)
    return _runtime
