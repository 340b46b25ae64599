"""Figure 4: the GPU. The ``large`` preset (ResNet-18 image encoder at 224x224) with random weights, exported
to TorchScript on the machine itself, served by the pipeline with the TorchScript backend on CUDA.

At batch sizes 1, 16 and 64: the raw forward time of each component with its inputs already on the device
(the limit), the time to copy a batch of images to the device, and the in-process pipeline's throughput at
cheap fractions 0, 0.5 and 0.8 (routes forced: ``text`` for the cheap share, the full expert for the rest),
all fractions interleaved call by call; then the realized speedup over always-full as a fraction of the
MAdds ratio. Weights do not change the time of a forced route, so random ones measure the same thing; with no
accuracy to choose it by, the full path is the most expensive expert.

Needs torch and NumPy only (no serving stack, no data); Pillow and tqdm are stubbed when missing, since no
image is read and no progress is shown. TorchScript is exported here because a file saved by one torch
release may not load in another.

    python -m bench.gpu                          # on a CUDA machine; writes $OUT/gpu.json or bench/results/
    python -m bench.gpu --device cpu --quick     # smoke test anywhere
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, markdown_table, spread, write_result
from bench.stubs import stub_missing_modules

GOAL = 0.8  # realized speedup over always-full, as a fraction of the MAdds ratio, at batch 64
CHEAP = "text"


def synthetic_run(run_dir: Path, preset: str, seed: int) -> None:
    """A run directory in models/training.py's format, with random weights, that export_run can read."""
    import torch

    from models.costs import routing_costs
    from models.preprocess import ImagePreprocessing
    from models.registry import create_model
    from models.tokenizer import Tokenizer
    from models.training import CHECKPOINT, RUN_FORMAT

    torch.manual_seed(seed)
    model_name = f"dynamic_fusion_{preset}"
    model = create_model(model_name).eval()
    config = model.config
    tokenizer = Tokenizer(("<pad>", "<unk>", *(f"w{i}" for i in range(config.vocab_size - 2))), config.max_tokens)
    router = model.new_router().eval()
    model.router.load_state_dict(router.state_dict())
    static = routing_costs(model)["static"]
    full = max(static, key=static.get)  # no accuracy to choose by: the most expensive expert is the full path
    checkpoint = {
        "format": RUN_FORMAT,
        "model_name": model_name,
        "config": config.to_dict(),
        "state_dict": model.state_dict(),
        "routers": [{"name": "random", "lambda": 0.0, "state_dict": router.state_dict()}],
        "default_router": "random",
        "labels": [f"class_{i}" for i in range(config.num_classes)],
        "tokenizer": tokenizer.to_dict(),
        "preprocessing": ImagePreprocessing(config.image_size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)).to_dict(),
        "experts": [e.to_dict() for e in model.experts],
        "full_expert": full,
        "shared_encoders": dict(model.shared_encoders),
        "madds": routing_costs(model, full),
        "train_config": {"note": "random weights for timing (bench/gpu.py)"},
        "data": {"dir": str(run_dir / "no-data"), "sizes": {}},  # missing on purpose: parity on random inputs
        "evaluation": {"val": [], "summary": {}},
        "train_seconds": 0.0,
    }
    run_dir.mkdir(parents=True)
    torch.save(checkpoint, run_dir / CHECKPOINT)


def device_info(device: str) -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    if device == "cuda":
        info["name"] = torch.cuda.get_device_name(0)
        try:
            query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
            info["nvidia_smi"] = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError) as error:
            info["nvidia_smi"] = f"unavailable: {error}"
    return info


