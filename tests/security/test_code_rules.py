"""Rules on the code itself, checked on its syntax tree (comments and docstrings do not count):

- no pickle, marshal, eval or exec of anything, no unsafe YAML, no ``torch.load`` without
  ``weights_only=True``, no ``np.load(..., allow_pickle=True)``, no ``read_pickle``, no shell: data a
  user uploads or a trace holds is only ever parsed as Arrow, Parquet or JSON. A use that is reviewed
  and justified goes into ALLOWED with its reason (an entry no longer needed fails too);
- the web UI inserts text as text: no ``innerHTML`` and the like, no ``eval`` in its JavaScript;
- API keys are compared in one place, with ``hmac.compare_digest`` on digests of equal length, for a
  right key, a wrong one, an unknown id and a UI key alike (behavioural check, real SQLite database).
"""

from __future__ import annotations

import ast
import hmac
import re
from pathlib import Path

import pytest

from mldbg_callbacks.server import db as server_db
from mldbg_callbacks.server.app import Server, ServerConfig
from mldbg_callbacks.server.db import Database

REPO = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = ("mldbg_callbacks", "integrations", "examples")

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "joblib"}
UNSAFE_BUILTINS = {"eval", "exec", "compile", "__import__"}
# (file relative to the repository, rule) -> why it is safe. Reviewed by hand; keep it short.
ALLOWED: dict[tuple[str, str], str] = {}


def _dotted(node: ast.AST) -> str:
    """``a.b.c`` for a name or attribute chain, else ''."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def violations(source: str) -> list[tuple[int, str]]:
    """(line, rule) for every unsafe construct in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append((node.lineno, f"import {node.module}"))
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            last = name.rsplit(".", 1)[-1]
            if isinstance(node.func, ast.Name) and name in UNSAFE_BUILTINS:
                found.append((node.lineno, f"{name}()"))
            elif name in ("yaml.unsafe_load", "yaml.full_load", "yaml.load_all") or (
                    name == "yaml.load" and _dotted(_keyword(node, "Loader") or ast.Name("")) not in
                    ("yaml.SafeLoader", "yaml.CSafeLoader", "SafeLoader", "CSafeLoader")):
                found.append((node.lineno, f"{name}() without SafeLoader"))
            elif name == "torch.load" and not _is_true(_keyword(node, "weights_only")):
                found.append((node.lineno, "torch.load() without weights_only=True"))
            elif last == "load" and name.split(".")[0] in ("np", "numpy") and _is_true(_keyword(node, "allow_pickle")):
                found.append((node.lineno, "np.load(allow_pickle=True)"))
            elif last in ("read_pickle", "to_pickle"):
                found.append((node.lineno, f"{last}()"))
            elif name in ("os.system", "os.popen") or _is_true(_keyword(node, "shell")):
                found.append((node.lineno, f"{name}() through a shell"))
    return found


def test_the_rules_catch_what_they_are_meant_to():
    """The checker itself, on code that breaks each rule (and on look-alikes that do not)."""
    bad = """
import pickle
from cloudpickle import loads
import yaml, torch, numpy as np, os, subprocess
eval(text); exec(code)
yaml.load(data); yaml.load(data, Loader=yaml.Loader); yaml.unsafe_load(data)
torch.load(path); torch.load(path, weights_only=False)
np.load(path, allow_pickle=True)
frame = pd.read_pickle(path)
os.system(cmd); subprocess.run(cmd, shell=True)
"""
    assert len(violations(bad)) == 13, violations(bad)
    fine = """
model.eval(); yaml.safe_load(data); yaml.load(data, Loader=yaml.SafeLoader)
torch.load(path, weights_only=True); np.load(path); np.load(path, allow_pickle=False)
subprocess.run([sys.executable, "-m", "x"]); re.compile("a")
"""
    assert violations(fine) == []


