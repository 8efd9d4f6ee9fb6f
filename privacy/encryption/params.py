"""Encryption parameters: 128-bit security limits, quantisation grid, BFV/CKKS planning, noise headroom.

Pure arithmetic (no keys), so property tests can drive it directly.

* Security: SEAL's ``CoeffModulus::MaxBitCount`` for 128-bit classical security, from the
  HomomorphicEncryption.org standard (Albrecht et al., "Homomorphic Encryption Security Standard", 2018):
  N=4096 allows log q <= 109, 8192 <= 218, 16384 <= 438.
* Quantisation: a client clips each value to [-clip, clip] and rounds stochastically to the grid
  ``quantum = clip * 2**-precision_bits``; the aggregator multiplies it by the client's public integer
  weight. One client's weighted integer is then at most
  ``max_weight * 2**precision_bits`` in magnitude, a sum of ``max_clients`` of them at most
  ``sum_bound``; packing base ``2 * sum_bound + 1`` means balanced digits never carry into each other.
* BFV exactness (Fan and Vercauteren, 2012): clients encrypt with the secret key (symmetric RLWE), so a
  fresh ciphertext satisfies ``c0 + c1*s = round(q*m/t) + e`` with SEAL's centred-binomial error
  ``|e_i| <= 21``. A sum of K ciphertexts decrypts exactly when ``K * (21 + 1/2) * t / q < 1/2``; the
  aggregator multiplies each by a public weight of at most W (double-and-add: K * W fresh ciphertexts'
  worth of noise), so we demand ``q >= 2 * 43 * K * W * t`` (one extra bit for the RNS decryption's rounding). This is a worst-case
  guarantee, not a high-probability estimate; public-key encryption's worst case (``e0 + e1*s + u*e``,
  about ``2 * N * 21``) would cost ~12 more bits of modulus (typical noise differs by ~2 bits only).
* CKKS (Cheon, Kim, Kim and Song, 2017) carries one quantised integer per slot; decryptions are rounded
  to the integer grid before release (Li and Micciancio, "On the Security of Homomorphic Encryption on
  Approximate Numbers", 2021), and a decryption whose noise could reach that rounding is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from dataclasses import asdict, dataclass, field

from privacy.errors import EncryptionError

SCHEMES = ("bfv", "ckks")

#: SEAL CoeffModulus::MaxBitCount(N, sec_level_type::tc128).
MAX_COEFF_BITS_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}

#: Largest |e_i| of SEAL's error sampler (centred binomial over 42 bits; 6 sigma = 19.2 if Gaussian).
SEAL_ERROR_BOUND = 21
#: ``q >= BFV_NOISE_FACTOR * max_clients * t`` guarantees exact decryption of a max_clients sum.
BFV_NOISE_FACTOR = 2 * (2 * SEAL_ERROR_BOUND + 1)
#: SEAL rejects plain moduli above 60 bits; a SEAL coefficient prime is at most 60 bits too.
PLAIN_MODULUS_MAX_BITS = 60
PRIME_MAX_BITS = 60
#: CKKS carries integers below 2**36: decoding to float64 keeps an absolute error far under 1/4 there.
CKKS_MAX_VALUE_BITS = 36
#: Two values per ciphertext chunk are reserved: encrypted units (1 each; the aggregate's decrypt to the
#: total public weight, a consistency check for the decrypting party).
META_VALUES = 2
DEFAULT_CIPHERTEXTS_PER_CHUNK = 256
SPEC_FORMAT = 1


@dataclass(frozen=True)
class QuantSpec:
    """The shared fixed-point grid and the headroom declared up front.

    Args:
        clip: per-coordinate bound; values are clipped to [-clip, clip] before quantisation.
        precision_bits: ``quantum = clip * 2**-precision_bits``.
        max_clients: most clients whose updates one aggregate may hold.
        max_weight: largest integer weight (e.g. capped sample count) one client may fold in.
    """

    clip: float
    precision_bits: int
    max_clients: int
    max_weight: int

    def __post_init__(self) -> None:
        if isinstance(self.clip, bool) or not isinstance(self.clip, int | float):
            raise EncryptionError(f"clip={self.clip!r}: expected a finite number > 0")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise EncryptionError(f"clip={self.clip!r}: expected a finite number > 0")
        object.__setattr__(self, "clip", float(self.clip))
        _check_int("precision_bits", self.precision_bits, 1, 40)
        _check_int("max_clients", self.max_clients, 1, 2**20)
        _check_int("max_weight", self.max_weight, 1, 2**20)

    @property
    def quantum(self) -> float:
        """Grid step of the weighted values (the release rounding quantum)."""
        return math.ldexp(float(self.clip), -self.precision_bits)

    @property
    def client_bound(self) -> int:
        """Largest |integer| one client sends for one value (weight and count included)."""
        return self.max_weight * 2**self.precision_bits

    @property
    def sum_bound(self) -> int:
        """Largest |integer| a sum over max_clients clients can reach."""
        return self.max_clients * self.client_bound

    @property
    def digit_base(self) -> int:
        """Base of the balanced positional packing: sums never carry between digits."""
        return 2 * self.sum_bound + 1


@dataclass(frozen=True)
class SchemeParams:
    """Scheme parameters as the key authority fixes them (coefficient primes included)."""

    scheme: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    coeff_primes: tuple[int, ...]
    plain_modulus: int = 0
    scale_bits: int = 0
    digits_per_slot: int = 1

    @property
    def slots(self) -> int:
        """Values one ciphertext carries per digit: N for BFV batching, N/2 for CKKS."""
        return self.poly_modulus_degree if self.scheme == "bfv" else self.poly_modulus_degree // 2

    @property
    def values_per_ciphertext(self) -> int:
        return self.slots * self.digits_per_slot

    @property
    def data_modulus(self) -> int:
        """Product of the primes ciphertexts live under (all but SEAL's special key-switching prime)."""
        return math.prod(self.coeff_primes[:-1])


@dataclass(frozen=True)
class AggregationSpec:
    """Everything clients and the aggregator must agree on; hashed into every payload header."""

    params: SchemeParams
    quant: QuantSpec
    ciphertexts_per_chunk: int = DEFAULT_CIPHERTEXTS_PER_CHUNK
    key_id: str = field(default_factory=lambda: secrets.token_hex(16))

    def __post_init__(self) -> None:
        _check_int("ciphertexts_per_chunk", self.ciphertexts_per_chunk, 1, 2**16)
        check_security(self.params)
        check_headroom(self.params, self.quant)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): the parameter hash is taken over it."""
        body = {
            "format": SPEC_FORMAT,
            "params": asdict(self.params),
            "quant": asdict(self.quant),
            "ciphertexts_per_chunk": self.ciphertexts_per_chunk,
            "key_id": self.key_id,
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> AggregationSpec:
        """Parse and re-validate a spec; unknown or missing keys are errors."""
        try:
            body = json.loads(text)
        except (ValueError, UnicodeDecodeError) as err:
            raise EncryptionError(f"context spec: not valid JSON ({err})") from None
        _check_keys("context spec", body, {"format", "params", "quant", "ciphertexts_per_chunk", "key_id"})
        if body["format"] != SPEC_FORMAT:
            raise EncryptionError(f"context spec format={body['format']!r}: expected {SPEC_FORMAT}")
        params_keys = {f for f in SchemeParams.__dataclass_fields__}
        quant_keys = {f for f in QuantSpec.__dataclass_fields__}
        _check_keys("context spec params", body["params"], params_keys)
        _check_keys("context spec quant", body["quant"], quant_keys)
        raw = dict(body["params"])
        for key in ("coeff_mod_bit_sizes", "coeff_primes"):
            if not isinstance(raw[key], list) or not all(type(v) is int for v in raw[key]):
                raise EncryptionError(f"context spec params.{key}={raw[key]!r}: expected a list of integers")
            raw[key] = tuple(raw[key])
        for key in ("poly_modulus_degree", "plain_modulus", "scale_bits", "digits_per_slot"):
            if type(raw[key]) is not int:
                raise EncryptionError(f"context spec params.{key}={raw[key]!r}: expected an integer")
        if not isinstance(body["key_id"], str) or len(body["key_id"]) != 32:
            raise EncryptionError(f"context spec key_id={body['key_id']!r}: expected 32 hex digits")
        return cls(
            params=SchemeParams(**raw),
            quant=QuantSpec(**body["quant"]),
            ciphertexts_per_chunk=body["ciphertexts_per_chunk"],
            key_id=body["key_id"],
        )

    @property
    def param_hash(self) -> bytes:
        """SHA-256 of the canonical spec: scheme, primes, grid, headroom, chunking and key id."""
        return hashlib.sha256(self.to_json().encode()).digest()

    def chunk_layout(self, num_params: int) -> list[tuple[int, int, int]]:
        """Split a flat update into chunks: ``(start, stop, ciphertext count)`` per chunk.

        Each chunk carries its parameters followed by the two meta values (weight, count).
        """
        _check_int("num_params", num_params, 1, 2**40)
        per_ct = self.params.values_per_ciphertext
        per_chunk = self.ciphertexts_per_chunk * per_ct - META_VALUES
        layout = []
        for start in range(0, num_params, per_chunk):
            stop = min(num_params, start + per_chunk)
            layout.append((start, stop, -(-(stop - start + META_VALUES) // per_ct)))
        return layout


def check_security(params: SchemeParams) -> None:
    """Reject parameters below 128-bit security or inconsistent with SEAL's rules."""
    if params.scheme not in SCHEMES:
        raise EncryptionError(f"scheme={params.scheme!r}: expected one of {', '.join(SCHEMES)}")
    n = params.poly_modulus_degree
    if n not in MAX_COEFF_BITS_128 or n < 4096:
        raise EncryptionError(f"poly_modulus_degree={n!r}: expected one of 4096, 8192, 16384, 32768")
    bits = params.coeff_mod_bit_sizes
    if len(bits) < 2 or len(bits) != len(params.coeff_primes):
        raise EncryptionError(
            f"coeff_mod_bit_sizes={list(bits)}: expected at least 2 sizes (data primes + special prime), "
            f"one per prime in coeff_primes ({len(params.coeff_primes)})"
        )
    limit = MAX_COEFF_BITS_128[n]
    if sum(bits) > limit:
        raise EncryptionError(
            f"coeff_mod_bit_sizes={list(bits)} sum to {sum(bits)} bits: 128-bit security at "
            f"poly_modulus_degree={n} allows at most {limit}"
        )
    for b, p in zip(bits, params.coeff_primes):
        if not (17 <= b <= PRIME_MAX_BITS) or p.bit_length() != b or p % (2 * n) != 1 or not is_prime(p):
            raise EncryptionError(
                f"coeff prime {p} (declared {b} bits): expected a {b}-bit prime = 1 mod {2 * n}, 17..60 bits"
            )
    if len(set(params.coeff_primes)) != len(params.coeff_primes):
        raise EncryptionError(f"coeff_primes={list(params.coeff_primes)}: expected distinct primes")
    _check_int("digits_per_slot", params.digits_per_slot, 1, 60)
    if params.scheme == "bfv":
        t = params.plain_modulus
        if not (isinstance(t, int) and 2 * n < t < 2**PLAIN_MODULUS_MAX_BITS):
            raise EncryptionError(f"plain_modulus={t!r}: expected an integer in ({2 * n}, 2**60)")
        if t % (2 * n) != 1 or not is_prime(t) or t in params.coeff_primes:
            raise EncryptionError(
                f"plain_modulus={t}: expected a prime = 1 mod {2 * n} (batching) distinct from the "
                "coefficient primes"
            )
        if params.scale_bits != 0:
            raise EncryptionError(f"scale_bits={params.scale_bits}: expected 0 for bfv")
    else:
        if params.plain_modulus != 0 or params.digits_per_slot != 1:
            raise EncryptionError(
                f"ckks with plain_modulus={params.plain_modulus}, digits_per_slot={params.digits_per_slot}: "
                "expected 0 and 1"
            )
        _check_int("scale_bits", params.scale_bits, 20, 80)


