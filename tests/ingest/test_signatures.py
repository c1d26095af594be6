"""Webhook signature verification against the providers' own vectors and official libraries."""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
import time
from datetime import UTC, datetime
from typing import Any, get_args

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from standardwebhooks import Webhook as StandardWebhook
from svix.webhooks import Webhook as SvixWebhook

from relayport.ingest.signatures import (
    MAX_HEADER_CHARS,
    SCHEMES,
    HmacConfig,
    Reason,
    SignatureError,
    Verified,
    generate_secret,
    sign,
    validate_secret,
    verify,
)

NOW = 1_700_000_000.0
BODY = b'{"id":"evt_1","type":"invoice.paid","data":{"amount":4200,"note":"h\xc3\xa9"}}'
TIMESTAMPED = ("stripe", "standard", "slack", "hmac")
HMAC_TS = HmacConfig(header="X-Sig", timestamp_header="X-Sig-Timestamp", prefix="v1=")

# docs.github.com, "Validating webhook deliveries": the documented example.
GITHUB_SECRET = "It's a Secret to Everybody"
GITHUB_BODY = b"Hello, World!"
GITHUB_SIGNATURE = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"

# api.slack.com, "Verifying requests from Slack": the worked example.
SLACK_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
SLACK_TS = "1531420618"
SLACK_BODY = (
    b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&"
    b"channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&"
    b"command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2F"
    b"commands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&"
    b"trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c"
)
SLACK_SIGNATURE = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"

# The Standard Webhooks reference libraries' test vector.
STANDARD_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
STANDARD_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
STANDARD_TS = 1614265330
STANDARD_BODY = b'{"test": 2432232314}'
STANDARD_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def _config(scheme: str) -> HmacConfig | None:
    return HMAC_TS if scheme == "hmac" else None


def _signed(scheme: str, secret: str, body: bytes = BODY, now: float = NOW) -> dict[str, str]:
    return sign(scheme, body, secret, now=now, msg_id="msg_1", hmac_config=_config(scheme))


def _verify(scheme: str, headers: dict[str, str], body: bytes = BODY, **kw: Any) -> Verified:
    secrets = kw.pop("secrets", [SECRETS[scheme]])
    return verify(scheme, headers, body, secrets, now=kw.pop("now", NOW), **kw)


def _reason(scheme: str, headers: dict[str, str], body: bytes = BODY, **kw: Any) -> str:
    kw.setdefault("hmac_config", _config(scheme))
    with pytest.raises(SignatureError) as info:
        _verify(scheme, headers, body, **kw)
    return info.value.reason


SECRETS = {scheme: generate_secret(scheme) for scheme in SCHEMES}
OTHER_SECRETS = {scheme: generate_secret(scheme) for scheme in SCHEMES}


# --- the providers' own vectors ------------------------------------------------------------------


def test_github_documented_vector() -> None:
    digest = hmac.new(GITHUB_SECRET.encode(), GITHUB_BODY, hashlib.sha256).hexdigest()
    assert "sha256=" + digest == GITHUB_SIGNATURE
    headers = {"x-hub-signature-256": GITHUB_SIGNATURE, "x-github-delivery": "72d3162e-cc78"}
    got = verify("github", headers, GITHUB_BODY, [GITHUB_SECRET], now=NOW)
    assert got == Verified(delivery_id="72d3162e-cc78", timestamp=None)
    assert sign("github", GITHUB_BODY, GITHUB_SECRET, now=NOW) == {
        "x-hub-signature-256": GITHUB_SIGNATURE
    }


def test_slack_documented_vector() -> None:
    headers = {"x-slack-signature": SLACK_SIGNATURE, "x-slack-request-timestamp": SLACK_TS}
    got = verify("slack", headers, SLACK_BODY, [SLACK_SECRET], now=float(SLACK_TS) + 10)
    assert got.timestamp == int(SLACK_TS)
    assert sign("slack", SLACK_BODY, SLACK_SECRET, now=float(SLACK_TS)) == headers
    with pytest.raises(SignatureError) as info:
        verify("slack", headers, SLACK_BODY, [SLACK_SECRET], now=float(SLACK_TS) + 301)
    assert info.value.reason == "stale-timestamp"


def test_standard_reference_vector() -> None:
    headers = {
        "webhook-id": STANDARD_ID,
        "webhook-timestamp": str(STANDARD_TS),
        "webhook-signature": STANDARD_SIGNATURE,
    }
    got = verify("standard", headers, STANDARD_BODY, [STANDARD_SECRET], now=STANDARD_TS)
    assert got == Verified(delivery_id=STANDARD_ID, timestamp=STANDARD_TS)


