"""Attack probes against a real `mldbg serve` on loopback: what an attacker with a key of one project,
or none, can try through the API, and what the server must answer.

- path traversal through every name field of every operation (path, query and body), as raw bytes on
  the wire (no client normalises the path): 4xx, no file anywhere but where it was;
- a key of project beta on every resource of project alpha, and on alpha's job ids through its own
  project: the 404 of a project that does not exist, never data, nothing written;
- bodies over the limit on every route that takes one (declared, streamed, lying), a header bomb;
- decompression bombs and absurd list lengths in uploads: 413 before the memory is taken (the server's
  peak RSS is measured), malformed Arrow (hypothesis mutates a valid chunk): never a 5xx;
- markup in the ids a trace holds is escaped in the HTML report the server serves.

(`tests/test_server.py` keeps the upload protocol's own refusals: corrupt bodies, wrong ids, strict JSON.)
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import re
import time

import numpy as np
import pyarrow as pa
import pytest
import requests
from hypothesis import HealthCheck, given, settings, strategies as st
from server_utils import MODEL, VERSION, digits_arrays, digits_tracer, running_server, train_digits

from mldbg_callbacks.evaluator import Evaluator
from mldbg_callbacks.server.app import ARROW_STREAM
from mldbg_callbacks.store.names import NAME_PATTERN
from mldbg_callbacks.store.remote import encode_chunk


def send(port: int, method: str, target: str, headers: dict | None = None, body: bytes | None = None,
         timeout: float = 60) -> tuple[int, str]:
    """One request with ``target`` sent exactly as given (http.client: no dot-segment removal, no quoting)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, target, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        connection.close()


def chunk(rows: int = 5) -> bytes:
    return encode_chunk(pa.table({"input_id": [f"i{k}" for k in range(rows)], "label": list(range(rows))}))


def files_under(root) -> dict[str, int]:
    """Every file under ``root`` and its size (what a probe must leave as it was)."""
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def unchanged_but_the_database(before: dict[str, int], after: dict[str, int]) -> bool:
    changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    return all(".mldbg-server.db" in p for p in changed)


# -- every operation, with the seeded names, and where each name field is --------------------------
def operations(url: str) -> list[dict]:
    """Each operation of the published schema: method, path template, the names of its fields that
    are store names (path, query, body) and a valid request for the seeded run of project alpha."""
    schema = requests.get(f"{url}/v1/openapi.json", timeout=30).json()
    found = []
    for path, methods in schema["paths"].items():
        for method, spec in methods.items():
            fields = {"path": [], "query": [], "body": []}
            for parameter in spec.get("parameters", []):
                if parameter["schema"].get("pattern") == NAME_PATTERN:
                    fields[parameter["in"]].append(parameter["name"])
            body_ref = (spec.get("requestBody", {}).get("content", {}).get("application/json", {})
                        .get("schema", {}).get("$ref", ""))
            if body_ref:
                properties = schema["components"]["schemas"][body_ref.rsplit("/", 1)[1]]["properties"]
                fields["body"] = [name for name, prop in properties.items() if prop.get("pattern") == NAME_PATTERN]
            found.append({"method": method.upper(), "path": path, "fields": fields,
                          "required_query": [p["name"] for p in spec.get("parameters", [])
                                             if p["in"] == "query" and p.get("required")]})
    return found


SEEDED = {"project": "alpha", "model": MODEL, "version": VERSION, "result": "r1", "dataset_type": "train",
          "n_epoch": "0", "rank": "0", "table": "samples", "job_id": "0" * 32,
          "other_model": MODEL, "other_version": VERSION, "other_result": "r1"}


def request_for(operation: dict, path_values: dict, query_values: dict, body_values: dict) -> tuple[str, bytes | None, dict]:
    """Target, body and content headers of a request to ``operation`` with the given values (raw: already
    as they go on the wire) over the seeded ones."""
    body, headers = None, {}
    values = {**SEEDED, **path_values}
    if "{chunk_id}" in operation["path"]:
        body = chunk()
        values["chunk_id"] = hashlib.sha256(body).hexdigest()
        headers["Content-Type"] = ARROW_STREAM
    target = re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], operation["path"])
    query = {name: SEEDED[name] for name in operation["required_query"]}
    query.update(query_values)
    if query:
        target += "?" + "&".join(f"{k}={v}" for k, v in query.items())
    if operation["path"].endswith("/meta"):
        body = json.dumps({"task": "classification", "num_classes": 10}).encode()
    elif operation["path"].endswith("/commit"):
        body = json.dumps({"parts": ["f" * 64]}).encode()
    elif operation["path"].endswith("/evaluations"):
        body = json.dumps({"result_name": "probe", **body_values}).encode()
    if body is not None and "Content-Type" not in headers:
        headers["Content-Type"] = "application/json"
    return target, body, headers


