"""Encrypted FedAvg end to end with real TenSEAL: decrypt(aggregate) == plaintext FedAvg within the bound."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts
from he_helpers import CLIP, MAX_CLIENTS, MAX_WEIGHT, fedavg, flat_schema, run_round
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.encryption import (
    EncryptionClient,
    StreamingAggregator,
    UpdateSchema,
    generate_keys,
    load_context,
    wire,
)
from privacy.encryption import context as context_module
from privacy.errors import EncryptionError

# Values per BFV ciphertext of the session key (4096 slots x digits); 2 of each chunk are weight+count.
LENGTH_CASES = ("one", "short", "full", "over", "several")


def length_for(case: str, per_ct: int) -> int:
    return {
        "one": 1,
        "short": per_ct - 3,  # parameters + weight + count = one slot short of a ciphertext
        "full": per_ct - 2,  # exactly one full ciphertext
        "over": per_ct - 1,  # one value over: a second ciphertext
        "several": 3 * per_ct + 5,  # four ciphertexts over two chunks of two
    }[case]


def client_updates(rng, n_clients, length, mode):
    if mode == "uniform":
        return [rng.uniform(-CLIP, CLIP, length) for _ in range(n_clients)]
    if mode == "edges":  # exactly at the clip bound, both signs
        return [rng.choice([-CLIP, CLIP], length) for _ in range(n_clients)]
    return [rng.normal(0.0, 0.01, length) for _ in range(n_clients)]  # typical small model deltas


weights_strategy = st.one_of(st.just(1), st.just(MAX_WEIGHT), st.integers(1, MAX_WEIGHT))


@settings(deadline=None, max_examples=25)
@given(
    n_clients=st.integers(1, MAX_CLIENTS),
    case=st.sampled_from(LENGTH_CASES),
    mode=st.sampled_from(["uniform", "edges", "small"]),
    weight_draws=st.lists(weights_strategy, min_size=MAX_CLIENTS, max_size=MAX_CLIENTS),
    seed=st.integers(0, 2**32 - 1),
)
def test_decrypted_aggregate_matches_plaintext_fedavg(
    bfv_keys, client_cache, n_clients, case, mode, weight_draws, seed
):
    length = length_for(case, bfv_keys.spec.params.values_per_ciphertext)
    schema = flat_schema(length)
    client = client_cache(bfv_keys, schema)
    rng = np.random.default_rng(seed)
    updates = client_updates(rng, n_clients, length, mode)
    weights = weight_draws[:n_clients]
    closed, result = run_round(client, bfv_keys, schema, updates, weights, seed=seed)
    expected = fedavg(updates, weights, CLIP)
    assert closed.clients == tuple(range(n_clients)) and closed.num_clients == n_clients
    assert result.total_weight == sum(weights) and result.num_clients == n_clients
    assert result.clients == tuple(range(n_clients))
    quantum = bfv_keys.spec.quant.quantum
    assert result.error_bound <= quantum * (1 + 1e-9)
    assert result.error_bound == pytest.approx(quantum, rel=1e-6)  # a constant of the configuration
    assert np.abs(result.average - expected).max() <= result.error_bound + 1e-12


@settings(deadline=None, max_examples=10)
@given(n_clients=st.integers(2, 12), seed=st.integers(0, 2**32 - 1))
def test_permutation_invariance(bfv_keys, client_cache, n_clients, seed):
    length = length_for("several", bfv_keys.spec.params.values_per_ciphertext)
    schema = flat_schema(length)
    client = client_cache(bfv_keys, schema)
    rng = np.random.default_rng(seed)
    updates = client_updates(rng, n_clients, length, "uniform")
    weights = [int(w) for w in rng.integers(1, MAX_WEIGHT + 1, n_clients)]
    payloads = [
        client.encrypt_update(u, weight=w, round_idx=0, client_id=i, rng=rng)
        for i, (u, w) in enumerate(zip(updates, weights))
    ]
    flat_payloads = [p for per_client in payloads for p in per_client]
    results = []
    for order in (range(len(flat_payloads)), rng.permutation(len(flat_payloads))):
        aggregator = StreamingAggregator(bfv_keys.public_context, schema, round_idx=0)
        for i in order:
            aggregator.add(flat_payloads[i])
        results.append(aggregator.close())
    # Ciphertext addition is commutative mod q: the aggregates are the same bytes.
    assert results[0].aggregate == results[1].aggregate
    assert results[0].clients == results[1].clients == tuple(range(n_clients))


@settings(deadline=None, max_examples=10)
@given(n_clients=st.integers(1, MAX_CLIENTS), seed=st.integers(0, 2**32 - 1))
def test_identical_updates_give_the_same_model(bfv_keys, client_cache, n_clients, seed):
    schema = UpdateSchema([("emb", (40, 16)), ("mlp.weight", (8, 4)), ("mlp.bias", (4,))])
    client = client_cache(bfv_keys, schema)
    rng = np.random.default_rng(seed)
    quantum = bfv_keys.spec.quant.quantum
    # On the grid every client's weighted value is an integer, so no rounding at all: exact.
    on_grid = {n: rng.integers(-(2**12), 2**12 + 1, s) * quantum for n, s in schema.entries}
    weights = [int(w) for w in rng.integers(1, MAX_WEIGHT + 1, n_clients)]
    _, result = run_round(client, bfv_keys, schema, [on_grid] * n_clients, weights, seed=seed)
    flat = schema.flatten(on_grid)
    np.testing.assert_array_equal(result.average, flat)
    off_grid = {n: rng.uniform(-CLIP, CLIP, s) for n, s in schema.entries}
    _, result = run_round(client, bfv_keys, schema, [off_grid] * n_clients, weights, seed=seed)
    assert np.abs(result.average - schema.flatten(off_grid)).max() <= result.error_bound + 1e-12
    as_dict = client.decrypt_aggregate(
        run_round(client, bfv_keys, schema, [on_grid] * n_clients, weights)[0].aggregate,
        round_idx=0,
        as_dict=True,
    ).average
    for name, value in on_grid.items():
        np.testing.assert_array_equal(as_dict[name], value)


def test_values_beyond_the_clip_are_clipped(bfv_keys, client_cache):
    schema = flat_schema(100)
    client = client_cache(bfv_keys, schema)
    rng = np.random.default_rng(3)
    updates = [rng.uniform(-5, 5, 100) for _ in range(4)]
    _, result = run_round(client, bfv_keys, schema, updates, [1, 2, 3, 4])
    assert np.abs(result.average - fedavg(updates, [1, 2, 3, 4], CLIP)).max() <= result.error_bound + 1e-12
    assert np.abs(result.average).max() <= CLIP


def test_a_smaller_client_clip_is_honoured(bfv_keys, client_cache):
    schema = flat_schema(50)
    client = client_cache(bfv_keys, schema)
    update = np.linspace(-1, 1, 50)
    payloads = client.encrypt_update(update, weight=1, round_idx=0, client_id=0, clip=0.25)
    aggregator = StreamingAggregator(bfv_keys.public_context, schema, round_idx=0)
    for p in payloads:
        aggregator.add(p)
    result = client.decrypt_aggregate(aggregator.close().aggregate, round_idx=0)
    assert np.abs(result.average - np.clip(update, -0.25, 0.25)).max() <= result.error_bound


@settings(deadline=None, max_examples=8)
@given(n_clients=st.integers(1, 20), seed=st.integers(0, 2**32 - 1), case=st.sampled_from(LENGTH_CASES))
def test_ckks_matches_plaintext_fedavg(ckks_keys, client_cache, n_clients, seed, case):
    slots = ckks_keys.spec.params.values_per_ciphertext
    length = length_for(case, slots) if case != "several" else 2 * slots + 7
    schema = flat_schema(length)
    client = client_cache(ckks_keys, schema)
    rng = np.random.default_rng(seed)
    updates = client_updates(rng, n_clients, length, "uniform")
    weights = [int(w) for w in rng.integers(1, 101, n_clients)]
    _, result = run_round(client, ckks_keys, schema, updates, weights, seed=seed)
    assert result.total_weight == sum(weights) and result.num_clients == n_clients
    assert np.abs(result.average - fedavg(updates, weights, CLIP)).max() <= result.error_bound + 1e-12


def test_ckks_release_is_rounded_to_the_grid(ckks_keys, client_cache):
    """Released CKKS values are exact multiples of quantum / W: the approximate noise never leaves."""
    schema = flat_schema(300)
    client = client_cache(ckks_keys, schema)
    rng = np.random.default_rng(5)
    updates = client_updates(rng, 3, 300, "uniform")
    _, result = run_round(client, ckks_keys, schema, updates, [2, 3, 5])
    grid = result.average * result.total_weight / ckks_keys.spec.quant.quantum
    np.testing.assert_array_equal(grid, np.rint(grid))


def test_aggregator_cannot_decrypt(bfv_keys, client_cache):
    schema = flat_schema(10)
    client = client_cache(bfv_keys, schema)
    aggregator = StreamingAggregator(bfv_keys.public_context, schema, round_idx=0)
    for p in client.encrypt_update(np.full(10, 0.5), weight=1, round_idx=0, client_id=1):
        aggregator.add(p)
    assert not aggregator.context.is_private() and not aggregator.context.has_secret_key()
    closed = aggregator.close()
    header, body = wire.decode(closed.aggregate, max_body=len(closed.aggregate))
    ((_, vector_bytes),) = wire.decode_aggregate_body(body, header.chunk_count)
    public = load_context(bfv_keys.public_context, role="public").context
    with pytest.raises(ValueError, match="secret"):
        ts.bfv_vector_from(public, vector_bytes).decrypt()
    with pytest.raises(EncryptionError, match="secret context"):
        EncryptionClient(bfv_keys.public_context, schema)
    with pytest.raises(EncryptionError, match="public context"):
        StreamingAggregator(bfv_keys.secret_context, schema, round_idx=0)
    assert b"secret" not in bfv_keys.public_context[:4]
    assert len(bfv_keys.public_context) < len(bfv_keys.secret_context)


def test_public_envelope_smuggling_a_secret_key_is_refused(bfv_keys):
    # Relabel the secret envelope as public: the role byte says public, TenSEAL finds a secret key.
    doctored = bytearray(bfv_keys.secret_context)
    doctored[6] = 2
    with pytest.raises(EncryptionError, match="holds a secret key"):
        load_context(bytes(doctored), role="public")


def test_context_round_trip(bfv_keys, ckks_keys):
    for keys in (bfv_keys, ckks_keys):
        secret = load_context(keys.secret_context, role="secret")
        public = load_context(keys.public_context, role="public")
        assert secret.spec == public.spec == keys.spec
        assert secret.context.is_private() and not public.context.is_private()


def test_context_whose_spec_disagrees_with_its_tenseal_parameters_is_rejected(bfv_keys):
    """A valid spec glued to a TenSEAL context of other parameters: caught by the parameter check."""
    other = generate_keys(max_clients=3, max_weight=1, clip=1.0, precision_bits=8)
    assert other.spec.params.coeff_primes != bfv_keys.spec.params.coeff_primes
    prefix = context_module._PREFIX
    _, _, _, spec_length = prefix.unpack_from(bfv_keys.public_context, 0)
    tenseal_bytes = bfv_keys.public_context[prefix.size + spec_length + 8 :]
    glued = context_module._envelope(context_module.ROLE_PUBLIC, other.spec, tenseal_bytes)
    with pytest.raises(EncryptionError, match="does not match its spec"):
        load_context(glued, role="public")
    # Same bytes, honest spec: loads.
    load_context(
        context_module._envelope(context_module.ROLE_PUBLIC, bfv_keys.spec, tenseal_bytes), role="public"
    )
    with pytest.raises(EncryptionError, match=r"too short|magic"):
        load_context(b"FRHK", role="public")
    with pytest.raises(EncryptionError, match="context bytes"):
        load_context(bfv_keys.public_context[:-1], role="public")


def test_insecure_explicit_parameters_are_refused():
    from privacy.encryption import SchemeParams
    from privacy.encryption.params import batching_prime, coeff_primes

    bits = (60, 55)  # 115 bits > 109 allowed at N=4096
    insecure = SchemeParams(
        scheme="bfv", poly_modulus_degree=4096, coeff_mod_bit_sizes=bits, coeff_primes=coeff_primes(4096, bits),
        plain_modulus=batching_prime(2**20, 4096),
    )  # fmt: skip
    with pytest.raises(EncryptionError, match="128-bit security"):
        generate_keys(max_clients=2, params=insecure)


def test_partial_delivery_and_stragglers(bfv_keys, client_cache):
    schema = flat_schema(length_for("several", bfv_keys.spec.params.values_per_ciphertext))
    client = client_cache(bfv_keys, schema)
    assert client.num_chunks == 2
    rng = np.random.default_rng(11)
    updates = client_updates(rng, 3, schema.size, "uniform")
    payloads = [
        client.encrypt_update(u, weight=w, round_idx=4, client_id=i)
        for i, (u, w) in enumerate(zip(updates, [5, 7, 9]))
    ]
    aggregator = StreamingAggregator(bfv_keys.public_context, schema, round_idx=4)
    for p in payloads[0] + payloads[1][:1]:  # client 1 delivers chunk 0 only; client 2 never delivers
        aggregator.add(p)
    assert aggregator.delivered == (0,)
    closed = aggregator.close()
    assert closed.clients == (0,) and closed.partial_clients == (1,)
    with pytest.raises(EncryptionError, match="allow_partial"):
        client.decrypt_aggregate(closed.aggregate, round_idx=4)
    result = client.decrypt_aggregate(closed.aggregate, round_idx=4, allow_partial=True)
    assert result.chunk_weights == (12, 5) and result.chunk_clients == (2, 1) and result.clients == (0,)
    split = client._layout[0][1]
    first = fedavg(updates[:2], [5, 7], CLIP)[:split]
    assert np.abs(result.average[:split] - first).max() <= result.error_bound + 1e-12
    assert (
        np.abs(result.average[split:] - np.clip(updates[0][split:], -CLIP, CLIP)).max() <= result.error_bound
    )


def test_a_round_nobody_delivered_to_cannot_be_decrypted(bfv_keys, client_cache):
    schema = flat_schema(10)
    closed = StreamingAggregator(bfv_keys.public_context, schema, round_idx=0).close()
    assert closed.clients == () and closed.num_clients == 0
    with pytest.raises(EncryptionError, match="no client"):
        client_cache(bfv_keys, schema).decrypt_aggregate(closed.aggregate, round_idx=0)


def test_max_clients_is_enforced_by_the_aggregator():
    keys = generate_keys(max_clients=2, max_weight=3, clip=1.0, precision_bits=8)
    schema = flat_schema(5)
    client = EncryptionClient(keys.secret_context, schema)
    aggregator = StreamingAggregator(keys.public_context, schema, round_idx=0)
    for cid in (0, 1):
        aggregator.add(client.encrypt_update(np.ones(5), weight=3, round_idx=0, client_id=cid)[0])
    with pytest.raises(EncryptionError, match="max_clients=2"):
        aggregator.add(client.encrypt_update(np.ones(5), weight=3, round_idx=0, client_id=2)[0])
    result = client.decrypt_aggregate(aggregator.close().aggregate, round_idx=0)
    assert result.num_clients == 2 and result.total_weight == 6
    np.testing.assert_array_equal(result.average, np.ones(5))


def test_bfv_upload_is_compact(bfv_keys, client_cache):
    """Seeded symmetric ciphertexts, several values per slot: far below CKKS's ~57 bytes per value."""
    schema = flat_schema(4 * bfv_keys.spec.params.values_per_ciphertext - 8)
    client = client_cache(bfv_keys, schema)
    payloads = client.encrypt_update(np.zeros(schema.size), weight=1, round_idx=0, client_id=0)
    bytes_per_value = sum(map(len, payloads)) / schema.size
    assert bfv_keys.spec.params.digits_per_slot >= 2
    assert bytes_per_value < 12  # 3x fp32


