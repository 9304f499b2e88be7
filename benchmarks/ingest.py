"""Ingest throughput: ``brain3d serve`` (SQL on) against a bare pynetdicom handler and ``storescp --fork``.

Each repeat sends the same generated 256x256 MR series (its own copy, with its own UIDs,
per sender) with 1 and then N concurrent dcmtk ``storescu`` senders to each peer in turn,
so that the peers of one repeat see the same machine load, and reports instances per
second received, the ratios to both peers, the CPU milliseconds per instance of serve
(its whole process tree, receiver processes included) and the bare handler, and finally
the median ratios of the repeats. ``brain3d serve`` runs twice: with its default receiver
processes and with ``node.receiver_processes = 0`` (every association in the node
process, as the bare handler). Every peer and sender gets ``TCP_NODELAY=1``: Debian's
dcmtk stalls about 40 ms per instance without it.

    python benchmarks/ingest.py --instances 300 --senders 1 4 --repeats 3
    python benchmarks/ingest.py --instances 100 --senders 1 4 --association-per-instance
    python benchmarks/ingest.py --profile [--clock wall]   # where serve's time goes (yappi)

The bare handler is the reference the issue sets: it writes file meta plus the raw
received bytes and fsyncs, nothing else (no rename, no SQL, no duplicate checks).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

NODELAY = {**os.environ, "TCP_NODELAY": "1"}
BRAIN3D = str(Path(sys.executable).parent / "brain3d")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def write_series(folder: Path, instances: int, size: int, seed: int) -> None:
    """One axial FLAIR-like MR series of ``instances`` slices of ``size`` x ``size``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    for index in range(instances):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.PatientID, ds.PatientName = "BENCH", "Bench^Mark"
        ds.Modality, ds.Manufacturer, ds.SeriesNumber = "MR", "Bench", 1
        ds.SeriesDescription = "AX FLAIR"
        ds.InstanceNumber, ds.ImagesInAcquisition = index + 1, instances
        ds.ScanningSequence, ds.InversionTime, ds.EchoTime, ds.RepetitionTime = (
            "SE\\IR",
            2500.0,
            100.0,
            9000.0,
        )
        ds.ImagePositionPatient = [-128.0, -128.0, float(index)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 1.0
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
        ds.save_as(folder / f"{index:04d}.dcm", enforce_file_format=True)


def bare_scp(port: int, out: Path) -> None:
    """The reference receiver: raw bytes + fsync per instance, nothing else."""
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

    out.mkdir(parents=True, exist_ok=True)

    def on_store(event: evt.Event) -> int:
        with open(out / f"{event.request.AffectedSOPInstanceUID}.dcm", "wb") as handle:
            handle.write(event.encoded_dataset())
            handle.flush()
            os.fsync(handle.fileno())
        return 0x0000

    ae = AE()
    ae.maximum_pdu_size = 0
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    stop.wait()
    server.shutdown()


def write_node_config(root: Path, port: int, receiver_processes: int | None = None) -> Path:
    """Embedded defaults in ``root``; ``receiver_processes`` None keeps the node's default."""
    receivers = "" if receiver_processes is None else f"receiver_processes = {receiver_processes}\n"
    config = root / "brain3d.toml"
    config.write_text(
        f"""[node]
host = "127.0.0.1"
port = {port}
{receivers}[storage]
spool_dir = "{root / "spool"}"
min_free_bytes = 0
[database]
url = "sqlite:///{root / "brain3d.db"}"
audit_key_file = "{root / "audit.key"}"
[queue]
broker_url = "sqla+sqlite:///{root / "broker.db"}"
result_backend = "db+sqlite:///{root / "results.db"}"
[completion]
stable_seconds = 30
"""
    )
    return config


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process and its live descendants (Linux /proc);
    a process or thread that ends while it is read counts no more."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            children += [int(child) for child in task.read_text().split()]
        except FileNotFoundError:
            continue
    return own + sum(cpu_seconds(child) for child in children)


SERVE = "brain3d serve"
SERVE_IN_PROCESS = "serve, 0 receivers"
BARE = "bare pynetdicom"
STORESCP = "storescp --fork"
PEERS = [SERVE, SERVE_IN_PROCESS, BARE, STORESCP]


@contextmanager
def peer(kind: str, root: Path) -> Iterator[tuple[int, int]]:
    """Start one receiver in a fresh folder; yield its port and process id; stop it by that id."""
    root.mkdir(parents=True)
    port = free_port()
    if kind == SERVE:
        command = [BRAIN3D, "serve", "--config", str(write_node_config(root, port))]
    elif kind == SERVE_IN_PROCESS:
        command = [BRAIN3D, "serve", "--config", str(write_node_config(root, port, receiver_processes=0))]
    elif kind == BARE:
        command = [sys.executable, __file__, "--bare-scp", str(port), str(root / "out")]
    else:
        (root / "out").mkdir()
        command = ["storescp", "--fork", "-od", str(root / "out"), str(port)]
    with open(root / "peer.log", "wb") as log:
        process = subprocess.Popen(command, cwd=root, env=NODELAY, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port)
        if kind in (SERVE, SERVE_IN_PROCESS):
            while b"node ready" not in (root / "peer.log").read_bytes():
                time.sleep(0.05)
        yield port, process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        if kind == STORESCP:
            time.sleep(0.5)  # forked children end with their associations


def _storescu(port: int, paths: list[Path]) -> None:
    done = subprocess.run(
        ["storescu", "127.0.0.1", str(port), *map(str, paths)], env=NODELAY, capture_output=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"storescu failed: {done.stderr.decode()[-500:]}")


def send(port: int, folders: list[Path], per_instance: bool = False) -> float:
    """Seconds for every folder to be sent by its own concurrent sender: one storescu association
    for the folder, or (``per_instance``) one storescu, and so one association, per instance."""

    def sender(folder: Path) -> None:
        paths = sorted(folder.iterdir())
        for batch in ([path] for path in paths) if per_instance else [paths]:
            _storescu(port, batch)

    started = time.perf_counter()
    with ThreadPoolExecutor(len(folders)) as pool:
        for done in [pool.submit(sender, folder) for folder in folders]:
            done.result()
    return time.perf_counter() - started


def benchmark(
    work: Path, instances: int, size: int, sender_counts: list[int], repeats: int, per_instance: bool
) -> None:
    """Interleave the peers in each repeat (so they see the same machine load); print median ratios."""
    most = max(sender_counts)
    folders = [work / "input" / f"sender{n}" for n in range(most)]
    for n, folder in enumerate(folders):
        write_series(folder, instances, size, seed=n)
    per = "one association per instance" if per_instance else "one association per sender"
    print(f"{instances} instances of {size}x{size} per sender, {per}; {repeats} repeats; TCP_NODELAY=1")
    header = " | ".join(f"{kind:>18}" for kind in PEERS)
    print(
        f"{'repeat':>6} | {'load':>4} | {'senders':>7} | {header} | serve/bare | 0 receivers/bare"
        " | serve/storescp | CPU ms/instance serve / 0 receivers / bare"
    )
    ratios: dict[int, list[tuple[float, float, float]]] = {senders: [] for senders in sender_counts}
    for attempt in range(repeats):
        for senders in sender_counts:
            load = os.getloadavg()[0]
            rates, cpu_ms = {}, {}
            for number, kind in enumerate(PEERS):
                root = work / f"peer{number}-{senders}-{attempt}"
                with peer(kind, root) as (port, pid):
                    cpu_before = cpu_seconds(pid)
                    seconds = send(port, folders[:senders], per_instance)
                    # storescp --fork works in children that have ended by now: its CPU says nothing
                    cpu_ms[kind] = 1e3 * (cpu_seconds(pid) - cpu_before) / (senders * instances)
                rates[kind] = senders * instances / seconds
                shutil.rmtree(root)
            row = (
                rates[SERVE] / rates[BARE],
                rates[SERVE_IN_PROCESS] / rates[BARE],
                rates[SERVE] / rates[STORESCP],
            )
            ratios[senders].append(row)
            cells = " | ".join(f"{rates[kind]:>14.0f} i/s" for kind in PEERS)
            cpu = " / ".join(f"{cpu_ms[kind]:.2f}" for kind in (SERVE, SERVE_IN_PROCESS, BARE))
            print(
                f"{attempt + 1:>6} | {load:>4.1f} | {senders:>7} | {cells} | {row[0]:>10.2f} |"
                f" {row[1]:>16.2f} | {row[2]:>14.2f} | {cpu}",
                flush=True,
            )
    for senders, rows in ratios.items():
        to_bare, in_process_to_bare, to_storescp = (
            statistics.median(column) for column in zip(*rows, strict=True)
        )
        print(
            f"median of {repeats}, {senders} senders: serve/bare {to_bare:.2f},"
            f" serve with 0 receivers/bare {in_process_to_bare:.2f}, serve/storescp {to_storescp:.2f}"
        )


def profile(work: Path, instances: int, size: int, senders: int, top: int, clock: str) -> None:
    """Run the node in this process under yappi (all threads) while senders send.

    Prints the top functions by own time, then the node's own functions by total time
    (with ``--clock wall`` the latter shows where an instance waits: fsyncs, the writer).
    """
    import logging

    import yappi

    from dicom_node.config import load_settings
    from dicom_node.server import NodeServer

    folders = [work / "input" / f"sender{n}" for n in range(senders)]
    for n, folder in enumerate(folders):
        write_series(folder, instances, size, seed=n)
    root = work / "node"
    port = free_port()
    logging.basicConfig(level=logging.WARNING)
    os.environ["BRAIN3D_DATABASE__AUDIT_KEY"] = "benchmark-audit-key-0123456789"
    root.mkdir(parents=True)
    # receiver_processes = 0: associations in this process, where yappi sees them
    node = NodeServer(load_settings(write_node_config(root, port, receiver_processes=0)))
    node.start()
    yappi.set_clock_type(clock)
    yappi.start()
    seconds = send(port, folders)
    yappi.stop()
    node.stop()
    print(f"profiled ({clock} clock): {senders} senders x {instances} instances in {seconds:.2f} s")
    stats = yappi.get_func_stats()
    stats.sort("tsub", "desc")
    entries = list(stats)
    print(f"total own time {sum(entry.tsub for entry in entries):.2f} s")
    print(f"{'own s':>10} {'calls':>8}  function")
    for entry in entries[:top]:
        print(f"{entry.tsub:>10.3f} {entry.ncall:>8}  {Path(entry.module).name}:{entry.lineno} {entry.name}")
    print(f"{'total s':>10} {'calls':>8}  node function (own + callees)")
    ours = [entry for entry in entries if f"{os.sep}dicom_node{os.sep}" in entry.module]
    for entry in sorted(ours, key=lambda entry: entry.ttot, reverse=True)[:top]:
        print(f"{entry.ttot:>10.3f} {entry.ncall:>8}  {Path(entry.module).name}:{entry.lineno} {entry.name}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--senders", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--association-per-instance",
        action="store_true",
        help="each sender opens one association per instance (forwarders and some modalities do)",
    )
    parser.add_argument("--profile", action="store_true", help="profile brain3d serve instead")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="yappi clock for --profile")
    parser.add_argument("--bare-scp", nargs=2, metavar=("PORT", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_scp:
        bare_scp(int(args.bare_scp[0]), Path(args.bare_scp[1]))
        return
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: apt-get install dcmtk")
    with tempfile.TemporaryDirectory(prefix="brain3d-ingest-") as work:
        if args.profile:
            profile(Path(work), args.instances, args.size, max(args.senders), args.top, args.clock)
        else:
            per_instance = args.association_per_instance
            benchmark(Path(work), args.instances, args.size, args.senders, args.repeats, per_instance)


if __name__ == "__main__":
    main()
