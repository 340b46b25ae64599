"""Who may call what: inference keys, the admin key, and model control (Triton's ``--model-control-mode``).

Protocol-free on purpose: every function takes the plain value of an ``Authorization`` header (HTTP) or of the
``authorization`` metadata (gRPC), as ``str`` or ``bytes``, never a request object, so that every front end
applies the same rules. Failures raise the ``ApiError`` subclasses of ``service/errors.py`` (401 ``Unauthorized``,
403 ``Forbidden``), which each front end maps to its own status.

- **Inference keys** (``DYNFUSE_API_KEY``, and named keys in ``DYNFUSE_API_KEYS_FILE``): when any is set, the
  inference calls (and model metadata) need one, as ``Bearer <key>``. Each key has a name (``default`` for
  ``DYNFUSE_API_KEY``), and the name, never the key, labels the request metrics.
- **The admin key** (``DYNFUSE_ADMIN_KEY``): the only key that loads or unloads a model. An inference key never
  does, and the admin key is not an inference key (one key, one role: a leaked inference key cannot unload).
- **Model control** (``DYNFUSE_MODEL_CONTROL``): ``none`` (default) refuses load and unload with 403; ``explicit``
  allows them to the admin key (or, with no admin key, to anyone who can reach a loopback-only server: the
  settings refuse any other host); ``poll`` polls the store and refuses explicit calls, as Triton does. The
  repository index is readable in every mode, with any valid key when keys are set.

Keys are compared in constant time on their bytes: the presented value and each configured key are hashed with
SHA-256 and the digests compared with ``hmac.compare_digest``, every configured key each time, so neither the
length of a key, its characters (non-ASCII, empty, very long), nor which key matched shows in the timing.

The keys file (format in ``parse_keys_file``) is re-read when it changes: its (inode, size, mtime) is checked at
most once a second, when a key is checked. A changed file that does not parse is refused with an error in the log,
and the keys read last stay in force until it is fixed.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from service.errors import Forbidden, Unauthorized
from service.metrics import ANONYMOUS

logger = logging.getLogger("dynfuse")

NONE, EXPLICIT, POLL = "none", "explicit", "poll"
MODEL_CONTROL_MODES = (NONE, EXPLICIT, POLL)
DEFAULT_KEY_NAME = "default"  # the name of DYNFUSE_API_KEY in the metrics
KEY_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # a name is a metric label value: short, plain
RECHECK_S = 1.0  # how often, at most, the keys file's stat is looked at

_SCHEME = b"bearer"


class KeysFileError(ValueError):
    """The keys file cannot be read or does not parse; the message names the file and the line."""


def parse_keys_file(text: str, source: str = "DYNFUSE_API_KEYS_FILE") -> dict[str, str]:
    """Name -> key. One key per line, ``NAME:KEY``: NAME is 1-64 of ``A-Z a-z 0-9 _ . -`` (it becomes the
    ``key`` label of the request metrics), KEY is everything after the first colon, surrounding whitespace
    removed, and must not be empty. Blank lines and lines starting with ``#`` are skipped. Names and keys are
    unique (a key shared by two names could not say which one called)."""
    keys: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        name, colon, key = stripped.partition(":")
        name, key = name.strip(), key.strip()
        where = f"{source}, line {number}"
        if not colon:
            raise KeysFileError(f"{where}: expected NAME:KEY")
        if not KEY_NAME.fullmatch(name):
            raise KeysFileError(f"{where}: the name {name[:70]!r} is not 1-64 letters, digits, '_', '.' or '-'")
        if not key:
            raise KeysFileError(f"{where}: the key of {name!r} is empty")
        if name in keys:
            raise KeysFileError(f"{where}: the name {name!r} is used twice")
        if key in keys.values():
            raise KeysFileError(f"{where}: the key of {name!r} is also another name's key")
        keys[name] = key
    return keys


def read_keys_file(path: Path) -> dict[str, str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise KeysFileError(f"DYNFUSE_API_KEYS_FILE={path}: cannot read it ({error})") from None
    return parse_keys_file(text, f"DYNFUSE_API_KEYS_FILE={path}")


def is_loopback(host: str) -> bool:
    """Whether a listening address reaches this machine only. A host name other than ``localhost`` is not
    resolved here: it may name any interface, so it counts as not loopback."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bearer_token(authorization: str | bytes | None) -> bytes | None:
    """The token of ``Bearer <token>`` as bytes (a str is encoded as UTF-8; HTTP headers arrive as latin-1 text,
    so pass the raw bytes where there are any), or None when the value is absent or another scheme."""
    if authorization is None:
        return None
    raw = authorization.encode("utf-8", "surrogateescape") if isinstance(authorization, str) else authorization
    scheme, _, token = raw.strip().partition(b" ")
    if scheme.lower() != _SCHEME:
        return None
    return token.strip()