# Raw path segments: dot segments, encoded separators and dots (single and double), NUL, newline,
# Unicode look-alikes of '.' and '/', a leading dot. Each is a name the store must refuse.
TRAVERSALS = ["..", ".", "...", "a..b", "%2e%2e", "%2E%2e", ".%2e", "..%2F..%2Fetc", "a%2Fb", "a%5C..%5Cb",
              "%5C..", "%00", "a%00b", "a%0Ab", ".hidden", "%2ehidden", "%252e%252e", "..%c0%af", "%e2%80%a5",
              "%ef%bc%8f..", "%20", "~root", "-rf", "a" * 129]
# The same ideas as JSON strings (a body's names arrive decoded)
BODY_TRAVERSALS = ["..", ".", "../x", "a/b", "a\\b", "a\x00b", ".hidden", "a..b", "\u2025", "\uff0f", "a" * 129, ""]


def test_every_name_field_of_every_operation_refuses_traversal(seeded):
    """4xx for every traversal in every name field; no file changes anywhere under the server's parent
    directory (the store's siblings included) but the database's."""
    ops = operations(seeded.url)
    named = [op for op in ops if any(op["fields"].values())]
    assert {"project", "model", "version", "dataset_type", "result"} <= {
        name for op in named for name in op["fields"]["path"]}
    assert {"other_model", "other_version", "other_result"} <= {name for op in named for name in op["fields"]["query"]}
    assert "result_name" in {name for op in named for name in op["fields"]["body"]}
    parent = seeded.process.store.parent
    before = files_under(parent)
    headers = seeded.headers("alpha")
    probes = 0
    for op in named:
        for location in ("path", "query"):
            for field in op["fields"][location]:
                for raw in TRAVERSALS:
                    target, body, content = request_for(op, {field: raw} if location == "path" else {},
                                                        {field: raw} if location == "query" else {}, {})
                    status, text = send(seeded.process.port, op["method"], target, {**headers, **content}, body)
                    assert status in (400, 404, 422), (op["method"], target, status, text)
                    assert str(seeded.process.store) not in text  # the server's paths are not the client's business
                    probes += 1
        for field in op["fields"]["body"]:
            for value in BODY_TRAVERSALS:
                target, body, content = request_for(op, {}, {}, {field: value})
                status, text = send(seeded.process.port, op["method"], target, {**headers, **content}, body)
                assert status in (400, 422), (op["method"], target, value, status, text)
                probes += 1
    assert probes > 300
    assert unchanged_but_the_database(before, files_under(parent))


def test_a_key_of_project_beta_opens_nothing_of_project_alpha(seeded):
    """Every operation on alpha's seeded run with beta's key: the answer a project that does not exist
    gets, word for word; alpha's files unchanged. Alpha's job, asked for through beta's own path: 404."""
    alpha_files = files_under(seeded.process.store / "alpha")
    beta = seeded.headers("beta")
    for op in operations(seeded.url):
        if "{project}" not in op["path"]:
            continue
        target, body, content = request_for(op, {}, {}, {})
        status, text = send(seeded.process.port, op["method"], target, {**beta, **content}, body)
        missing_target, missing_body, _ = request_for(op, {"project": "gamma"}, {}, {})
        missing_status, missing_text = send(seeded.process.port, op["method"], missing_target, {**beta, **content},
                                            missing_body)
        assert status == missing_status == 404, (op["method"], target, status, text)
        assert text == missing_text.replace("gamma", "alpha"), (text, missing_text)
    assert files_under(seeded.process.store / "alpha") == alpha_files

    db = seeded.process.database()
    try:
        alpha_job = db.create_job("alpha", MODEL, VERSION, {"result_name": "secret"})
    finally:
        db.dispose()
    own = requests.get(f"{seeded.url}/v1/projects/alpha/jobs/{alpha_job}", headers=seeded.headers("alpha"), timeout=30)
    assert own.status_code == 200 and own.json()["model_name"] == MODEL
    through_beta = requests.get(f"{seeded.url}/v1/projects/beta/jobs/{alpha_job}", headers=beta, timeout=30)
    assert through_beta.status_code == 404 and MODEL not in through_beta.text


