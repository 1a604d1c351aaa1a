"""Which peers' X-Forwarded-For the gateway believes: the stack key
autodeploy:trustedProxies and `serve --trusted-proxy`, both checked up front."""
from __future__ import annotations

from pathlib import Path

import pytest

from controller.errors import AutoDeployError
from controller.serve import _networks
from controller.stack import load_stack


def stack_with(tmp_path: Path, value: str) -> Path:
    (tmp_path / "stacks").mkdir()
    (tmp_path / "stacks" / "Pulumi.dev.yaml").write_text(f"config:\n  autodeploy:trustedProxies: {value}\n")
    return tmp_path


def test_no_proxy_is_trusted_by_default():
    assert load_stack(Path(__file__).resolve().parent.parent, "dev").trusted_proxies == []


def test_stack_key_takes_a_list_or_the_text_pulumi_config_set_stores(tmp_path: Path):
    assert load_stack(stack_with(tmp_path, "[10.0.0.0/8, 192.168.1.7]"), "dev").trusted_proxies == \
        ["10.0.0.0/8", "192.168.1.7/32"]


def test_stack_key_as_comma_separated_text(tmp_path: Path):
    assert load_stack(stack_with(tmp_path, "'10.1.2.3/16, ::1'"), "dev").trusted_proxies == \
        ["10.1.0.0/16", "::1/128"]


def test_a_bad_stack_entry_is_named(tmp_path: Path):
    with pytest.raises(AutoDeployError) as info:
        load_stack(stack_with(tmp_path, "[10.0.0.0/8, nonsense]"), "dev")
    assert "trustedProxies" in info.value.detail and "'nonsense' is not an IP address or CIDR" in info.value.detail


def test_serve_option_is_normalised_and_a_bad_one_stops_serve():
    assert _networks(("127.0.0.1", "10.0.0.0/8")) == ("127.0.0.1/32", "10.0.0.0/8")
    with pytest.raises(SystemExit, match="--trusted-proxy 10.0.0.0/8"):
        _networks(("10.0.0.300",))
