"""The ``dynfuse`` command line: data, training, export, evaluation, the default model, serving.

Each subcommand imports what it needs when it runs, so ``dynfuse serve`` with ONNX never loads torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from models.errors import DynfuseError


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _formats(text: str) -> tuple[str, ...]:
    formats = tuple(f.strip() for f in text.split(",") if f.strip())
    unknown = sorted(set(formats) - {"onnx", "torchscript"})
    if not formats or unknown:
        raise argparse.ArgumentTypeError(f"expected onnx, torchscript or both (comma-separated), got {text!r}")
    return formats


def cmd_data_synth(args) -> int:
    from models.data.synthetic import SynthConfig, generate

    options = {"mix": args.mix} if args.mix else {}
    if args.ood_size is not None:
        options["ood_size"] = args.ood_size
    config = SynthConfig(size=args.size, seed=args.seed, image_size=args.image_size, **options)
    summary = generate(Path(args.out), config, progress=not args.quiet, overwrite=args.force)
    print(f"wrote {config.size} samples to {args.out}: {json.dumps(summary.get('counts', {}))}")
    return 0


def cmd_train(args) -> int:
    from models.training import TrainConfig, train

    options = {"preset": args.preset, "seed": args.seed, "threads": args.threads}
    if args.lambdas:
        options["lambdas"] = args.lambdas
    if args.epochs:
        options["stage1_epochs"] = args.epochs
    train(Path(args.data), Path(args.out), TrainConfig(**options), progress=not args.quiet)
    return 0


def cmd_train_router(args) -> int:
    from models.byo.training import train_router_only
    from models.training import TrainConfig

    options = {"preset": args.preset, "seed": args.seed, "threads": args.threads}
    if args.lambdas:
        options["lambdas"] = args.lambdas
    if args.epochs:
        options["stage1_epochs"] = args.epochs
    train_router_only(Path(args.data), Path(args.out), args.expert, TrainConfig(**options), progress=not args.quiet)
    return 0


def cmd_export(args) -> int:
    from export.writer import export_run

    export_run(
        Path(args.run_dir),
        Path(args.store),
        name=args.name,
        version=args.version,
        data_dir=Path(args.data) if args.data else None,
        progress=not args.quiet,
    )
    return 0


def cmd_evaluate(args) -> int:
    from export.evaluate import evaluate_store
    from models.evaluation import compare_points, format_table, plot_pareto, summarize

    rows, outputs = evaluate_store(
        Path(args.store),
        args.model,
        Path(args.data),
        split=args.split,
        version=args.version,
        backend=args.backend,
        device=args.device,
        progress=not args.quiet,
    )
    print(
        f"{outputs.extra['model']} v{outputs.extra['version']} ({outputs.extra['backend']}), {args.split} split, "
        f"{len(outputs.labels)} samples, madds_full {outputs.madds_full:,}"
    )
    print(format_table(rows))
    summary = summarize(rows)
    print(
        f"{compare_points('auto', summary['auto_accuracy'], 'full', summary['full_accuracy'])}, "
        f"saving {summary['auto_saved_ratio']:.1%} of the MAdds: "
        f"{summary['auto_share_of_oracle_savings']:.1%} of what the oracle saves"
    )
    if args.json:
        payload = {
            "model": outputs.extra["model"],
            "version": outputs.extra["version"],
            "split": args.split,
            "samples": len(outputs.labels),
            "madds_full": outputs.madds_full,
            "summary": summary,
            "policies": rows,
        }
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot_pareto(rows, Path(args.plot), title=f"{outputs.extra['model']} v{outputs.extra['version']}, {args.split}")
        print(f"wrote {args.plot}")
    return 0


def cmd_build_default(args) -> int:
    from export.default_model import DEFAULT_WORK_DIR, build_default

    build_default(
        Path(args.store),
        work_dir=Path(args.work) if args.work else DEFAULT_WORK_DIR,
        preset=args.preset,
        size=args.size,
        seed=args.seed,
        formats=tuple(args.formats),
        progress=not args.quiet,
    )
    return 0


def cmd_serve(args) -> int:
    from service.config import load_settings
    from service.server import serve

    overrides = {
        key: value
        for key, value in {
            "store": args.store,
            "host": args.host,
            "port": args.port,
            "grpc_port": args.grpc_port,
            "backend": args.backend,
            "device": args.device,
            "model": args.model,
            "model_version": args.version,
            "workers": args.workers,
            "threads": args.threads,
            "max_inflight": args.max_inflight,
            "request_timeout_s": args.request_timeout,
            "log_level": args.log_level,
        }.items()
        if value is not None
    }
    if args.engine == "ray":
        settings = load_settings(**overrides)
        if settings.grpc_port is not None:
            raise ValueError(
                "gRPC (--grpc-port, DYNFUSE_GRPC_PORT) is served by the uvicorn engine only: --engine ray serves the "
                "Open Inference Protocol over HTTP (/v2); leave the gRPC port unset, or serve with --engine uvicorn"
            )
        from service.ray.run import serve_on_ray

        return serve_on_ray(settings, args.address, args.deployments)
    if args.address or args.deployments:
        raise ValueError("--address and --deployments are for --engine ray")
    return serve(load_settings(**overrides))


def cmd_plan(args) -> int:
    from service import plan

    throughput = json.loads(Path(args.throughput).read_text())
    store = Path(args.store or "store")
    # With --mix alone, the mix names the experts; with a store, its model does (and each needs a replica).
    experts = plan.experts_of(store, args.model) if args.store or not args.mix else None
    mix = plan.parse_mix(args.mix) if args.mix else plan.route_mix_of(store, args.model)
    if experts is not None:
        plan.check_measured(experts, throughput, args.throughput)
    lines, static = plan.make_plan(args.rps, mix, throughput, args.p99_ms, args.utilization, experts)
    bound = f", p99 <= {args.p99_ms:g} ms" if args.p99_ms else ""
    print(
        f"{throughput['model']} v{throughput['version']}: {args.rps:g} req/s{bound}, replicas at "
        f"{args.utilization:.0%} of what one serves (1 CPU each, {args.throughput})"
    )
    print(plan.format_plan(lines, static, args.rps))
    if args.out:
        settings = {"store": args.serve_store, "model": throughput["model"]}
        comment = (
            f"Written by: dynfuse plan --rps {args.rps:g}"
            + (f" --p99-ms {args.p99_ms:g}" if args.p99_ms else "")
            + f"\nroute mix: {', '.join(f'{k} {v:.1%}' for k, v in mix.items())}"
        )
        plan.write_serve_config(plan.serve_config(lines, settings), Path(args.out), comment)
        print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynfuse", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="data sets").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write the synthetic benchmark (PNG images + train/val/test.jsonl)")
    synth.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    synth.add_argument("--size", type=int, default=8000, help="samples in train, val and test (default 8000)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    synth.add_argument(
        "--mix",
        type=_floats,
        help="fractions of text_sufficient,image_needed,noisy_image,image_decides,cross_modal "
        "(default 0.3,0.15,0.1,0.25,0.2)",
    )
    synth.add_argument(
        "--ood-size", type=int, help="samples in test_ood, captions from a held-out family (default: as test; 0: none)"
    )
    synth.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    synth.set_defaults(func=cmd_data_synth)

    train = sub.add_parser("train", help="Stage I experts + Stage II routers (one per lambda)")
    train.add_argument("--data", required=True, help="manifest directory (train/val[/test].jsonl)")
    train.add_argument("--out", required=True, help="run directory to create")
    train.add_argument("--preset", choices=("tiny", "default", "large"), default="default")
    train.add_argument("--lambdas", type=_floats, help="resource-loss weights, e.g. 0,0.01,0.1,1")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--epochs", type=int, help="Stage I epochs (default: the preset's)")
    train.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    train.set_defaults(func=cmd_train)

    router = sub.add_parser(
        "train-router",
        help="a router over experts you already have (frozen): --expert NAME=package.module:factory, two or more",
    )
    router.add_argument(
        "--expert",
        action="append",
        required=True,
        metavar="NAME[=package.module:factory]",
        help="an expert: its factory (imported with the current directory on sys.path), or NAME alone for one "
        "installed in the 'dynfuse.experts' entry-point group; repeat for each",
    )
    router.add_argument("--data", required=True, help="manifest directory (train/val[/test].jsonl)")
    router.add_argument("--out", required=True, help="run directory to create (then: dynfuse export RUN_DIR)")
    router.add_argument(
        "--preset", choices=("tiny", "default", "large"), default="default", help="size of the router's own encoders"
    )
    router.add_argument("--lambdas", type=_floats, help="resource-loss weights, e.g. 0,0.1,0.3")
    router.add_argument("--seed", type=int, default=0)
    router.add_argument("--epochs", type=int, help="epochs of the router encoders' pass (default: the preset's)")
    router.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    router.set_defaults(func=cmd_train_router)

    export = sub.add_parser("export", help="export a run to the model store (ONNX + TorchScript, verified)")
    export.add_argument("run_dir")
    export.add_argument("--store", required=True)
    export.add_argument("--name", help="model name (default: the run directory's name)")
    export.add_argument("--version", help="version (default: the next free number)")
    export.add_argument("--data", help="labelled data for the parity checks (default: the run's training data)")
    export.set_defaults(func=cmd_export)

    evaluate = sub.add_parser("evaluate", help="accuracy against compute of a stored model, per policy")
    evaluate.add_argument("--store", required=True)
    evaluate.add_argument("--model", help="model name (default: the store's only model)")
    evaluate.add_argument("--version", help="version (default: the highest)")
    evaluate.add_argument("--data", required=True, help="manifest directory")
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--backend", choices=("onnx", "torchscript"), default="onnx")
    evaluate.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    evaluate.add_argument("--json", help="write the policies as JSON here")
    evaluate.add_argument("--plot", help="write the Pareto plot (PNG) here")
    evaluate.set_defaults(func=cmd_evaluate)

    build = sub.add_parser("build-default", help="synthesize, train and export the embedded default model")
    build.add_argument("--store", required=True)
    build.add_argument("--work", help="where data and the run go (default build/default-model)")
    build.add_argument("--preset", choices=("tiny", "default", "large"), default="default")
    build.add_argument("--size", type=int, help="synthetic samples (default 8000)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument(
        "--formats",
        type=_formats,
        default=("onnx", "torchscript"),
        help="comma-separated export formats (default onnx,torchscript; the shipped model is onnx only)",
    )
    build.set_defaults(func=cmd_build_default)

    serve = sub.add_parser("serve", help="serve a stored model over HTTP (settings also from DYNFUSE_* env)")
    serve.add_argument("--store")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument(
        "--grpc-port",
        type=int,
        help="also serve the Open Inference Protocol over gRPC on this port (default: off; the image uses 8001)",
    )
    serve.add_argument("--backend", choices=("onnx", "torchscript"))
    serve.add_argument("--device", choices=("cpu", "cuda"))
    serve.add_argument("--model", help="model name (default: the store's only model)")
    serve.add_argument(
        "--workers",
        type=int,
        help="server processes sharing the port (default: one per core; metrics are summed across them)",
    )
    serve.add_argument("--version", help="pin a version (default: the highest)")
    serve.add_argument("--threads", type=int, help="runtime threads per worker (default: the cores, split)")
    serve.add_argument(
        "--max-inflight",
        type=int,
        help="requests admitted at once per worker; more get 503 before their body is read (default max_queue/2)",
    )
    serve.add_argument(
        "--request-timeout", type=float, help="seconds a request may take from arrival: then 408 or 504 (default 10)"
    )
    serve.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"))
    serve.add_argument(
        "--engine",
        choices=("uvicorn", "ray"),
        default="uvicorn",
        help="uvicorn: this machine's processes (default); ray: Ray Serve, an ingress and one deployment per expert "
        "(needs the ray extra)",
    )
    serve.add_argument(
        "--address", help="with --engine ray: the cluster (auto, ray://host:10001); default: start a local one"
    )
    serve.add_argument(
        "--deployments",
        metavar="FILE",
        help="with --engine ray: each deployment's replicas and resources, from a Serve config (what dynfuse plan "
        "--out writes) or a YAML file of the application's args; default: sized to the cluster",
    )
    serve.set_defaults(func=cmd_serve)

    planner = sub.add_parser(
        "plan", help="replicas per Ray deployment for a request rate, against a static full model; a Serve config"
    )
    planner.add_argument("--rps", type=float, required=True, help="requests per second to serve")
    planner.add_argument("--p99-ms", type=float, help="latency bound: each deployment batches within half of it")
    planner.add_argument(
        "--store", help="where the model's experts and measured route mix are read (default: store; with --mix, none)"
    )
    planner.add_argument("--model", help="model name (default: the store's only model)")
    planner.add_argument("--mix", help="route mix instead of the model's, e.g. text=0.4,image=0.3,mi2p=0.3")
    planner.add_argument(
        "--throughput",
        default="bench/results/expert_throughput.json",
        help="one replica's throughput per deployment (python -m bench.expert_throughput)",
    )
    planner.add_argument("--utilization", type=float, default=0.7, help="planned share of a replica's throughput")
    planner.add_argument(
        "--out", help="write the plan as a Serve config here (dynfuse serve --engine ray --deployments reads it)"
    )
    planner.add_argument(
        "--serve-store", default="/opt/dynfuse/store", help="the store's path on the cluster (the image's by default)"
    )
    planner.set_defaults(func=cmd_plan)

    for command in (synth, train, router, export, evaluate, build):
        command.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (DynfuseError, OSError, ValueError) as error:
        # Bad data, a missing store, a refused export, a bad option: one clear line, no traceback.
        print(f"dynfuse {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