def check_headroom(params: SchemeParams, quant: QuantSpec) -> None:
    """Reject parameters where a sum of max_clients updates could wrap around or lose exactness."""
    base, k = quant.digit_base, quant.max_clients
    # The aggregator multiplies each ciphertext by its public weight (<= max_weight): noise grows by it.
    k = k * quant.max_weight
    if params.scheme == "bfv":
        t = params.plain_modulus
        if base**params.digits_per_slot > t:
            raise EncryptionError(
                f"digits_per_slot={params.digits_per_slot} of base {base} (max_clients={k}, "
                f"max_weight={quant.max_weight}, precision_bits={quant.precision_bits}) need a plain modulus "
                f">= {base**params.digits_per_slot}, got plain_modulus={t}: sums would wrap around"
            )
        if params.data_modulus < BFV_NOISE_FACTOR * k * t:
            raise EncryptionError(
                f"data modulus of {params.data_modulus.bit_length()} bits is below the "
                f"{(BFV_NOISE_FACTOR * k * t).bit_length()} bits a sum of max_clients={quant.max_clients} "
                f"ciphertexts each scaled by up to max_weight={quant.max_weight} with "
                f"plain_modulus={t} needs to decrypt exactly"
            )
    else:
        if base.bit_length() > CKKS_MAX_VALUE_BITS:
            raise EncryptionError(
                f"ckks sums need {base.bit_length()} bits (max_clients={quant.max_clients}, max_weight={quant.max_weight}, "
                f"precision_bits={quant.precision_bits}): expected at most {CKKS_MAX_VALUE_BITS}"
            )
        noise_bound = 8 * params.poly_modulus_degree * k * (SEAL_ERROR_BOUND + 1)
        if 2**params.scale_bits < noise_bound:
            raise EncryptionError(
                f"scale_bits={params.scale_bits}: a sum of max_clients={quant.max_clients} ckks ciphertexts "
                f"each scaled by up to max_weight={quant.max_weight} needs at least "
                f"{noise_bound.bit_length()} bits so that its noise stays below 1/8 of the quantum"
            )
        if params.data_modulus < 4 * (quant.sum_bound + 1) * 2**params.scale_bits:
            raise EncryptionError(
                f"ckks data modulus of {params.data_modulus.bit_length()} bits cannot hold sums up to "
                f"{quant.sum_bound} at scale 2**{params.scale_bits}"
            )


