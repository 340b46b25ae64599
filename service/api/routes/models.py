"""Model metadata: labels, experts with modalities and MAdds, the router; and the examples' images."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse

from export.examples import example_path, media_type
from service.api.deps import ServiceDep, require_api_key
from service.errors import NotFound
from service.inference import InferenceService
from service.schemas import ErrorResponse, ModelDescription, ModelList

router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=[Depends(require_api_key)])


@router.get("", response_model=ModelList, summary="The served models")
async def list_models(service: ServiceDep) -> dict:
    return {"models": [service.describe()]}


@router.get("/{name}", response_model=ModelDescription, responses={404: {"model": ErrorResponse}}, summary="One model")
async def get_model(name: str, service: ServiceDep) -> dict:
    _check_name(service, name)
    return service.describe()


@router.get(
    "/{name}/examples/{example_id:path}",  # :path: an id may hold a slash
    response_class=FileResponse,
    responses={200: {"content": {"image/*": {}}}, 404: {"model": ErrorResponse}},
    summary="The image of one example shipped with the model",
)
async def example_image(name: str, example_id: str, service: ServiceDep) -> FileResponse:
    _check_name(service, name)
    model = service.model
    # Looked up among the ids model.json lists, never joined into a path: no id reaches another file.
    entry = next((e for e in model.manifest.get("examples", []) if e["id"] == example_id), None)
    path = example_path(model.path, entry) if entry is not None else None
    if path is None:
        raise NotFound(f"model {name!r} has no example {example_id!r}; GET /v1/models/{name} lists them")
    return FileResponse(path, media_type=media_type(path))


def _check_name(service: InferenceService, name: str) -> None:
    if name != service.model.name:
        raise NotFound(f"no model {name!r} is served here; GET /v1/models lists them")
