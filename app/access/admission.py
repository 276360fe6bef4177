"""admit(): the one check a generation passes before it reaches the engine, and the Admission it
holds until it ends.

    admission = await admit(state, user_id=..., api_key_id=...)   # AccessRefused: 429
    stream = admission.start(lambda: engine_submit(...))            # releases on failure and at the end

Order: token budgets (no lease is taken for a request that would be refused anyway), the
cross-instance concurrency lease (PostgreSQL), then this instance's fair gate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import anyio

from app.access.errors import AccessRefused
from app.access.fair import FairGate
from app.access.leases import acquire_lease, release_lease
from app.access.limits import limits_for
from app.access.quota import check_budgets
from app.db import transaction
from app.inference.types import GenerationResult, TextDelta

if TYPE_CHECKING:
    from app.state import ZeusState

log = logging.getLogger("zeus.access")
# How long a refusal is repeated without asking the database: a concurrency slot freed on another
# instance is seen within a second; a budget an admin raised, within 5 s.
REMEMBER_CONCURRENCY_S = 1.0
REMEMBER_QUOTA_S = 5.0


class AccessControl:
    """Per instance: the fair gate and the leases this run holds (ZeusState.access)."""

    def __init__(self, settings: Any) -> None:
        self.gate = FairGate(settings.max_batch_size, settings.max_queue) if settings.fair_admission else None
        self.held_leases: set[int] = set()
        self._releases: set[asyncio.Task[None]] = set()
        # Recent refusals, by ("user", id) or ("key", id): (monotonic deadline, detail,
        # Retry-After, reason, scope). A client hammering past its limit is answered from here instead
        # of a database round trip each time, so its retries cannot crowd other users out of the
        # connection pool. Cleared when one of that user's generations here ends.
        self._refusals: dict[tuple[str, int], tuple[float, str, int, str, str]] = {}

    def remembered_refusal(self, user_id: int, api_key_id: int | None) -> AccessRefused | None:
        now = time.monotonic()
        for scope in (("user", user_id), ("key", api_key_id)):
            entry = self._refusals.get(scope) if scope[1] is not None else None  # type: ignore[arg-type]
            if entry is None:
                continue
            deadline, detail, retry_after_s, reason, scope_name = entry
            if now < deadline:
                return AccessRefused(detail, retry_after_s=retry_after_s, reason=reason, scope=scope_name)
            del self._refusals[scope]  # type: ignore[arg-type]
        return None

    def remember_refusal(self, user_id: int, api_key_id: int | None, refusal: AccessRefused) -> None:
        scope = (
            ("key", api_key_id) if refusal.scope == "key" and api_key_id is not None else ("user", user_id)
        )
        hold_s = REMEMBER_QUOTA_S if refusal.reason == "quota" else REMEMBER_CONCURRENCY_S
        self._refusals[scope] = (
            time.monotonic() + min(hold_s, refusal.retry_after_s),
            refusal.detail,
            refusal.retry_after_s,
            refusal.reason,
            refusal.scope,
        )
        if len(self._refusals) > 10_000:  # a flood of distinct users: forget the oldest half
            for stale in sorted(self._refusals, key=lambda item: self._refusals[item][0])[:5_000]:
                del self._refusals[stale]

    def forget_refusals(self, user_id: int, api_key_id: int | None) -> None:
        self._refusals.pop(("user", user_id), None)
        if api_key_id is not None:
            self._refusals.pop(("key", api_key_id), None)

    async def release_now(self, state: ZeusState, lease_id: int) -> None:
        """Deletes the lease row (in a worker thread); a failure leaves a row this run no longer
        holds, which the user's next admission removes once it is older than the stale timeout."""
        self.held_leases.discard(lease_id)

        def delete() -> None:
            with transaction(state.sessions) as db:
                release_lease(db, lease_id)

        try:
            await anyio.to_thread.run_sync(delete)
        except Exception as error:
            log.warning("generation lease %s not released: %s", lease_id, error)

    def release_later(self, state: ZeusState, lease_id: int) -> None:
        """release_now in a task of its own, for callers that cannot wait (cancel, cleanup)."""
        self.held_leases.discard(lease_id)
        task = asyncio.get_running_loop().create_task(self.release_now(state, lease_id))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)