def _digest(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


@dataclass(frozen=True)
class _Keys:
    by_digest: tuple[tuple[bytes, str], ...]  # (sha256 of the key, its name)

    @classmethod
    def of(cls, named: dict[str, str]) -> _Keys:
        return cls(tuple((_digest(key.encode("utf-8")), name) for name, key in named.items()))

    def match(self, token: bytes | None) -> str | None:
        """The name of the key equal to ``token``; every key is compared, whichever matches."""
        if token is None:
            return None
        presented = _digest(token)
        found = None
        for digest, name in self.by_digest:
            if hmac.compare_digest(presented, digest) and found is None:
                found = name
        return found


class AccessPolicy:
    """The keys and the model control mode of one server (``from_settings``), checked per call."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        api_keys_file: Path | None = None,
        admin_key: str | None = None,
        model_control: str = NONE,
        clock=time.monotonic,
    ):
        if model_control not in MODEL_CONTROL_MODES:
            raise ValueError(f"DYNFUSE_MODEL_CONTROL={model_control!r}: one of {', '.join(MODEL_CONTROL_MODES)}")
        self.model_control = model_control
        self._fixed = {DEFAULT_KEY_NAME: api_key} if api_key else {}
        self._file = Path(api_keys_file) if api_keys_file is not None else None
        self._admin = _Keys.of({"admin": admin_key}) if admin_key else None
        self._clock = clock
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._checked_at = float("-inf")
        from_file = self._load_file() if self._file is not None else {}  # at start, a bad file is an error
        self._keys = self._combine(from_file)

    @classmethod
    def from_settings(cls, settings) -> AccessPolicy:
        return cls(
            api_key=settings.api_key,
            api_keys_file=settings.api_keys_file,
            admin_key=settings.admin_key,
            model_control=settings.model_control,
        )

    # -- inference ---------------------------------------------------------------------------
    @property
    def keys_required(self) -> bool:
        """Inference calls need a key (one is configured, or a keys file is, even if it lists none now)."""
        return bool(self._fixed) or self._file is not None

    def key_name(self, authorization: str | bytes | None) -> str | None:
        """The name of the inference key presented, or None (none presented, or not a valid one). Never raises."""
        if not self.keys_required:
            return None
        self._refresh()
        return self._keys.match(bearer_token(authorization))

    def check_inference(self, authorization: str | bytes | None) -> str:
        """The caller's label for the metrics: the key's name, or ``ANONYMOUS`` when no key is needed. Raises
        Unauthorized (401) when a key is needed and the value carries no valid one."""
        if not self.keys_required:
            return ANONYMOUS
        name = self.key_name(authorization)
        if name is None:
            raise Unauthorized("missing or wrong API key: send 'Authorization: Bearer <key>' with an inference key")
        return name

    # -- the model repository ----------------------------------------------------------------
    def check_index(self, authorization: str | bytes | None) -> None:
        """Reading the repository index: open when inference is (no inference key configured), else any valid
        key, an inference key or the admin key."""
        if not self.keys_required:
            return
        if self._admin is not None and self._admin.match(bearer_token(authorization)) is not None:
            return
        if self.key_name(authorization) is None:
            raise Unauthorized("missing or wrong key: the repository index needs an inference key or the admin key")

    def check_control(self, authorization: str | bytes | None, action: str = "load and unload") -> None:
        """Loading or unloading a model: refused 403 unless DYNFUSE_MODEL_CONTROL=explicit, then the admin key
        when one is set (401 without it; never an inference key)."""
        if self.model_control == NONE:
            raise Forbidden(
                f"model control is off (DYNFUSE_MODEL_CONTROL=none, the default): {action} are refused. To allow "
                "them, start the server with DYNFUSE_MODEL_CONTROL=explicit and DYNFUSE_ADMIN_KEY set, and send "
                "'Authorization: Bearer <admin key>'"
            )
        if self.model_control == POLL:
            raise Forbidden(
                f"the store is polled (DYNFUSE_MODEL_CONTROL=poll): explicit {action} are refused, as Triton does; "
                "write a new version to the store and the poll serves it, or use DYNFUSE_MODEL_CONTROL=explicit"
            )
        if self._admin is None:
            return  # explicit without an admin key: the settings allow it on a loopback-only server only
        if self._admin.match(bearer_token(authorization)) is None:
            raise Unauthorized(
                f"{action} need the admin key: send 'Authorization: Bearer <DYNFUSE_ADMIN_KEY>' (an inference key "
                "is not enough)"
            )

    # -- the keys file -------------------------------------------------------------------------
    def _combine(self, from_file: dict[str, str]) -> _Keys:
        named = dict(self._fixed)
        for name, key in from_file.items():
            if name in named:
                raise KeysFileError(f"DYNFUSE_API_KEYS_FILE: the name {name!r} is DYNFUSE_API_KEY's; use another")
            named[name] = key
        return _Keys.of(named)

    def _stat(self) -> os.stat_result:
        try:
            return os.stat(self._file)
        except OSError as error:
            raise KeysFileError(f"DYNFUSE_API_KEYS_FILE={self._file}: cannot read it ({error})") from None

    def _load_file(self) -> dict[str, str]:
        status = self._stat()
        self._stamp = (status.st_ino, status.st_size, status.st_mtime_ns)
        if status.st_mode & 0o004:
            logger.warning("the keys file %s is readable by every user of this machine (chmod 600 it)", self._file)
        return read_keys_file(self._file)

    def _refresh(self) -> None:
        """Re-read the keys file if it changed since it was read (looked at most once per ``RECHECK_S``)."""
        if self._file is None:
            return
        now = self._clock()
        if now - self._checked_at < RECHECK_S:
            return
        with self._lock:
            if now - self._checked_at < RECHECK_S:
                return
            self._checked_at = now
            try:
                status = self._stat()
                if (status.st_ino, status.st_size, status.st_mtime_ns) == self._stamp:
                    return
                keys = self._combine(self._load_file())  # a broken file is reported once, not every second
            except KeysFileError as error:
                logger.error("%s; the keys read last stay in force until it is fixed", error)
                return
            self._keys = keys
            logger.info("keys file %s re-read: %d inference key(s)", self._file, len(keys.by_digest))
