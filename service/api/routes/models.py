"""Model metadata: labels, experts with modalities and MAdds, the router."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from service.api.deps import ServiceDep, require_api_key
from service.errors import NotFound
from service.schemas import ErrorResponse, ModelDescription, ModelList

router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=[Depends(require_api_key)])


@router.get("", response_model=ModelList, summary="The served models")
async def list_models(service: ServiceDep) -> dict:
    return {"models": [service.describe()]}


@router.get("/{name}", response_model=ModelDescription, responses={404: {"model": ErrorResponse}}, summary="One model")
async def get_model(name: str, service: ServiceDep) -> dict:
    if name != service.model.name:
        raise NotFound(f"no model {name!r} is served here; GET /v1/models lists them")
    return service.describe()