class Admission:
    """What admit() hands out: one lease and one gate slot, given back exactly once by release()."""

    def __init__(
        self, state: ZeusState, user_id: int, api_key_id: int | None, lease_id: int | None, gated: bool
    ) -> None:
        self._state = state
        self.user_id = user_id
        self.api_key_id = api_key_id
        self.lease_id = lease_id
        self._gated = gated
        self.released = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        access = self._state.access
        if self._gated and access.gate is not None:
            access.gate.leave(self.user_id)
        if self.lease_id is not None:
            access.release_later(self._state, self.lease_id)
        access.forget_refusals(self.user_id, self.api_key_id)

    async def release_and_wait(self) -> None:
        """release(), the lease row deleted first: a client that sends its next request the moment
        this one's last event arrives is counted without this one, on any instance (a client
        running exactly its limit of requests in a row got an occasional 429 otherwise)."""
        if self.released:
            return
        lease_id, self.lease_id = self.lease_id, None
        try:
            if lease_id is not None:
                await self._state.access.release_now(self._state, lease_id)
        finally:
            self.release()

    def start(self, submit: Callable[[], Any]) -> AdmittedStream:
        """Calls submit() (the engine's, returning a RequestStream); released when it raises,
        and otherwise when the stream ends, is cancelled or its consumer leaves."""
        try:
            stream = submit()
        except BaseException:
            self.release()
            raise
        return AdmittedStream(stream, self)


class AdmittedStream:
    """A RequestStream that releases its Admission when the generation ends; otherwise the same."""

    def __init__(self, stream: Any, admission: Admission) -> None:
        self._stream = stream
        self.admission = admission

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def cancel(self) -> None:
        # The engine frees the batch slot at its next step: the gate's successor waits that long
        # in the engine's own queue at most.
        self._stream.cancel()
        self.admission.release()

    async def aclose(self) -> None:
        self.cancel()

    async def _iterate(self) -> AsyncIterator[TextDelta | GenerationResult]:
        try:
            async for item in self._stream:
                if isinstance(item, GenerationResult):
                    await self.admission.release_and_wait()
                yield item
        finally:
            self.admission.release()

    def __aiter__(self) -> AsyncIterator[TextDelta | GenerationResult]:
        return self._iterate()

    async def result(self) -> GenerationResult:
        try:
            result = await self._stream.result()
        except BaseException:
            self.admission.release()
            raise
        await self.admission.release_and_wait()
        return result


async def admit(state: ZeusState, *, user_id: int, api_key_id: int | None) -> Admission:
    """Lets one generation of this caller in, or raises AccessRefused (HTTP 429 with Retry-After):
    a token budget used up (Retry-After: until it resets), the concurrency limit of the user or of
    the key reached (across all instances), or this instance's batch and waiting line full. May
    wait, in turn with other users, for a slot of this instance's batch."""
    settings = state.settings
    access = state.access
    remembered = access.remembered_refusal(user_id, api_key_id)
    if remembered is not None:
        state.metrics.reject(remembered.reason)
        raise remembered
    held = tuple(access.held_leases)

    def take_lease() -> int:
        with transaction(state.sessions) as db:
            limits = limits_for(db, settings, user_id, api_key_id)
            check_budgets(db, limits, user_id=user_id, api_key_id=api_key_id)
            return acquire_lease(
                db,
                run_id=state.run_id,
                user_id=user_id,
                api_key_id=api_key_id,
                limits=limits,
                stale_after_s=settings.stale_after_s,
                held_here=held,
                retry_after_s=settings.concurrency_retry_after_s,
            )

    try:
        lease_id = await anyio.to_thread.run_sync(take_lease)
    except AccessRefused as error:
        state.metrics.reject(error.reason)
        access.remember_refusal(user_id, api_key_id, error)
        raise
    access.held_leases.add(lease_id)
    admission = Admission(state, user_id, api_key_id, lease_id, gated=False)
    if access.gate is not None:
        try:
            await access.gate.enter(user_id)
        except BaseException as error:
            admission.release()
            if isinstance(error, AccessRefused):
                state.metrics.reject(error.reason)
            raise
        admission._gated = True
    return admission