# -- bodies and headers over the limits -----------------------------------------------------------
def test_oversized_bodies_and_headers_on_every_route_that_reads_a_body(seeded):
    """1 MB JSON limit (the upload limit for chunks): 413 by Content-Length, while streaming without one,
    a Content-Length that is not a number: 4xx; a 64 KB header: 4xx. The server answers afterwards."""
    headers = {**seeded.headers("alpha"), "Content-Type": "application/json"}
    json_routes = [op for op in operations(seeded.url) if op["method"] in ("PUT", "POST") and "{chunk_id}" not in op["path"]]
    assert len(json_routes) == 3  # meta, commit, evaluations
    big = b'{"task": "' + b"x" * (2 << 20) + b'"}'
    for op in json_routes:
        target, _, _ = request_for(op, {}, {}, {})
        url = seeded.url + target
        assert requests.request(op["method"], url, data=big, headers=headers, timeout=60).status_code == 413
        streamed = requests.request(op["method"], url, headers=headers, timeout=60,
                                    data=iter([big[i:i + 65536] for i in range(0, len(big), 65536)]))
        assert streamed.status_code == 413, (target, streamed.status_code)
        status, _ = send(seeded.process.port, op["method"], target, {**headers, "Content-Length": "12abc"}, b"{}")
        assert 400 <= status < 500, (target, status)
    # a path that merely contains "/chunks/" keeps the JSON limit
    chunks_named = f"{seeded.url}/v1/projects/alpha/models/chunks/versions/chunks/meta"
    assert requests.put(chunks_named, data=big, headers=headers, timeout=60).status_code == 413
    status, _ = send(seeded.process.port, "GET", "/v1/whoami", {"Authorization": "Bearer " + "A" * 65536})
    assert 400 <= status < 500
    assert requests.get(f"{seeded.url}/v1/whoami", headers=seeded.headers("alpha"), timeout=30).json()["project"] == "alpha"


# -- what an upload holds: bombs, absurd lengths, malformed Arrow -----------------------------------
def peak_rss_mb(pid: int) -> float:
    """The process' peak resident memory so far (VmHWM), in MB."""
    status = open(f"/proc/{pid}/status").read()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


@pytest.fixture(scope="module")
def small_limit_server(tmp_path_factory):
    """A server accepting 1 MB uploads: 16 MB decompressed and 1M values at most per chunk."""
    with running_server(tmp_path_factory.mktemp("bombs") / "server", extra=("--max-upload-mb", "1")) as process:
        yield process, {"Authorization": f"Bearer {process.create_key('p')}", "Content-Type": ARROW_STREAM}


def put_chunk(process, headers: dict, body: bytes, version: str = "v") -> requests.Response:
    chunk_id = hashlib.sha256(body).hexdigest()
    return requests.put(f"{process.url}/v1/projects/p/models/m/versions/{version}/traces/train/0/0/chunks/{chunk_id}",
                        data=body, headers=headers, timeout=120)


def test_a_decompression_bomb_is_refused_before_it_is_inflated(small_limit_server):
    """A body of a few tens of KB that inflates to 256 MB in one record batch: 413, and the server's peak
    memory does not grow by anything near it (it would by 256 MB had it decompressed the batch to check it)."""
    process, headers = small_limit_server
    rows, row_bytes = 1024, 256 << 10
    zeros = pa.table({"input_id": [f"i{k}" for k in range(rows)],
                      "x": pa.FixedSizeListArray.from_arrays(np.zeros(rows * row_bytes, dtype=np.int8), row_bytes)})
    bomb = encode_chunk(zeros)  # 1024 rows of 256 KB of zeros
    del zeros
    assert len(bomb) < (1 << 20) // 4  # well under the upload limit: only what it inflates to is wrong
    assert put_chunk(process, headers, chunk()).ok  # warm: the first upload's imports count in the peak
    before = peak_rss_mb(process.process.pid)
    answer = put_chunk(process, headers, bomb)
    assert answer.status_code == 413 and "decompresses to more than" in answer.json()["detail"], answer.text
    assert peak_rss_mb(process.process.pid) - before < 64
    assert not list(process.store.rglob("*.parquet")) or all(
        "pending" in p.name for p in process.store.rglob("*.parquet"))


