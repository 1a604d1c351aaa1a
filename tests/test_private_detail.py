"""Operator-only error text (an instance's log tail) is data on the error, not a cut in
its message: endpoint clients never get it, the operator API and the events do."""
from __future__ import annotations

import json
import secrets as pysecrets

from conftest import deployment_yaml
from controller import contracts, errors
from controller.contracts import Status
from controller.errors import AutoDeployError


def test_private_detail_travels_over_ipc_as_its_own_key_and_stays_out_of_the_public_message():
    exc = AutoDeployError(errors.INSTANCE_START_FAILED, "instance ab exited with code 3", 2.0,
                          private_detail="last log lines:\nKEY=sk-abc")
    wire = json.loads(contracts.encode_error(exc))
    assert wire["error"] == {"code": 1003, "msg": "instance failed to start: instance ab exited with code 3",
                             "private_detail": "last log lines:\nKEY=sk-abc"}
    try:
        contracts.decode(contracts.encode_error(exc), Status)
    except AutoDeployError as back:
        assert (back.error, back.detail, back.private_detail, back.retry_after) == \
            (exc.error, exc.detail, exc.private_detail, 2.0)
        assert "sk-abc" not in back.message and "sk-abc" in back.operator_message
        assert "sk-abc" not in json.dumps(back.to_json())  # the default wire form is the public one
    else:
        raise AssertionError("decode of an error reply must raise it")
    assert not hasattr(errors, "PRIVATE_DETAIL_MARKERS")


def test_a_crash_at_start_shows_its_secret_looking_log_line_to_operators_only(serve):
    secret = "sk-live-" + pysecrets.token_hex(10)
    s = serve({"leaky.yaml": deployment_yaml("leaky", f"echo API_SECRET={secret}; exit 4", health=None)})
    first = s.get("/d/leaky/")
    assert (first.status_code, first.json()["code"]) == (502, 1003), first.text
    assert "exited with code 4" in first.json()["msg"] and "autodeploy logs leaky" in first.json()["msg"]
    again = s.get("/d/leaky/")  # answered from the backoff with the deployment's last failure
    assert again.json()["code"] == 1003
    for resp in (first, again):
        assert secret not in resp.text and set(resp.json()) == {"code", "msg"}
    status = s.status("leaky")
    assert secret in status["last_error"]
    assert any(secret in e["message"] for e in status["events"] if e["kind"] == "failed")
    anonymous = s.get("/api/deployments/leaky", auth=False)
    assert anonymous.status_code == 401 and secret not in anonymous.text


class FakeFailingControl:
    """The gateway's control plane (the static one, real) whose deployment `x` fails to
    start with a log tail, as the controller's IPC would answer."""

    def __init__(self, token: str) -> None:
        from controller.auth import digest
        from gateway.static import StaticControlPlane
        self.real = StaticControlPlane({"version": 1, "deployments": {
            "x": {"state": "running", "instances": [{"id": "x-0", "address": "127.0.0.1:9"}]}}},
            tokens=f"ops:admin:{digest(token)}")

    def request(self, msg):
        from controller.contracts import Acquire
        if isinstance(msg, (Acquire, Status)) and getattr(msg, "name", "x") in ("x", None) \
                and getattr(msg, "deployment", "x") == "x":
            raise AutoDeployError(errors.INSTANCE_START_FAILED, "instance x-1 exited with code 4",
                                  private_detail="last log lines:\nAPI_SECRET=sk-inproc")
        return self.real.request(msg)

    def close(self) -> None:
        self.real.close()


def test_the_api_gives_the_private_detail_to_a_principal_and_the_endpoint_never(tmp_path):
    from gateway.app import create_app
    token = "adt_private-detail-test-token"
    app = create_app(counters_path=str(tmp_path / "counters"), control=FakeFailingControl(token))
    client = app.test_client()
    api = client.get("/api/deployments/x", headers={"Authorization": f"Bearer {token}"})
    assert (api.status_code, api.json["code"]) == (502, 1003)
    assert api.json["private_detail"] == "last log lines:\nAPI_SECRET=sk-inproc"
    assert "sk-inproc" not in api.json["msg"]
    assert b"sk-inproc" not in client.get("/api/deployments/x").data  # no principal: 401 only
    endpoint = client.get("/d/x/")
    assert (endpoint.status_code, endpoint.json["code"]) == (502, 1003)
    assert b"sk-inproc" not in endpoint.data and set(endpoint.json) == {"code", "msg"}
