"""``dynfuse serve --engine ray``: the application on a Ray cluster, in the foreground.

Without ``--address`` (and no ``RAY_ADDRESS``) a local cluster of this machine is started for the process, in a
private temporary directory (so it never joins another cluster of the machine), without the dashboard (about
940 MiB and ten processes), and every process of it is stopped with the command. With ``--address auto`` or
``ray://host:10001`` the application is deployed on that cluster and deleted again when the command stops; the
cluster stays.

The steps, each one bounded or stopped by a signal:

1. the store is resolved (a missing model is refused before any process starts);
2. the cluster is started or joined, and the application sized to it (service/ray/sizing.py): the deployments
   whose resources ``--deployments`` (a Serve config, e.g. ``dynfuse plan --out``'s, or a file of the
   application's args) does not give share the cluster's CPUs;
3. the deployments are checked against the cluster's resources: what does not fit is refused at once on a local
   cluster, naming each deployment and what it lacks; on a remote one after ``DYNFUSE_RAY_PLACEMENT_WAIT_S``
   (nodes may be added meanwhile);
4. Serve's proxy starts on the port and the application is deployed; a replica that fails to start ends the
   command with Serve's message. Once the ingress replica runs (a few seconds after the proxy; requests wait for
   it meanwhile), ``/readyz`` answers 503 while it deploys the experts and warms the model through them, and 200
   after; if the experts cannot be placed or fail to start, the command ends with the ingress's reason;
5. SIGTERM or SIGINT, at any of these steps: Serve lets the requests in flight finish (at most ``DRAIN_S``),
   the cluster is shut down, and whatever process of it is still alive is killed, all within ``STOP_WITHIN_S``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from service.config import Settings
from service.ray.processes import become_subreaper, descendants, stop_descendants

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
STOP_WITHIN_S = 10.0  # the promise: a signal ends the command, and every process it started, within this
HARD_STOP_S = 8.5  # after a signal, whatever is still running is killed and the command exits
DRAIN_S = 4.0  # Serve's graceful shutdown: the requests in flight are answered within this
POLL_S = 0.25

logger = logging.getLogger("dynfuse")


class Stopping(BaseException):
    """A signal asked the command to stop (a BaseException, so no ``except Exception`` on the way swallows it)."""


class Refused(Exception):
    """The application cannot run on this cluster (the message says why and what to change)."""


def serve_on_ray(settings: Settings, address: str | None, deployments: str | None = None) -> int:
    from export.store import StoreError, resolve
    from service.ray.options import app_args_of

    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    try:
        args = app_args_of(settings, Path(deployments) if deployments else None)
        resolve(Path(args.settings["store"]), args.settings.get("model"), args.settings.get("model_version"))
    except (StoreError, ValueError, OSError) as error:
        print(f"dynfuse serve: error: {error}", file=sys.stderr)
        return 1
    address = address or os.environ.get("RAY_ADDRESS") or None
    code = RayServe(args, settings, address).main()
    # Ray's own threads and exit hooks are not waited for: every process of ours is already down, and a hook
    # of a cluster stopped in the middle of its start can hang.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class RayServe:
    def __init__(self, args, settings: Settings, address: str | None):
        self.args = args  # the application's AppArgs
        self.settings = settings
        self.address = address
        self.local = address is None
        self.temp_dir: str | None = None
        self.ray_started = False
        self.serve_started = False
        self.signalled_at: float | None = None
        self.tearing_down = False
        self.code = 1

    # -- the command -----------------------------------------------------------------------------------
    def main(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        if self.local:
            become_subreaper()
        started = time.monotonic()
        try:
            self._start()
            base = self._base_url()
            where = "a local Ray cluster" if self.local else f"the Ray cluster at {self.address}"
            print(f"dynfuse: deployed on {where}; readiness at {base}/readyz, metrics at {base}/metrics", flush=True)
            self._wait_ready(base)
            print(f"dynfuse: ready in {time.monotonic() - started:.1f} s", flush=True)
            while True:
                time.sleep(3600)
        except (Stopping, KeyboardInterrupt):
            self.code = 0
        except SystemExit as exit_:  # Ray's own SIGTERM handler, while ray.init ran: a stop too
            self.code = 0 if self.signalled_at is not None or exit_.code in (0, signal.SIGTERM) else 1
        except Refused as error:
            print(f"dynfuse serve: error: {error}", file=sys.stderr, flush=True)
            self.code = 1
        except Exception as error:  # noqa: BLE001 - one line for the user, the traceback in the log
            logger.exception("dynfuse serve --engine ray failed")
            print(f"dynfuse serve: error: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            self.code = 1
        finally:
            self._teardown()
        return self.code

    def _on_signal(self, signum, _frame) -> None:
        if self.tearing_down:  # a second signal while stopping: stop now
            self._kill_and_exit(0)
        self.signalled_at = time.monotonic()
        logger.info("signal %s: stopping", signal.Signals(signum).name)
        watchdog = threading.Thread(target=self._watchdog, name="dynfuse-stop-watchdog", daemon=True)
        watchdog.start()
        raise Stopping()

    def _watchdog(self) -> None:
        """Whatever the shutdown is stuck on, the command ends within STOP_WITHIN_S of the signal."""
        time.sleep(HARD_STOP_S)
        logger.warning("the shutdown took more than %.1f s: killing what is left", HARD_STOP_S)
        self._kill_and_exit(0)

    def _kill_and_exit(self, code: int) -> None:
        if self.local:
            stop_descendants(grace_s=0.2)
        self._remove_temp_dir()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    # -- start -------------------------------------------------------------------------------------------
    def _start(self) -> None:
        ray = _import_ray_without_its_failure_handler()
        from ray import serve

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token written under the home directory
        options = {"log_to_driver": False}
        if self.local:
            # Short: Ray's socket paths live under it and a Unix socket path may not exceed 107 bytes. Private: a
            # cluster another user started on this machine (ray start) is never joined, nor stopped.
            self.temp_dir = tempfile.mkdtemp(prefix="dynfuse-ray-", dir="/tmp")
            options |= {"include_dashboard": False, "_temp_dir": self.temp_dir}
        self.ray_started = True
        ray.init(address=self.address, **options)
        for signum in (signal.SIGTERM, signal.SIGINT):  # ray.init installs its own SIGTERM handler
            signal.signal(signum, self._on_signal)
        application = self._placed_application()
        serve.start(
            http_options={"host": self.settings.host, "port": self.settings.port},
            logging_config={"enable_access_log": False},
        )
        self.serve_started = True
        from service.ray.app import APP_NAME

        serve._run(application, _blocking=False, name=APP_NAME, route_prefix="/")
        self._wait_running()

    def _placed_application(self):
        """The application, sized to the cluster, once its deployments fit on it (Refused when they do not)."""
        from service.ray.app import build_checked

        deadline = time.monotonic() + (0.0 if self.local else self.settings.ray_placement_wait_s)
        while True:
            application, missing, summary = build_checked(self.args)
            if not missing:
                print(f"dynfuse: deployments: {summary}", flush=True)
                return application
            if time.monotonic() >= deadline:
                where = "this machine's local Ray cluster" if self.local else f"the Ray cluster at {self.address}"
                raise Refused(
                    f"the application does not fit on {where}: " + "; ".join(missing) + ". Give the deployments "
                    "fewer resources (leave num_cpus unset to size them to the cluster), fewer replicas, or add nodes"
                    + ("" if self.local else f" (waited {self.settings.ray_placement_wait_s:g} s for them)")
                )
            logger.info("waiting for room on the cluster: %s", "; ".join(missing))
            time.sleep(1.0)

    def _wait_running(self) -> None:
        """Until Serve reports the application running; Refused when a deployment failed."""
        from ray import serve

        from service.ray.app import APP_NAME

        while True:
            status = serve.status().applications.get(APP_NAME)
            if status is not None and status.status == "RUNNING":
                return
            if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                details = [
                    f"{name}: {d.status} {d.message}".strip()
                    for name, d in status.deployments.items()
                    if d.status != "HEALTHY"
                ]
                raise Refused(f"the application failed to start ({status.status}): {status.message} {details}")
            time.sleep(POLL_S)

    def _wait_ready(self, base: str) -> None:
        """Until /readyz answers 200 (the ingress deployed its experts and warmed the model through them); Refused
        when the ingress says the model cannot be served (its experts cannot be placed or failed to start)."""
        while True:
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=2) as response:
                    if response.status == 200:
                        return
            except urllib.error.HTTPError as error:
                with contextlib.suppress(ValueError):
                    body = json.loads(error.read())
                    if body.get("status") == "failed":
                        raise Refused(f"the model cannot be served: {body.get('error')}") from None
            except OSError:
                pass  # the proxy or the ingress replica is not up yet
            time.sleep(POLL_S)

    def _base_url(self) -> str:
        host = self.settings.host
        probe = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
        return f"http://{probe}:{self.settings.port}"

    # -- stop --------------------------------------------------------------------------------------------
    def _teardown(self) -> None:
        """Drain, shut down, kill what is left: bounded by the watchdog when a signal started it."""
        self.tearing_down = True
        began = self.signalled_at or time.monotonic()
        left = lambda: HARD_STOP_S - 1.0 - (time.monotonic() - began)  # noqa: E731 - a clock, read below
        if self.serve_started:
            _bounded(self._drain, min(DRAIN_S, max(0.0, left())), "Serve's shutdown")
        if self.ray_started:
            import ray

            _bounded(ray.shutdown, max(0.5, left()), "ray.shutdown()")
        if self.local:
            killed = stop_descendants(grace_s=max(0.2, min(1.0, left())))
            if killed:
                logger.info("killed %d Ray processes that outlived the shutdown", len(killed))
            left_alive = descendants()
            if left_alive:
                logger.error("processes of the local cluster still alive: %s", left_alive)
        self._remove_temp_dir()

    def _drain(self) -> None:
        from ray import serve

        from service.ray.app import APP_NAME
        from service.ray.versions import app_prefix

        if self.local:
            serve.shutdown()  # every application, the proxy and the controller; replicas finish their requests
            return
        names = [APP_NAME, *(n for n in serve.status().applications if n.startswith(app_prefix(APP_NAME)))]
        for name in names:
            serve.delete(name, _blocking=False)
        while any(name in serve.status().applications for name in names):
            time.sleep(POLL_S)

    def _remove_temp_dir(self) -> None:
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def _import_ray_without_its_failure_handler():
    """Ray, whose driver does not install Ray's C++ failure signal handler: it handles SIGTERM too, by dumping a
    stack and aborting (exit -6, with the cluster left running), and is in place from the middle of ray.init
    until this command's own handler is put back. The variable is read when Ray is imported, and removed again
    so that Ray's processes, which inherit the environment, keep theirs (a crash there still leaves a stack)."""
    name = "RAY_DISABLE_FAILURE_SIGNAL_HANDLER"
    before = os.environ.get(name)
    os.environ[name] = "1"
    try:
        import ray
        from ray._private import ray_constants

        ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
    return ray


def _bounded(step, seconds: float, what: str) -> None:
    """Run ``step`` in a thread and wait for it at most ``seconds`` (what it leaves is killed after)."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            step()
        except BaseException as error:  # noqa: BLE001 - reported below, the shutdown goes on
            errors.append(error)

    thread = threading.Thread(target=run, name=f"dynfuse-{what}", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        logger.warning("%s did not finish within %.1f s; going on", what, seconds)
    elif errors:
        logger.warning("%s failed: %s", what, errors[0])