# --- Stripe, with headers built the way Stripe's libraries build them ----------------------------


def _stripe_header(secret: str, t: int, body: bytes = BODY, scheme: str = "v1") -> str:
    signature = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},{scheme}={signature}"


def test_stripe_library_style_header() -> None:
    t = int(NOW)
    got = _verify("stripe", {"stripe-signature": _stripe_header(SECRETS["stripe"], t)})
    assert got == Verified(delivery_id=None, timestamp=t)
    assert _signed("stripe", SECRETS["stripe"])["stripe-signature"] == _stripe_header(
        SECRETS["stripe"], t
    )


def test_stripe_several_v1_one_valid_and_v0_ignored() -> None:
    t = int(NOW)
    wrong = _stripe_header(OTHER_SECRETS["stripe"], t).split(",")[1]
    right = _stripe_header(SECRETS["stripe"], t).split(",")[1]
    v0 = "v0=" + "ab" * 32
    header = f"t={t},{v0},{wrong},{right},v2=zz,junk"
    assert _verify("stripe", {"stripe-signature": header}).timestamp == t
    only_v0 = _stripe_header(SECRETS["stripe"], t, scheme="v0")
    assert _reason("stripe", {"stripe-signature": only_v0}) == "malformed-signature"


@pytest.mark.parametrize("offset", [-301, 301, -10_000, 86_400])
def test_stripe_stale(offset: int) -> None:
    header = _stripe_header(SECRETS["stripe"], int(NOW) + offset)
    assert _reason("stripe", {"stripe-signature": header}) == "stale-timestamp"


def test_stripe_tolerance_boundary_and_custom_tolerance() -> None:
    header = {"stripe-signature": _stripe_header(SECRETS["stripe"], int(NOW) - 300)}
    assert _verify("stripe", header).timestamp == int(NOW) - 300
    assert _reason("stripe", header, tolerance_s=299) == "stale-timestamp"


def test_stripe_ambiguous_or_missing_timestamp() -> None:
    t = int(NOW)
    valid = _stripe_header(SECRETS["stripe"], t)
    assert _verify("stripe", {"stripe-signature": f"{valid},t={t}"}).timestamp == t
    twice = f"{valid},t={t + 1}"
    assert _reason("stripe", {"stripe-signature": twice}) == "malformed-signature"
    no_t = valid.split(",", 1)[1]
    assert _reason("stripe", {"stripe-signature": no_t}) == "missing-timestamp"
    bad_t = valid.replace(f"t={t}", "t=12a")
    assert _reason("stripe", {"stripe-signature": bad_t}) == "malformed-signature"


# --- the official Standard Webhooks and Svix libraries -------------------------------------------


def _payload() -> str:
    return BODY.decode()


def test_standardwebhooks_library_signs_what_we_accept() -> None:
    secret = generate_secret("standard")
    when = datetime.fromtimestamp(int(NOW), tz=UTC)
    signature = StandardWebhook(secret).sign("msg_lib", when, _payload())
    headers = {
        "webhook-id": "msg_lib",
        "webhook-timestamp": str(int(NOW)),
        "webhook-signature": signature,
    }
    got = verify("standard", headers, BODY, [secret], now=NOW)
    assert got == Verified(delivery_id="msg_lib", timestamp=int(NOW))


def test_standardwebhooks_library_accepts_what_we_sign() -> None:
    secret = generate_secret("standard")
    headers = sign("standard", BODY, secret, now=time.time(), msg_id="msg_ours")
    StandardWebhook(secret).verify(BODY, headers)  # raises on failure; uses the real clock


def test_svix_library_signs_what_we_accept() -> None:
    secret = generate_secret("standard")
    when = datetime.fromtimestamp(int(NOW), tz=UTC)
    signature = SvixWebhook(secret).sign("msg_svix", when, _payload())
    headers = {"svix-id": "msg_svix", "svix-timestamp": str(int(NOW)), "svix-signature": signature}
    got = verify("standard", headers, BODY, [secret], now=NOW)
    assert got == Verified(delivery_id="msg_svix", timestamp=int(NOW))
    # Svix's own test secrets may be unpadded base64 of any length: the library accepts them.
    unpadded = "whsec_" + base64.b64encode(b"k" * 32).decode().rstrip("=")
    signature = SvixWebhook(unpadded).sign("msg_svix", when, _payload())
    headers["svix-signature"] = signature
    assert verify("standard", headers, BODY, [unpadded], now=NOW).delivery_id == "msg_svix"


