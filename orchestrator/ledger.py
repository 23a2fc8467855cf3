"""The host-wide GPU memory ledger: what every up2you-budget process on this machine has claimed, per GPU.

NVML says what is allocated; it cannot say what a stage that just got `go` is about to allocate. The
ledger holds those claims. One small JSON file per GPU UUID in a runtime folder every user can reach,
guarded by an OS file lock (`filelock`: flock, released by the kernel when its holder dies). Nothing
here trusts itself over NVML:

- an entry is a process (pid + start time, so a reused pid is not mistaken for the owner); whoever
  reads the file next removes entries whose process is gone, but only once NVML no longer lists that
  pid (a process can look dead and still hold device memory for a few seconds);
- what is *available* is NVML's free memory minus the part of each live reservation that its process
  has not allocated yet (reserved - NVML used by that pid), so allocated bytes are counted once;
- waiters take tickets, served first come first served: a request is admitted only if it fits after
  setting aside what every earlier waiter needs, so a large request never starves behind small ones
  and, when memory comes back, one waiter takes it (the others still see it set aside or reserved).
  A ticket whose waiter stops polling for TICKET_LEASE_S is dropped; a waiter holds no reservation.
  Reservations have no lease: a live process may hold its memory as long as it runs (a hung stage is
  its runner's to stop), and a dead one's entry goes as described above.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import psutil
from filelock import FileLock, Timeout

from orchestrator.probe import GpuInfo, Probe

RUNTIME_ENV = "UP2YOU_RUNTIME_DIR"
FORMAT = 1
LOCK_TIMEOUT_S = 30.0  # the lock is held for a read-modify-write of a few KB; longer means a hung holder
TICKET_LEASE_S = 30.0  # a waiter polls at least every few seconds; silence this long means it is gone
_START_TOLERANCE_S = 0.05  # psutil's create_time is exact to the clock tick


class LedgerError(RuntimeError):
    """The runtime folder or a ledger file cannot be used; the message names it and the fix."""


@dataclass(frozen=True)
class Reservation:
    """One stage's claim on one GPU, held by the process that will allocate it."""

    gpu_uuid: str
    job_id: str
    stage: str
    pid: int
    pid_started: float
    nbytes: int
    created: float
    owner_pid: int = 0  # the job process that made the claim (for people reading `gpus`)


@dataclass(frozen=True)
class Ticket:
    """A waiter's place in the queue of one GPU; `nbytes` is the least it would accept."""

    gpu_uuid: str
    number: int
    job_id: str
    stage: str
    pid: int
    pid_started: float
    nbytes: int
    created: float
    polled: float


@dataclass(frozen=True)
class Holding:
    """A live reservation and how much of it its process has allocated so far (NVML)."""

    reservation: Reservation
    allocated: int  # NVML used by the pid (0 if NVML does not list it yet)
    alive: bool  # False: the process is gone but NVML still lists its memory

    @property
    def outstanding(self) -> int:
        """Reserved but not yet allocated: what NVML's free memory still contains of this claim."""
        return max(0, self.reservation.nbytes - self.allocated) if self.alive else 0

    @property
    def held(self) -> int:
        """What comes back to the card when this process ends."""
        return max(self.reservation.nbytes, self.allocated) if self.alive else self.allocated


@dataclass(frozen=True)
class LedgerView:
    """One GPU as NVML and the ledger see it together, at one moment."""

    gpu: GpuInfo
    holdings: tuple[Holding, ...]
    tickets: tuple[Ticket, ...]
    foreign: tuple[tuple[int, int, str], ...] = field(default=())  # (pid, bytes, name) NVML lists, not ours

    def available(self, exclude_job: str | None = None) -> int:
        """Free and unreserved: NVML free minus the outstanding part of other jobs' claims."""
        out = sum(h.outstanding for h in self.holdings if h.reservation.job_id != exclude_job)
        return max(0, self.gpu.free - out)

    def ahead_of(self, ticket: Ticket | None, job_id: str) -> int:
        """Bytes set aside for the waiters before `ticket` (all waiters of other jobs if it is None)."""
        return sum(t.nbytes for t in self.tickets
                   if t.job_id != job_id and (ticket is None or t.number < ticket.number))  # fmt: skip

    def if_siblings_finished(self, job_id: str) -> int:
        """Available once every other ledger entry has ended: NVML free plus what those processes hold."""
        back = sum(h.allocated for h in self.holdings if h.reservation.job_id != job_id)
        return self.gpu.free + back


