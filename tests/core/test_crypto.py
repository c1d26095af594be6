from __future__ import annotations

import base64
import json
import logging
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayport.core.crypto import (
    KEY_BYTES,
    DecryptionError,
    KeyRing,
    _create_key_file,
    generate_master_key,
)
from relayport.settings import CryptoSettings, Settings

K1 = bytes(range(32))
K2 = bytes(range(100, 132))
B64URL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("RELAYPORT_"):
            monkeypatch.delenv(name)


def ring(*kids: str, active: str | None = None) -> KeyRing:
    keys = {"k1": K1, "k2": K2}
    return KeyRing({kid: keys[kid] for kid in kids}, active or kids[-1])


def parts(token: str) -> list[str]:
    return token.split(".")


def b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@pytest.mark.parametrize("plaintext", [b"", b"whsec_abc", bytes(range(256)) * 40])
def test_encrypted_bytes_decrypt_to_the_same_bytes(plaintext: bytes) -> None:
    keyring = ring("k1")
    token = keyring.encrypt(plaintext, aad=b"tenant_1:signing_secret")
    assert keyring.decrypt(token, aad=b"tenant_1:signing_secret") == plaintext


def test_strings_round_trip_as_utf8() -> None:
    keyring = ring("k1")
    assert keyring.decrypt_str(keyring.encrypt_str("clé ✓")) == "clé ✓"


def test_token_is_versioned_ascii_naming_its_kid_and_never_repeats() -> None:
    keyring = ring("k1")
    first, second = keyring.encrypt(b"same"), keyring.encrypt(b"same")
    assert first.isascii()
    assert parts(first)[:2] == ["v1", "k1"]
    assert len(parts(first)) == 4
    assert first != second
    assert parts(first)[3] != parts(second)[3]


def test_non_utf8_plaintext_is_a_decryption_error_for_decrypt_str() -> None:
    keyring = ring("k1")
    with pytest.raises(DecryptionError):
        keyring.decrypt_str(keyring.encrypt(b"\xff\xfe"))


def test_token_copied_to_another_tenant_or_column_does_not_decrypt() -> None:
    keyring = ring("k1")
    token = keyring.encrypt(b"secret", aad=b"tenant_1:signing_secret")
    for aad in (b"tenant_2:signing_secret", b"tenant_1:other_column", b""):
        with pytest.raises(DecryptionError):
            keyring.decrypt(token, aad=aad)


# 6 bytes of plaintext leave the data part's last base64 character with unused bits.
@pytest.mark.parametrize("plaintext", [b"", b"sixsix", b"seven!!"])
def test_every_flipped_byte_in_either_part_is_rejected(plaintext: bytes) -> None:
    keyring = ring("k1")
    token = keyring.encrypt(plaintext, aad=b"t")
    version, kid, wrapped, data = parts(token)
    for index in (2, 3):
        raw = b64d(parts(token)[index])
        for i in range(len(raw)):
            tampered = bytearray(raw)
            tampered[i] ^= 0x01
            pieces = [version, kid, wrapped, data]
            pieces[index] = b64e(bytes(tampered))
            with pytest.raises(DecryptionError):
                keyring.decrypt(".".join(pieces), aad=b"t")


@pytest.mark.parametrize("plaintext", [b"", b"sixsix", b"seven!!"])
def test_every_changed_character_of_the_token_is_rejected(plaintext: bytes) -> None:
    keyring = ring("k1")
    token = keyring.encrypt(plaintext, aad=b"t")
    for i, char in enumerate(token):
        # One change leaves the alphabet (or breaks the structure), one stays inside base64url.
        inside = B64URL_ALPHABET[(B64URL_ALPHABET.find(char) + 1) % 64] if char != "." else "A"
        for replacement in {chr(ord(char) ^ 0x01), inside}:
            with pytest.raises(DecryptionError):
                keyring.decrypt(token[:i] + replacement + token[i + 1 :], aad=b"t")


def test_token_under_a_kid_missing_from_the_ring_does_not_decrypt() -> None:
    token = ring("k1").encrypt(b"secret")
    with pytest.raises(DecryptionError, match="k1"):
        ring("k2").decrypt(token)


def test_key_swapped_under_the_same_kid_does_not_decrypt() -> None:
    token = ring("k1").encrypt(b"secret")
    with pytest.raises(DecryptionError):
        KeyRing({"k1": K2}, "k1").decrypt(token)


@pytest.mark.parametrize(
    "token",
    ["", "v1", "v1.k1", "v1.k1.AAAA", "v2.k1.AAAA.AAAA", "v1.k1.AAAA.AAAA.AAAA", "v1.k1.A.A"],
)
def test_malformed_tokens_are_decryption_errors(token: str) -> None:
    with pytest.raises(DecryptionError):
        ring("k1").decrypt(token)