def test_svix_library_accepts_what_we_sign() -> None:
    secret = generate_secret("standard")
    ours = sign("standard", BODY, secret, now=time.time(), msg_id="msg_ours")
    SvixWebhook(secret).verify(BODY, {k.replace("webhook-", "svix-"): v for k, v in ours.items()})


def test_standard_multiple_signatures_and_other_versions() -> None:
    secret = SECRETS["standard"]
    good = _signed("standard", secret)
    other = _signed("standard", OTHER_SECRETS["standard"])["webhook-signature"]
    v1a = "v1a," + base64.b64encode(b"\x01" * 64).decode()
    good["webhook-signature"] = f"{v1a}  {other} v1,!!! {good['webhook-signature']} v2,x"
    assert _verify("standard", good).delivery_id == "msg_1"
    good["webhook-signature"] = v1a
    assert _reason("standard", good) == "malformed-signature"


def test_standard_needs_the_id_and_prefers_one_header_set() -> None:
    headers = _signed("standard", SECRETS["standard"])
    assert _reason("standard", {**headers, "webhook-id": ""}) == "malformed-signature"
    assert _reason("standard", {**headers, "webhook-id": "msg 1"}) == "malformed-signature"
    svix = {k.replace("webhook-", "svix-"): v for k, v in headers.items()}
    # A mixed set is never combined: the webhook-* signature is checked with webhook-* id/ts.
    mixed = {**svix, "webhook-signature": headers["webhook-signature"]}
    assert _reason("standard", mixed) == "malformed-signature"
    assert _verify("standard", {**svix, **headers}).delivery_id == "msg_1"


# --- every scheme: tampering, wrong secret, staleness, rotation, missing parts -------------------