def test_no_pickle_eval_exec_or_unsafe_loading_anywhere_in_the_package():
    seen, unexpected = set(), []
    files = [p for d in PACKAGE_DIRS for p in (REPO / d).rglob("*.py")]
    assert len(files) > 40
    for path in files:
        relative = str(path.relative_to(REPO))
        for line, rule in violations(path.read_text()):
            if (relative, rule) in ALLOWED:
                seen.add((relative, rule))
            else:
                unexpected.append(f"{relative}:{line}: {rule}")
    assert not unexpected, "unsafe constructs (parse user data as Arrow, Parquet or JSON only):\n" + "\n".join(unexpected)
    assert seen == set(ALLOWED), f"allowed but no longer used, remove: {set(ALLOWED) - seen}"


def test_the_web_ui_inserts_text_never_markup():
    static = REPO / "mldbg_callbacks" / "server" / "static"
    unsafe = re.compile(r"\.innerHTML|\.outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function\(|"
                        r"srcdoc|javascript:|setTimeout\(\s*['\"`]")
    code = re.compile(r"//[^\n]*")  # comments may name what is avoided
    hits = [f"{p.name}:{n}: {line.strip()}" for p in static.glob("*.js")
            for n, line in enumerate(p.read_text().splitlines(), 1) if unsafe.search(code.sub("", line))]
    assert not hits, hits
    html = (static / "index.html").read_text()
    assert not re.search(r"<script[^>]*src=['\"]?https?:", html)  # nothing fetched from elsewhere


# -- key comparison ---------------------------------------------------------------------------------
def test_keys_are_compared_in_one_place_with_compare_digest():
    server_dir = REPO / "mldbg_callbacks" / "server"
    callers = []
    for path in server_dir.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _dotted(node.func) == "hmac.compare_digest":
                function = next(f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                                and f.lineno <= node.lineno <= f.end_lineno)
                callers.append((path.name, function))
            # no plain comparison of anything secret: == on a key, hash, secret or token
            if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
                names = " ".join(ast.unparse(n) for n in [node.left, *node.comparators])
                secret = re.search(r"\b(key_hash|stored_hash|secret|token|key|api_key|ui_key|stored)\b", names)
                assert not secret, f"{path.name}:{node.lineno}: {ast.unparse(node)} (use key_matches)"
    assert callers == [("db.py", "key_matches")]


@pytest.fixture
def counted_compare(monkeypatch) -> list[tuple[int, int]]:
    """Every hmac.compare_digest call the server code makes: the lengths of its two arguments."""
    calls, compare_digest = [], hmac.compare_digest

    def counting(a, b):
        calls.append((len(a), len(b)))
        return compare_digest(a, b)

    monkeypatch.setattr(server_db.hmac, "compare_digest", counting)
    return calls


def test_every_key_check_makes_one_comparison_of_equal_length_digests(tmp_path, counted_compare):
    """Right key, wrong first or last character, unknown id, another project's id: the same work each
    time (one compare_digest of two 64-character digests), so response timing cannot tell them apart."""
    database = Database(f"sqlite:///{tmp_path / 'keys.db'}")
    try:
        key = database.create_key("alpha")
        other = database.create_key("beta")
        id_length = len("mldbg_") + 12 + 1  # mldbg_<12 hex>_<43 characters, '_' among them>
        prefix, secret = key[:id_length - 1], key[id_length:]
        flip = {"A": "B"}
        probes = {"right": key,
                  "first character": f"{prefix}_{flip.get(secret[0], 'A')}{secret[1:]}",
                  "last character": f"{prefix}_{secret[:-1]}{flip.get(secret[-1], 'A')}",
                  "unknown id": f"mldbg_{'0' * 12}_{secret}",
                  "other project's id": f"{other[:id_length]}{secret}"}
        for what, probe in probes.items():
            counted_compare.clear()
            check = database.check_key(probe)
            assert (check.project == "alpha") == (what == "right"), what
            assert counted_compare == [(64, 64)], (what, counted_compare)
    finally:
        database.dispose()

    server = Server(ServerConfig(store=tmp_path / "ui", local=True, ui_key="k" * 43))
    try:
        for probe, expected in (("k" * 43, "local"), ("k" * 42 + "j", None), ("x", None)):
            counted_compare.clear()
            assert server.check_key(probe).project == expected
            assert counted_compare == [(64, 64)]
    finally:
        server.db.dispose()
        server.worker.shutdown()