def default_root() -> Path:
    """$UP2YOU_RUNTIME_DIR, else <system temp>/up2you-budget (mode 1777, like /tmp: every user can add)."""
    env = os.environ.get(RUNTIME_ENV)
    return Path(env) if env else Path(tempfile.gettempdir()) / "up2you-budget"


def process_start(pid: int) -> float | None:
    """The process's start time (psutil), or None if it is gone or a zombie."""
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p.create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:  # another user's live process
        return -1.0


def _alive(pid: int, started: float) -> bool:
    now = process_start(pid)
    return now is not None and (now < 0 or abs(now - started) <= _START_TOLERANCE_S)


def _safe(uuid: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", uuid) or "unknown"


class Ledger:
    """Reservations and waiters per GPU, shared by every process on the host through `root`.

    With a `probe`, every admission re-reads the GPU from NVML inside the lock (the caller's snapshot
    may be seconds old); without one, the GpuInfo passed in is taken as current.
    """

    def __init__(self, root: Path | None = None, probe: Probe | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.probe = probe
        self._prepare_root()

    # --- files -------------------------------------------------------------------------------
    def _prepare_root(self) -> None:
        shared = self.root == default_root() and RUNTIME_ENV not in os.environ
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if shared and self.root.stat().st_uid == os.getuid():
                os.chmod(self.root, 0o1777)
        except OSError as exc:
            raise LedgerError(f"cannot use the GPU ledger folder {self.root} ({exc.strerror}); set "
                              f"{RUNTIME_ENV} to a folder every user of this GPU can write") from None  # fmt: skip

    def _paths(self, gpu_uuid: str) -> tuple[Path, Path]:
        name = _safe(gpu_uuid)
        return self.root / f"{name}.json", self.root / f"{name}.lock"

    @contextlib.contextmanager
    def _locked(self, gpu_uuid: str) -> Iterator[dict]:
        """Read-modify-write of one GPU's file under its lock; the dict is written back on exit."""
        data_path, lock_path = self._paths(gpu_uuid)
        lock = _file_lock(lock_path)
        try:
            with lock:
                fd = _open_shared(data_path)
                try:
                    state = _read(fd, data_path)
                    before = json.dumps(state, sort_keys=True)
                    yield state
                    after = json.dumps(state, sort_keys=True)
                    if after != before:
                        _write(fd, after)
                finally:
                    os.close(fd)
        except Timeout:
            raise LedgerError(f"the GPU ledger {lock_path} has been locked for {LOCK_TIMEOUT_S:.0f} s; a hung "
                              f"up2you-budget process? (`up2you-budget gpus` lists them)") from None  # fmt: skip
        except PermissionError as exc:
            raise LedgerError(f"cannot write the GPU ledger {exc.filename or data_path}; set {RUNTIME_ENV} to a "
                              f"folder every user of this GPU can write") from None  # fmt: skip

    # --- reading -----------------------------------------------------------------------------
    def _fresh(self, gpu: GpuInfo) -> GpuInfo:
        if self.probe is None:
            return gpu
        for g in self.probe.gpus():
            if g.uuid == gpu.uuid or (not gpu.uuid and g.index == gpu.index):
                return g
        return gpu

    def _view(self, state: dict, gpu: GpuInfo | None) -> LedgerView:
        """Sweep dead entries and stale tickets from `state`, then combine what is left with NVML.

        Without `gpu` (NVML not read) a dead entry is left in the file: only NVML can say its memory is gone.
        """
        nvml = {p.pid: p for p in gpu.processes} if gpu is not None else {}
        now = time.time()
        holdings, kept = [], []
        for raw in state["entries"]:
            r = Reservation(**raw)
            alive = _alive(r.pid, r.pid_started)
            listed = nvml.get(r.pid)
            if not alive and (listed is None or gpu is None):
                if gpu is None:
                    kept.append(raw)
                continue  # gone, and NVML no longer lists it: swept
            kept.append(raw)
            holdings.append(Holding(r, (listed.used_bytes or 0) if listed is not None else 0, alive))
        state["entries"] = kept
        tickets = [Ticket(**t) for t in state["tickets"]]
        tickets = [t for t in tickets if now - t.polled <= TICKET_LEASE_S and _alive(t.pid, t.pid_started)]
        state["tickets"] = [asdict(t) for t in tickets]
        ours = {h.reservation.pid for h in holdings}
        procs = gpu.processes if gpu is not None else ()
        foreign = tuple((p.pid, p.used_bytes or 0, p.name) for p in procs if p.pid not in ours)
        gpu = gpu or GpuInfo(-1, "", "", 0, 0, 0)
        return LedgerView(gpu, tuple(holdings), tuple(sorted(tickets, key=lambda t: t.number)), foreign)

    def view(self, gpu: GpuInfo) -> LedgerView:
        """The GPU now (re-read if the ledger has a probe), with dead entries swept."""
        with self._locked(gpu.uuid) as state:
            return self._view(state, self._fresh(gpu))

    def entries(self, gpu_uuid: str) -> list[Reservation]:
        """Live reservations on that GPU; dead pids are swept once NVML (the probe, if any) no longer lists them."""
        with self._locked(gpu_uuid) as state:
            return [h.reservation for h in self._view(state, self._by_uuid(gpu_uuid)).holdings if h.alive]

    def tickets(self, gpu_uuid: str) -> list[Ticket]:
        """The live waiters on that GPU, in the order they will be served."""
        with self._locked(gpu_uuid) as state:
            return list(self._view(state, None).tickets)

    def _by_uuid(self, gpu_uuid: str) -> GpuInfo | None:
        if self.probe is None:
            return None
        return next((g for g in self.probe.gpus() if g.uuid == gpu_uuid), None)

    def available(self, gpu: GpuInfo, exclude_job: str | None = None) -> int:
        """NVML free minus the not-yet-allocated part of live reservations (of jobs other than exclude_job)."""
        return self.view(gpu).available(exclude_job)

    # --- claiming ----------------------------------------------------------------------------
    def reserve(
        self, gpu: GpuInfo, job_id: str, stage: str, pid: int, nbytes: int, *,
        ticket: Ticket | None = None, keep_free: int = 0, cap: int | None = None, owner_pid: int | None = None,
    ) -> Reservation | None:  # fmt: skip
        """Claim `nbytes` for process `pid`, or None if it does not fit now (see `reserve_first_fit`)."""
        return self.reserve_first_fit(gpu, job_id, stage, pid, [nbytes], ticket=ticket, keep_free=keep_free, cap=cap,
                                      owner_pid=owner_pid)  # fmt: skip

    def reserve_first_fit(
        self, gpu: GpuInfo, job_id: str, stage: str, pid: int, sizes: Sequence[int], *,
        ticket: Ticket | None = None, keep_free: int = 0, cap: int | None = None, owner_pid: int | None = None,
    ) -> Reservation | None:  # fmt: skip
        """Claim the first of `sizes` (in the caller's preference order) that fits now, atomically.

        Fits: size <= cap and size <= available - keep_free - what earlier waiters need. A granted
        ticket leaves the queue. Returns None (and changes nothing) when no size fits.
        """
        started = process_start(pid)
        if started is None:
            raise LedgerError(f"cannot reserve GPU memory for pid {pid}: no such process")
        with self._locked(gpu.uuid) as state:
            view = self._view(state, self._fresh(gpu))
            room = view.available() - keep_free - view.ahead_of(ticket, job_id)
            if cap is not None:
                room = min(room, cap)
            size = next((s for s in sizes if s <= room), None)
            if size is None:
                return None
            r = Reservation(gpu.uuid, job_id, stage, pid, started, int(size), time.time(), owner_pid or os.getpid())
            state["entries"].append(asdict(r))
            if ticket is not None:
                state["tickets"] = [t for t in state["tickets"] if t["number"] != ticket.number]
            return r

    def release(self, r: Reservation) -> None:
        """Give the claim back (idempotent)."""
        with self._locked(r.gpu_uuid) as state:
            state["entries"] = [e for e in state["entries"]
                                if not (e["pid"] == r.pid and e["created"] == r.created and e["stage"] == r.stage)]  # fmt: skip

    def shrink(self, r: Reservation, nbytes: int) -> Reservation:
        """Lower a claim to `nbytes` (never raise it): for a process whose work is done and that only gives
        memory back from here on. The same claim (release finds it); a claim already gone stays gone."""
        smaller = replace(r, nbytes=min(r.nbytes, max(0, int(nbytes))))
        with self._locked(r.gpu_uuid) as state:
            for e in state["entries"]:
                if e["pid"] == r.pid and e["created"] == r.created and e["stage"] == r.stage:
                    e["nbytes"] = smaller.nbytes
        return smaller

    # --- waiting -----------------------------------------------------------------------------
    def take_ticket(self, gpu: GpuInfo, job_id: str, stage: str, nbytes: int, pid: int | None = None) -> Ticket:
        """Join the queue of this GPU (one ticket per job: an older one of the same job is replaced)."""
        pid = pid or os.getpid()
        started = process_start(pid) or time.time()
        with self._locked(gpu.uuid) as state:
            self._view(state, None)
            mine = [t for t in state["tickets"] if t["job_id"] == job_id]
            number = mine[0]["number"] if mine else state["next_ticket"]  # a job keeps its place
            state["next_ticket"] = max(state["next_ticket"], number + 1)
            now = time.time()
            t = Ticket(gpu.uuid, number, job_id, stage, pid, started, int(nbytes), now, now)
            state["tickets"] = [x for x in state["tickets"] if x["job_id"] != job_id] + [asdict(t)]
            return t

    def touch(self, ticket: Ticket, nbytes: int | None = None) -> Ticket:
        """Renew the ticket's lease (and change what it asks for); re-queues it at its number if swept."""
        with self._locked(ticket.gpu_uuid) as state:
            t = Ticket(**{**asdict(ticket), "polled": time.time(),
                          "nbytes": int(nbytes if nbytes is not None else ticket.nbytes)})  # fmt: skip
            state["tickets"] = [x for x in state["tickets"] if x["number"] != ticket.number] + [asdict(t)]
            return t

    def drop_ticket(self, ticket: Ticket) -> None:
        with self._locked(ticket.gpu_uuid) as state:
            state["tickets"] = [t for t in state["tickets"] if t["number"] != ticket.number]

    def all_gpus(self) -> list[str]:
        """UUIDs that have a ledger file here (for `gpus`)."""
        return sorted(p.stem for p in self.root.glob("*.json"))


def _file_lock(path: Path) -> FileLock:
    """An flock on `path`, created writable by every user (filelock < 3.10 has no `mode`: umask decides)."""
    try:
        return FileLock(str(path), mode=0o666, timeout=LOCK_TIMEOUT_S)
    except TypeError:  # pragma: no cover - an old filelock, e.g. the one a preinstalled torch brought
        return FileLock(str(path), timeout=LOCK_TIMEOUT_S)


# --- the file: written in place under the lock (a sticky folder forbids replacing another user's file) ----
def _open_shared(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR)  # no O_CREAT: fs.protected_regular refuses it on others' files in /tmp
    except FileNotFoundError:
        pass
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return os.open(path, os.O_RDWR)
    with contextlib.suppress(OSError):
        os.fchmod(fd, stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IWGRP | stat.S_IROTH | stat.S_IWOTH)
    return fd


def _empty() -> dict:
    return {"format": FORMAT, "entries": [], "tickets": [], "next_ticket": 1}


def _read(fd: int, path: Path) -> dict:
    raw = b""
    while chunk := os.pread(fd, 1 << 16, len(raw)):
        raw += chunk
    text = raw.decode(errors="replace").strip()
    if not text:
        return _empty()
    try:
        # raw_decode: a writer killed between the write and the truncate leaves trailing bytes, ignored
        state, _ = json.JSONDecoder().raw_decode(text)
    except ValueError:
        return _empty()  # unreadable: start over (live stages' memory is still in NVML's numbers)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        return _empty()
    for key, default in _empty().items():
        state.setdefault(key, default)
    return state


def _write(fd: int, text: str) -> None:
    data = (text + "\n").encode()
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))
