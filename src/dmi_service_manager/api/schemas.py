"""The shapes of the HTTP API, for `/openapi.json` and the people who read it.

Hot routes answer with bytes they serialise themselves (4CAT polls by the thousand), so these
models document the answers rather than validate each one; the tests check that both agree.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorBody(_Open):
    status: str = Field("error", examples=["error"])
    message: str
    reason: str


class JobWire(BaseModel):
    """A job exactly as 4CAT reads it; `details` and `results` are JSON strings."""

    id: int
    created_at: int
    jobtype: str
    completed_at: int | None
    status: str = Field(description="created, pending, running (still going); complete, error (final)")
    message: str | None
    processed_records: int | None
    details: str = Field(description='a JSON string: {"request_json": <the submitted body>, "request_args": {...}}')
    results: str | None = Field(description="a JSON string once final: returncode, error, report, times")


class ListedJob(JobWire):
    kind: str = Field(description="4cat or tes: the front door the job came through")
    task_id: str | None = Field(description="the TES task id, for a TES task")


class PollAnswer(BaseModel):
    status: str = "success"
    job: JobWire


class JobListAnswer(BaseModel):
    status: str = "success"
    jobs: list[ListedJob]


class DetailsQueryAnswer(BaseModel):
    status: str = "success"
    jobs: list[JobWire]


class DetailsQuery(BaseModel):
    details_key: str = Field(description="a JSON path into the stored details", examples=[
        "$.request_json.4CAT_dataset_key"])
    details_value: str | int | float | bool | None


class SubmitBody(_Open):
    """Any other keys are stored too."""

    args: list[str] = Field(default_factory=list, description="the container's arguments, as a list (no shell)")
    fourcat_dataset_key: str | None = Field(None, alias="4CAT_dataset_key")
    pass_key: bool | None = Field(None, description="append --database_key <id> --dmi_sm_server <url>")
    timeout: float | None = Field(None, description="seconds, counted from the container's start")
    callback_url: str | None = Field(None, description="POSTed the final job (CALLBACK_ALLOWED_HOSTS only)")


class SubmitAnswer(BaseModel):
    key: int
    result_url: str
    status: str


class CancelAnswer(BaseModel):
    status: str = "success"
    job: JobWire


class StatusUpdateAnswer(BaseModel):
    status: str = "success"


class EndpointsAnswer(BaseModel):
    endpoints: list[str]


class GpuAnswer(_Open):
    reason: str
    memory: dict[str, Any] | None = Field(None, description="gpu_total_mem and gpu_free_mem in bytes, per-card figures")


class UploadAnswer(_Open):
    """`folder_name`, then each field name (the subfolder) with the original names stored there."""

    folder_name: str
    errors: dict[str, str] | None = None


class LinecountAnswer(BaseModel):
    lines: int


class DeletedAnswer(BaseModel):
    status: str = "success"
    deleted: str


class RecentFailure(BaseModel):
    id: int
    completed_at: int | None
    failure: str | None
    message: str


class ServiceOverview(BaseModel):
    name: str
    image: str
    endpoints: list[str]
    uses_gpu: bool
    gpu_memory: int | None
    max_concurrent: int | None
    running: int
    waiting: int
    recent_failures: list[RecentFailure]


class ServicesAnswer(BaseModel):
    services: list[ServiceOverview]


class CardJob(BaseModel):
    id: int
    service: str | None
    gpu_memory: int | None


class CardOverview(BaseModel):
    id: str
    name: str
    uuid: str
    total: int
    used: int | None = Field(description="bytes in use as NVML measures them; null where nothing measures")
    reserved: int = Field(description="bytes this server's placement holds for running jobs")
    jobs: list[CardJob]


class GpusAnswer(BaseModel):
    enabled: bool
    source: str | None
    problem: str | None
    cards: list[CardOverview]


class CollectionOverview(BaseModel):
    name: str
    files: int
    bytes: int
    modified_at: float
    in_use: bool


class CollectionsAnswer(BaseModel):
    collections: list[CollectionOverview]


class HealthAnswer(_Open):
    status: str
    message: str


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The error answers a route documents, all of one shape."""
    return {code: {"model": ErrorBody} for code in codes}


# Models that documented bodies refer to, added to the document's components (see `with_components`).
COMPONENTS: dict[str, Any] = {}
# Operations served by plain routes (the hottest ones), documented here.
OPERATIONS: dict[str, dict[str, Any]] = {}


def document(path: str, method: str, *, summary: str, model: type[BaseModel], parameters: list[dict[str, Any]],
             errors: tuple[int, ...] = (), body: dict[str, Any] | None = None) -> None:
    COMPONENTS[model.__name__] = model.model_json_schema(ref_template="#/components/schemas/{model}")
    COMPONENTS.update(COMPONENTS[model.__name__].pop("$defs", {}))
    responses: dict[str, Any] = {"200": {"description": "OK", "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}
    for code in errors:
        responses[str(code)] = {"description": "error", "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
    operation = {"summary": summary, "parameters": parameters, "responses": responses}
    if body is not None:
        operation["requestBody"] = body
    OPERATIONS.setdefault(path, {})[method] = operation


def json_body(model: type[BaseModel], *, required: bool = True) -> dict[str, Any]:
    """An `openapi_extra` documenting a JSON body that the route reads itself (leniently, as 4CAT sends it)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    COMPONENTS.update(schema.pop("$defs", {}))
    COMPONENTS[model.__name__] = schema
    return {"requestBody": {"required": required, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def with_components(document: dict[str, Any]) -> dict[str, Any]:
    """The generated OpenAPI document, with the models of the bodies that routes read themselves."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in COMPONENTS.items():
        schemas.setdefault(name, schema)
    schemas.setdefault("ErrorBody", ErrorBody.model_json_schema())
    for path, operations in OPERATIONS.items():
        document.setdefault("paths", {}).setdefault(path, {}).update(operations)
    document["components"].setdefault("securitySchemes", {})["bearer"] = {
        "type": "http", "scheme": "bearer", "description": "a token from `dsm token create` (see REQUIRE_TOKEN)"}
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            # A request that fails validation is answered 400 with the usual error body, never FastAPI's 422,
            # and so is a path with control characters or bytes that are not UTF-8, on any route.
            responses.pop("422", None)
            responses.setdefault("400", {"description": "Bad Request", **error})
            # Any route answers these to a token that is wrong (or missing where one is needed) or too small.
            responses.setdefault("401", {"description": "no valid token where one is needed", **error})
            responses.setdefault("403", {"description": "not allowed: this address, or this token's scope", **error})
            operation.setdefault("security", [{}, {"bearer": []}])
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                schema = parameter.get("schema", {})
                _standard_bounds(schema)
                if parameter.get("in") == "path" and schema.get("type") == "string":
                    schema.setdefault("pattern", PATH_TEXT)
    return document


# A number's bounds as JSON Schema names them: FastAPI writes pydantic's own names where a query number has
# a validator of its own (params.QueryInt), and a client or fuzzer reading the document would miss them.
_BOUNDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}
# No route takes a path with control characters (app.path_problem): the path parameters say so.
PATH_TEXT = "^[^\\u0000-\\u001f\\u007f]+$"


def _standard_bounds(schema: Any) -> None:
    if isinstance(schema, list):
        for item in schema:
            _standard_bounds(item)
    elif isinstance(schema, dict):
        for ours, standard in _BOUNDS.items():
            if ours in schema:
                schema[standard] = schema.pop(ours)
        for value in schema.values():
            _standard_bounds(value)
