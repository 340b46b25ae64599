"""Regenerates the Python modules of the Open Inference Protocol's gRPC service from the .proto files beside
this one (a development tool: it needs grpcio-tools, from the dev extra; serving needs only grpcio and protobuf).

    python -m service.grpc.protocol.generate            # rewrite grpc_service_pb2*.py and model_config_pb2.py
    python -m service.grpc.protocol.generate --check    # exit 1 when the checked-in modules are out of date
    python -m service.grpc.protocol.generate --protos-from-tritonclient
        # rewrite the .proto files from the descriptors the installed tritonclient embeds (see below), then the modules

Where the .proto files come from: Triton's ``grpc_service.proto`` and ``model_config.proto`` (package
``inference``, the protocol's ``GRPCInferenceService``), as the PyPI package tritonclient ships them: compiled
into ``tritonclient/grpc/service_pb2.py`` and ``model_config_pb2.py`` as serialized FileDescriptorProtos.
``--protos-from-tritonclient`` prints those descriptors back as .proto source, under Triton's license (the
descriptor keeps every message, field, number, enum and RPC, but not the original's comments). The generated
modules' descriptors are byte for byte tritonclient's (tests/unit/test_grpc_protocol.py checks it), so both load
into one process's descriptor pool.

protoc writes ``import model_config_pb2`` (a top-level module); the one fix here makes it this package's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE = "service.grpc.protocol"
PROTOS = ("model_config.proto", "grpc_service.proto")
MODULES = ("model_config_pb2.py", "grpc_service_pb2.py", "grpc_service_pb2_grpc.py")

LICENSE = """\
// Copyright (c) 2020, NVIDIA CORPORATION. All rights reserved.
//
// Redistribution and use in source and binary forms, with or without
// modification, are permitted provided that the following conditions
// are met:
//  * Redistributions of source code must retain the above copyright
//    notice, this list of conditions and the following disclaimer.
//  * Redistributions in binary form must reproduce the above copyright
//    notice, this list of conditions and the following disclaimer in the
//    documentation and/or other materials provided with the distribution.
//  * Neither the name of NVIDIA CORPORATION nor the names of its
//    contributors may be used to endorse or promote products derived
//    from this software without specific prior written permission.
//
// THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS ``AS IS'' AND ANY
// EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
// IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR
// PURPOSE ARE DISCLAIMED.  IN NO EVENT SHALL THE COPYRIGHT OWNER OR
// CONTRIBUTORS BE LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL,
// EXEMPLARY, OR CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED TO,
// PROCUREMENT OF SUBSTITUTE GOODS OR SERVICES; LOSS OF USE, DATA, OR
// PROFITS; OR BUSINESS INTERRUPTION) HOWEVER CAUSED AND ON ANY THEORY
// OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY, OR TORT
// (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
// OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
"""


def generate(out: Path = HERE) -> list[Path]:
    """The modules generated from the .proto files here, written to ``out``."""
    from grpc_tools import protoc  # the dev extra's grpcio-tools

    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto, as protoc's own -I
    for proto in PROTOS:
        args = ["protoc", f"-I{HERE}", f"-I{include}", f"--python_out={out}", str(HERE / proto)]
        if proto == "grpc_service.proto":
            args.insert(-1, f"--grpc_python_out={out}")
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
    written = [out / name for name in MODULES]
    for path in written:
        source = path.read_text()
        source = source.replace("import model_config_pb2 as", f"from {PACKAGE} import model_config_pb2 as")
        source = source.replace("import grpc_service_pb2 as", f"from {PACKAGE} import grpc_service_pb2 as")
        path.write_text(source)
    return written


def check() -> list[str]:
    """The checked-in modules that differ from what the .proto files generate now."""
    with tempfile.TemporaryDirectory() as scratch:
        fresh = generate(Path(scratch))
        return [path.name for path in fresh if path.read_text() != (HERE / path.name).read_text()]


# -- the .proto files from tritonclient's descriptors ----------------------------------------------
LABELS = {1: "", 3: "repeated "}  # proto3: singular fields carry no label
SCALARS = {
    1: "double", 2: "float", 3: "int64", 4: "uint64", 5: "int32", 6: "fixed64", 7: "fixed32", 8: "bool",
    9: "string", 12: "bytes", 13: "uint32", 15: "sfixed32", 16: "sfixed64", 17: "sint32", 18: "sint64",
}  # fmt: skip


def proto_source(descriptor, origin: str) -> str:
    """A proto3 FileDescriptorProto as .proto source that compiles back to the same descriptor."""
    package = f".{descriptor.package}."
    lines = [LICENSE, *(f"// {line}" for line in textwrap.wrap(origin, 100)), ""]
    lines += [f'syntax = "{descriptor.syntax}";', "", f"package {descriptor.package};"]
    lines += [""] + [f'import "{dependency}";' for dependency in descriptor.dependency]

    def type_name(field) -> str:
        if field.type in SCALARS:
            return SCALARS[field.type]
        return field.type_name.removeprefix(package)

    def message(msg, indent: str) -> list[str]:
        inner = indent + "  "
        maps = {nested.name: nested for nested in msg.nested_type if nested.options.map_entry}
        out = ["", f"{indent}message {msg.name}", f"{indent}{{"]
        for enum in msg.enum_type:
            out += enumeration(enum, inner)
        for nested in msg.nested_type:
            if nested.name not in maps:
                out += message(nested, inner)
        done_oneofs: set[int] = set()
        for field in msg.field:
            if field.HasField("oneof_index"):
                if field.oneof_index in done_oneofs:
                    continue
                done_oneofs.add(field.oneof_index)
                members = [f for f in msg.field if f.HasField("oneof_index") and f.oneof_index == field.oneof_index]
                out += ["", f"{inner}oneof {msg.oneof_decl[field.oneof_index].name}", f"{inner}{{"]
                out += [f"{inner}  {type_name(f)} {f.name} = {f.number};" for f in members]
                out.append(f"{inner}}}")
                continue
            entry = maps.get(field.type_name.rsplit(".", 1)[-1]) if field.type == 11 else None
            if entry is not None and field.label == 3:
                key, value = entry.field
                out.append(f"{inner}map<{type_name(key)}, {type_name(value)}> {field.name} = {field.number};")
            else:
                out.append(f"{inner}{LABELS[field.label]}{type_name(field)} {field.name} = {field.number};")
        out.append(f"{indent}}}")
        return out

    def enumeration(enum, indent: str) -> list[str]:
        out = ["", f"{indent}enum {enum.name}", f"{indent}{{"]
        out += [f"{indent}  {value.name} = {value.number};" for value in enum.value]
        return [*out, f"{indent}}}"]

    for enum in descriptor.enum_type:
        lines += enumeration(enum, "")
    for msg in descriptor.message_type:
        lines += message(msg, "")
    for service in descriptor.service:
        lines += ["", f"service {service.name}", "{"]
        for method in service.method:
            request = ("stream " if method.client_streaming else "") + method.input_type.removeprefix(package)
            response = ("stream " if method.server_streaming else "") + method.output_type.removeprefix(package)
            body = " {}" if method.HasField("options") else ";"
            lines.append(f"  rpc {method.name}({request}) returns ({response}){body}")
        lines.append("}")
    return "\n".join(lines) + "\n"


def protos_from_tritonclient() -> list[Path]:
    from importlib import metadata

    from google.protobuf import descriptor_pb2
    from tritonclient.grpc import model_config_pb2, service_pb2

    version = metadata.version("tritonclient")
    written = []
    for module in (model_config_pb2, service_pb2):
        descriptor = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(descriptor)
        origin = (
            f"Triton's {descriptor.name} (github.com/triton-inference-server/common, protobuf/), printed by "
            f"service/grpc/protocol/generate.py from the descriptor that tritonclient {version} (PyPI) embeds in "
            f"tritonclient/grpc/{module.__name__.rsplit('.', 1)[-1]}.py; the original's comments are not in it."
        )
        path = HERE / descriptor.name
        path.write_text(proto_source(descriptor, origin))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.grpc.protocol.generate", description=__doc__.split(".")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 when the checked-in modules are out of date")
    mode.add_argument("--protos-from-tritonclient", action="store_true", help="rewrite the .proto files first")
    args = parser.parse_args(argv)
    if args.check:
        stale = check()
        for name in stale:
            print(f"{name} is out of date: run python -m service.grpc.protocol.generate", file=sys.stderr)
        return 1 if stale else 0
    if args.protos_from_tritonclient:
        for path in protos_from_tritonclient():
            print(f"wrote {path}")
    for path in generate():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
