"""Fair admission within one instance: when the engine's batch is full, waiting requests are let
in by user, in turn, instead of first come first served.

The engine runs at most ZEUS_MAX_BATCH_SIZE generations at once and queues the rest in arrival
order, so one user's 50 queued requests would stand in front of another's single one. The gate
keeps the engine's batch at most full and holds the rest here, at most ZEUS_MAX_QUEUE of them
(beyond that: 429, as the engine's own queue would answer). When a slot frees, it goes to the
waiting user with the fewest generations running on this instance, ties broken by who was served
longest ago (round robin). Everything runs on the event loop's thread: no locks.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict, deque

from app.access.errors import AccessRefused


class FairGate:
    """capacity: generations let through at once (the engine's batch); max_waiting: held here."""

    def __init__(self, capacity: int, max_waiting: int, retry_after_s: int = 1) -> None:
        self.capacity = capacity
        self.max_waiting = max_waiting
        self.retry_after_s = retry_after_s
        self.admitted = 0
        self.admitted_by_user: defaultdict[int, int] = defaultdict(int)
        self._waiting: dict[int, deque[asyncio.Future[None]]] = {}
        self._last_served: dict[int, int] = {}
        self._clock = itertools.count()
        self._waiting_count = 0

    @property
    def waiting(self) -> int:
        # A plain counter: health, heartbeat and metrics read it from other threads.
        return self._waiting_count

    def waiting_users(self) -> dict[int, int]:
        return {user: len(line) for user, line in self._waiting.items()}

    async def enter(self, user_id: int) -> None:
        """Returns once this request may go to the engine; the caller must call leave() later.
        Raises AccessRefused (429) when the batch is full and max_waiting requests already wait."""
        if self.admitted < self.capacity and not self._waiting:
            self._grant(user_id)
            return
        if self.waiting >= self.max_waiting:
            raise AccessRefused(
                f"server busy: {self.admitted} generations running (ZEUS_MAX_BATCH_SIZE) and "
                f"{self.waiting} waiting (ZEUS_MAX_QUEUE) on this instance",
                retry_after_s=self.retry_after_s,
                reason="full",
            )
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(user_id, deque()).append(turn)
        self._waiting_count += 1
        self._dispatch()
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.leave(user_id)  # granted in the same instant it was abandoned: give it on
            else:
                self._forget(user_id, turn)
            raise

    def leave(self, user_id: int) -> None:
        """A generation let through by enter() ended: its slot goes to the next user in turn."""
        self.admitted -= 1
        self.admitted_by_user[user_id] -= 1
        if self.admitted_by_user[user_id] <= 0:
            del self.admitted_by_user[user_id]
        self._dispatch()

    def _grant(self, user_id: int) -> None:
        self.admitted += 1
        self.admitted_by_user[user_id] += 1
        self._last_served[user_id] = next(self._clock)

    def _forget(self, user_id: int, turn: asyncio.Future[None]) -> None:
        line = self._waiting.get(user_id)
        if line is not None:
            try:
                line.remove(turn)
                self._waiting_count -= 1
            except ValueError:
                pass  # already taken off by _dispatch
            if not line:
                del self._waiting[user_id]

    def _dispatch(self) -> None:
        while self.admitted < self.capacity and self._waiting:
            user_id = min(
                self._waiting,
                key=lambda user: (self.admitted_by_user.get(user, 0), self._last_served.get(user, -1)),
            )
            line = self._waiting[user_id]
            turn = line.popleft()
            self._waiting_count -= 1
            if not line:
                del self._waiting[user_id]
            if turn.done():  # its request was cancelled while waiting
                continue
            self._grant(user_id)
            turn.set_result(None)
        if len(self._last_served) > 4 * (self.capacity + self.max_waiting) + 64:
            # Forget users who neither run nor wait here: the table stays small.
            active = set(self.admitted_by_user) | set(self._waiting)
            self._last_served = {user: stamp for user, stamp in self._last_served.items() if user in active}