def plan_bfv(quant: QuantSpec, *, poly_modulus_degree: int | None = None) -> SchemeParams:
    """Choose BFV parameters that minimise wire bytes per value for this grid and headroom.

    Tries every digit count per slot whose base fits a plain modulus below 2**60, picks the smallest
    batching prime t above ``digit_base**digits``, the smallest data modulus with ``q >= 86 * K * W * t`` (K = max_clients ciphertexts, each scaled by a
    public weight of at most W = max_weight)
    and fills the rest of the 128-bit budget with the special prime (never sent on the wire).
    """
    degrees = (poly_modulus_degree,) if poly_modulus_degree is not None else (4096, 8192, 16384)
    best: tuple[float, SchemeParams] | None = None
    for n in degrees:
        if n not in MAX_COEFF_BITS_128 or n < 4096:
            raise EncryptionError(f"poly_modulus_degree={n!r}: expected one of 4096, 8192, 16384, 32768")
        for digits in range(1, PLAIN_MODULUS_MAX_BITS + 1):
            need_t = max(quant.digit_base**digits, 2 * n + 1)
            if need_t.bit_length() > PLAIN_MODULUS_MAX_BITS:
                break
            # Noise: max_clients ciphertexts, each multiplied by a public weight of up to max_weight.
            params = _bfv_candidate(n, digits, need_t, quant.max_clients * quant.max_weight)
            if params is None:
                continue
            cost = _estimated_bytes_per_slot(params) / digits
            if best is None or cost < best[0] - 1e-9:
                best = (cost, params)
    if best is None:
        raise EncryptionError(
            f"no 128-bit secure BFV parameters hold sums of max_clients={quant.max_clients}, "
            f"max_weight={quant.max_weight}, precision_bits={quant.precision_bits}: lower one of them"
        )
    return best[1]