def test_aggregator_in_a_fresh_process(bfv_keys, client_cache, tmp_path):
    """The aggregator's process imports nothing but privacy.encryption and gets only public bytes."""
    import subprocess
    import sys
    from pathlib import Path

    schema = flat_schema(5000)
    client = client_cache(bfv_keys, schema)
    updates = [np.full(5000, 0.25), np.full(5000, -0.5)]
    for i, u in enumerate(updates):
        for j, p in enumerate(client.encrypt_update(u, weight=i + 1, round_idx=2, client_id=i)):
            (tmp_path / f"payload-{i}-{j}.bin").write_bytes(p)
    (tmp_path / "public.bin").write_bytes(bfv_keys.public_context)
    script = (
        "import sys, pathlib\n"
        "from privacy.encryption import StreamingAggregator, UpdateSchema\n"
        "d = pathlib.Path(sys.argv[1])\n"
        "agg = StreamingAggregator((d / 'public.bin').read_bytes(), UpdateSchema([('w', (5000,))]), round_idx=2)\n"
        "for p in sorted(d.glob('payload-*.bin')):\n"
        "    agg.add(p.read_bytes())\n"
        "(d / 'aggregate.bin').write_bytes(agg.close().aggregate)\n"
    )
    root = Path(__file__).resolve().parents[3]
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = client.decrypt_aggregate((tmp_path / "aggregate.bin").read_bytes(), round_idx=2)
    np.testing.assert_array_equal(result.average, np.full(5000, (0.25 - 2 * 0.5) / 3))