def timed(fn, sync, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return times


def raw_components(model, device: str, batch_sizes, warmup: int, repeats: int, sync) -> dict:
    """Median ms of each served component's forward with its inputs on the device, and of an image copy."""
    import numpy as np
    import torch

    served = {*model.shared_encoders.values(), model.router, *(c for e in model.experts for c in e.components)}
    modules = {n: torch.jit.load(str(model.components[n].files["torchscript"]), map_location=device) for n in served}
    vocab = model.tokenizer.vocab_size
    result = {}
    for batch in batch_sizes:
        per_component = {}
        for name, module in sorted(modules.items()):
            info = model.components[name]
            inputs = []
            for tensor in info.inputs:
                shape = (batch, *tensor.shape[1:])
                if tensor.dtype == "int64":
                    inputs.append(torch.randint(2, vocab, shape, device=device))
                elif tensor.name.endswith("_present"):
                    inputs.append(torch.ones(shape, device=device))
                else:
                    inputs.append(torch.randn(shape, device=device))

            def forward(module=module, inputs=inputs):
                with torch.inference_mode():
                    module(*inputs)

            per_component[name] = 1000 * statistics.median(timed(forward, sync, warmup, repeats))
        size = model.preprocessing.image_size
        images = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
        copy = timed(lambda images=images: torch.from_numpy(images).to(device), sync, warmup, repeats)
        result[batch] = {"components_ms": per_component, "image_copy_to_device_ms": 1000 * statistics.median(copy)}
    return result


def pipeline_throughput(pipeline, batch_sizes, fractions, warmup: int, repeats: int, cycle: int = 10) -> dict:
    """Per batch size and cheap fraction: time of a cycle of predict calls (at least ``cycle`` requests, so a
    fraction is realized at batch 1 too), throughput and MAdds; the fractions interleaved cycle by cycle."""
    import numpy as np

    from export.pipeline import PipelineInput

    model = pipeline.model
    rng = np.random.default_rng(0)
    size, tokens = model.preprocessing.image_size, model.tokenizer.max_tokens
    result = {}
    for batch in batch_sizes:
        n = batch * -(-cycle // batch)  # requests per cycle: whole batches
        images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)  # decoded pixels, as served
        token_ids = rng.integers(2, model.tokenizer.vocab_size, (batch, tokens)).astype(np.int64)
        calls = {}
        for fraction in fractions:
            routes = [CHEAP] * round(fraction * n) + [model.full_expert] * (n - round(fraction * n))
            inputs = [PipelineInput(token_ids[i % batch], images[i % batch], route=r) for i, r in enumerate(routes)]
            calls[fraction] = [inputs[start : start + batch] for start in range(0, n, batch)]

        def run(batches):
            return [out for inputs in batches for out in pipeline.predict(inputs)[0]]  # NumPy out: device done

        for _ in range(warmup):
            for batches in calls.values():
                run(batches)
        seconds = {f: [] for f in fractions}
        for _ in range(repeats):
            for fraction, batches in calls.items():
                started = time.perf_counter()
                run(batches)
                seconds[fraction].append(time.perf_counter() - started)
        madds = {f: sum(o.madds for o in run(batches)) for f, batches in calls.items()}
        full_time = statistics.median(seconds[0.0])
        rows = {}
        for fraction in fractions:
            median = statistics.median(seconds[fraction])
            speedup, madds_ratio = full_time / median, madds[0.0] / madds[fraction]
            rows[fraction] = {
                "requests_per_cycle": n,
                "cheap_share": round(fraction * n) / n,
                "ms_per_call": 1000 * median * batch / n,
                "ms_per_cycle": {k: 1000 * v for k, v in spread(seconds[fraction]).items() if k != "n"},
                "requests_per_second": n / median,
                "madds_per_request": madds[fraction] / n,
                "speedup_vs_full": speedup,
                "madds_ratio": madds_ratio,
                "speedup_over_madds_ratio": speedup / madds_ratio if fraction else None,
            }
        result[batch] = rows
    return result


def report(result: dict) -> str:
    raw_rows = [
        [batch, *(f"{figures['components_ms'][c]:.2f}" for c in ("image_encoder", "text_encoder", "image_glimpse"))]
        + [f"{figures['image_copy_to_device_ms']:.2f}", f"{result['pipeline'][batch][0.0]['ms_per_call']:.2f}"]
        for batch, figures in result["raw"].items()
    ]
    pipe_rows = [
        [batch, f"{row['cheap_share']:.1%}", f"{row['ms_per_call']:.2f}", f"{row['requests_per_second']:,.0f}"]
        + [f"{row['madds_per_request'] / 1e6:,.1f}", f"{row['speedup_vs_full']:.2f}", f"{row['madds_ratio']:.2f}"]
        + ["—" if row["speedup_over_madds_ratio"] is None else f"{row['speedup_over_madds_ratio']:.2f}"]
        for batch, rows in result["pipeline"].items()
        for row in rows.values()
    ]
    raw_header = ["batch", "image_encoder ms", "text_encoder ms", "image_glimpse ms", "image copy to device ms"]
    pipe_header = ["batch", "cheap share", "ms per call", "req/s", "MMAdds/request", "speedup vs full", "MAdds ratio"]
    return "\n\n".join(
        [
            markdown_table([*raw_header, "pipeline always-full ms"], raw_rows),
            markdown_table([*pipe_header, "speedup / MAdds ratio"], pipe_rows),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--preset", choices=("tiny", "default", "large"), default="large")
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--fractions", default="0,0.5,0.8", help="cheap fractions; 0 (always full) is the baseline")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="a smoke test: batches 1 and 4, 3 repeats")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="default: $OUT/gpu.json when OUT is set, else bench/results/")
    args = parser.parse_args(argv)
    batch_sizes = (1, 4) if args.quick else tuple(int(b) for b in args.batch_sizes.split(","))
    repeats, warmup = (3, 3) if args.quick else (args.repeats, args.warmup)
    fractions = tuple(sorted({0.0, *(float(f) for f in args.fractions.split(","))}))
    default_out = Path(os.environ["OUT"]) / "gpu.json" if os.environ.get("OUT") else RESULTS / f"gpu_{args.device}.json"
    out = args.out or default_out

    stubbed = stub_missing_modules()
    import torch

    from export.backends import TorchScriptBackend
    from export.pipeline import DynamicPipeline
    from export.store import load_model
    from export.writer import export_run

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu for a smoke test", file=sys.stderr)
        return 2
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    info = device_info(args.device)
    print(f"{info.get('nvidia_smi', 'CPU')}, torch {info['torch']} (CUDA {info['cuda']}); stubbed: {stubbed or '-'}")

    work = Path(tempfile.mkdtemp(prefix="dynfuse-gpu-bench-"))
    try:
        started = time.perf_counter()
        synthetic_run(work / "run", args.preset, args.seed)
        export_run(
            work / "run",
            work / "store",
            name=f"{args.preset}-random",
            version="1",
            formats=("torchscript",),
            progress=False,
        )
        export_seconds = time.perf_counter() - started
        model = load_model(work / "store")
        pipeline = DynamicPipeline(model, TorchScriptBackend(args.device))
        pipeline.warmup(batch_sizes=(1, max(batch_sizes)))
        raw = raw_components(model, args.device, batch_sizes, warmup, repeats, sync)
        pipe = pipeline_throughput(pipeline, batch_sizes, fractions, warmup, repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    goal_batch = max(batch_sizes)
    efficiency = pipe[goal_batch][max(fractions)]["speedup_over_madds_ratio"]
    result = {
        "figure": "GPU",
        "device": args.device,
        "device_info": info,
        "stubbed_modules": stubbed,
        "preset": args.preset,
        "weights": "random (routes forced)",
        "router": model.router,
        "madds_full": model.madds_full,
        "path_madds": {e.name: e.path_madds for e in model.experts},
        "export_seconds": round(export_seconds, 1),
        "repeats": repeats,
        "warmup": warmup,
        "raw": raw,
        "pipeline": pipe,
        "goal": {"batch": goal_batch, "fraction": max(fractions), "at_least": GOAL, "value": efficiency},
    }
    print("\n" + report(result))
    print(
        f"\nbatch {goal_batch}, cheap fraction {max(fractions):.0%}: speedup / MAdds ratio = {efficiency:.2f} "
        + (
            f"(goal >= {GOAL}: {'MET' if efficiency >= GOAL else 'NOT MET'})"
            if args.device == "cuda"
            else "(CPU smoke test)"
        )
    )
    write_result(out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