def _positions(n: int) -> list[int]:
    rng = random.Random(n)  # fixed sample: the same positions on every run
    return sorted({0, 1, n // 2, n - 1, *rng.sample(range(n), 12)})


@pytest.mark.parametrize("scheme", SCHEMES)
def test_each_tampered_byte_is_refused(scheme: str) -> None:
    headers = _signed(scheme, SECRETS[scheme])
    assert _verify(scheme, headers, hmac_config=_config(scheme)) is not None
    for position in _positions(len(BODY)):
        for flip in (0x01, 0x80):
            tampered = bytearray(BODY)
            tampered[position] ^= flip
            assert _reason(scheme, headers, bytes(tampered)) == "bad-signature", position
    for body in (BODY[:-1], BODY + b" ", b"", BODY + b"\x00"):
        assert _reason(scheme, headers, body) == "bad-signature"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_tampered_signature_is_refused(scheme: str) -> None:
    headers = _signed(scheme, SECRETS[scheme])
    name = next(k for k in headers if "sig" in k or "hmac" in k)
    value = headers[name]
    # Change one character of the encoded signature, keeping its alphabet.
    i = len(value) - 5
    # Digits: valid in hex and base64, and not equal under hex's case-insensitivity.
    swapped = value[:i] + ("1" if value[i] != "1" else "2") + value[i + 1 :]
    assert _reason(scheme, {**headers, name: swapped}) == "bad-signature"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_wrong_secret_is_refused_without_leaking(scheme: str) -> None:
    headers = _signed(scheme, SECRETS[scheme])
    with pytest.raises(SignatureError) as info:
        _verify(scheme, headers, secrets=[OTHER_SECRETS[scheme]], hmac_config=_config(scheme))
    assert info.value.reason == "bad-signature"
    expected = _signed(scheme, OTHER_SECRETS[scheme])
    for secret_or_sig in [OTHER_SECRETS[scheme], *expected.values()]:
        if len(secret_or_sig) > 12:
            assert secret_or_sig not in str(info.value)


@pytest.mark.parametrize("scheme", TIMESTAMPED)
@pytest.mark.parametrize("offset", [-301, 301, -3600])
def test_stale_timestamp_is_refused(scheme: str, offset: int) -> None:
    headers = _signed(scheme, SECRETS[scheme], now=NOW + offset)
    assert _reason(scheme, headers) == "stale-timestamp"
    assert _verify(scheme, headers, now=NOW + offset, hmac_config=_config(scheme)) is not None


@pytest.mark.parametrize("scheme", TIMESTAMPED)
def test_missing_timestamp(scheme: str) -> None:
    headers = _signed(scheme, SECRETS[scheme])
    if scheme == "stripe":
        headers["stripe-signature"] = headers["stripe-signature"].split(",", 1)[1]
    else:
        ts_name = next(k for k in headers if "timestamp" in k)
        del headers[ts_name]
    assert _reason(scheme, headers) == "missing-timestamp"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_missing_signature(scheme: str) -> None:
    assert _reason(scheme, {}) == "missing-signature"
    headers = _signed(scheme, SECRETS[scheme])
    name = next(k for k in headers if ("sig" in k or "hmac" in k) and "timestamp" not in k)
    assert _reason(scheme, {**headers, name: "   "}) == "missing-signature"
    huge = {**headers, name: "x" * (MAX_HEADER_CHARS + 1)}
    assert _reason(scheme, huge) == "malformed-signature"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_rotation_accepts_old_and_new_secret(scheme: str) -> None:
    old, new = SECRETS[scheme], OTHER_SECRETS[scheme]
    for secret in (old, new):
        headers = _signed(scheme, secret)
        assert _verify(scheme, headers, secrets=[new, old], hmac_config=_config(scheme))
    assert _reason(scheme, _signed(scheme, old), secrets=[new]) == "bad-signature"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_generated_secrets_round_trip(scheme: str) -> None:
    secret = generate_secret(scheme)
    validate_secret(scheme, secret)
    if scheme == "standard":
        assert secret.startswith("whsec_")
        assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 24
    else:
        assert len(base64.urlsafe_b64decode(secret + "=")) == 32
    headers = _signed(scheme, secret)
    assert _verify(scheme, headers, secrets=[secret], hmac_config=_config(scheme))


def test_stripe_rotation_two_v1_from_two_secrets() -> None:
    t = int(NOW)
    old, new = SECRETS["stripe"], OTHER_SECRETS["stripe"]
    header = _stripe_header(old, t) + "," + _stripe_header(new, t).split(",")[1]
    for secrets in ([old], [new], [old, new]):
        assert _verify("stripe", {"stripe-signature": header}, secrets=secrets).timestamp == t


def test_bad_secrets() -> None:
    headers = _signed("standard", SECRETS["standard"])
    assert _reason("standard", headers, secrets=["whsec_not base64!"]) == "bad-secret"
    assert _reason("standard", headers, secrets=[]) == "bad-secret"
    assert _reason("standard", headers, secrets=[""]) == "bad-secret"
    # A broken secret beside a good one does not lock out the good one...
    assert _verify("standard", headers, secrets=["whsec_!!", SECRETS["standard"]])
    # ...and when nothing matches, the broken one is what gets reported.
    assert _reason("standard", headers, secrets=["whsec_!!", OTHER_SECRETS["standard"]]) == (
        "bad-secret"
    )
    for bad in ("whsec_!!", "whsec_", "whsec_a", ""):
        with pytest.raises(SignatureError) as info:
            validate_secret("standard", bad)
        assert info.value.reason == "bad-secret"
    with pytest.raises(SignatureError):
        validate_secret("github", "\ud800")
    with pytest.raises(SignatureError):
        sign("standard", BODY, "whsec_???", now=NOW)


def test_programming_errors() -> None:
    with pytest.raises(ValueError, match="unknown scheme"):
        verify("nope", {}, BODY, ["s"], now=NOW)
    with pytest.raises(ValueError, match="unknown scheme"):
        generate_secret("nope")
    with pytest.raises(TypeError):
        verify("github", {}, BODY, "one-secret", now=NOW)
    with pytest.raises(ValueError, match="finite"):
        verify("github", {}, BODY, ["s"], now=float("nan"))
    with pytest.raises(ValueError, match="msg_id"):
        sign("standard", BODY, SECRETS["standard"], now=NOW, msg_id="has space")


# --- the generic scheme --------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["sha256", "sha512"])
@pytest.mark.parametrize("encoding", ["hex", "base64"])
@pytest.mark.parametrize("prefix", ["", "sha256="])
@pytest.mark.parametrize("timestamp_header", [None, "X-Timestamp"])
def test_hmac_configurations(
    algorithm: str, encoding: str, prefix: str, timestamp_header: str | None
) -> None:
    cfg = HmacConfig("X-Hook-Signature", algorithm, encoding, prefix, timestamp_header)
    assert cfg.header == "x-hook-signature"
    secret = "generic secret"
    headers = sign("hmac", BODY, secret, now=NOW, hmac_config=cfg)
    value = headers["x-hook-signature"]
    content = BODY if timestamp_header is None else f"{int(NOW)}.".encode() + BODY
    digest = hmac.new(secret.encode(), content, algorithm).digest()
    assert value == prefix + (
        digest.hex() if encoding == "hex" else base64.b64encode(digest).decode()
    )
    got = verify("hmac", headers, BODY, [secret], now=NOW, hmac_config=cfg)
    assert got.timestamp == (None if timestamp_header is None else int(NOW))
    if prefix:
        stripped = {**headers, "x-hook-signature": value.removeprefix(prefix)}
        assert _reason("hmac", stripped, secrets=[secret], hmac_config=cfg) == (
            "malformed-signature"
        )


def test_hmac_default_config_and_uppercase_hex() -> None:
    headers = sign("hmac", BODY, "s3cret", now=NOW)
    assert list(headers) == ["x-signature"]
    upper = {"x-signature": headers["x-signature"].upper()}
    assert verify("hmac", upper, BODY, ["s3cret"], now=NOW) == Verified()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"header": ""},
        {"header": "bad header"},
        {"header": "x-sig\n"},
        {"algorithm": "md5"},
        {"encoding": "base32"},
        {"prefix": "x" * 33},
        {"prefix": "é="},
        {"timestamp_header": "x signature"},
        {"timestamp_header": "X-Signature"},
    ],
)
def test_hmac_config_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each field has its own message
        HmacConfig(**kwargs)


