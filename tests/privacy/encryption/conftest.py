"""Shared keys for the encryption tests: generated once per session (N=4096 BFV, N=8192 CKKS)."""

from __future__ import annotations

import pytest
from he_helpers import CLIP, MAX_CLIENTS, MAX_WEIGHT, PRECISION_BITS

from privacy.encryption import EncryptionClient, UpdateSchema, generate_keys


@pytest.fixture(scope="session")
def bfv_keys():
    # Two ciphertexts per chunk, so "several ciphertexts" also crosses chunk boundaries.
    return generate_keys(
        max_clients=MAX_CLIENTS,
        max_weight=MAX_WEIGHT,
        clip=CLIP,
        precision_bits=PRECISION_BITS,
        ciphertexts_per_chunk=2,
    )


@pytest.fixture(scope="session")
def other_bfv_keys():
    """Same settings, another key generation: another key id, so another parameter hash."""
    return generate_keys(
        max_clients=MAX_CLIENTS,
        max_weight=MAX_WEIGHT,
        clip=CLIP,
        precision_bits=PRECISION_BITS,
        ciphertexts_per_chunk=2,
    )


@pytest.fixture(scope="session")
def ckks_keys():
    return generate_keys(
        scheme="ckks", max_clients=20, max_weight=100, clip=CLIP, precision_bits=12, ciphertexts_per_chunk=2
    )


@pytest.fixture(scope="session")
def client_cache():
    """EncryptionClient per (keys, schema): loading a context is the slow part of building one."""
    cache: dict = {}

    def get(keys, schema: UpdateSchema) -> EncryptionClient:
        key = (keys.spec.param_hash, schema.hash)
        if key not in cache:
            cache[key] = EncryptionClient(keys.secret_context, schema)
        return cache[key]

    return get
