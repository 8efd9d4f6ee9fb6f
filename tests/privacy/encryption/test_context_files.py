"""Context files checked at load, before any spend (issue 14, finding 8).

Deleting ``public.ctx`` gave a FileNotFoundError traceback; a ``secret.ctx`` from another key
generation failed only after 4 attempts and 20 recorded spends. ``read_context_file`` and
``check_key_pair`` refuse both with one line at load.
"""

from __future__ import annotations

import struct

import pytest

from privacy.encryption.context import check_key_pair, load_context, read_context_file
from privacy.errors import EncryptionError


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_missing_public_context_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "public.ctx"
    with pytest.raises(EncryptionError) as err:
        read_context_file(path, role="public")
    assert str(err.value).startswith(f"{path}: public context file not found")
    assert "\n" not in str(err.value)
    with pytest.raises(EncryptionError, match="not a regular file"):
        read_context_file(tmp_path, role="public")


def test_context_files_load_and_a_matching_pair_passes(tmp_path, bfv_keys):
    public = read_context_file(write(tmp_path / "public.ctx", bfv_keys.public_context), role="public")
    secret = read_context_file(write(tmp_path / "secret.ctx", bfv_keys.secret_context), role="secret")
    check_key_pair(secret, public)


def test_roles_swapped_between_files_name_the_file(tmp_path, bfv_keys):
    path = write(tmp_path / "public.ctx", bfv_keys.secret_context)
    with pytest.raises(
        EncryptionError, match=r"public\.ctx: context role 'secret': expected a public context"
    ):
        read_context_file(path, role="public")


def test_secret_context_from_another_key_generation_is_refused(bfv_keys, other_bfv_keys):
    public = load_context(bfv_keys.public_context, role="public")
    swapped = load_context(other_bfv_keys.secret_context, role="secret")
    with pytest.raises(EncryptionError, match="different key generations"):
        check_key_pair(swapped, public)


def test_swapped_secret_key_inside_a_copied_envelope_is_refused(bfv_keys, other_bfv_keys):
    """Right spec (copied from the real secret.ctx), wrong key: the encrypt/decrypt probe catches it."""
    prefix = struct.Struct("<4sHBI")

    def parts(envelope: bytes) -> tuple[bytes, bytes, bytes]:
        *_, spec_length = prefix.unpack_from(envelope, 0)
        start = prefix.size
        return envelope[:start], envelope[start : start + spec_length], envelope[start + spec_length :]

    head, spec, _ = parts(bfv_keys.secret_context)
    _, _, other_context = parts(other_bfv_keys.secret_context)
    forged = head + spec + other_context  # the u64 length and TenSEAL bytes of the other key
    public = load_context(bfv_keys.public_context, role="public")
    secret = load_context(forged, role="secret")
    assert secret.spec.param_hash == public.spec.param_hash
    with pytest.raises(EncryptionError, match=r"swapped secret\.ctx"):
        check_key_pair(secret, public)