# --- hypothesis: header parsers raise nothing but SignatureError ---------------------------------

ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=300)
SIGNATURE_HEADERS = {
    "github": ["x-hub-signature-256", "x-github-delivery"],
    "stripe": ["stripe-signature"],
    "standard": [
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "svix-id",
        "svix-timestamp",
        "svix-signature",
    ],
    "shopify": ["x-shopify-hmac-sha256"],
    "slack": ["x-slack-signature", "x-slack-request-timestamp"],
    "hmac": ["x-sig", "x-sig-timestamp"],
}


def _fuzz_piece() -> st.SearchStrategy[str]:
    digits = st.integers(0, 10**16).map(str)
    near = st.integers(int(NOW) - 400, int(NOW) + 400).map(str)
    hexes = st.binary(max_size=40).map(bytes.hex)
    b64 = st.binary(max_size=70).map(lambda b: base64.b64encode(b).decode())
    words = st.sampled_from(["t", "v1", "v0", "v1a", "sha256", "=", ",", " ", "", "msg_1"])
    return st.one_of(ANY_TEXT, digits, near, hexes, b64, words)


STRUCTURED = st.lists(st.tuples(_fuzz_piece(), st.sampled_from(["=", ",", " ", ""])), max_size=12)


def _join(parts: list[tuple[str, str]]) -> str:
    return "".join(a + b for a, b in parts)


def _check_only_signature_errors(scheme: str, headers: dict[str, str], body: bytes) -> None:
    reason: str | None = None
    try:
        verify(scheme, headers, body, [SECRETS[scheme], "whsec_!!"], now=NOW, hmac_config=HMAC_TS)
    except SignatureError as exc:  # anything else escapes and fails the test
        reason = exc.reason
    assert reason is None or reason in get_args(Reason)


@pytest.mark.parametrize("scheme", SCHEMES)
@settings(max_examples=300, deadline=None)
@given(data=st.data(), body=st.binary(max_size=64))
def test_arbitrary_header_values_raise_only_signature_errors(
    scheme: str, data: st.DataObject, body: bytes
) -> None:
    names = SIGNATURE_HEADERS[scheme]
    values = st.one_of(ANY_TEXT, STRUCTURED.map(_join))
    headers = data.draw(st.dictionaries(st.sampled_from(names), values))
    _check_only_signature_errors(scheme, headers, body)


@pytest.mark.parametrize("scheme", SCHEMES)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_mutated_valid_headers_raise_only_signature_errors(
    scheme: str, data: st.DataObject
) -> None:
    headers = _signed(scheme, SECRETS[scheme])
    name = data.draw(st.sampled_from(sorted(headers)))
    value = headers[name]
    cut = data.draw(st.integers(0, len(value)))
    insert = data.draw(st.one_of(ANY_TEXT, STRUCTURED.map(_join)))
    mutated = {**headers, name: value[:cut] + insert + value[cut + data.draw(st.integers(0, 3)) :]}
    _check_only_signature_errors(scheme, mutated, BODY)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_huge_and_repetitive_headers(scheme: str) -> None:
    headers = _signed(scheme, SECRETS[scheme])
    for name, value in headers.items():
        for junk in (value * 1000, ",".join([value] * 40), " ".join([value] * 40), "\x00" * 10):
            _check_only_signature_errors(scheme, {**headers, name: junk}, BODY)
    # More signatures than a rotation needs is refused before any HMAC work.
    if scheme == "standard":
        many = " ".join([headers["webhook-signature"]] * 17)
        assert _reason(scheme, {**headers, "webhook-signature": many}) == "malformed-signature"
