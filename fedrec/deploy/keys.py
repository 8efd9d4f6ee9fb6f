"""Key authority of a deployment: the BFV keys of encrypted FedAvg plus the model key, split by role.

Every data owner receives the same secret material (TenSEAL has no threshold decryption): the BFV
secret context (encrypt updates, decrypt aggregates) and the AES model key (open and seal the global
model, see :mod:`fedrec.deploy.sealed`). The coordinator receives only the public context: it can add
encrypted updates and nothing else. In a real deployment the key authority is one trusted owner or
a separate party that hands each owner its file out of band; ``scripts/deploy_syft.py`` in local
mode plays that part and writes each owner's file into that owner's directory.

Owner key file: JSON (never pickle) with base64 fields, written atomically with mode 0600.

Key authority command (one file per owner plus the coordinator's public context)::

    python -m fedrec.deploy.keys --owners 3 --max-weight 20000 --out keys/
    # keys/owner_000.keys.json ... (to each owner, out of band), keys/public.ctx (to the coordinator
    # and to every owner, which checks at start that its secret context and public.ctx form a pair)
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedrec.deploy.errors import DeployError
from fedrec.deploy.sealed import MODEL_KEY_BYTES, new_model_key
from privacy.encryption.signing import PUBLIC_KEY_BYTES, new_signing_key, public_key
from privacy.errors import EncryptionError

KEYS_FORMAT = "fedrec-owner-keys"
KEYS_VERSION = 2  # 2: Ed25519 signing key and the federation's registered public keys


class OwnerKeys:
    """One owner's secret material and federation identity (a plain class: no printer walks into keys)."""

    __slots__ = ("client_id", "model_key", "registered_keys", "secret_context", "signing_key")

    def __init__(
        self,
        *,
        client_id: int,
        secret_context: bytes,
        model_key: bytes,
        signing_key: bytes | None = None,
        registered_keys: Mapping[int, bytes] | None = None,
    ) -> None:
        """``signing_key``: this owner's Ed25519 key (default: a fresh one); ``registered_keys``: every
        owner's public key as the key authority registered them at join (default: this owner's only)."""

        if isinstance(client_id, bool) or not isinstance(client_id, int) or client_id < 0:
            raise DeployError(f"owner keys: client_id={client_id!r}, expected an integer >= 0")
        if not isinstance(model_key, bytes) or len(model_key) != MODEL_KEY_BYTES:
            raise DeployError(f"owner keys: model key must be {MODEL_KEY_BYTES} bytes")
        if not isinstance(secret_context, bytes) or not secret_context:
            raise DeployError("owner keys: secret context must be non-empty bytes")
        self.client_id = client_id
        self.secret_context = secret_context
        self.model_key = model_key
        try:
            self.signing_key = new_signing_key() if signing_key is None else bytes(signing_key)
            own = public_key(self.signing_key)
        except (EncryptionError, TypeError, ValueError) as err:
            raise DeployError(f"owner keys: bad signing key ({err})") from None
        registered = {int(c): bytes(k) for c, k in (registered_keys or {client_id: own}).items()}
        if registered.get(client_id) != own or any(len(k) != PUBLIC_KEY_BYTES for k in registered.values()):
            raise DeployError(
                f"owner keys: client {client_id}'s signing key is not the one registered for it"
            )
        self.registered_keys = registered

    def __repr__(self) -> str:
        return f"OwnerKeys(client_id={self.client_id})"

    def save(self, path: str) -> None:
        """Write the key file atomically, readable by its owner only (0600)."""
        data = {
            "format": KEYS_FORMAT,
            "version": KEYS_VERSION,
            "client_id": self.client_id,
            "secret_context": base64.b64encode(self.secret_context).decode("ascii"),
            "model_key": base64.b64encode(self.model_key).decode("ascii"),
            "signing_key": base64.b64encode(self.signing_key).decode("ascii"),
            "registered_keys": {
                str(c): base64.b64encode(k).decode("ascii") for c, k in sorted(self.registered_keys.items())
            },
        }
        write_private_json(path, data)

    @classmethod
    def load(cls, path: str) -> OwnerKeys:
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
            if data.get("format") != KEYS_FORMAT or data.get("version") != KEYS_VERSION:
                raise DeployError(f"{path}: not a fedrec owner key file (format {data.get('format')!r})")
            return cls(
                client_id=int(data["client_id"]),
                secret_context=base64.b64decode(data["secret_context"], validate=True),
                model_key=base64.b64decode(data["model_key"], validate=True),
                signing_key=base64.b64decode(data["signing_key"], validate=True),
                registered_keys={
                    int(c): base64.b64decode(k, validate=True) for c, k in data["registered_keys"].items()
                },
            )
        except FileNotFoundError:
            raise DeployError(f"{path}: no owner key file") from None
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise DeployError(f"{path}: unreadable owner key file ({type(err).__name__}: {err})") from None


