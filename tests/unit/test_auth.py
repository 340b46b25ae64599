"""service/auth.py: inference keys, the admin key and model control, on plain header values."""

from __future__ import annotations

import hmac
import os

import pytest
from pydantic import ValidationError

from service import auth
from service.auth import AccessPolicy, KeysFileError, bearer_token, is_loopback, parse_keys_file
from service.config import Settings
from service.errors import Forbidden, Unauthorized

KEYS = "# the team's keys\nci: ci-key-0123\n\nmobile :  m0bile key with spaces  \npartner:clé-ünïcode-🔑\n"


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def keys_file(tmp_path, text: str = KEYS):
    path = tmp_path / "keys"
    path.write_text(text, encoding="utf-8")
    os.chmod(path, 0o600)
    return path


def test_the_keys_file_format():
    assert parse_keys_file(KEYS) == {
        "ci": "ci-key-0123",
        "mobile": "m0bile key with spaces",
        "partner": "clé-ünïcode-🔑",
    }
    assert parse_keys_file("a:b:c") == {"a": "b:c"}  # the key is everything after the first colon


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("just-a-key", "line 1: expected NAME:KEY"),
        ("a:x\nb:", "line 2: the key of 'b' is empty"),
        ("a:x\na:y", "line 2: the name 'a' is used twice"),
        ("a:x\nb:x", "line 2: the key of 'b' is also another name's key"),
        ("bad name:x", "line 1: the name 'bad name' is not"),
        ('{job="x"}:k', "is not 1-64 letters"),  # a name becomes a metric label value
        ("n" * 65 + ":k", "is not 1-64 letters"),
    ],
)
def test_a_keys_file_that_does_not_parse_is_refused_naming_the_line(text, message):
    with pytest.raises(KeysFileError, match=message):
        parse_keys_file(text)


def test_bearer_token_takes_str_or_bytes_and_any_scheme_case():
    assert bearer_token("Bearer abc") == b"abc"
    assert bearer_token(b"bearer   abc  ") == b"abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token(None) is None
    assert bearer_token("Bearer") == b""
    assert bearer_token("Bearer clé") == "clé".encode()


def test_no_key_configured_means_open_inference():
    access = AccessPolicy()
    assert not access.keys_required
    assert access.check_inference(None) == "anonymous"
    assert access.key_name("Bearer anything") is None


def test_inference_keys_are_named_and_checked_on_their_bytes(tmp_path):
    access = AccessPolicy(api_key="single", api_keys_file=keys_file(tmp_path))
    assert access.check_inference("Bearer single") == "default"
    assert access.check_inference("Bearer ci-key-0123") == "ci"
    assert access.check_inference("Bearer m0bile key with spaces") == "mobile"
    assert access.check_inference(b"Bearer " + "clé-ünïcode-🔑".encode()) == "partner"
    # one byte short of the key is another key
    assert access.key_name(b"Bearer " + "clé-ünïcode-🔑".encode("utf-8", "replace")[:-1]) is None
    for wrong in (None, "", "Bearer", "Bearer ", "Bearer ci-key-012", "Bearer ci-key-01234", "ci-key-0123",
                  "Bearer " + "x" * 1_000_000, b"Bearer \xff\xfe\x00", "Bearer 🔑", "Token ci-key-0123"):  # fmt: skip
        with pytest.raises(Unauthorized) as refused:
            access.check_inference(wrong)
        assert refused.value.status == 401


def test_every_key_is_compared_whichever_matches(tmp_path, monkeypatch):
    """Constant time: the presented key's digest is compared with every configured one, so which key matched (or
    that none did) does not change the work done."""
    access = AccessPolicy(api_key="single", api_keys_file=keys_file(tmp_path))
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    for presented in ("Bearer single", "Bearer ci-key-0123", "Bearer nope", "Bearer " + "y" * 100_000):
        calls.clear()
        access.key_name(presented)
        assert calls == [(32, 32)] * 4  # four keys, four comparisons of 32-byte digests, every time


def test_model_control_none_refuses_load_and_unload_naming_the_setting():
    access = AccessPolicy(admin_key="admin-key")
    with pytest.raises(Forbidden, match="DYNFUSE_MODEL_CONTROL=none") as refused:
        access.check_control("Bearer admin-key")
    assert refused.value.status == 403
    assert "DYNFUSE_MODEL_CONTROL=explicit" in refused.value.message  # how to turn it on


def test_model_control_poll_refuses_explicit_calls():
    with pytest.raises(Forbidden, match="DYNFUSE_MODEL_CONTROL=poll"):
        AccessPolicy(model_control="poll", admin_key="a").check_control("Bearer a")


