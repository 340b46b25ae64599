"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``), served beside HTTP in the same process
and event loop when DYNFUSE_GRPC_PORT (``dynfuse serve --grpc-port``) is set: ``server.py`` (start, stop, ports),
``servicer.py`` (the calls), ``codec.py`` (the wire format), ``errors.py`` (status codes), ``protocol/`` (the
.proto files and the modules generated from them)."""