def plan_ckks(
    quant: QuantSpec,
    *,
    poly_modulus_degree: int = 8192,
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 40),
    scale_bits: int = 40,
) -> SchemeParams:
    """CKKS parameters (default: the common N=8192, q=[60,40,40], scale 2**40), checked for headroom."""
    primes = coeff_primes(poly_modulus_degree, tuple(coeff_mod_bit_sizes))
    params = SchemeParams(
        scheme="ckks",
        poly_modulus_degree=poly_modulus_degree,
        coeff_mod_bit_sizes=tuple(coeff_mod_bit_sizes),
        coeff_primes=primes,
        scale_bits=scale_bits,
    )
    check_security(params)
    check_headroom(params, quant)
    return params


def coeff_primes(poly_modulus_degree: int, bit_sizes: tuple[int, ...]) -> tuple[int, ...]:
    """The primes SEAL (and so TenSEAL) picks for these bit sizes."""
    import tenseal.sealapi as sealapi

    if poly_modulus_degree not in MAX_COEFF_BITS_128:
        raise EncryptionError(
            f"poly_modulus_degree={poly_modulus_degree!r}: expected a power of two 4096..32768"
        )
    try:
        moduli = sealapi.CoeffModulus.Create(poly_modulus_degree, list(bit_sizes))
    except (ValueError, RuntimeError) as err:
        raise EncryptionError(
            f"coeff_mod_bit_sizes={list(bit_sizes)} at poly_modulus_degree={poly_modulus_degree}: {err}"
        ) from None
    return tuple(int(m.value()) for m in moduli)


