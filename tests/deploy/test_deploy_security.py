"""Security properties of the datasites, checked against the real PySyft 0.9 servers of the session:
loopback-only listening sockets, credentials, guest sign-up, unapproved and changed code, and a
datasite whose output is not a well-formed encrypted update."""

from __future__ import annotations

import ipaddress
import json
import os
import time

import numpy as np
import pytest
import requests
from deploy_helpers import ANALYST_EMAIL, ANALYST_PASSWORD, build, deploy_data

pytestmark = pytest.mark.slow


def _login(spec_url: str, email: str, password: str):
    import syft as sy

    from fedrec.deploy.datasite import split_url as _split_url

    host, port = _split_url(spec_url)
    return sy.login(url=host, port=port, email=email, password=password, cache=False)


def _decisions(federation, client_id: int) -> list[dict]:
    path = os.path.join(federation.owner_dir(client_id), "decisions.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _wait_for_decision(
    federation,
    client_id: int,
    function: str,
    sha256: str,
    *,
    decision: str | None = None,
    timeout: float = 60.0,
) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in reversed(_decisions(federation, client_id)):
            if (
                entry["function"] == function
                and entry["sha256"] == sha256
                and decision in (None, entry["decision"])
            ):
                return entry
        time.sleep(0.3)
    raise AssertionError(f"owner {client_id} did not decide on {function} within {timeout}s")


def test_datasites_listen_on_loopback_only(federation):
    """Every listening socket of every owner process and its datasite is on 127.0.0.1."""
    import psutil

    for owner, spec in zip(federation.local.owners, federation.specs):
        process = psutil.Process(owner.process.pid)
        listening = []
        for proc in [process, *process.children(recursive=True)]:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    listening.append(conn.laddr)
        assert listening, f"owner {owner.client_id} has no listening socket"
        assert all(ipaddress.ip_address(addr.ip).is_loopback for addr in listening), listening
        assert int(spec.url.rsplit(":", 1)[1]) in {addr.port for addr in listening}
    # /proc/net/tcp agrees: the datasite ports are bound to 127.0.0.1 (0100007F), never 0.0.0.0.
    ports = {int(spec.url.rsplit(":", 1)[1]) for spec in federation.specs}
    with open("/proc/net/tcp", encoding="ascii") as fh:
        rows = [line.split() for line in fh.readlines()[1:]]
    bound = {int(r[1].split(":")[1], 16): r[1].split(":")[0] for r in rows if r[3] == "0A"}
    assert {port: bound.get(port) for port in ports} == {port: "0100007F" for port in ports}


def test_wrong_credentials_and_the_default_password_are_refused(federation):
    from fedrec.deploy.owner import ADMIN_EMAIL, SYFT_DEFAULT_PASSWORD

    spec = federation.specs[0]
    refused = [
        (spec.email, spec.password + "x"),
        ("nobody@fedrec.org", spec.password),
        (ADMIN_EMAIL, SYFT_DEFAULT_PASSWORD),  # PySyft's default admin password never worked here
    ]
    for email, password in refused:
        with pytest.raises(Exception, match=r"(?i)invalid credentials|not found"):
            _login(spec.url, email, password)
    admin = federation.admin(0)
    assert len(admin["password"]) >= 32 and admin["password"] != SYFT_DEFAULT_PASSWORD
    assert oct(os.stat(os.path.join(federation.owner_dir(0), "admin.json")).st_mode & 0o777) == "0o600"
    assert _login(spec.url, admin["email"], admin["password"]) is not None  # the owner's own login works


def test_guest_sign_up_is_off(federation):
    import syft as sy

    from fedrec.deploy.datasite import split_url as _split_url

    host, port = _split_url(federation.specs[1].url)
    with pytest.raises(Exception, match=r"(?i)permission|not allowed|disabled|allow guest sessions"):
        guest = sy.login_as_guest(url=host, port=port)
        result = guest.register(
            name="x", email="walkin@fedrec.org", password="walk-in-pw", password_verify="walk-in-pw"
        )
        if type(result).__name__ == "SyftError":
            raise RuntimeError(str(result))


