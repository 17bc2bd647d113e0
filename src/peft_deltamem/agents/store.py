"""Where sessions live between turns: a directory (default) or Redis, with one lock per session.

A session is stored as a :class:`SessionRecord`: the message log and counters as JSON, the memory as the
bytes of a ``DeltaMemory`` safetensors file, and the memory checkpoints a fork returns to (one row each) as
another. Saving is atomic: a reader sees the old turn or the new
one, never a mix. The lock serialises turns of one session across threads and processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}")
RECORD_VERSION = 1


class InvalidSessionId(ValueError):
    """A session id that could escape the store or is not a plain name."""


class CorruptSession(RuntimeError):
    """A stored session that cannot be read (damaged on the server's side, not the client's fault).

    It names the session and where it is stored; the stored data is left as it was, for inspection.
    """


class SessionBusy(TimeoutError):
    """Another turn of the same session holds its lock."""


def check_session_id(session_id: object) -> str:
    """Return ``session_id`` if it is a plain name (letters, digits, ``_ . @ -``; 1–128 chars; no ``..``)."""
    if not isinstance(session_id, str) or not SESSION_ID.fullmatch(session_id) or ".." in session_id:
        raise InvalidSessionId(
            f"invalid session id {session_id!r}: use 1-128 characters from letters, digits and _ . @ - , starting "
            "with a letter or digit, without '..'"
        )
    return session_id


@dataclass
class SessionRecord:
    """What a store keeps of one session."""

    messages: list[dict[str, str]] = field(default_factory=list)  # the whole log, oldest first
    processed: int = 0  # messages[:processed] have been written into memory (or skipped by the write policy)
    memory: bytes | None = None  # DeltaMemory.to_bytes(); None: nothing written yet
    stats: dict = field(default_factory=dict)  # turns, tokens_written, ...
    # the memory after messages[:i] for each i in `checkpoints` (ascending, <= processed), one DeltaMemory row each
    checkpoints: list[int] = field(default_factory=list)
    checkpoint_memory: bytes | None = None

    def to_dict(self) -> dict:
        """Everything but the memory bytes, as JSON-ready data."""
        data = asdict(self)
        data.pop("memory")
        data.pop("checkpoint_memory")
        return {"version": RECORD_VERSION, **data}

    @classmethod
    def from_dict(cls, data: dict, memory: bytes | None, checkpoint_memory: bytes | None = None) -> SessionRecord:
        """The record of ``data`` (as :meth:`to_dict` wrote it); ValueError naming the field that is wrong."""
        if not isinstance(data, dict):
            raise ValueError(f"the record is a JSON {type(data).__name__}, not an object")
        data = dict(data)
        if data.pop("version", None) != RECORD_VERSION:
            raise ValueError(f"session record of an unknown version; this peft-deltamem reads version {RECORD_VERSION}")
        messages, processed, stats = data.get("messages"), data.get("processed"), data.get("stats")
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise ValueError("'messages' must be a list of {'role': str, 'content': str} objects")
        if isinstance(processed, bool) or not isinstance(processed, int) or not 0 <= processed <= len(messages):
            raise ValueError(f"'processed' must be an int in 0..{len(messages)}, got {processed!r}")
        if not isinstance(stats, dict):
            raise ValueError(f"'stats' must be an object, got {type(stats).__name__}")
        checkpoints = data.get("checkpoints", [])  # absent in records written before forks existed
        if (
            not isinstance(checkpoints, list)
            or not all(isinstance(c, int) and not isinstance(c, bool) and 0 < c <= processed for c in checkpoints)
            or checkpoints != sorted(set(checkpoints))
        ):
            raise ValueError(f"'checkpoints' must be ascending ints in 1..{processed}, got {checkpoints!r}")
        if bool(checkpoints) != (checkpoint_memory is not None):
            raise ValueError("'checkpoints' and the checkpoint memory file must be present together")
        return cls(messages=messages, processed=processed, stats=stats, memory=memory, checkpoints=checkpoints,
                   checkpoint_memory=checkpoint_memory)  # fmt: skip


class SessionStore(ABC):
    """A place for session records with a lock per session (see :class:`DirectoryStore`, :class:`RedisStore`)."""

    @abstractmethod
    def load(self, session_id: str) -> SessionRecord | None:
        """The stored record, or None for a session that does not exist."""

    @abstractmethod
    def save(self, session_id: str, record: SessionRecord) -> None:
        """Store ``record`` atomically (replaces the previous one)."""

    @abstractmethod
    def delete(self, session_id: str) -> bool:
        """Remove the session; False if it did not exist."""

    @abstractmethod
    def list(self) -> list[str]:
        """The ids of the stored sessions."""

    @abstractmethod
    def lock(self, session_id: str, timeout: float | None = None) -> contextlib.AbstractContextManager:
        """Hold the session's lock (across threads and processes); raises :class:`SessionBusy` after ``timeout``."""

    def purge_expired(self) -> int:
        """Delete the sessions idle for longer than the store's ``ttl`` (skipping busy ones); how many went."""
        return 0


