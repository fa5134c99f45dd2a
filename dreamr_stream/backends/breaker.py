"""A circuit breaker: stop calling a server that is down, and probe it back.

Why: a served model that is down (refusing connections, stalled, answering 5xx) costs every new
request the whole wait for its failure: a connect timeout, or the call's deadline. After
``failures`` failures in a row the breaker *opens*: calls fail at once, without touching the
server, for a cool-down (``cooldown_s``). After it one call is let through as a probe
(*half-open*); its success closes the breaker, its failure opens it again for twice as long (up
to ``max_cooldown_s``). For a draft that means requests go on with the target alone at once;
for a target they fail fast with a clear error, and both recover by themselves when the server
is back.

The breaker knows nothing of HTTP: its owner says which outcomes count as failures (connect
errors, timeouts, 5xx: a server that answers 4xx is up). It is thread-safe, since a backend
used from several event loops shares one.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import anyio

__all__ = ["Admission", "CircuitBreaker"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Admission:
    """Whether a call may go to the server: ``refused`` says why not; ``probe``: it is the one
    call let through after a cool-down."""

    refused: str | None = None
    probe: bool = False


class CircuitBreaker:
    """Counts a server's consecutive failures and refuses calls while it is taken to be down."""

    def __init__(
        self,
        *,
        failures: int = 3,
        cooldown_s: float = 5.0,
        max_cooldown_s: float = 60.0,
        name: str = "server",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failures = failures
        self.cooldown_s = cooldown_s
        self.max_cooldown_s = max_cooldown_s
        self.name = name
        self._clock = clock
        self._lock = threading.Lock()
        self._streak = 0  # failures in a row
        self._since: float | None = None  # wall-clock time of the streak's first failure
        self._last = ""  # the last failure, for the refusal
        self._open_until: float | None = None  # None: closed
        self._cooldown = cooldown_s
        self._probing = False

    @property
    def open(self) -> bool:
        """Calls are refused now (or only a probe goes through)."""
        return self._open_until is not None

    def admit(self) -> Admission:
        """Whether a call may go now; the caller then reports ``success``, ``failure`` or
        ``abandon`` (with the admission's ``probe``)."""
        with self._lock:
            if self._open_until is None:
                return Admission()
            wait = self._open_until - self._clock()
            if wait <= 0 and not self._probing:
                self._probing = True
                return Admission(probe=True)
            since = time.strftime("%H:%M:%S", time.localtime(self._since))
            then = f"next try in {wait:.1f} s" if wait > 0 else "a probe call is under way"
            return Admission(refused=f"unavailable since {since} ({self._streak} failed calls; {then}): {self._last}")

    def success(self) -> None:
        """The server answered: close the breaker."""
        with self._lock:
            was_open = self._open_until is not None
            self._streak, self._since, self._open_until, self._probing = 0, None, None, False
            self._cooldown = self.cooldown_s
        if was_open:
            log.info("%s is back: calls go through again", self.name)

    def failure(self, detail: str, *, probe: bool = False) -> None:
        """The server failed a call (``detail`` says how): open the breaker after enough of
        them, or again (for longer) when the probe failed."""
        with self._lock:
            self._streak += 1
            self._since = self._since or time.time()
            self._last = detail
            if probe:
                self._probing = False
                self._cooldown = min(self.max_cooldown_s, self._cooldown * 2)
            elif self._open_until is not None or self._streak < self.failures:
                return
            self._open_until = self._clock() + self._cooldown
            cooldown = self._cooldown
        log.warning("%s is unavailable (%s); calls fail at once for %.1f s", self.name, detail, cooldown)

    def abandon(self, *, probe: bool = False) -> None:
        """The call ended without telling (cancelled): a probe's turn passes to the next call."""
        if probe:
            with self._lock:
                self._probing = False

    @contextlib.asynccontextmanager
    async def guard(
        self,
        deadline_s: float,
        *,
        refused: Callable[[str], Exception],
        timed_out: Callable[[], Exception],
        failed: Callable[[Exception], bool],
    ) -> AsyncIterator[None]:
        """One call to the server: refused at once while the breaker is open (the error
        ``refused(why)``), ended at ``deadline_s`` (``timed_out()``, a failure), and its outcome
        counted: an exception for which ``failed`` holds is a failure, any other outcome shows
        the server up. A cancelled call counts neither way."""
        admission = self.admit()
        if admission.refused is not None:
            raise refused(admission.refused)
        try:
            with anyio.fail_after(deadline_s):
                yield
        except TimeoutError as e:
            error = timed_out()
            self.failure(str(error), probe=admission.probe)
            raise error from e
        except Exception as e:
            if failed(e):
                self.failure(str(e), probe=admission.probe)
            else:
                self.success()
            raise
        except BaseException:
            self.abandon(probe=admission.probe)
            raise
        self.success()
