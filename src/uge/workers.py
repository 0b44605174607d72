"""Several processes sharing one run folder: claims on pieces of work, and a fixed share of a grid per worker.

A *claim* is a small JSON file beside the file a piece of work writes (``records/uge/uge_hacker_cnn.claim``
beside ``uge_hacker_cnn.json``; ``variants/uge/protect.claim`` beside ``protect.json``), created with
``O_CREAT | O_EXCL``, so exactly one process gets it, on a local disk or a shared (NFS v3+) folder alike. It names
its holder (host, process id, a random token). While it is held a heartbeat thread touches it; a claim untouched
for ``timeout`` seconds, or held by a process of this host that no longer exists, is *abandoned* (its worker
died) and the next worker takes it over. The work's own file is written atomically (a temporary file, then a
rename: :func:`uge.utils.atomic_file`), so nobody reads half a record, and a worker killed while writing leaves a
hidden ``.*.tmp`` file that never counts as done.

Staleness compares the claim's modification time with this machine's clock: the machines sharing a folder are
assumed to agree on the time (NTP) to well within ``timeout``. A worker that is suspended for longer than
``timeout`` loses its claims (its heartbeat warns when it notices); the network is then trained twice, and the
same seeds write the same record.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import signal
import socket
import threading
import time
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger("uge")
HOST = socket.gethostname()
CLAIM_TIMEOUT = 600.0  # seconds without a heartbeat before another worker may take a claim over


def claim_path(target: Path) -> Path:
    """The claim file of the work that writes ``target``: ``x.json`` -> ``x.claim``."""
    return target.with_suffix(".claim")


def _holder(path: Path) -> dict:
    """Who holds a claim ({} when the file is gone or not yet written)."""
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _who(holder: dict) -> str:
    return f"{holder.get('host', '?')}:{holder.get('pid', '?')}" if holder else "another worker"


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError, OverflowError):
        return True  # another user's process, or no pid to check: only the timeout can tell
    return True


def abandoned(path: Path, timeout: float) -> str | None:
    """Why the claim file ``path`` is abandoned ("heartbeat 700 s ago", "process 123 is gone"), or None while
    its holder lives (or when the file is gone)."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    if age > timeout:
        return f"last heartbeat {age:.0f} s ago"
    holder = _holder(path)
    if holder.get("host") == HOST and holder.get("pid") != os.getpid() and not _alive(holder.get("pid")):
        return f"process {holder['pid']} on {HOST} is gone"
    return None


