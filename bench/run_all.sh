#!/usr/bin/env bash
# Rerun the CPU benchmarks and refresh bench/results/ (figures 1-3, 5, 7 and 12, the soak; about 40 minutes on 2 cores).
# Figure 4 needs a CUDA machine: python -m bench.gpu (see bench/BENCHMARKS.md); here it runs as a CPU smoke test.
# Needs the shipped model's test splits (make figures writes them to build/figures/), wrk (apt-get install wrk; else a Python load generator
# is used) and py-spy (.venv/bin/pip install -e '.[bench]') for the profile.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
"$PYTHON" -m bench.figures    # figure 1 for the shipped model: every table and plot about it
"$PYTHON" -m bench.realized_savings
"$PYTHON" -m bench.ort_spin
"$PYTHON" -m bench.http_load
# Run-to-run spread on a shared VM is about +-20%: repeat the two timing figures whose goals sit near it.
for i in 2 3; do
    "$PYTHON" -m bench.realized_savings --out "bench/results/realized_savings_repeat$i.json"
    "$PYTHON" -m bench.http_load --no-profile --out "bench/results/http_load_repeat$i.json"
done
# The same load against `dynfuse serve --workers 2` (one process per core here).
"$PYTHON" -m bench.http_load --no-profile --workers 2 --out bench/results/http_load_workers2.json
for i in 2 3; do
    "$PYTHON" -m bench.http_load --no-profile --workers 2 --out "bench/results/http_load_workers2_repeat$i.json"
done
# Figure 9: gRPC against HTTP (JSON and binary), the Open Inference Protocol, one server, transports in turn.
"$PYTHON" -m bench.grpc_throughput
"$PYTHON" -m bench.gpu --device cpu --quick --out bench/results/gpu_cpu_smoke.json
# Figure 5: goodput under overload, one worker and two (needs wrk); then the 10-minute soak and chaos run.
"$PYTHON" -m bench.overload
"$PYTHON" -m bench.soak
# The Ray engine against one process, and one replica's throughput per expert deployment (dynfuse plan reads it).
"$PYTHON" -m bench.expert_throughput
"$PYTHON" -m bench.ray_engine
# Figure 7: limits before work (over-limit bodies, one at a time and 8 at once) and big-image decoding memory.
"$PYTHON" -m bench.body_bomb
"$PYTHON" -m bench.decode_memory
# Is routing still safe? (issue 22): a shift through dynfuse serve, the guard replayed offline, "uncertain" answers.
"$PYTHON" -m bench.shift
"$PYTHON" -m bench.guard_replay
"$PYTHON" -m bench.uncertain
