"""Parameter checks: 128-bit security limits, headroom planning, primes (pure functions, no keys)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.encryption import (
    MAX_COEFF_BITS_128,
    AggregationSpec,
    QuantSpec,
    SchemeParams,
    check_headroom,
    check_security,
    plan_bfv,
    plan_ckks,
)
from privacy.encryption.params import BFV_NOISE_FACTOR, batching_prime, coeff_primes, is_prime
from privacy.errors import EncryptionError

quant_specs = st.builds(
    QuantSpec,
    clip=st.floats(1e-3, 10.0),
    precision_bits=st.integers(1, 24),
    max_clients=st.integers(1, 2000),
    max_weight=st.integers(1, 4096),
)


@settings(deadline=None, max_examples=30)
@given(quant=quant_specs)
def test_planned_bfv_parameters_are_secure_and_never_wrap(quant):
    params = plan_bfv(quant)
    check_security(params)
    check_headroom(params, quant)
    # The two inequalities the exactness argument rests on, restated from scratch.
    assert quant.digit_base**params.digits_per_slot <= params.plain_modulus
    assert params.data_modulus >= BFV_NOISE_FACTOR * quant.max_clients * params.plain_modulus
    assert sum(params.coeff_mod_bit_sizes) <= MAX_COEFF_BITS_128[params.poly_modulus_degree]
    assert params.plain_modulus < 2**60 and is_prime(params.plain_modulus)
    assert params.plain_modulus % (2 * params.poly_modulus_degree) == 1


def test_planner_packs_several_values_per_slot_for_the_benchmark_headroom():
    params = plan_bfv(QuantSpec(clip=1.0, precision_bits=16, max_clients=100, max_weight=1))
    assert params.poly_modulus_degree == 4096
    assert params.digits_per_slot == 2


@pytest.mark.parametrize(
    ("n", "bits"),
    [(4096, (60, 50)), (8192, (60, 60, 60, 40)), (4096, (40,)), (2048, (27, 27))],
)
def test_insecure_or_malformed_moduli_are_rejected(n, bits):
    primes = tuple(p for p in (coeff_primes(n, bits) if n >= 4096 else (12289, 40961)))
    params = SchemeParams(
        scheme="bfv", poly_modulus_degree=n, coeff_mod_bit_sizes=bits, coeff_primes=primes[: len(bits)],
        plain_modulus=batching_prime(2**20, n),
    )  # fmt: skip
    with pytest.raises(EncryptionError):
        check_security(params)


def test_security_limits_are_seals_128_bit_table():
    assert MAX_COEFF_BITS_128[4096] == 109
    assert MAX_COEFF_BITS_128[8192] == 218
    assert MAX_COEFF_BITS_128[16384] == 438


def test_limit_is_inclusive():
    params = SchemeParams(
        scheme="bfv", poly_modulus_degree=4096, coeff_mod_bit_sizes=(60, 49),
        coeff_primes=coeff_primes(4096, (60, 49)), plain_modulus=batching_prime(2**20, 4096),
    )  # fmt: skip
    check_security(params)


def test_mismatched_primes_and_bad_plain_modulus_are_rejected():
    good = coeff_primes(4096, (60, 49))
    with pytest.raises(EncryptionError, match="coeff prime"):
        check_security(
            SchemeParams(
                "bfv", 4096, (60, 49), (good[0], good[1] + 2), plain_modulus=batching_prime(2**20, 4096)
            )
        )
    for t in (2**20, good[0], 12289):  # not prime, equal to a coefficient prime, not 1 mod 2N
        with pytest.raises(EncryptionError, match="plain_modulus"):
            check_security(SchemeParams("bfv", 4096, (60, 49), good, plain_modulus=t))


def test_headroom_violations_are_errors():
    quant = QuantSpec(clip=1.0, precision_bits=16, max_clients=100, max_weight=1)
    params = plan_bfv(quant)
    more_clients = QuantSpec(clip=1.0, precision_bits=16, max_clients=1000, max_weight=1)
    with pytest.raises(EncryptionError, match=r"wrap|exactly"):
        check_headroom(params, more_clients)
    finer = QuantSpec(clip=1.0, precision_bits=20, max_clients=100, max_weight=1)
    with pytest.raises(EncryptionError):
        check_headroom(params, finer)


def test_ckks_headroom_and_scale_checks():
    quant = QuantSpec(clip=1.0, precision_bits=16, max_clients=100, max_weight=64)
    plan_ckks(quant)  # the common N=8192, q=[60,40,40], scale 2**40 holds it
    with pytest.raises(EncryptionError, match="scale_bits"):
        plan_ckks(quant, scale_bits=24)
    with pytest.raises(EncryptionError, match="ckks sums need"):
        plan_ckks(QuantSpec(clip=1.0, precision_bits=30, max_clients=100, max_weight=64))


def test_impossible_headroom_is_reported():
    with pytest.raises(EncryptionError, match="no 128-bit secure BFV"):
        plan_bfv(QuantSpec(clip=1.0, precision_bits=40, max_clients=2**20, max_weight=2**20))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clip": 0.0}, {"clip": float("nan")}, {"clip": float("inf")}, {"clip": True},
        {"precision_bits": 0}, {"precision_bits": 41}, {"max_clients": 0}, {"max_weight": 0},
        {"max_weight": 1.5},
    ],
)  # fmt: skip
def test_quant_spec_validation(kwargs):
    base = {"clip": 1.0, "precision_bits": 16, "max_clients": 10, "max_weight": 1}
    with pytest.raises(EncryptionError):
        QuantSpec(**{**base, **kwargs})


@settings(deadline=None, max_examples=30)
@given(
    quant=quant_specs, per_chunk=st.integers(1, 64), key=st.text("0123456789abcdef", min_size=32, max_size=32)
)
def test_spec_json_round_trip(quant, per_chunk, key):
    spec = AggregationSpec(params=plan_bfv(quant), quant=quant, ciphertexts_per_chunk=per_chunk, key_id=key)
    again = AggregationSpec.from_json(spec.to_json())
    assert again == spec and again.param_hash == spec.param_hash


def test_spec_json_rejects_unknown_and_missing_keys():
    spec = AggregationSpec(params=plan_bfv(QuantSpec(1.0, 8, 4, 1)), quant=QuantSpec(1.0, 8, 4, 1))
    text = spec.to_json()
    with pytest.raises(EncryptionError, match="unknown keys"):
        AggregationSpec.from_json(text.replace('"key_id"', '"extra":1,"key_id"'))
    with pytest.raises(EncryptionError, match="missing keys"):
        AggregationSpec.from_json(text.replace('"ciphertexts_per_chunk":256,', ""))
    with pytest.raises(EncryptionError, match="JSON"):
        AggregationSpec.from_json(text[:-3])


@settings(deadline=None, max_examples=30)
@given(quant=quant_specs, num_params=st.integers(1, 10**6), per_chunk=st.integers(1, 8))
def test_chunk_layout_covers_every_parameter_once(quant, num_params, per_chunk):
    spec = AggregationSpec(params=plan_bfv(quant), quant=quant, ciphertexts_per_chunk=per_chunk)
    layout = spec.chunk_layout(num_params)
    assert layout[0][0] == 0 and layout[-1][1] == num_params
    per_ct = spec.params.values_per_ciphertext
    for (start, stop, n_ct), nxt in zip(layout, [*layout[1:], None]):
        assert 1 <= n_ct <= per_chunk
        assert (n_ct - 1) * per_ct < stop - start + 2 <= n_ct * per_ct
        if nxt is not None:
            assert nxt[0] == stop


@given(st.integers(0, 20000))
def test_is_prime_matches_trial_division(n):
    assert is_prime(n) == (n > 1 and all(n % d for d in range(2, math.isqrt(n) + 1)))


def test_batching_prime_is_the_smallest_above():
    p = batching_prime(2**30, 4096)
    assert p >= 2**30 and p % 8192 == 1 and is_prime(p)
    assert not any(is_prime(c) for c in range(2**30 + (1 - 2**30) % 8192, p, 8192))
    assert batching_prime(2**60, 4096) is None