def test_explicit_control_needs_the_admin_key_and_an_inference_key_never_suffices(tmp_path):
    access = AccessPolicy(
        api_key="inference", api_keys_file=keys_file(tmp_path), admin_key="admin", model_control="explicit"
    )
    access.check_control("Bearer admin")
    for wrong in (None, "Bearer inference", "Bearer ci-key-0123", "Bearer admi", "Bearer adminn"):
        with pytest.raises(Unauthorized, match="admin key"):
            access.check_control(wrong)
    with pytest.raises(Unauthorized):  # and the admin key is not an inference key
        access.check_inference("Bearer admin")


def test_explicit_control_without_an_admin_key_is_open(tmp_path):
    AccessPolicy(model_control="explicit", api_key="inference").check_control(None)


def test_the_index_is_readable_with_any_valid_key_or_open_when_inference_is():
    AccessPolicy(admin_key="admin").check_index(None)  # inference is open: so is the index
    access = AccessPolicy(api_key="inference", admin_key="admin")
    access.check_index("Bearer inference")
    access.check_index("Bearer admin")
    with pytest.raises(Unauthorized):
        access.check_index("Bearer other")


def test_a_key_is_revoked_by_removing_its_line_and_the_others_keep_working(tmp_path):
    clock = Clock()
    path = keys_file(tmp_path)
    access = AccessPolicy(api_keys_file=path, clock=clock)
    assert access.key_name("Bearer ci-key-0123") == "ci"
    replacement = tmp_path / "keys.new"
    replacement.write_text("mobile: m0bile key with spaces\nnew: n3w-key\n")
    os.replace(replacement, path)  # written whole, then renamed over the old file
    assert access.key_name("Bearer ci-key-0123") == "ci"  # looked at once a second at most
    clock.now += auth.RECHECK_S
    assert access.key_name("Bearer ci-key-0123") is None
    assert access.key_name("Bearer m0bile key with spaces") == "mobile"
    assert access.key_name("Bearer n3w-key") == "new"


def test_a_changed_file_that_does_not_parse_leaves_the_last_keys_in_force(tmp_path, caplog):
    clock = Clock()
    path = keys_file(tmp_path)
    access = AccessPolicy(api_keys_file=path, clock=clock)
    path.write_text("ci: ci-key-0123\nbroken line\n")
    clock.now += auth.RECHECK_S
    assert access.key_name("Bearer mobile") is None
    assert access.key_name("Bearer m0bile key with spaces") == "mobile"
    assert "line 2: expected NAME:KEY" in caplog.text
    path.unlink()
    clock.now += auth.RECHECK_S
    assert access.key_name("Bearer ci-key-0123") == "ci"
    path.write_text("ci: rotated\n")
    clock.now += auth.RECHECK_S
    assert access.key_name("Bearer ci-key-0123") is None
    assert access.key_name("Bearer rotated") == "ci"


def test_a_file_with_no_keys_still_requires_a_key(tmp_path):
    access = AccessPolicy(api_keys_file=keys_file(tmp_path, "# every key revoked\n"))
    with pytest.raises(Unauthorized):
        access.check_inference(None)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.8.0.1", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("", False), ("10.0.0.5", False), ("example.com", False)],
)  # fmt: skip
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback


def test_explicit_control_without_an_admin_key_refuses_to_start_off_loopback(tmp_path):
    with pytest.raises(ValidationError, match="DYNFUSE_ADMIN_KEY") as refused:
        Settings(store=tmp_path, model_control="explicit", host="0.0.0.0")
    assert "DYNFUSE_HOST=0.0.0.0" in str(refused.value)
    Settings(store=tmp_path, model_control="explicit", host="0.0.0.0", admin_key="a")
    Settings(store=tmp_path, model_control="explicit", host="127.0.0.1")
    Settings(store=tmp_path, model_control="none", host="0.0.0.0")


def test_a_bad_keys_file_and_a_poll_interval_without_poll_stop_the_settings(tmp_path):
    with pytest.raises(ValidationError, match="DYNFUSE_API_KEYS_FILE=.*cannot read it"):
        Settings(store=tmp_path, api_keys_file=tmp_path / "missing")
    with pytest.raises(ValidationError, match="line 1: expected NAME:KEY"):
        Settings(store=tmp_path, api_keys_file=keys_file(tmp_path, "oops"))
    with pytest.raises(ValidationError, match="DYNFUSE_STORE_POLL_S is set but DYNFUSE_MODEL_CONTROL=none"):
        Settings(store=tmp_path, store_poll_s=5)
    assert Settings(store=tmp_path, model_control="poll").poll_interval_s == 15.0
    assert Settings(store=tmp_path, model_control="poll", store_poll_s=2).poll_interval_s == 2.0
    assert Settings(store=tmp_path).poll_interval_s is None
