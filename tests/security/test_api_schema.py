"""schemathesis against the real server's published schema (``/v1/openapi.json``), over loopback HTTP.

Every operation is called with generated path parameters, queries and bodies (valid and invalid for the
schema), with the project's key, without a key, with a malformed or unknown key and with a revoked key:
no answer is a 500, every status, content type and body is one the schema declares, data the schema
rejects is rejected (4xx), and without a valid key nothing under ``/v1/projects`` answers 2xx. Half of
the generated cases of the read and upload routes use the names of the seeded run, so the generator
reaches the code behind the 404s (real results, tables, filters, uploads into a real version).
"""

from __future__ import annotations

import collections

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from mldbg_callbacks.server.app import ARROW_STREAM

MAX_EXAMPLES = 12  # per operation, test and kind (valid, invalid): the three tests take about 35 s on two cores

# The checks that hold for every case. Not `positive_data_acceptance`: a name the schema allows is still
# a 404 when nothing by that name is stored.
checks = schemathesis.checks
SCHEMA_CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
                 checks.response_schema_conformance, checks.negative_data_rejection]


@schemathesis.serializer(ARROW_STREAM)
def _raw_bytes(_context, value):
    """Chunk bodies are bytes on the wire; the generator's strings are sent as their UTF-8 bytes."""
    return value if isinstance(value, bytes) else str(value).encode()


@pytest.fixture(scope="module")
def api_schema(seeded):
    return schemathesis.openapi.from_url(f"{seeded.url}/v1/openapi.json")


fuzz = settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                database=None, derandomize=True)


@schemathesis.check
def no_project_data_without_a_valid_key(_context, response, case):
    """Without a valid key, a project route answers 401/403 (or a 4xx about the request itself), never data."""
    if case.path.startswith("/v1/projects/"):
        assert response.status_code in (400, 401, 403, 404, 413, 422), (
            f"{case.method} {case.formatted_path} answered {response.status_code} without a valid key")


def fuzz_every_operation(schema, names: dict, header_sets: list[dict], extra_checks=()) -> collections.Counter:
    """Each operation of ``schema`` with MAX_EXAMPLES cases valid for the schema (half of them, where the
    path has names, with ``names`` in the path and query) and MAX_EXAMPLES invalid ones, each sent with
    one of ``header_sets`` (fixed: never generated) and checked. Fails naming every operation that failed and how; returns how
    often each (operation, status) was answered.

    (Hypothesis' ``given`` over schemathesis' strategies: its pytest plugin's lazy loader does not run on
    this pytest.)"""
    failures, answered = [], collections.Counter()
    for loaded in schema.get_all_operations():
        operation = loaded.ok()
        path_names = {k: v for k, v in names.items() if "{" + k + "}" in operation.path}
        query_names = {k: v for k, v in names.items() if k in {p.name for p in operation.query}}
        valid, invalid = [], []
        for headers in header_sets:
            valid.append(operation.as_strategy(GenerationMode.POSITIVE, headers=headers))
            if path_names and not operation.path.endswith("/evaluations"):  # (each evaluation would start a job)
                valid.append(operation.as_strategy(GenerationMode.POSITIVE, headers=headers, path_parameters=path_names,
                                                   query=query_names or None))
            invalid.append(operation.as_strategy(GenerationMode.NEGATIVE, headers=headers))
        for label, strategies in (("valid", valid), ("invalid", invalid)):
            @fuzz
            @given(case=st.one_of(strategies))
            def call_and_check(case):
                if not any(header_sets):  # the key headers the schema declares, generated: not sent
                    case.headers = {k: v for k, v in (case.headers or {}).items()
                                    if k.lower() not in ("authorization", "x-api-key")}
                response = case.call_and_validate(checks=[*SCHEMA_CHECKS, *extra_checks], timeout=30)
                answered[operation.label, response.status_code] += 1

            try:
                call_and_check()
            except Unsatisfiable:
                assert label == "invalid", operation.label  # nothing to make invalid (no parameters, no body)
            except Exception as exc:  # noqa: BLE001 - every operation's failure is reported at the end
                failures.append(f"{operation.label} ({label} data): {exc}")
        # a read of the seeded run with its names and no optional parameter: the generated cases add optional
        # filters at random, which a table without that column refuses, so they may never reach its data
        if operation.method.upper() == "GET" and path_names and set(path_names) == {
                p.name for p in operation.path_parameters}:
            required = {k: v for k, v in query_names.items() if any(p.name == k and p.is_required for p in operation.query)}
            for headers in header_sets:
                try:
                    response = operation.Case(path_parameters=path_names, query=required or None,
                                              headers=headers).call_and_validate(
                        checks=[*SCHEMA_CHECKS, *extra_checks], timeout=30)
                    answered[operation.label, response.status_code] += 1
                except Exception as exc:  # noqa: BLE001
                    failures.append(f"{operation.label} (the seeded run's names): {exc}")
    assert not failures, "\n\n".join(failures)
    return answered


def test_with_the_projects_key_every_answer_is_declared_and_none_is_a_500(api_schema, seeded):
    key = seeded.keys["alpha"]
    answered = fuzz_every_operation(api_schema, seeded.names, [{"Authorization": f"Bearer {key}", "X-API-Key": key}],
                                    extra_checks=[checks.ignored_auth])
    # the generator reached the seeded run: every read of it answered with data at least once
    reads = {op.ok().label for op in api_schema.get_all_operations()
             if op.ok().method.upper() == "GET" and "{project}" in op.ok().path and "{job_id}" not in op.ok().path}
    never_200 = {read for read in reads if answered[read, 200] == 0}
    assert reads and not never_200, (never_200, answered)


def test_without_a_key_nothing_is_served(api_schema, seeded):
    answered = fuzz_every_operation(api_schema, seeded.names, [{}], extra_checks=[no_project_data_without_a_valid_key])
    assert answered[("GET /v1/projects/{project}/models", 401)] > 0


def test_with_a_wrong_or_revoked_key_nothing_is_served(api_schema, seeded):
    wrong = ["Bearer mldbg_nope", "Bearer mldbg_0123456789ab_" + "A" * 43, "Basic dXNlcjpwYXNz",
             f"Bearer {seeded.keys['beta']}", f"Bearer {seeded.keys['revoked']}"]
    answered = fuzz_every_operation(api_schema, seeded.names, [{"Authorization": value} for value in wrong],
                                    extra_checks=[no_project_data_without_a_valid_key])
    statuses = {status for (label, status) in answered if label.startswith("GET /v1/projects")}
    assert {401, 403, 404} <= statuses  # unknown and malformed, revoked, the other project's key
