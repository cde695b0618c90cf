"""`mldbg ui` serves a store without keys, so it binds loopback only; exposing it takes ``--expose`` and
then every request needs its key. Real `mldbg ui` processes; the exposed one binds 0.0.0.0 and is only
ever talked to through 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import psutil
import pytest
import requests
from server_utils import MODEL, digits_arrays, digits_tracer, running_server, train_digits

UI_KEY = "u" * 20 + "I-key_of_the_exposed_ui"  # 43 characters, as a generated one


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui") / "store"
    tracer = digits_tracer(root)
    train_digits(tracer, digits_arrays(100), epochs=1)
    tracer.wait_for_save()
    return root


def listening_addresses(pid: int) -> set[str]:
    return {c.laddr.ip for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}


def ui_command(store, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MLD_")}
    return subprocess.run([sys.executable, "-m", "mldbg_callbacks.cli", "--store", str(store), "ui", *args],
                          capture_output=True, text=True, timeout=60, env={**environment, **(env or {})})


def test_by_default_the_ui_listens_on_loopback_only_and_needs_no_key(store):
    with running_server(store, command="ui") as ui:
        assert listening_addresses(ui.process.pid) == {"127.0.0.1"}
        assert requests.get(f"{ui.url}/v1/whoami", timeout=30).json()["auth"] is False
        models = requests.get(f"{ui.url}/v1/projects/local/models", timeout=30).json()
        assert models == [{"model_name": MODEL, "versions": ["v1"]}]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "192.0.2.7"])
def test_a_non_loopback_host_without_expose_is_refused_before_binding(store, host):
    refused = ui_command(store, "--host", host, "--port", "9")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    message = " ".join(refused.stdout.split())
    assert "--expose" in message and "mldbg serve" in message, message


def test_expose_refuses_a_short_key(store):
    refused = ui_command(store, "--host", "0.0.0.0", "--expose", "--port", "9", env={"MLD_UI_KEY": "short"})
    assert refused.returncode == 2 and "at least 32" in " ".join(refused.stdout.split())


def test_an_exposed_ui_answers_only_with_its_key(store):
    with running_server(store, command="ui", extra=("--host", "0.0.0.0", "--expose"),
                        env={"MLD_UI_KEY": UI_KEY}) as ui:
        assert listening_addresses(ui.process.pid) == {"0.0.0.0"}
        models = f"{ui.url}/v1/projects/local/models"
        good = {"Authorization": f"Bearer {UI_KEY}"}
        assert requests.get(f"{ui.url}/v1/health", timeout=30).ok  # liveness stays open
        assert requests.get(f"{ui.url}/", timeout=30).ok  # the UI's code (no data): it asks for the key
        for headers in ({}, {"Authorization": f"Bearer {UI_KEY[:-1]}x"}, {"Authorization": "Bearer mldbg_x"},
                        {"X-API-Key": UI_KEY.upper()}):
            answer = requests.get(models, headers=headers, timeout=30)
            assert answer.status_code == 401 and MODEL not in answer.text, (headers, answer.status_code)
            assert requests.get(f"{ui.url}/v1/whoami", headers=headers, timeout=30).status_code == 401
            assert "mldbg ui --expose" in answer.json()["detail"]  # the message names where the key comes from
        assert requests.get(models, headers=good, timeout=30).json() == [{"model_name": MODEL, "versions": ["v1"]}]
        assert requests.get(models, headers={"X-API-Key": UI_KEY}, timeout=30).ok
        assert requests.get(f"{ui.url}/v1/whoami", headers=good, timeout=30).json()["auth"] is True
        assert requests.get(f"{ui.url}/v1/projects/other/models", headers=good, timeout=30).status_code == 404


def test_expose_without_a_key_generates_one_and_prints_it_once(store):
    with running_server(store, command="ui", extra=("--expose",)) as ui:
        printed = [ui.process.stdout.readline().strip() for _ in range(2)]  # printed before serving: no wait
        assert "shown once" in printed[0], printed
        key = printed[1]
        assert re.fullmatch(r"[A-Za-z0-9_\-]{43}", key), printed
        models = f"{ui.url}/v1/projects/local/models"
        assert requests.get(models, timeout=30).status_code == 401
        assert requests.get(models, headers={"Authorization": f"Bearer {key}"}, timeout=30).ok
