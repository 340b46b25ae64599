"""Model metadata: labels, experts with modalities and MAdds, the router; and the examples' images."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse

from export.examples import example_path, media_type
from service.api.deps import ModelsDep, RepositoryDep, require_api_key
from service.errors import NotFound, NotReady
from service.schemas import ErrorResponse, ModelDescription, ModelList

router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=[Depends(require_api_key)])


@router.get("", response_model=ModelList, summary="The served models")
async def list_models(repository: RepositoryDep) -> dict:
    if repository.starting:
        raise NotReady("the model is still loading; retry shortly (GET /readyz answers 200 once it is ready)")
    return {"models": [service.describe() for _, service in sorted(repository.models.items())]}


@router.get("/{name}", response_model=ModelDescription, responses={404: {"model": ErrorResponse}}, summary="One model")
async def get_model(name: str, models: ModelsDep) -> dict:
    return models.get(name).describe()


@router.get(
    "/{name}/examples/{example_id:path}",  # :path: an id may hold a slash
    response_class=FileResponse,
    responses={200: {"content": {"image/*": {}}}, 404: {"model": ErrorResponse}},
    summary="The image of one example shipped with the model",
)
async def example_image(name: str, example_id: str, models: ModelsDep) -> FileResponse:
    model = models.get(name).model
    # Looked up among the ids model.json lists, never joined into a path: no id reaches another file.
    entry = next((e for e in model.manifest.get("examples", []) if e["id"] == example_id), None)
    path = example_path(model.path, entry) if entry is not None else None
    if path is None:
        raise NotFound(f"model {name!r} has no example {example_id!r}; GET /v1/models/{name} lists them")
    return FileResponse(path, media_type=media_type(path))
