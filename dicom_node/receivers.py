"""Receiver processes: the Storage SCP in several processes accepting on the node's one socket.

pynetdicom runs every association in Python threads of one process, so one process receives
at most what one interpreter lock allows (``docs/benchmarks.md``). ``brain3d serve`` therefore
binds the port once (``scp.listen``) and starts ``node.receiver_processes`` processes that
accept on that socket, each running a ``StorageSCP``. Bookkeeping stays in the node process:
a receiver's SQL rows and audit events travel as calls over a pipe to the node process, where
the one ``Ingest`` commits them in group commits shared by all receivers and the one
``AuditTrail`` chains them. Series state keeps a single owner, and a C-STORE is still answered
only once its row is committed.

A receiver dies with the node process (``PR_SET_PDEATHSIG``, and it stops when its pipe
closes); a receiver that dies alone is audited and replaced.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from dicom_node.audit import Action, AuditTrail, EventID, EventTypeCode, Outcome, Participant, Role
from dicom_node.config import NodeSettings, StorageSettings
from dicom_node.ingest import Ingest, InstanceHeaders, InstanceOutcome
from dicom_node.scp import StorageSCP
from dicom_node.spool import Spool, SpooledInstance

log = logging.getLogger(__name__)

READY = "ready"  # the one message that is not a call: the receiver accepts now
START_TIMEOUT_SECONDS = 60.0
STOP_MARGIN_SECONDS = 5.0
RECEIVER_RESTARTED = "receiver process restarted"
_PR_SET_PDEATHSIG = 1


class BookkeepingError(RuntimeError):
    """A call the node process could not carry out, or could not be asked any more."""


# -- the node process's side ------------------------------------------------------------------


@dataclass
class _Receiver:
    index: int
    process: BaseProcess
    connection: Connection
    ready: threading.Event


class ReceiverPool:
    """Starts the receiver processes, answers their bookkeeping calls, replaces any that dies."""

    def __init__(
        self,
        node: NodeSettings,
        storage: StorageSettings,
        ingest: Ingest,
        audit: AuditTrail,
        listener: socket.socket,
        shutdown_grace_seconds: float,
    ) -> None:
        self.node = node
        self.storage = storage
        self.audit = audit
        self.listener = listener
        self.shutdown_grace_seconds = shutdown_grace_seconds
        self._calls: dict[str, Callable[..., Any]] = {
            "open_association": ingest.open_association,
            "close_association": ingest.close_association,
            "record_rejected_association": ingest.record_rejected_association,
            "record_instance": ingest.record_instance,
            "audit": audit.record,
        }
        self._context = multiprocessing.get_context("spawn")  # never fork a process with threads
        self._receivers: list[_Receiver] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._stopped = threading.Event()  # every receiver joined
        self._monitor = threading.Thread(target=self._replace_dead, name="receiver-monitor", daemon=True)

    @property
    def port(self) -> int:
        return int(self.listener.getsockname()[1])

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [receiver.process.pid or 0 for receiver in self._receivers]

    def start(self) -> None:
        """Start every receiver and return once each accepts on the socket."""
        for index in range(self.node.receiver_processes):
            receiver = self._start_receiver(index)
            with self._lock:
                self._receivers.append(receiver)
        for receiver in self._receivers:
            self._await_ready(receiver)
        self._monitor.start()
        log.info("%d receiver processes accepting on port %d", len(self._receivers), self.port)

    def stop(self, grace_seconds: float) -> None:
        """Ask every receiver to stop (each drains its associations for its grace), then wait."""
        self._stopping.set()
        with self._lock:
            receivers = list(self._receivers)
        for receiver in receivers:
            receiver.process.terminate()  # SIGTERM: stop accepting, drain
        for receiver in receivers:
            receiver.process.join(grace_seconds + STOP_MARGIN_SECONDS)
            if receiver.process.is_alive():
                log.error("receiver %d did not stop in time: killed", receiver.index)
                receiver.process.kill()
                receiver.process.join()
        self._stopped.set()
        if self._monitor.is_alive():
            self._monitor.join()
        self.listener.close()

    # -- processes --------------------------------------------------------------------------

    def _start_receiver(self, index: int) -> _Receiver:
        ours, theirs = self._context.Pipe()
        process = self._context.Process(
            target=run_receiver,
            args=(
                index,
                self.node,
                self.storage,
                self.listener,
                theirs,
                os.getpid(),
                self.shutdown_grace_seconds,
            ),
            name=f"brain3d-receiver-{index}",
            daemon=True,
        )
        process.start()
        theirs.close()
        receiver = _Receiver(index, process, ours, threading.Event())
        threading.Thread(
            target=self._answer_calls, args=(receiver,), name=f"bookkeeping-{index}", daemon=True
        ).start()
        return receiver

    def _await_ready(self, receiver: _Receiver) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not receiver.ready.wait(0.1):
            if not receiver.process.is_alive():
                raise RuntimeError(
                    f"receiver process {receiver.index} exited at start (code {receiver.process.exitcode})"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"receiver process {receiver.index} did not start within {START_TIMEOUT_SECONDS:.0f} s"
                )

    def _replace_dead(self) -> None:
        """Wait on the receivers' sentinels; one that ends outside a stop is audited and replaced.

        The kernel kills a receiver when the *thread* that started it ends (``PR_SET_PDEATHSIG``),
        and this thread starts the replacements: so it never ends before ``stop`` has joined
        every receiver, and an error does not end it."""
        while not self._stopping.is_set():
            try:
                self._replace_ended()
            except Exception:  # keep watching: a replacement that cannot start now may later
                log.exception("replacing a receiver failed")
                self._stopping.wait(0.5)
        self._stopped.wait()

    def _replace_ended(self) -> None:
        """Replace, auditing each, the receivers that end within half a second."""
        with self._lock:
            by_sentinel = {receiver.process.sentinel: receiver for receiver in self._receivers}
        ended = multiprocessing.connection.wait(list(by_sentinel), timeout=0.5)
        if self._stopping.is_set():
            return
        for sentinel in ended:
            dead = by_sentinel[sentinel]  # type: ignore[index]
            dead.process.join()
            log.error(
                "receiver %d (pid %s) ended with exit code %s: starting a replacement",
                dead.index,
                dead.process.pid,
                dead.process.exitcode,
            )
            self._audit_restart(dead)
            replacement = self._start_receiver(dead.index)
            with self._lock:
                self._receivers[self._receivers.index(dead)] = replacement
            try:
                self._await_ready(replacement)
            except RuntimeError:
                log.exception("replacement receiver %d did not start", dead.index)

    def _audit_restart(self, dead: _Receiver) -> None:
        try:
            self.audit.record(
                EventID.APPLICATION_ACTIVITY,
                Outcome.SERIOUS_FAILURE,
                event_type=RECEIVER_RESTARTED,
                participants=[
                    Participant(
                        Role.APPLICATION,
                        ae_title=self.node.ae_title,
                        network_address=self.node.host,
                        user_id=str(dead.process.pid),
                    )
                ],
                detail={"receiver": dead.index, "exit_code": dead.process.exitcode},
            )
        except Exception:
            log.exception("the restart of receiver %d could not be audited", dead.index)

    # -- calls ------------------------------------------------------------------------------

    def _answer_calls(self, receiver: _Receiver) -> None:
        """One thread per receiver: run each call; a future answers when it resolves.

        A call on the ``Ingest`` commits inline in this thread when no transaction runs, or
        joins the next group commit; its answer is sent by whichever thread commits it.
        """
        connection = receiver.connection
        send_lock = threading.Lock()

        def answer(call_id: int, succeeded: bool, value: Any) -> None:
            # A receiver that is gone never answers its sender: no success without this answer.
            with send_lock, contextlib.suppress(OSError):
                connection.send((call_id, succeeded, value))

        def answer_future(call_id: int, future: Future[Any]) -> None:
            error = future.exception()
            if error is None:
                answer(call_id, True, future.result())
            else:
                answer(call_id, False, _describe(error))

        while True:
            try:
                call_id, name, args, kwargs = connection.recv()
            except (EOFError, OSError):
                connection.close()
                return
            if name == READY:
                receiver.ready.set()
                continue
            try:
                result = self._calls[name](*args, **kwargs)
            except Exception as exc:
                log.exception("bookkeeping call %s from receiver %d failed", name, receiver.index)
                answer(call_id, False, _describe(exc))
                continue
            if isinstance(result, Future):
                result.add_done_callback(lambda done, call_id=call_id: answer_future(call_id, done))
            else:
                answer(call_id, True, None)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


# -- the receiver process's side ---------------------------------------------------------------


class BookkeepingClient:
    """Calls into the node process over the receiver's pipe; each call returns a future."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._pending: dict[int, Future[Any]] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.closed = threading.Event()
        self._reader = threading.Thread(target=self._read_answers, name="bookkeeping-answers", daemon=True)

    def start(self) -> None:
        self._reader.start()

    def call(self, name: str, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            if self.closed.is_set():
                future.set_exception(BookkeepingError("the node process is gone"))
                return future
            call_id = next(self._ids)
            self._pending[call_id] = future
            try:
                self._connection.send((call_id, name, args, kwargs))
            except OSError as exc:
                del self._pending[call_id]
                future.set_exception(BookkeepingError(f"the node process is gone: {exc}"))
        return future

    def notify_ready(self) -> None:
        with self._lock:
            self._connection.send((0, READY, (), {}))

    def _read_answers(self) -> None:
        while True:
            try:
                call_id, succeeded, value = self._connection.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                future = self._pending.pop(call_id)
            if succeeded:
                future.set_result(value)
            else:
                future.set_exception(BookkeepingError(value))
        with self._lock:
            self.closed.set()
            pending, self._pending = self._pending, {}
        for future in pending.values():
            future.set_exception(BookkeepingError("the node process is gone"))


class RemoteIngest:
    """The receiver's ``scp.InstanceBookkeeping``: the node process's ``Ingest``, over the pipe."""

    def __init__(self, client: BookkeepingClient) -> None:
        self._client = client

    def open_association(self, calling_ae: str, called_ae: str, address: str, port: int) -> Future[int]:
        return self._client.call("open_association", calling_ae, called_ae, address, port)

    def close_association(
        self, association_id: int, outcome: str, stored: int, duplicate: int, failed: int
    ) -> Future[None]:
        return self._client.call("close_association", association_id, outcome, stored, duplicate, failed)

    def record_rejected_association(
        self, calling_ae: str, called_ae: str, address: str, port: int
    ) -> Future[int]:
        return self._client.call("record_rejected_association", calling_ae, called_ae, address, port)

    def record_instance(
        self,
        headers: InstanceHeaders,
        spooled: SpooledInstance,
        *,
        transfer_syntax_uid: str,
        association_id: int | None,
        received_at: datetime,
    ) -> Future[InstanceOutcome]:
        return self._client.call(
            "record_instance",
            headers,
            spooled,
            transfer_syntax_uid=transfer_syntax_uid,
            association_id=association_id,
            received_at=received_at,
        )


class RemoteAudit:
    """The receiver's ``scp.AuditRecorder``: the node process's ``AuditTrail``, over the pipe."""

    def __init__(self, client: BookkeepingClient) -> None:
        self._client = client

    def record(
        self,
        event_id: EventID | str,
        outcome: Outcome | int,
        *,
        action: Action | str = Action.EXECUTE,
        event_type: EventTypeCode | str | None = None,
        participants: Iterable[Participant] = (),
        study_uid: str | None = None,
        series_uid: str | None = None,
        job_id: int | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        """Blocks until the event is appended, as ``AuditTrail.record`` does."""
        self._client.call(
            "audit",
            event_id,
            outcome,
            action=action,
            event_type=event_type,
            participants=list(participants),
            study_uid=study_uid,
            series_uid=series_uid,
            job_id=job_id,
            detail=dict(detail) if detail else None,
        ).result()


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel kill this process when the node process dies (Linux), however it dies."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
            log.warning("PR_SET_PDEATHSIG failed (errno %d)", ctypes.get_errno())
    if os.getppid() != parent_pid:  # the node died before the request took effect
        os._exit(1)


def run_receiver(
    index: int,
    node: NodeSettings,
    storage: StorageSettings,
    listener: socket.socket,
    connection: Connection,
    parent_pid: int,
    grace_seconds: float,
) -> None:
    """A receiver process: a StorageSCP on the shared socket until SIGTERM or the node's end."""
    _die_with_parent(parent_pid)
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s %(levelname)s receiver-{index} %(name)s: %(message)s"
    )
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    stop_requested = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the node stops us
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop_requested.set())

    client = BookkeepingClient(connection)
    client.start()
    scp = StorageSCP(node, storage, Spool(storage.spool_dir), RemoteIngest(client), RemoteAudit(client))
    scp.start(listener)
    client.notify_ready()
    while not stop_requested.wait(0.5):
        if client.closed.is_set():
            log.error("the node process is gone: stopping")
            break
    scp.stop(grace_seconds)