def _guest_call(host: str, port: int, path: str, *, kwargs: dict | None = None, claim=None, sign=True):
    """One ``/api_call`` from a fresh anonymous guest key, posted without fetching the service listing:
    ``claim`` puts another verify key in the call (the signature stays the guest's)."""
    import syft as sy
    from syft.client.api import SignedSyftAPICall, SyftAPICall, debox_signed_syftapicall_response

    guest = sy.login_as_guest(url=host, port=port, verbose=False)
    call = SyftAPICall(server_uid=guest.id, path=path, args=[], kwargs=kwargs or {}, blocking=True)
    signed = call.sign(guest.credentials)
    if claim is not None:
        signed = SignedSyftAPICall(
            credentials=claim, signature=signed.signature, serialized_message=signed.serialized_message
        )
    try:
        if sign:
            answer = guest.connection.make_call(signed)
        else:  # an unsigned call: no credentials at all
            response = requests.post(
                guest.connection.api_url, data=sy.serialize(call, to_bytes=True), timeout=30
            )
            if response.status_code != 200:
                return f"refused: HTTP {response.status_code}"
            answer = sy.deserialize(response.content, from_bytes=True)
    except requests.ConnectionError as err:  # PySyft's client: a non-200 answer
        return f"refused: {err}"
    return debox_signed_syftapicall_response(answer).unwrap()


def test_guest_sessions_are_off(federation):
    """Anonymous guests (issue 14, item 9) are refused every read of a real datasite: the listing of
    services, the dataset list, the dataset by name (row count and schema in its summary), the mock,
    and raw signed calls that skip the listing (dataset list and search, the queue and metadata
    paths, a call claiming the server's public verify key with the guest's signature, an unsigned
    call). The owner's and the analyst's logins still work. Without fedrec.deploy.guests (PySyft 0.9.5
    alone, allow_guest_sessions=False set) every read below is answered."""
    import syft as sy
    from syft.server.credentials import SyftVerifyKey

    from fedrec.deploy.datasite import split_url as _split_url
    from fedrec.deploy.guests import GUEST_REFUSAL
    from fedrec.deploy.owner import DATASET_NAME

    host, port = _split_url(federation.specs[1].url)

    def as_guest(read):
        guest = sy.login_as_guest(url=host, port=port, verbose=False)
        return read(guest)

    for label, read in {
        "service listing": lambda g: g.api,
        "list datasets": lambda g: g.datasets.get_all(),
        "dataset by name": lambda g: g.datasets[DATASET_NAME],
        "mock": lambda g: g.datasets[DATASET_NAME].assets[0].mock,
    }.items():
        with pytest.raises(Exception, match=r"code 403|guest sessions are refused") as refused:
            as_guest(read)
        assert refused.value is not None, label

    server_key = sy.login_as_guest(url=host, port=port, verbose=False).metadata.verify_key
    if not isinstance(server_key, SyftVerifyKey):
        server_key = SyftVerifyKey.from_string(str(server_key))
    for path, kwargs, claim in [
        ("dataset.get_all", {}, None),
        ("dataset.search", {"name": DATASET_NAME}, None),
        ("metadata", {}, None),
        ("queue", {"uid": sy.UID()}, None),
        ("dataset.get_all", {}, server_key),  # the root admin's key, public in /metadata
    ]:
        result = _guest_call(host, port, path, kwargs=kwargs, claim=claim)
        if claim is None:
            assert type(result).__name__ == "SyftError" and GUEST_REFUSAL in str(result), (path, result)
        else:  # past the guest check (an account's key), PySyft's signature check refuses it
            assert str(result).startswith("refused: ") and "code 500" in str(result), (path, result)
    result = _guest_call(host, port, "dataset.get_all", sign=False)
    assert type(result).__name__ == "SyftError" and GUEST_REFUSAL in str(result), result

    # Accounts are not guests: the owner's admin and the analyst still read what they may.
    analyst = _login(federation.specs[1].url, ANALYST_EMAIL, ANALYST_PASSWORD)
    assert json.loads(analyst.datasets[DATASET_NAME].summary)["rows"] > 0
    admin = federation.admin(1)
    assert len(_login(federation.specs[1].url, admin["email"], admin["password"]).datasets.get_all()) == 1