def test_decryption_errors_carry_no_key_material() -> None:
    keyring = ring("k1")
    token = keyring.encrypt(b"secret")
    with pytest.raises(DecryptionError) as caught:
        keyring.decrypt(token, aad=b"wrong")
    message = str(caught.value)
    assert caught.value.__cause__ is None
    assert K1.hex() not in message
    assert base64.b64encode(K1).decode() not in message
    assert "secret" not in message


def test_rotation_reads_old_tokens_and_rewrap_moves_only_the_dek_to_the_new_key() -> None:
    old = ring("k1").encrypt(b"secret", aad=b"t")
    rotated = ring("k1", "k2", active="k2")
    assert rotated.active_kid == "k2"
    assert rotated.decrypt(old, aad=b"t") == b"secret"
    assert rotated.needs_rewrap(old)

    new = rotated.rewrap(old)

    assert parts(new)[:2] == ["v1", "k2"]
    assert parts(new)[2] != parts(old)[2]
    assert parts(new)[3] == parts(old)[3]
    assert not rotated.needs_rewrap(new)
    assert ring("k2").decrypt(new, aad=b"t") == b"secret"
    with pytest.raises(DecryptionError):
        ring("k1").decrypt(new, aad=b"t")


def test_rewrap_of_a_token_under_the_active_key_returns_it_unchanged() -> None:
    keyring = ring("k1", "k2", active="k2")
    token = keyring.encrypt(b"secret")
    assert not keyring.needs_rewrap(token)
    assert keyring.rewrap(token) == token


def test_rewrap_refuses_a_tampered_wrapped_key() -> None:
    token = ring("k1").encrypt(b"secret")
    version, kid, wrapped, data = parts(token)
    raw = bytearray(b64d(wrapped))
    raw[-1] ^= 0x80
    with pytest.raises(DecryptionError):
        ring("k1", "k2").rewrap(".".join([version, kid, b64e(bytes(raw)), data]))


def test_needs_rewrap_on_garbage_is_a_decryption_error() -> None:
    with pytest.raises(DecryptionError):
        ring("k1").needs_rewrap("not a token")