def batching_prime(at_least: int, poly_modulus_degree: int, *, avoid: tuple[int, ...] = ()) -> int | None:
    """Smallest prime >= at_least that is 1 mod 2N (needed for BFV batching), or None above 2**60."""
    step = 2 * poly_modulus_degree
    candidate = at_least + (1 - at_least) % step
    while candidate.bit_length() <= PLAIN_MODULUS_MAX_BITS:
        if candidate not in avoid and is_prime(candidate):
            return candidate
        candidate += step
    return None


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for n < 3.3e24 (bases: the first 12 primes)."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    for p in small:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _bfv_candidate(n: int, digits: int, need_t: int, max_clients: int) -> SchemeParams | None:
    limit = MAX_COEFF_BITS_128[n]
    t = batching_prime(need_t, n)
    if t is None:
        return None
    need_q = BFV_NOISE_FACTOR * max_clients * t
    n_data = -(-need_q.bit_length() // PRIME_MAX_BITS)
    for extra in range(0, 2 * n_data + 1):
        # Spread the bits over the data primes, then grow them one bit at a time until q is enough.
        total = need_q.bit_length() + extra
        data_bits = [total // n_data + (1 if i < total % n_data else 0) for i in range(n_data)]
        if max(data_bits) > PRIME_MAX_BITS or min(data_bits) < 17:
            return None
        special = min(PRIME_MAX_BITS, limit - sum(data_bits))
        if special < 17:
            return None
        bits = (*data_bits, special)
        try:
            primes = coeff_primes(n, bits)
        except EncryptionError:
            return None
        if t in primes:
            t = batching_prime(t + 1, n, avoid=primes)
            if t is None:
                return None
        params = SchemeParams(
            scheme="bfv",
            poly_modulus_degree=n,
            coeff_mod_bit_sizes=bits,
            coeff_primes=primes,
            plain_modulus=t,
            digits_per_slot=digits,
        )
        if params.data_modulus >= BFV_NOISE_FACTOR * max_clients * t:
            return params
    return None


def _estimated_bytes_per_slot(params: SchemeParams) -> float:
    # A seeded ciphertext sends c0 only: one compressed word per data prime per coefficient
    # (measured: ~bits/8 + 0.6 bytes with SEAL's zstd).
    per_coeff = sum(b / 8 + 0.6 for b in params.coeff_mod_bit_sizes[:-1])
    return per_coeff * params.poly_modulus_degree / params.slots


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise EncryptionError(f"{name}={value!r}: expected an integer in [{low}, {high}]")


def _check_keys(where: str, body: object, expected: set[str]) -> None:
    if not isinstance(body, dict):
        raise EncryptionError(f"{where}: expected a JSON object, got {type(body).__name__}")
    if set(body) != expected:
        missing, unknown = sorted(expected - set(body)), sorted(set(body) - expected)
        raise EncryptionError(f"{where}: missing keys {missing}, unknown keys {unknown}")