def test_unapproved_code_cannot_read_private_data(federation):
    """A data scientist sees the mock, never the rows; code that returns the rows is denied and cannot run."""
    import deploy_tampered
    import syft as sy

    from fedrec.deploy.functions import function_digest
    from fedrec.deploy.owner import DATASET_NAME, TRAIN_ASSET, read_owner_data

    rows, _ = read_owner_data(federation.owner_dir(1))
    analyst = _login(federation.specs[1].url, ANALYST_EMAIL, ANALYST_PASSWORD)
    asset = analyst.datasets[DATASET_NAME].assets[TRAIN_ASSET]
    assert asset.data is None or type(asset.data).__name__ == "SyftError"  # "no access to the private data"
    mock = asset.mock
    assert set(mock) == set(rows) and all(mock[k].shape == rows[k].shape for k in rows)
    assert not np.array_equal(mock["dense"], rows["dense"])
    leak = sy.syft_function(input_policy=sy.MixedInputPolicy(data=asset, client=analyst))(
        deploy_tampered.leak_rows
    )
    analyst.code.request_code_execution(leak)
    with pytest.raises(Exception, match=r"(?i)approv|denied|pending"):  # pending or denied: it does not run
        analyst.code.leak_rows(data=asset)
    decision = _wait_for_decision(federation, 1, "leak_rows", function_digest(deploy_tampered.leak_rows))
    assert decision["decision"] == "denied" and "not pinned" in decision["reason"]
    with pytest.raises(Exception, match=r"(?i)denied|reject|approv"):
        analyst.code.leak_rows(data=asset)


def test_changed_function_needs_a_new_approval(federation):
    """The approved function's name with other source: a new digest, denied (the test of malformed
    output below then has owner 1 pin it: the new approval it needs)."""
    import deploy_tampered

    from fedrec.deploy.datasite import DatasiteClient
    from fedrec.deploy.functions import TRAIN_FUNCTION, approved_digests, function_digest
    from fedrec.deploy.local import DatasiteSpec

    changed = function_digest(deploy_tampered.fedrec_train_round)
    assert changed != approved_digests()[TRAIN_FUNCTION]
    spec = DatasiteSpec(
        client_id=1, url=federation.specs[1].url, email=ANALYST_EMAIL, password=ANALYST_PASSWORD
    )
    client = DatasiteClient(
        spec, max_executions=5, functions={TRAIN_FUNCTION: deploy_tampered.fedrec_train_round}
    )
    client.connect()
    client.submit()
    decision = _wait_for_decision(federation, 1, TRAIN_FUNCTION, changed)
    assert decision["decision"] == "denied" and "not pinned" in decision["reason"]
    assert client.approval() == {TRAIN_FUNCTION: "denied"}
    with pytest.raises(Exception, match="not approved"):
        client.call(TRAIN_FUNCTION, {})


def test_malformed_output_is_rejected_before_aggregation(federation, tmp_path):
    """Datasite 1 runs code its owner approved that impersonates client 0 in its payload headers: the
    coordinator rejects that output before it touches the sum; the round completes with the others."""
    import deploy_tampered

    from fedrec.deploy.coordinator import Coordinator
    from fedrec.deploy.functions import TRAIN_FUNCTION, function_digest

    changed = function_digest(deploy_tampered.fedrec_train_round)
    policy_path = os.path.join(federation.owner_dir(1), "policy.yml")
    with open(policy_path, encoding="utf-8") as fh:
        policy = fh.read()
    # Owner 1 approves the changed code by pinning its digest (the approval this new hash needs); its
    # daemon reconsiders the request it denied before (test_changed_function_needs_a_new_approval).
    time.sleep(1.1)  # a new modification time for the owner's daemon
    with open(policy_path + ".tmp", "w", encoding="utf-8") as fh:
        fh.write(
            policy.replace("approve:\n", f"approve:\n  - {{name: {TRAIN_FUNCTION}, sha256: {changed}}}\n", 1)
        )
    os.replace(policy_path + ".tmp", policy_path)
    try:
        _wait_for_decision(federation, 1, TRAIN_FUNCTION, changed, decision="approved")
        data = deploy_data(federation.cache, **{"fl.rounds": 1})
        coordinator = Coordinator(
            build(data), str(tmp_path), federation.analyst_specs(), public_context=federation.public_context
        )
        coordinator.datasites[1].functions[TRAIN_FUNCTION] = deploy_tampered.fedrec_train_round
        final = coordinator.run()
    finally:
        with open(policy_path, "w", encoding="utf-8") as fh:
            fh.write(policy)  # owner 1 withdraws the pin (the approval already given stands)
    assert final["rounds_completed"] == 1
    (record,) = json.loads((tmp_path / "summary.json").read_text())["rounds"]
    assert record["completed"] == 2 and record["aggregate_clients"] == 2
    (failure,) = record["failures"]
    assert failure["client"] == 1 and failure["reason"] == "rejected"
    assert "payload of client 0, sent by client 1" in failure["message"]
    from privacy.ledger import PrivacyLedger

    with PrivacyLedger.read(os.path.join(tmp_path, "privacy_ledger.sqlite")) as ledger:
        assert {s.client for s in ledger.client_spends()} == {
            "0",
            "2",
        }  # the rejected output was never counted
