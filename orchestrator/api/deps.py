"""Request dependencies as typed aliases, so routers stay one-liners."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from orchestrator.db.engine import session_scope
from orchestrator.services import keys
from orchestrator.settings import Settings

_bearer = HTTPBearer(auto_error=False)
_header = APIKeyHeader(name="X-API-Key", auto_error=False)


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def current_tenant(
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header_key: Annotated[str | None, Depends(_header)],
) -> uuid.UUID:
    key = (bearer.credentials if bearer else None) or header_key
    if not key:
        raise HTTPException(401, "missing API key: send 'Authorization: Bearer <key>'",
                            headers={"WWW-Authenticate": "Bearer"})
    with session_scope() as s:
        tenant = keys.tenant_for_key(s, key)
        if tenant is None:
            raise HTTPException(401, "invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"})
        return tenant.id


bearer_scheme = Depends(_bearer)
TenantDep = Annotated[uuid.UUID, Depends(current_tenant)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
