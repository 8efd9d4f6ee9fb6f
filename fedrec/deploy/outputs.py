"""What the coordinator checks in datasite outputs before anything touches the aggregate or the ledger.

A training output must be exactly one list of wire-format payloads of this round, attempt and client
(headers checked here; bodies parsed once, by the aggregator) plus the spend record the config implies
for that client; an apply output must be a sealed global model of the next round with its digest.
Anything else is :class:`~fedrec.deploy.errors.RejectedOutput`.
"""

from __future__ import annotations

import math
from typing import Any

from fedrec.config import ExperimentConfig
from fedrec.deploy.errors import RejectedOutput
from fedrec.deploy.sealed import OVERHEAD, sealed_round
from fedrec.deploy.training import NOISE_SOURCES, PROTOCOL
from privacy.encryption import wire
from privacy.encryption.client import max_ciphertext_bytes
from privacy.encryption.signing import SIGNATURE_BYTES
from privacy.errors import EncryptionError

TRAIN_KEYS = {"protocol", "update", "spend", "noise_source", "signature"}
SPEND_KEYS = {"client", "round", "attempt", "noise_multiplier", "sample_rate", "steps"}
APPLY_KEYS = {"protocol", "round", "global_model", "digest", "num_clients", "error_bound", "dropped"}


def expected_spend(config: ExperimentConfig, rows: int) -> dict[str, Any]:
    """The DP-SGD spend a client with ``rows`` examples makes in one round under ``config``."""
    privacy = config.privacy
    assert privacy is not None and privacy.noise_multiplier is not None and config.fl is not None
    rate = (
        privacy.sample_rate
        if privacy.sample_rate is not None
        else min(1.0, config.train.batch_size / max(1, rows))
    )
    steps = config.fl.local_epochs * max(1, math.ceil(1.0 / rate))
    if config.fl.local_steps is not None:
        steps = min(steps, config.fl.local_steps)
    if config.fl.reconstruction is not None and config.fl.reconstruction.method == "steps":
        steps += config.fl.reconstruction.steps  # the DP-SGD steps that rebuild the user rows
    return {
        "noise_multiplier": float(privacy.noise_multiplier),
        "sample_rate": float(rate),
        "steps": int(steps),
    }


def validate_train_output(
    output: Any,
    *,
    client_id: int,
    round_idx: int,
    attempt: int,
    aggregator: Any,
    spend: dict[str, Any],
) -> tuple[list[bytes], dict[str, Any]]:
    """The payloads and spend of a well-formed output of this round, or RejectedOutput (nothing added).

    Checks the structure, every chunk's header (kind, parameters, schema, round, client, chunk index
    and count, ciphertext count, body length), and that the spend record is the one the config implies
    for this client. Bodies are parsed once, by the aggregator's ``add`` (SEAL framing and loading),
    which refuses a bad chunk without touching its sum.
    """
    if not isinstance(output, dict) or set(output) != TRAIN_KEYS:
        keys = sorted(output) if isinstance(output, dict) else type(output).__name__
        raise RejectedOutput(f"output {keys}: expected a dict with exactly {sorted(TRAIN_KEYS)}")
    signature = output["signature"]
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        raise RejectedOutput(f"output signature: expected {SIGNATURE_BYTES} bytes (Ed25519)")
    if output["noise_source"] not in NOISE_SOURCES:
        raise RejectedOutput(
            f"output noise_source {output['noise_source']!r}: expected one of {sorted(NOISE_SOURCES)}"
        )
    if output["protocol"] != PROTOCOL:
        raise RejectedOutput(f"output protocol {output['protocol']!r}: expected {PROTOCOL}")
    payloads = output["update"]
    layout = aggregator.spec.chunk_layout(aggregator.schema.size)
    if (
        not isinstance(payloads, list)
        or len(payloads) != len(layout)
        or not all(isinstance(p, bytes) for p in payloads)
    ):
        raise RejectedOutput(f"update: expected a list of {len(layout)} byte strings (one per chunk)")
    max_ct = max_ciphertext_bytes(aggregator.spec)
    try:
        for index, payload in enumerate(payloads):
            n_ct = layout[index][2]
            header, _ = wire.decode(payload, max_body=n_ct * (max_ct + 4))
            if header.kind != wire.KIND_UPDATE:
                raise RejectedOutput(f"chunk {index}: payload kind {header.kind}, expected an update")
            wire.check_binding(header, aggregator.spec, aggregator.schema, aggregator.round_idx)
            if header.client_id != client_id:
                raise RejectedOutput(
                    f"chunk {index}: payload of client {header.client_id}, sent by client {client_id}"
                )
            if (header.chunk_index, header.chunk_count, header.num_ciphertexts) != (index, len(layout), n_ct):
                raise RejectedOutput(
                    f"chunk {index}: header says chunk {header.chunk_index} of {header.chunk_count} with "
                    f"{header.num_ciphertexts} ciphertexts; expected chunk {index} of {len(layout)} with {n_ct}"
                )
    except EncryptionError as err:
        raise RejectedOutput(f"update: {err}") from None
    record = output["spend"]
    if not isinstance(record, dict) or set(record) != SPEND_KEYS:
        raise RejectedOutput(f"spend record: expected keys {sorted(SPEND_KEYS)}")
    wanted = {"client": client_id, "round": round_idx, "attempt": attempt, **spend}
    for key, value in wanted.items():
        got = record[key]
        same = (
            isinstance(got, float | int)
            and not isinstance(got, bool)
            and math.isclose(float(got), value, rel_tol=1e-12)
            if isinstance(value, float)
            else type(got) is int and got == value
        )
        if not same:
            raise RejectedOutput(f"spend record {key}={got!r}: expected {value!r}")
    return payloads, record


def validate_apply_output(output: Any, *, round_idx: int, size: int, num_clients: int) -> dict[str, Any]:
    """The sealed next global model and its digest, or RejectedOutput."""
    if not isinstance(output, dict) or set(output) != APPLY_KEYS or output["protocol"] != PROTOCOL:
        raise RejectedOutput(f"apply output: expected a dict with exactly {sorted(APPLY_KEYS)}")
    sealed = output["global_model"]
    if (
        not isinstance(sealed, bytes)
        or len(sealed) != OVERHEAD + 4 * size
        or sealed_round(sealed) != round_idx + 1
    ):
        raise RejectedOutput(
            f"apply output: not a sealed global model of round {round_idx + 1} with {size} values"
        )
    digest = output["digest"]
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise RejectedOutput("apply output: digest is not a sha256 hex string")
    dropped = output["dropped"]
    if not isinstance(dropped, list) or not all(
        isinstance(c, int) and not isinstance(c, bool) for c in dropped
    ):
        raise RejectedOutput("apply output: dropped must be a list of client ids")
    if output["round"] != round_idx + 1 or output["num_clients"] + len(dropped) != num_clients:
        raise RejectedOutput(
            f"apply output: round {output['round']!r} of {output['num_clients']!r} clients; expected round "
            f"{round_idx + 1} of {num_clients}"
        )
    bound = output["error_bound"]
    if not isinstance(bound, float) or not math.isfinite(bound) or bound < 0:
        raise RejectedOutput(f"apply output: error bound {bound!r} is not a finite number >= 0")
    return output
