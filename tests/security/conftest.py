"""The security suite: a real `mldbg serve` on loopback holding two projects, each with a run and a result.

Every test here talks to the server over HTTP on 127.0.0.1 only. ``seeded`` is module-scoped: the
probes that upload (or try to) leave it as they found it or only add to their own project.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import pytest
from server_utils import MODEL, VERSION, ServerProcess, digits_arrays, digits_tracer, running_server, train_digits

from mldbg_callbacks.evaluator import Evaluator

RESULT = "r1"


@dataclass
class SeededServer:
    """A running server, its projects ``alpha`` and ``beta`` (MODEL/VERSION traced, result RESULT) and keys:
    ``alpha``, ``beta`` (one per project) and ``revoked`` (was alpha's)."""

    process: ServerProcess
    keys: dict[str, str]
    # the seeded result's names, as path and query parameters
    names = {"project": "alpha", "model": MODEL, "version": VERSION, "result": RESULT,
             "other_model": MODEL, "other_version": VERSION, "other_result": RESULT,
             "dataset_type": "train", "n_epoch": 1, "table": "samples"}

    @property
    def url(self) -> str:
        return self.process.url

    def headers(self, who: str | None) -> dict[str, str]:
        """Authorization headers with the named key (None: no header)."""
        return {"Authorization": f"Bearer {self.keys[who]}"} if who else {}


@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> SeededServer:
    root = tmp_path_factory.mktemp("secure") / "server"
    tracer = digits_tracer(root / "alpha")
    train_digits(tracer, digits_arrays(200), epochs=2)
    tracer.wait_for_save()
    Evaluator(MODEL, VERSION, store=root / "alpha").request_evaluation(result_name=RESULT)
    shutil.copytree(root / "alpha", root / "beta")  # the same run in a second project
    with running_server(root) as process:
        keys = {project: process.create_key(project) for project in ("alpha", "beta")}
        keys["revoked"] = process.create_key("alpha")
        db = process.database()
        try:
            assert db.revoke_key(keys["revoked"].split("_")[1])
        finally:
            db.dispose()
        yield SeededServer(process, keys)
