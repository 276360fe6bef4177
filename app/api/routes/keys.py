"""The caller's own API keys."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, HTTPException, Request, Response
from sqlalchemy import select

from app.api.deps import CallerDep, SessionDep, client_address
from app.api.errors import COMMON_RESPONSES, ErrorBody
from app.api.schemas import KeyCreate, KeyCreated, KeyOut
from app.auth.accounts import AccountError, create_api_key, revoke_api_key
from app.models import ApiKey

router = APIRouter(prefix="/api/keys", tags=["api keys"], responses=COMMON_RESPONSES)


@router.get("", response_model=list[KeyOut])
def list_keys(caller: CallerDep, db: SessionDep) -> list[ApiKey]:
    return list(db.scalars(select(ApiKey).where(ApiKey.user_id == caller.user.id).order_by(ApiKey.id.desc())))


@router.post("", response_model=KeyCreated, status_code=201, responses={400: {"model": ErrorBody}})
def create_key(body: KeyCreate, caller: CallerDep, db: SessionDep, request: Request) -> KeyCreated:
    with db.begin():
        if body.expires_at is not None and body.expires_at <= datetime.now(UTC):
            raise HTTPException(400, f"expires_at {body.expires_at.isoformat()} is not in the future")
        try:
            created = create_api_key(
                db, user=caller.user, name=body.name, actor=caller.user, address=client_address(request)
            )
        except AccountError as error:
            raise HTTPException(400, str(error)) from None
        created.key.expires_at = body.expires_at
    return KeyCreated(id=created.key.id, name=created.key.name, key=created.secret)


@router.delete("/{key_id}", status_code=204, response_class=Response, responses={404: {"model": ErrorBody}})
def delete_key(key_id: int, caller: CallerDep, db: SessionDep, request: Request) -> Response:
    with db.begin():
        key = db.get(ApiKey, key_id)
        if key is None or key.user_id != caller.user.id:
            raise HTTPException(404, f"no API key {key_id} of yours")
        revoke_api_key(db, key=key, actor=caller.user, address=client_address(request))
    return Response(status_code=204)