def _check_ttl(ttl: object) -> float | None:
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0):
        raise ValueError(f"ttl must be a positive number of seconds (or None: sessions never expire), got {ttl!r}")
    return ttl


class DirectoryStore(SessionStore):
    """One folder per session under ``root``: ``session.json`` and the memory file it names.

    A save writes a new memory file, then atomically replaces ``session.json`` (which names that file), then
    removes the previous memory file: a crash at any point leaves a consistent session. The lock is an
    ``fcntl`` lock on ``<root>/.locks/<id>.lock`` (threads and processes on one machine). With ``ttl`` (seconds),
    a session not saved for longer is gone: ``load`` and ``list`` no longer see it and :meth:`purge_expired`
    deletes its folder.
    """

    def __init__(self, root: str | os.PathLike, ttl: float | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.ttl = _check_ttl(ttl)

    def _expired(self, meta: Path) -> bool:
        try:
            return self.ttl is not None and time.time() - meta.stat().st_mtime > self.ttl
        except FileNotFoundError:
            return True

    def _dir(self, session_id: str) -> Path:
        return self.root / check_session_id(session_id)

    def load(self, session_id: str) -> SessionRecord | None:
        folder = self._dir(session_id)
        meta = folder / "session.json"
        if not meta.is_file() or self._expired(meta):
            return None
        try:
            data = json.loads(meta.read_text(encoding="utf-8"))
            blobs = {}
            for field_name in ("memory_file", "checkpoint_file"):
                name = data.pop(field_name, None) if isinstance(data, dict) else None
                if name is not None and (not isinstance(name, str) or Path(name).name != name):
                    raise ValueError(f"'{field_name}' must be a file name in the session folder, got {name!r}")
                blobs[field_name] = (folder / name).read_bytes() if name else None
            return SessionRecord.from_dict(data, blobs["memory_file"], blobs["checkpoint_file"])
        except (ValueError, OSError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
            raise CorruptSession(
                f"session {session_id!r} cannot be read from {meta}: {error}. It is left as it is for inspection; "
                "delete the session (DELETE /v1/sessions/ID) or repair the file."
            ) from error

    def save(self, session_id: str, record: SessionRecord) -> None:
        folder = self._dir(session_id)
        folder.mkdir(exist_ok=True)
        meta = folder / "session.json"
        previous = json.loads(meta.read_text(encoding="utf-8")) if meta.is_file() else {}
        names = {}
        for field_name, prefix, blob in (
            ("memory_file", "memory", record.memory),
            ("checkpoint_file", "checkpoints", record.checkpoint_memory),
        ):
            names[field_name] = None
            if blob is not None:
                names[field_name] = f"{prefix}-{time.time_ns()}.safetensors"
                _atomic_write(folder / names[field_name], blob)
        data = {**record.to_dict(), **names}
        _atomic_write(meta, json.dumps(data, ensure_ascii=False).encode("utf-8"))
        for field_name, name in names.items():
            old = previous.get(field_name) if isinstance(previous, dict) else None
            if isinstance(old, str) and Path(old).name == old and old != name:
                (folder / old).unlink(missing_ok=True)

    def delete(self, session_id: str) -> bool:
        folder = self._dir(session_id)
        if not (folder / "session.json").is_file():
            return False
        shutil.rmtree(folder)
        return True

    def list(self) -> list[str]:
        metas = (p / "session.json" for p in self.root.iterdir())
        return sorted(m.parent.name for m in metas if m.is_file() and not self._expired(m))

    def purge_expired(self) -> int:
        if self.ttl is None:
            return 0
        gone = 0
        for folder in self.root.iterdir():
            meta = folder / "session.json"
            if not meta.is_file() or not self._expired(meta):
                continue
            try:
                with self.lock(folder.name, timeout=0):
                    if self._expired(meta):  # not saved by a turn meanwhile
                        shutil.rmtree(folder)
                        gone += 1
            except (SessionBusy, InvalidSessionId):
                continue
        return gone

    @contextlib.contextmanager
    def lock(self, session_id: str, timeout: float | None = None) -> Iterator[None]:
        locks = self.root / ".locks"
        locks.mkdir(exist_ok=True)
        # a separate open file per holder: flock then also excludes other threads of this process
        with open(locks / f"{check_session_id(session_id)}.lock", "a+") as handle:
            _flock(handle, session_id, timeout)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


class RedisStore(SessionStore):
    """Sessions in Redis, shared by several server processes: one hash per session, a Redis lock per session.

    ``client`` is a ``redis.Redis`` (``redis.Redis.from_url("redis://localhost:6379/0")``). A save writes the
    JSON and the memory bytes in one transaction. With ``ttl`` (seconds) Redis expires a session not saved for
    longer (``EXPIRE`` on every save).
    """

    def __init__(
        self, client, prefix: str = "peft-deltamem", lock_ttl: float = 600.0, ttl: float | None = None
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.lock_ttl = lock_ttl
        self.ttl = _check_ttl(ttl)

    def _key(self, session_id: str) -> str:
        return f"{self.prefix}:session:{check_session_id(session_id)}"

    def load(self, session_id: str) -> SessionRecord | None:
        data = self.client.hgetall(self._key(session_id))
        if not data:
            return None
        memory = data.get(b"memory") or None
        try:
            return SessionRecord.from_dict(json.loads(data[b"record"]), memory, data.get(b"checkpoints") or None)
        except (KeyError, ValueError, UnicodeDecodeError) as error:
            raise CorruptSession(
                f"session {session_id!r} cannot be read from Redis key {self._key(session_id)!r}: {error!r}. It is "
                "left as it is for inspection; delete the session or repair the key."
            ) from error

    def save(self, session_id: str, record: SessionRecord) -> None:
        key = self._key(session_id)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.hset(key, mapping={"record": json.dumps(record.to_dict()), "memory": record.memory or b"",
                                    "checkpoints": record.checkpoint_memory or b""})  # fmt: skip
            if self.ttl is not None:
                pipe.pexpire(key, max(1, round(self.ttl * 1000)))
            pipe.sadd(f"{self.prefix}:sessions", session_id)
            pipe.execute()

    def delete(self, session_id: str) -> bool:
        key = self._key(session_id)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.srem(f"{self.prefix}:sessions", session_id)
            deleted, _ = pipe.execute()
        return bool(deleted)

    def list(self) -> list[str]:
        ids = sorted(m.decode("utf-8") for m in self.client.smembers(f"{self.prefix}:sessions"))
        if self.ttl is None:
            return ids
        return [i for i in ids if self.client.exists(self._key(i))]  # expired keys leave their id behind

    def purge_expired(self) -> int:
        if self.ttl is None:
            return 0
        members = self.client.smembers(f"{self.prefix}:sessions")
        gone = [m for m in members if not self.client.exists(self._key(m.decode("utf-8")))]
        if gone:
            self.client.srem(f"{self.prefix}:sessions", *gone)
        return len(gone)

    @contextlib.contextmanager
    def lock(self, session_id: str, timeout: float | None = None) -> Iterator[None]:
        lock = self.client.lock(f"{self._key(session_id)}:lock", timeout=self.lock_ttl, blocking_timeout=timeout)
        if not lock.acquire(blocking=True):
            raise SessionBusy(f"session {session_id!r} is busy with another turn (waited {timeout} s)")
        try:
            yield
        finally:
            lock.release()


def _flock(handle, session_id: str, timeout: float | None) -> None:
    if timeout is None:
        fcntl.flock(handle, fcntl.LOCK_EX)
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise SessionBusy(f"session {session_id!r} is busy with another turn (waited {timeout} s)") from None
            time.sleep(0.005)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
