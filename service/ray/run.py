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
4. Serve's proxy starts on the port (waited for up to ``DYNFUSE_RAY_PROXY_TIMEOUT_S``, past Ray's own 60 s:
   ``start_serve``) and the application is deployed; a replica that fails to start ends the command with Serve's
   message. Once the ingress replica runs (a few seconds after the proxy; requests wait for
   it meanwhile), ``/readyz`` answers 503 while it deploys the experts and warms the model through them, and 200
   after; if the experts cannot be placed or fail to start, the command ends with the ingress's reason;
5. SIGTERM or SIGINT, at any of these steps: once served, Serve lets the requests in flight finish (at most
   ``DRAIN_S``); the local cluster's processes get SIGTERM, then SIGKILL while any is left (on another cluster
   the application is deleted), all within ``STOP_WITHIN_S``. A second signal stops at once.
"""

from __future__ import annotations

import contextlib
import inspect
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
    """The command. Its main thread only waits: for a signal, or for the start (run in a thread of its own, which
    is where every Ray call is made) to fail. So a signal never lands inside Ray's code (an exception raised there
    by a handler is swallowed or turned into another, and Ray defers or replaces signal handlers on the main
    thread), and the stop never waits for a Ray call that may not return. The handler itself only assigns and
    writes a byte to a pipe: it takes no lock (one the main thread held when the signal came would never be
    released), raises nothing, starts no thread."""

    def __init__(self, args, settings: Settings, address: str | None):
        self.args = args  # the application's AppArgs
        self.settings = settings
        self.address = address
        self.local = address is None
        self.temp_dir: str | None = None
        self.ray_started = False
        self.serve_started = False
        self.signalled_at: float | None = None
        self.signal_name = ""
        self.tearing_down = False
        self.failure: BaseException | None = None  # the start's, handed to the main thread
        self.starter: threading.Thread | None = None
        # The start thread outlives its work until the teardown is done: Ray starts the local cluster's GCS and
        # raylet with PR_SET_PDEATHSIG, which Linux delivers when the *thread* that spawned them ends, so a start
        # thread that returned once ready killed the cluster under the served experts.
        self.start_finished = threading.Event()
        self.torn_down = threading.Event()
        self.signal_read, self.signal_write = os.pipe()  # the handler's byte wakes the watchdog

    # -- the command -----------------------------------------------------------------------------------
    def main(self) -> int:
        threading.Thread(target=self._watchdog, name="dynfuse-stop-watchdog", daemon=True).start()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        if self.local:
            become_subreaper()
        self.starter = threading.Thread(target=self._start_and_serve, name="dynfuse-ray-start", daemon=True)
        self.starter.start()
        while not self.stopping:
            time.sleep(POLL_S)  # where a signal's handler runs (the sleep goes on after it; the loop then ends)
        if self.signalled_at is not None:
            logger.info("signal %s: stopping", self.signal_name)
        code = 0
        if self.signalled_at is None and self.failure is not None:
            code = 1
            if isinstance(self.failure, Refused):
                print(f"dynfuse serve: error: {self.failure}", file=sys.stderr, flush=True)
            else:
                logger.error("dynfuse serve --engine ray failed", exc_info=self.failure)
                message = f"{type(self.failure).__name__}: {self.failure}"
                print(f"dynfuse serve: error: {message}", file=sys.stderr, flush=True)
        self._teardown()
        return code

    def _on_signal(self, signum, _frame) -> None:
        """Notes the signal (the main thread then stops everything) and wakes the watchdog; a second signal, or one
        during a stop after a failure, stops now."""
        if self.tearing_down or self.signalled_at is not None:
            self._kill_and_exit(0)
        self.signalled_at = time.monotonic()
        self.signal_name = signal.Signals(signum).name
        os.write(self.signal_write, b"s")

    @property
    def stopping(self) -> bool:
        return self.signalled_at is not None or self.failure is not None

    def _watchdog(self) -> None:
        """Whatever the shutdown is stuck on, the command ends within STOP_WITHIN_S of the signal."""
        os.read(self.signal_read, 1)  # until the first signal
        time.sleep(max(0.0, HARD_STOP_S - (time.monotonic() - self.signalled_at)))
        logger.warning("the shutdown took more than %.1f s: killing what is left", HARD_STOP_S)
        self._kill_and_exit(0)

    def _kill_and_exit(self, code: int) -> None:
        if self.local:
            stop_descendants(grace_s=0.2, settle_s=0.3)
        self._remove_temp_dir()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # in a handler, the main thread may be inside a write
                stream.flush()
        os._exit(code)

    # -- start (the starter thread) --------------------------------------------------------------------
    def _start_and_serve(self) -> None:
        started = time.monotonic()
        try:
            self._start()
            if self.stopping:
                return
            base = self._base_url()
            where = "a local Ray cluster" if self.local else f"the Ray cluster at {self.address}"
            print(f"dynfuse: deployed on {where}; readiness at {base}/readyz, metrics at {base}/metrics", flush=True)
            if self._wait_ready(base):
                print(f"dynfuse: ready in {time.monotonic() - started:.1f} s", flush=True)
        except BaseException as error:  # noqa: BLE001 - handed to the main thread, which reports it and stops
            self.failure = error
        finally:
            self.start_finished.set()
            self.torn_down.wait()  # the cluster's processes die with this thread (see __init__)

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
        ray.init(address=self.address, **options)  # off the main thread, Ray leaves the signal handlers alone
        application = self._placed_application()
        if self.stopping:
            return
        self.serve_started = True  # from here on, Serve's controller may run: the stop shuts it down
        start_serve(
            {"host": self.settings.host, "port": self.settings.port},
            self.settings.ray_proxy_timeout_s,
            stopping=lambda: self.stopping,
        )
        from service.ray.app import APP_NAME

        if self.stopping:
            return
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
            if self.stopping:
                return None
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
        """Until Serve reports the application running (or a stop); Refused when a deployment failed."""
        from ray import serve

        from service.ray.app import APP_NAME

        while not self.stopping:
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

    def _wait_ready(self, base: str) -> bool:
        """Until /readyz answers 200 (the ingress deployed its experts and warmed the model through them): True;
        False on a stop. Refused when the ingress says the model cannot be served (its experts cannot be placed,
        or failed to start)."""
        while not self.stopping:
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=2) as response:
                    if response.status == 200:
                        return True
            except urllib.error.HTTPError as error:
                with contextlib.suppress(ValueError):
                    body = json.loads(error.read())
                    if body.get("status") == "failed":
                        raise Refused(f"the model cannot be served: {body.get('error')}") from None
            except OSError:
                pass  # the proxy or the ingress replica is not up yet
            time.sleep(POLL_S)
        return False

    def _base_url(self) -> str:
        host = self.settings.host
        probe = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
        return f"http://{probe}:{self.settings.port}"

    # -- stop --------------------------------------------------------------------------------------------
    def _teardown(self) -> None:
        """Drain, shut down, kill what is left; bounded by the watchdog when a signal started it. The start leaves its
        waiting loops at once; while it is still inside a Ray call (ray.init, serve.start) on the local cluster, Ray
        is not called again from here (ray.shutdown cannot run beside ray.init): the cluster's processes are
        stopped directly, and nothing was served yet, so nothing is lost. On another cluster, whatever was
        deployed there is deleted (the cluster stays)."""
        self.tearing_down = True
        began = self.signalled_at or time.monotonic()
        left = lambda: HARD_STOP_S - 1.0 - (time.monotonic() - began)  # noqa: E731 - a clock, read below
        if self.starter is not None:
            self.start_finished.wait(min(2 * POLL_S + 1.0, max(0.0, left())))
        start_returned = self.starter is None or self.start_finished.is_set()
        if self.serve_started and (start_returned or not self.local):
            _bounded(self._drain, min(DRAIN_S, max(0.0, left())), "Serve's shutdown")
        if self.ray_started and start_returned and not self.local:
            import ray

            _bounded(ray.shutdown, max(0.5, left()), "ray.shutdown()")  # disconnects; the cluster stays
        if self.local:
            # The local cluster's processes are ours: SIGTERM (GCS, raylet and workers end on it), then SIGKILL.
            # ray.shutdown() would do the same, slower. A start still inside ray.init may spawn one more: watched.
            settle_s = 0.0 if start_returned else 0.5
            killed = stop_descendants(grace_s=max(0.5, min(1.0, left())), settle_s=settle_s)
            if killed:
                logger.info("killed %d Ray processes that outlived SIGTERM", len(killed))
            left_alive = descendants()
            if left_alive:
                logger.error("processes of the local cluster still alive: %s", left_alive)
        self._remove_temp_dir()
        self.torn_down.set()

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


def start_serve(http_options: dict, timeout_s: float, stopping=lambda: False) -> bool:
    """Serve's controller and HTTP proxy, started on the connected cluster; returns once the proxy answers on its
    port (True), or on a stop (False). On a small machine whose cores are busy the proxy's process can take longer
    to start than Ray allows, in two places:

    - the controller kills a proxy that has not answered its ready check within 5 s (``PROXY_READY_CHECK_TIMEOUT_S``,
      times the proxy's restarts) and starts another; ``serve.start``, waiting on the killed one, raises
      ActorDiedError. The controller is given ``timeout_s`` for that check (``proxy_ready_check``);
    - ``serve.start`` itself waits 60 s (``HTTP_PROXY_TIMEOUT``, not a setting), then raises TimeoutError.

    After either, the controller (a detached actor) keeps starting the proxy, ``serve.start`` again connects to
    it, and the proxy is waited for here up to ``timeout_s`` from the start (the setting
    DYNFUSE_RAY_PROXY_TIMEOUT_S); past it, Refused says which setting to raise."""
    from ray import serve
    from ray.exceptions import RayActorError

    started = time.monotonic()
    options = {"http_options": http_options, "logging_config": {"enable_access_log": False}}
    options |= proxy_ready_check(serve.start, timeout_s)
    try:
        serve.start(**options)
    except (TimeoutError, RayActorError) as error:
        if time.monotonic() - started >= timeout_s:
            raise _proxy_refused(timeout_s, error) from None
        logger.warning(
            "Ray Serve's HTTP proxy did not start within Ray's own limits (%s: %s); waiting for it up to %g s from "
            "the start (DYNFUSE_RAY_PROXY_TIMEOUT_S)", type(error).__name__, str(error).partition("\n")[0], timeout_s,
        )  # fmt: skip
        serve.start(**options)  # the controller runs: this connects to it, the proxy is waited for below
    host = http_options.get("host") or "127.0.0.1"
    probe = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
    # Serve's proxy answers there once it listens: 503 until an application's routes reach it, 200 after.
    url = f"http://{probe}:{http_options['port']}/-/healthz"
    while not stopping():
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except urllib.error.HTTPError as error:
            if error.code == 503:
                return True
        except OSError:
            pass  # not listening yet
        if time.monotonic() - started >= timeout_s:
            raise _proxy_refused(timeout_s, f"nothing answered at {url}")
        time.sleep(POLL_S)
    return False


# Read by Serve's controller when it starts (ray/serve/_private/constants.py); a value the user set is kept.
PROXY_READY_CHECK_VARIABLE = "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"


def proxy_ready_check(start, timeout_s: float) -> dict:
    """``serve.start``'s options that give a starting proxy ``timeout_s`` to answer the controller's ready check,
    through the controller's environment (its ``controller_options``, applied when the controller is created;
    Ray releases without them restart the proxy with a check 5 s longer each time instead)."""
    if "controller_options" not in inspect.signature(start).parameters:
        return {}
    seconds = os.environ.get(PROXY_READY_CHECK_VARIABLE, f"{timeout_s:g}")
    return {"controller_options": {"runtime_env": {"env_vars": {PROXY_READY_CHECK_VARIABLE: seconds}}}}


def _proxy_refused(timeout_s: float, why) -> Refused:
    return Refused(
        f"Ray Serve's HTTP proxy did not start within {timeout_s:g} s ({why}). On a small or busy machine it can "
        "take longer: raise DYNFUSE_RAY_PROXY_TIMEOUT_S (e.g. DYNFUSE_RAY_PROXY_TIMEOUT_S=600), or leave the "
        "machine more CPU"
    )


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