@pytest.mark.parametrize(
    ("keys", "active", "reason"),
    [
        ({}, "k1", "at least one"),
        ({"k1": K1[:16]}, "k1", "'k1'"),
        ({"k.1": K1}, "k.1", "'k.1'"),
        ({"k1": K1}, "k2", "'k2'"),
    ],
)
def test_keyring_rejects_bad_keys(keys: dict[str, bytes], active: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        KeyRing(keys, active)


def test_repr_names_kids_but_not_keys() -> None:
    text = repr(ring("k1", "k2"))
    assert "k1" in text
    assert "k2" in text
    assert K1.hex() not in text
    assert repr(K1) not in text


def test_generated_master_key_is_32_random_bytes_of_base64() -> None:
    key = generate_master_key()
    assert len(base64.b64decode(key, validate=True)) == KEY_BYTES
    assert generate_master_key() != key


def test_from_settings_accepts_standard_and_urlsafe_base64_and_defaults_to_the_last_kid(
    tmp_path: Path,
) -> None:
    key = b"\xfb\xff" * 16  # encodes with "+" and "/" in standard base64
    standard = base64.b64encode(key).decode()
    urlsafe = base64.urlsafe_b64encode(key).decode().rstrip("=")
    assert "+" in standard
    assert "-" in urlsafe
    settings = Settings(
        data_dir=tmp_path,
        crypto={"master_keys": {"a": standard, "b": urlsafe}},
        _env_file=None,
    )
    keyring = KeyRing.from_settings(settings)
    assert keyring.active_kid == "b"
    assert keyring.kids == {"a", "b"}
    assert keyring.decrypt(KeyRing({"a": key}, "a").encrypt(b"x")) == b"x"
    assert keyring.decrypt(KeyRing({"b": key}, "b").encrypt(b"y")) == b"y"
    assert not (tmp_path / "master.key").exists()


def test_from_settings_uses_the_configured_active_kid(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        crypto={
            "master_keys": {"a": generate_master_key(), "b": generate_master_key()},
            "active_key_id": "a",
        },
        _env_file=None,
    )
    assert KeyRing.from_settings(settings).active_kid == "a"


@pytest.mark.parametrize(
    "value",
    ["not base64!!", base64.b64encode(b"short").decode(), base64.b64encode(b"x" * 33).decode()],
)
def test_bad_configured_key_is_a_value_error_naming_the_kid_not_the_key(
    tmp_path: Path, value: str
) -> None:
    # Settings refuse the key at start (exit 2 in the CLI), naming the kid but not the key.
    with pytest.raises(ValueError, match="'prod-2025'") as caught:
        Settings(data_dir=tmp_path, crypto={"master_keys": {"prod-2025": value}}, _env_file=None)
    assert value not in str(caught.value)
    # The key ring checks again for rings built without Settings validation.
    settings = Settings.model_construct(
        data_dir=tmp_path,
        env="development",
        crypto=CryptoSettings(master_keys={"prod-2025": value}),
    )
    with pytest.raises(ValueError, match="'prod-2025'") as direct:
        KeyRing.from_settings(settings)
    assert value not in str(direct.value)
    assert "\n" not in str(direct.value)


def test_from_settings_generates_a_private_key_file_once_and_loads_it_after(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "missing" / "data"
    settings = Settings(data_dir=data_dir, _env_file=None)
    with caplog.at_level(logging.WARNING, logger="relayport.crypto"):
        first = KeyRing.from_settings(settings)
    path = data_dir / "master.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads(path.read_text())
    assert doc["active"] == first.active_kid
    assert set(doc["keys"]) == {first.active_kid}
    [record] = [r for r in caplog.records if r.name == "relayport.crypto"]
    assert record.levelno == logging.WARNING
    assert record.__dict__["event"] == "crypto.master_key_generated"
    assert record.__dict__["path"] == str(path)
    assert doc["keys"][first.active_kid] not in caplog.text
    assert [p.name for p in data_dir.iterdir()] == ["master.key"]
    token = first.encrypt(b"secret", aad=b"t")
    caplog.clear()

    with caplog.at_level(logging.WARNING, logger="relayport.crypto"):
        second = KeyRing.from_settings(settings)

    assert second.active_kid == first.active_kid
    assert second.decrypt(token, aad=b"t") == b"secret"
    assert json.loads(path.read_text()) == doc
    assert not caplog.records


def test_key_file_written_by_another_process_first_wins(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    path.write_text(json.dumps({"active": "theirs", "keys": {"theirs": generate_master_key()}}))
    before = path.read_text()
    assert _create_key_file(path) is False
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["master.key"]
    assert KeyRing.from_settings(Settings(data_dir=tmp_path, _env_file=None)).active_kid == "theirs"


@pytest.mark.parametrize(
    "content",
    [
        "",
        "{",
        "[]",
        '{"active": "a"}',
        '{"active": 1, "keys": {}}',
        json.dumps({"active": "b", "keys": {"a": base64.b64encode(K1).decode()}}),
    ],
)
def test_corrupt_key_file_is_a_value_error_naming_the_file(tmp_path: Path, content: str) -> None:
    (tmp_path / "master.key").write_text(content)
    with pytest.raises(ValueError, match=r"master\.key"):
        KeyRing.from_settings(Settings(data_dir=tmp_path, _env_file=None))


def test_key_file_with_a_short_key_names_the_kid(tmp_path: Path) -> None:
    short = base64.b64encode(b"short").decode()
    (tmp_path / "master.key").write_text(json.dumps({"active": "a", "keys": {"a": short}}))
    with pytest.raises(ValueError, match="'a'"):
        KeyRing.from_settings(Settings(data_dir=tmp_path, _env_file=None))


def test_production_without_keys_never_generates_one(tmp_path: Path) -> None:
    settings = Settings(
        env="production",
        data_dir=tmp_path,
        auth={"jwt_secret": "x" * 32},
        crypto={"master_keys": {"k1": generate_master_key()}},
        _env_file=None,
    )
    settings.crypto.master_keys = {}  # past validation, as a defensive check must assume
    with pytest.raises(ValueError, match="MASTER_KEYS"):
        KeyRing.from_settings(settings)
    assert not (tmp_path / "master.key").exists()


_KEYRING = ring("k1", "k2")
_B64URL_TEXT = st.text(alphabet=B64URL_ALPHABET + "=+/.", max_size=120)


@given(
    st.one_of(
        st.text(),
        st.builds(lambda w, d: f"v1.k1.{w}.{d}", _B64URL_TEXT, _B64URL_TEXT),
        st.builds(lambda w, d: f"v1.k2.{w}.{d}", _B64URL_TEXT, _B64URL_TEXT),
    )
)
def test_arbitrary_text_given_to_decrypt_raises_only_decryption_error(token: str) -> None:
    with pytest.raises(DecryptionError):
        _KEYRING.decrypt(token)
    with pytest.raises(DecryptionError):
        _KEYRING.rewrap(token)