@dataclass(frozen=True)
class FederationKeys:
    """What the key authority hands out: the public context (coordinator) and one key file per owner."""

    public_context: bytes
    owners: tuple[OwnerKeys, ...]


def generate_federation_keys(
    *,
    client_ids: list[int],
    max_clients: int,
    max_weight: int,
    scheme: str,
    clip: float,
    precision_bits: int,
) -> FederationKeys:
    """Keys for owners ``client_ids``: aggregates of at most ``max_clients`` updates of weight <= ``max_weight``.

    The planning is the simulation's key authority's (``keygen_task``): the same arguments give the
    same encryption parameters and the same quantisation.
    """
    from privacy.encryption.context import generate_keys

    if not client_ids or len(set(client_ids)) != len(client_ids):
        raise DeployError(f"client ids {client_ids}: expected at least one, all distinct")
    keys = generate_keys(
        max_clients=max_clients,
        scheme=scheme,
        max_weight=max_weight,
        clip=clip,
        precision_bits=precision_bits,
    )
    model_key = new_model_key()
    # Each owner's Ed25519 signing key, registered with every owner at join (verifiable contributors).
    signing = {int(c): new_signing_key() for c in client_ids}
    registered = {c: public_key(k) for c, k in signing.items()}
    owners = tuple(
        OwnerKeys(
            client_id=int(c),
            secret_context=keys.secret_context,
            model_key=model_key,
            signing_key=signing[int(c)],
            registered_keys=registered,
        )
        for c in client_ids
    )
    return FederationKeys(public_context=keys.public_context, owners=owners)


def check_owner_keys(keys: OwnerKeys, *, keys_path: str, public_path: str) -> None:
    """Refuse an owner's key material that cannot work, at start and before any spend.

    The secret context in ``keys_path`` must load as a secret context (not a public one, not damaged),
    and the key authority's public context at ``public_path`` (the coordinator's ``public.ctx``, which
    every owner also receives) must load as a public context and form a key pair with it: a known
    vector encrypted under the public key decrypts under the secret one
    (:func:`privacy.encryption.context.check_key_pair`). A swapped or stale ``keys.json`` is then one
    line naming both files, instead of a round that fails after the owner has recorded spends.

    Raises:
        DeployError: missing or unreadable ``public.ctx``, a context of the wrong role or parameters,
            or a secret and public context from different key generations.
    """
    from privacy.encryption.context import check_key_pair, load_context, read_context_file

    try:
        secret = load_context(keys.secret_context, role="secret")
    except EncryptionError as err:
        raise DeployError(f"{keys_path}: field 'secret_context': {err}") from None
    try:
        public = read_context_file(public_path, role="public")
    except EncryptionError as err:
        raise DeployError(str(err)) from None
    try:
        check_key_pair(secret, public)
    except EncryptionError as err:
        raise DeployError(f"{keys_path} and {public_path}: {err}") from None


def write_private_json(path: str, data: Any) -> None:
    """JSON written to a temporary name with mode 0600, fsynced, renamed into place."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_private_bytes(path: str, data: bytes, *, mode: int = 0o600) -> None:
    """Bytes written atomically with ``mode``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedrec.deploy.keys", description="Key authority of a deployment."
    )
    parser.add_argument("--owners", type=int, required=True, help="number of data owners (client ids 0..N-1)")
    parser.add_argument(
        "--max-weight", type=int, required=True, help="largest owner row count (the update weight)"
    )
    parser.add_argument(
        "--max-clients", type=int, default=None, help="most updates per aggregate (default: owners)"
    )
    parser.add_argument("--scheme", default="bfv", choices=("bfv", "ckks"))
    parser.add_argument("--clip", type=float, default=1.0, help="fl.encryption.clip of the runs")
    parser.add_argument(
        "--precision-bits", type=int, default=16, help="fl.encryption.precision_bits of the runs"
    )
    parser.add_argument(
        "--out",
        required=True,
        help="directory for owner_NNN.keys.json and public.ctx (public.ctx goes to the coordinator and every owner)",
    )
    args = parser.parse_args(argv)
    keys = generate_federation_keys(
        client_ids=list(range(args.owners)),
        max_clients=args.max_clients or args.owners,
        max_weight=args.max_weight,
        scheme=args.scheme,
        clip=args.clip,
        precision_bits=args.precision_bits,
    )
    for owner in keys.owners:
        owner.save(os.path.join(args.out, f"owner_{owner.client_id:03d}.keys.json"))
    write_private_bytes(os.path.join(args.out, "public.ctx"), keys.public_context, mode=0o644)
    print(f"{len(keys.owners)} owner key files and public.ctx written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from fedrec.cli import run_main

    run_main(main, sys.argv[1:])
