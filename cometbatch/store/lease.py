"""One run per output on an object store: a lock object holding a lease that its run renews."""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from ..errors import LedgerError
from .liverun import holder_alive, holder_text
from .lock import process_start

log = logging.getLogger(__name__)

# A lease outlives a few missed renewals; a run on another host that died is taken over
# once its lease ran out (a dead run on this host at once, by its pid).
LEASE_S = 120.0
RENEW_S = 30.0


class LeaseLock:
    """The lock object of an output on a store, renewed by a thread while it is held."""

    def __init__(
        self,
        where: str,
        read: Callable[[], bytes],
        write: Callable[[bytes], None],
        remove: Callable[[], None],
        *,
        lease_s: float = LEASE_S,
        renew_s: float = RENEW_S,
        clock: Callable[[], float] = time.time,
        create: Callable[[bytes], None] | None = None,
    ) -> None:
        self.where = where
        self._read, self._write, self._remove = read, write, remove
        # A write that fails (FileExistsError) when the object exists, where the store has
        # one: two runs that found the output free at once cannot both take it.
        self._create = create
        self.lease_s = lease_s
        self.renew_s = renew_s
        self._clock = clock
        self._info: dict[str, Any] | None = None
        # Set when a renewal found another run's token: this run no longer owns the output.
        self._lost = False
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self.renewals = 0

    def __repr__(self) -> str:
        state = "held" if self._info is not None else "free"
        return f"<LeaseLock {self.where!r} {state} renewals={self.renewals}>"

    @property
    def held(self) -> bool:
        return self._info is not None

    def holder(self) -> dict[str, Any] | None:
        """The lock object's info, as far as it can be read (None: no lock object)."""
        try:
            info = json.loads(self._read())
        except FileNotFoundError:
            return None
        except ValueError:
            return {}
        return info if isinstance(info, dict) else {}

    def acquire(self) -> None:
        """Take the lock unless a live run holds it (LedgerError naming that run)."""
        if self._info is not None:
            raise RuntimeError(f"{self!r} is already held")
        current = self.holder()
        if current and holder_alive(current, self._clock()) is not False:
            raise self._in_use(current)
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "process_start": process_start(os.getpid()),
            "token": secrets.token_hex(8),
            "expires_at": self._clock() + self.lease_s,
        }
        data = json.dumps(info).encode()
        if current is None and self._create is not None:
            try:
                self._create(data)
            except FileExistsError:
                raise self._in_use(self.holder() or {}) from None
        else:
            self._write(data)
        # Two runs that found it free (or stale) at once both wrote: the one whose info stayed
        # wins.
        now = self.holder()
        if not now or now.get("token") != info["token"]:
            raise self._in_use(now or {})
        self._info = info
        self._lost = False
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew, name="cometbatch-lease", daemon=True)
        self._renewer.start()

    def _in_use(self, info: dict[str, Any]) -> LedgerError:
        return LedgerError(
            f"{self.where} is in use by another cometbatch run ({holder_text(info)}); "
            "wait for it to finish or stop it"
        )

    def renew(self) -> None:
        """Push the lease's end further (the renewing thread calls it)."""
        info = self._info
        if info is None:
            return
        current = self.holder()
        if current is not None and current.get("token") != info["token"]:
            # This run's lease ran out unrenewed and another run took the output: writing on
            # would take it back from under that run. Said loudly; the lease is not renewed.
            log.error("the lock of %s was taken over by %s", self.where, holder_text(current))
            self._lost = True
            self._stop.set()
            return
        info = {**info, "expires_at": self._clock() + self.lease_s}
        self._write(json.dumps(info).encode())
        self._info = info
        self.renewals += 1

    def check(self) -> None:
        """Raise LedgerError unless this run may still write: its lease is its own and has a
        quarter of its length left (a run stalled past it may have been taken over)."""
        info = self._info
        if info is None:
            return  # not taken (a read-only command), or let go: nothing to guard
        if self._lost or self._clock() > info["expires_at"] - self.lease_s / 4:
            raise LedgerError(
                f"{self.where}: this run's lock ran out or was taken over by another run, so "
                "it writes nothing more there (what it recorded stands; run again to resume)"
            )

    def _renew(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                self.renew()
            except Exception as exc:  # the next renewal tries again; the lease has slack
                log.warning("could not renew the lock of %s: %s", self.where, exc)

    def release(self) -> None:
        """Stop renewing and remove the lock object if it is still this run's."""
        info, self._info = self._info, None
        if info is None:
            return
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
        try:
            current = self.holder()
            if current is not None and current.get("token") == info["token"]:
                self._remove()
        except OSError as exc:
            log.warning("could not remove the lock of %s: %s", self.where, exc)