def nulls(length: int) -> pa.Array:
    """A null array of any length: it has no buffer, so this takes no memory (``pa.nulls`` allocates)."""
    return pa.Array.from_buffers(pa.null(), length, [None])


@pytest.mark.parametrize("make_column", [
    lambda: pa.LargeListArray.from_arrays(pa.array([0, 1 << 40], pa.int64()), nulls(1 << 40)),
    lambda: pa.FixedSizeListArray.from_arrays(nulls((1 << 31) - 1), (1 << 31) - 1),
    lambda: pa.ListArray.from_arrays(pa.array([0, (1 << 31) - 1], pa.int32()), nulls((1 << 31) - 1)),
], ids=["large_list_of_2^40_nulls", "fixed_size_list_of_2^31_nulls", "list_of_2^31_nulls"])
def test_absurd_list_lengths_are_refused_before_anything_iterates_them(small_limit_server, make_column):
    """A list of nulls needs no buffer whatever its declared length: a few hundred bytes claim 2^31 or
    2^40 values. 413 at once (before: accepted, then writing the Parquet part asked for 4 GB and more)."""
    process, headers = small_limit_server
    table = pa.table({"input_id": ["a"], "x": make_column()})
    sink = io.BytesIO()
    options = pa.ipc.IpcWriteOptions(compression="zstd", allow_64bit=True)  # lengths past 2^31 on the wire
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    assert len(sink.getvalue()) < 4096
    started = time.monotonic()
    answer = put_chunk(process, headers, sink.getvalue())
    assert answer.status_code == 413 and "values" in answer.json()["detail"], answer.text
    assert time.monotonic() - started < 10


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True)
@given(data=st.data())
def test_malformed_arrow_never_gets_a_5xx(small_limit_server, data):
    """A valid chunk (strings, floats, nested lists) with bytes overwritten or cut: 4xx, or 200 when what
    is left still is a valid table; never a 5xx, and the server keeps answering."""
    process, headers = small_limit_server
    valid = encode_chunk(pa.table({"input_id": ["a", "b", "c"], "score": [0.1, 0.2, 0.3],
                                   "boxes": [[[1.0, 2.0, 3.0, 4.0]], [], [[5.0, 6.0, 7.0, 8.0], [1.0, 1.0, 2.0, 2.0]]]}))
    body = bytearray(valid)
    for _ in range(data.draw(st.integers(1, 6), label="mutations")):
        position = data.draw(st.integers(0, len(body) - 1), label="position")
        body[position:position + 4] = data.draw(st.sampled_from(
            [b"\xff\xff\xff\x7f", b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\x01\x00\x00\x00"]), label="value")
    if data.draw(st.booleans(), label="truncate"):
        body = body[:data.draw(st.integers(0, len(body)), label="length")]
    answer = put_chunk(process, headers, bytes(body), version="fuzz")
    assert answer.status_code < 500, (answer.status_code, answer.text)
    assert answer.status_code in (200, 400, 413), (answer.status_code, answer.text)


def test_markup_in_trace_ids_is_escaped_in_the_served_report(seeded):
    """Input ids are free text a project member uploads; the HTML report the server serves shows them
    (issue examples) as text, so another member opening it runs nothing."""
    x, y, _ = digits_arrays(120)
    ids = np.array([f"<script>alert({i})</script>" if i % 2 else f'"><img src=x onerror=alert({i})>' for i in range(120)])
    tracer = digits_tracer(seeded.process.store / "alpha", version_name="markup")
    train_digits(tracer, (x, y, ids), epochs=1)
    tracer.wait_for_save()
    Evaluator(MODEL, "markup", store=seeded.process.store / "alpha").request_evaluation(result_name="r")
    report = requests.get(f"{seeded.url}/v1/projects/alpha/models/{MODEL}/versions/markup/results/r/report.html",
                          headers=seeded.headers("alpha"), timeout=60)
    assert report.ok
    assert "&lt;script&gt;alert(" in report.text or "&lt;img src=x" in report.text  # the ids are there, as text
    assert "<script>alert(" not in report.text and "<img src=x" not in report.text