class Claim:
    """A held claim: a heartbeat thread keeps it fresh until :meth:`release` (or the end of a ``with`` block)."""

    def __init__(self, path: Path, token: str, heartbeat: float):
        self.path, self.token = path, token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat,), daemon=True, name=f"claim {path.name}")
        self._thread.start()

    def _mine(self) -> bool:
        return _holder(self.path).get("token") == self.token

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            if not self._mine():
                log.warning("the claim %s was taken over by another worker (this one was silent too long)", self.path)
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Stop the heartbeat and delete the claim file (only if it is still this claim's)."""
        self._stop.set()
        self._thread.join()
        if self._mine():
            self.path.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim(target: Path, timeout: float = CLAIM_TIMEOUT) -> Claim | None:
    """Claim the work that writes ``target`` for this process; None while another live worker holds it.

    An abandoned claim (see :func:`abandoned`) is moved aside (a rename: one worker wins) and claimed anew.
    """
    path = claim_path(Path(target))
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            why = abandoned(path, timeout)
            if why is None:
                return None
            aside = path.with_name(f".{path.name}.abandoned-{HOST}-{os.getpid()}")
            try:
                os.rename(path, aside)  # of several workers that saw it abandoned, one moves it
            except FileNotFoundError:
                continue
            log.warning("taking over %s from %s (%s)", path, _who(_holder(aside)), why)
            aside.unlink(missing_ok=True)
            continue
        token = secrets.token_hex(8)
        with os.fdopen(fd, "w") as f:
            json.dump({"host": HOST, "pid": os.getpid(), "token": token,
                       "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, f)
        return Claim(path, token, heartbeat=max(0.05, min(60.0, timeout / 4)))
    return None


class Terminated(SystemExit):
    """SIGTERM received (a scheduler's time limit or preemption, ``kill``): exit status 128 + 15."""

    def __init__(self):
        super().__init__(128 + signal.SIGTERM)


@contextlib.contextmanager
def released_on_sigterm():
    """Within the block, SIGTERM ends the process by the normal exit path (:class:`Terminated`), so every held
    claim's ``with`` block releases it at once: other workers take the work over now, not after the claim's
    timeout, and on another host too. Python's default for SIGTERM ends the process without unwinding. Only the
    main thread can install a handler; elsewhere the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` (0 <= i < n) -> (i, n): this worker's share of a grid split into n."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard takes I/N (this worker's index from 0 and the number of workers), "
                          f"got {text!r}") from None
    if not 0 <= i < n:
        raise ConfigError(f"--shard {text}: need 0 <= I < N (a Slurm array --array=0-{max(n, 1) - 1} and "
                          "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    return i, n


class Worker:
    """One of several processes that share a run folder: which networks it trains, and what it waits for.

    With ``shards = n`` this worker trains the networks whose *group* hashes to ``shard`` (mod n); a group is a
    network and those that need it trained (a distilled hacker goes with its teacher), so no shard waits for
    another one's network. The hash is of the record's folder and file name: the same on every machine, wherever
    the folder is mounted. Shared steps (a variant's protection) go to whichever worker reaches them first.
    Claims keep any two workers (two shards, or two plain workers without shards) off the same piece of work.

    Args:
        shard, shards: this worker's share (default: the whole grid).
        claim_timeout: seconds without a heartbeat after which a claim counts as abandoned.
        poll: seconds between looks at the claims this worker waits for.
    """

    def __init__(self, shard: int = 0, shards: int = 1, claim_timeout: float = CLAIM_TIMEOUT, poll: float = 1.0):
        if not 0 <= shard < shards:
            raise ConfigError(f"shard {shard} of {shards}: need 0 <= shard < shards")
        if claim_timeout < 0:
            raise ConfigError(f"claim timeout must be >= 0 seconds, got {claim_timeout}")
        self.shard, self.shards, self.claim_timeout, self.poll = shard, shards, claim_timeout, poll
        self.claimed: list[str] = []  # the records this worker claimed to train, "variant/file.json"
        self.waiting: set[Path] = set()  # work of this worker's that another live worker holds (this pass)
        self.others: set[Path] = set()  # records of other shards not finished when this pass saw them

    def __str__(self) -> str:
        return f"shard {self.shard}/{self.shards}" if self.shards > 1 else "worker"

    @staticmethod
    def name(target: Path) -> str:
        return f"{target.parent.name}/{target.name}"

    def owns(self, target: Path) -> bool:
        """Whether the network that writes ``target`` (or heads its group) is in this worker's shard."""
        digest = hashlib.sha256(self.name(target).encode()).digest()
        return int.from_bytes(digest[:8], "big") % self.shards == self.shard

    def start_pass(self) -> None:
        self.waiting.clear()
        self.others.clear()

    def take(self, target: Path, *, group: Path | None = None, done=None, ready: bool = True,
             shared: bool = False) -> Claim | None:
        """A held claim on the work that writes ``target``, or None when this worker must skip it for now.

        Args:
            group: the record that heads ``target``'s group (a distilled hacker's teacher); default itself.
            done: () -> bool, checked once the claim is held: the claim's last holder may have finished the
                work between the caller's look and the claim (then it is skipped, and read on the next pass).
            ready: False when the work needs another that this worker is already waiting for (the teacher).
            shared: work of no shard (a variant's protection), done by the first worker to reach it.
        Skipped: another shard's network (remembered until it is finished, for :attr:`complete`), work that
        another live worker holds or that is not ready (waited for: :meth:`wait`).
        """
        if not shared and not self.owns(group or target):
            log.debug("skip %s (another shard's)", target.name)
            self.others.add(target)
            return None
        if not ready:
            return None
        c = claim(target, self.claim_timeout)
        if c is None:
            log.info("skip %s (claimed by %s)", self.name(target), _who(_holder(claim_path(target))))
            self.waiting.add(target)
            return None
        if done is not None and done():
            c.release()
            self.waiting.add(target)
            return None
        if not shared:
            self.claimed.append(self.name(target))
        return c

    def wait(self) -> None:
        """Sleep until a claim this worker waits for is released or abandoned."""
        held = sorted(self.name(t) for t in self.waiting)
        log.info("%s: waiting for %d piece(s) of work other workers hold: %s%s", self, len(held), ", ".join(held[:4]),
                 " …" if len(held) > 4 else "")
        while not any(not claim_path(t).exists() or abandoned(claim_path(t), self.claim_timeout)
                      for t in self.waiting):
            time.sleep(self.poll)

    @property
    def left(self) -> list[Path]:
        """The other shards' records that are not finished, as of now."""
        return [t for t in sorted(self.others) if not t.exists()]

    @property
    def complete(self) -> bool:
        """Whether the whole grid is finished (other shards' records included), as of now."""
        return not self.waiting and not self.left
