"""KServe's own gRPC client (``kserve.InferenceGRPCClient``, PyPI), run in a process of its own by
tests/e2e/test_grpc_clients.py: its generated module declares the protobuf names of the protocol (``inference.*``)
from another file than Triton's, and one process's descriptor pool holds only one of the two.

Reads a JSON list of calls on stdin and writes one JSON answer per call on stdout:

- ``{"call": "health", "model": NAME}`` -> ``{"live", "ready", "model_ready"}``
- ``{"call": "infer", "url", "images": [base64 or ""], "texts": [str], "parameters": {...}, "headers": {...},
  "encoding": "raw" | "contents", "id": str}`` -> ``{"id", "model_name", "model_version", "outputs": {name: list}}``
- ``{"call": "load" | "unload", "model": NAME, "headers": {...}}`` -> KServe's answer, ``{"model_name",
  "isLoaded"}`` or ``{"model_name", "isUnloaded"}`` (its client has no method for them: its generated stub, as its
  server's tests)

A call that fails answers ``{"error": {"code": "INVALID_ARGUMENT", "details": "..."}}``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys

import grpc
import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest
from kserve.protocol.grpc import grpc_predict_v2_pb2 as kserve_pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub


def _input(name: str, elements: list[bytes], encoding: str) -> InferInput:
    if encoding == "raw":  # raw_input_contents, as numpy arrays are sent
        tensor = InferInput(name, [len(elements)], "BYTES")
        tensor.set_data_from_numpy(np.array(elements, dtype=np.object_), binary_data=True)
        return tensor
    return InferInput(name, [len(elements)], "BYTES", data=list(elements))  # contents.bytes_contents


async def _repository(url: str, spec: dict) -> dict:
    async with grpc.aio.insecure_channel(url) as channel:
        stub = GRPCInferenceServiceStub(channel)
        metadata = tuple(spec.get("headers", {}).items()) or None
        if spec["call"] == "load":
            request = kserve_pb.RepositoryModelLoadRequest(model_name=spec["model"])
            answer = await stub.RepositoryModelLoad(request, metadata=metadata)
            return {"model_name": answer.model_name, "isLoaded": answer.isLoaded}
        request = kserve_pb.RepositoryModelUnloadRequest(model_name=spec["model"])
        answer = await stub.RepositoryModelUnload(request, metadata=metadata)
        return {"model_name": answer.model_name, "isUnloaded": answer.isUnloaded}


async def _call(client: InferenceGRPCClient, spec: dict, url: str) -> dict:
    if spec["call"] in ("load", "unload"):
        return await _repository(url, spec)
    headers = list(spec.get("headers", {}).items()) or None
    if spec["call"] == "health":
        return {
            "live": await client.is_server_live(headers=headers),
            "ready": await client.is_server_ready(headers=headers),
            "model_ready": await client.is_model_ready(spec["model"], headers=headers),
        }
    inputs = []
    if spec.get("images") is not None:
        inputs.append(_input("image", [base64.b64decode(i) for i in spec["images"]], spec["encoding"]))
    if spec.get("texts") is not None:
        inputs.append(_input("text", [t.encode() for t in spec["texts"]], spec["encoding"]))
    # KServe's protocol carries bool, int64 and string parameters, no double: a fraction goes as a string.
    parameters = {name: str(v) if isinstance(v, float) else v for name, v in spec.get("parameters", {}).items()}
    request = InferRequest(
        model_name=spec.get("model", "shapes"), infer_inputs=inputs, request_id=spec.get("id"), parameters=parameters
    )
    response = await client.infer(request, headers=headers)
    outputs = {}
    for output in response.outputs:
        array = output.as_numpy()
        outputs[output.name] = [e.decode() for e in array.tolist()] if output.datatype == "BYTES" else array.tolist()
    return {
        "id": response.id,
        "model_name": response.model_name,
        "model_version": response.model_version,
        "outputs": outputs,
        "datatypes": {output.name: output.datatype for output in response.outputs},
    }


async def main(url: str, calls: list[dict]) -> list[dict]:
    answers = []
    # retries=0: a refusal is the answer under test, not something to hide behind a retry.
    async with InferenceGRPCClient(url, timeout=60, retries=0) as client:
        for spec in calls:
            try:
                answers.append(await _call(client, spec, url))
            except grpc.RpcError as error:
                answers.append({"error": {"code": error.code().name, "details": error.details()}})
    return answers


if __name__ == "__main__":
    spec = json.load(sys.stdin)
    json.dump(asyncio.run(main(spec["url"], spec["calls"])), sys.stdout)
