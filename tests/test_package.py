"""The package's public surface and documentation stay in step with the code."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import zmqmesh

ROOT = Path(__file__).resolve().parent.parent


def test_all_matches_the_public_exports() -> None:
    for name in zmqmesh.__all__:  # (all but the errors are imported on first access)
        getattr(zmqmesh, name)
    public = {n for n in vars(zmqmesh) if (not n.startswith("_") or n == "__version__") and n != "annotations"}
    modules = {name for name, value in vars(zmqmesh).items() if type(value).__name__ == "module"}
    assert set(zmqmesh.__all__) == public - modules
    for name in zmqmesh.__all__:
        obj = getattr(zmqmesh, name)
        if callable(obj):
            assert obj.__doc__, f"{name} has no docstring"


def test_every_error_derives_from_zmqmesh_error() -> None:
    errors = [getattr(zmqmesh, n) for n in zmqmesh.__all__ if n.endswith("Error")]
    assert len(errors) >= 8
    assert all(issubclass(e, zmqmesh.ZmqMeshError) for e in errors)


def test_every_option_is_documented_with_its_default() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    for field in zmqmesh.NodeConfig.fields():
        assert f"| `{field}` |" in text, f"{field} missing from docs/configuration.md"


def test_the_package_loads_what_a_process_uses_on_first_use() -> None:
    # without the site module, as an installed package is imported: this environment's
    # site loads some of these modules first (an editable install's finder does)
    path = os.pathsep.join(p for p in sys.path if p)

    def run(code: str) -> str:
        return subprocess.run([sys.executable, "-S", "-c", code], check=True, timeout=60, capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": path}).stdout

    # (what start-up would pay for and a node without a store, a key file, metrics, a
    # handler or pipelined requests does not use; less what pyzmq and msgpack load
    # themselves in this Python: pyzmq's extension imports inspect on 3.12)
    unused = {"asyncio", "sqlite3", "zmqmesh._store.store", "inspect", "dataclasses", "ipaddress", "pathlib",
              "zmqmesh._patterns.durable", "zmqmesh._patterns.history", "zmqmesh._observe.prometheus",
              "zmqmesh._drivers.pipelined", "fcntl", "concurrent.futures.thread"}
    theirs = set(run("import sys, zmq, msgpack; print(*sys.modules)").split())
    code = ("import sys, zmqmesh\n"
            "assert not {'zmq', 'msgpack', 'zmqmesh.node'} & set(sys.modules), sorted(sys.modules)\n"
            "zmqmesh.Node\n"
            "assert 'zmq' in sys.modules\n"
            f"assert not set({sorted(unused - theirs)!r}) & set(sys.modules), sorted(sys.modules)\n"
            "from zmqmesh import AsyncNode\n"
            "assert 'asyncio' in sys.modules\n")
    run(code)


def test_a_config_is_a_frozen_checked_record() -> None:
    config = zmqmesh.NodeConfig(mesh="m", seeds=["tcp://127.0.0.1:5000"], history={"t/": 5}, store="/tmp/x")
    assert config.seeds == ("tcp://127.0.0.1:5000",) and config.history[0].max_messages == 5  # normalised
    same = zmqmesh.NodeConfig(mesh="m", seeds=("tcp://127.0.0.1:5000",), history={"t/": 5}, store="/tmp/x")
    assert config == same and hash(config) == hash(same) and config != zmqmesh.NodeConfig(mesh="m")
    assert repr(config).startswith("NodeConfig(mesh='m', interface=None,")
    with pytest.raises(AttributeError, match="frozen"):
        config.mesh = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError, match="frozen"):
        del config.mesh
    changed = config.replace(beacon_port=6000)
    assert (changed.beacon_port, changed.mesh, config.beacon_port) == (6000, "m", zmqmesh.NodeConfig.beacon_port)
    with pytest.raises(zmqmesh.ConfigError, match="beacon_port"):
        config.replace(beacon_port=-1)
    with pytest.raises(TypeError, match="unexpected argument"):
        zmqmesh.NodeConfig(bogus=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="no field"):
        config.replace(bogus=1)
    with pytest.raises(zmqmesh.ConfigError, match="unknown option"):
        zmqmesh.NodeConfig.from_options(bogus=1)
    assert zmqmesh.NodeConfig.fields()[:2] == ("mesh", "interface") and "metrics_address" in zmqmesh.NodeConfig.fields()


def test_a_peer_is_a_frozen_record_made_by_name_or_position() -> None:
    peer = zmqmesh.Peer("abc", "n", "127.0.0.1", endpoint="tcp://127.0.0.1:1")
    assert peer == zmqmesh.Peer(id="abc", name="n", address="127.0.0.1", endpoint="tcp://127.0.0.1:1")
    assert dict(peer.headers) == {} and peer.groups == frozenset() and peer.is_zmqmesh
    assert str(peer) == "n(abc)@127.0.0.1"
    with pytest.raises(TypeError, match="missing the argument 'endpoint'"):
        zmqmesh.Peer("abc", "n", "127.0.0.1")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="twice"):
        zmqmesh.Peer("abc", "n", "127.0.0.1", "e", id="x")  # type: ignore[misc]
    with pytest.raises(TypeError, match="takes 11 arguments"):
        zmqmesh.Peer(*range(12))  # type: ignore[arg-type, call-arg]
    with pytest.raises(AttributeError):
        peer.name = "m"  # type: ignore[misc]
    assert type(peer.headers) is dict and peer.headers is not zmqmesh.Peer("a", "b", "c", "d").headers


def test_records_copy_and_match_as_dataclasses_did() -> None:
    config = zmqmesh.NodeConfig(mesh="m", seeds=["tcp://127.0.0.1:5000"], history={"t/": 5}, store="/tmp/x")
    peer = zmqmesh.Peer("abc", "n", "127.0.0.1", "tcp://127.0.0.1:1", headers={"k": "v"})
    for record in (config, peer):
        for copied in (copy.copy(record), copy.deepcopy(record)):
            assert type(copied) is type(record) and copied == record
    match peer:
        case zmqmesh.Peer("abc", "n", address=address):
            assert address == "127.0.0.1"
        case _:
            pytest.fail("a positional pattern did not match")


def test_package_is_typed() -> None:
    assert (ROOT / "zmqmesh" / "py.typed").exists()


@pytest.mark.timeout(600)  # (a cold mypy cache or a slow host)
def test_docs_build_strictly(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    # every public name, and every public method of the node classes (inherited ones too)
    missing = [name for name in zmqmesh.__all__ if name != "__version__"
               and f'id="zmqmesh.{name}"' not in api and f'id="zmqmesh.errors.{name}"' not in api]
    missing += [f"Node.{m}" for m in dir(zmqmesh.Node) if not m.startswith("_") and f'id="zmqmesh.Node.{m}"' not in api]
    missing += [f"AsyncNode.{m}" for m in dir(zmqmesh.AsyncNode)
                if not m.startswith("_") and f'id="zmqmesh.AsyncNode.{m}"' not in api]
    assert not missing, f"missing from the API page: {missing}"
    assert "zmqmesh.__version__" in api
    assert "Example::" not in api


@pytest.mark.timeout(600)  # (a cold mypy cache or a slow host)
def test_lint_and_types_are_clean() -> None:
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", "zmqmesh", "--select", "E,F,W,B,UP,I",
                           "--ignore", "E501,B905", "--output-format", "concise"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    types = subprocess.run([sys.executable, "-m", "mypy", "--strict", "zmqmesh", "--ignore-missing-imports"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert types.returncode == 0, types.stdout + types.stderr


@pytest.mark.timeout(600)  # (a cold mypy cache or a slow host)
def test_types_are_clean_for_the_oldest_python_supported() -> None:
    """Checked as for Python 3.10 (``requires-python``), the records (`Peer`, `NodeConfig`)
    still take their fields: their decorator informed type checkers only from 3.11, so
    that 21 calls of the package's own were errors (``Unexpected keyword argument "id"
    for "Peer"``), and so were a user's of Python 3.10."""
    oldest = re.search(r'requires-python = ">=(3\.\d+)"', (ROOT / "pyproject.toml").read_text())
    assert oldest is not None
    types = subprocess.run([sys.executable, "-m", "mypy", "--strict", "zmqmesh", "--ignore-missing-imports",
                            "--python-version", oldest.group(1)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert types.returncode == 0, types.stdout + types.stderr


@pytest.mark.timeout(600)  # (a cold mypy cache or a slow host)
def test_decorators_give_a_type_checker_the_handler_back(tmp_path: Path) -> None:
    user = tmp_path / "user_code.py"
    user.write_text(
        "import zmqmesh\n"
        "node = zmqmesh.Node('typed')\n"
        "@node.service('add')\n"
        "def add(msg: zmqmesh.Message) -> int:\n"
        "    return 1\n"
        "@node.subscribe('t.', replay='all')\n"
        "async def on_t(msg: zmqmesh.Message) -> None: ...\n"
        "def work(msg: zmqmesh.Message) -> str:\n"
        "    return ''\n"
        "same = node.pull('jobs', work, at_least_once=True)\n"
        "reveal_type(add)\n"
        "reveal_type(on_t)\n"
        "reveal_type(same)\n"
    )
    result = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--ignore-missing-imports", str(user)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    revealed = [line.split("Revealed type is ", 1)[1] for line in result.stdout.splitlines() if "Revealed type" in line]
    assert revealed == ['"def (msg: zmqmesh.message.Message) -> int"',
                        '"def (msg: zmqmesh.message.Message) -> typing.Coroutine[Any, Any, None]"',
                        '"def (msg: zmqmesh.message.Message) -> str"'], result.stdout
    assert result.returncode == 0, result.stdout  # and strict mypy finds nothing else to say


NOT_FOR_A_PLAIN_NODE = {
    "CURVE": {"zmqmesh._io.curve", "zmq.utils.z85"},
    "replay": {"zmqmesh._patterns.replay", "zmqmesh._patterns.replay.replays", "zmqmesh._patterns.replay.cursor"},
    "durable queues": {"zmqmesh._patterns.durable", "zmqmesh._store.store", "sqlite3"},
    "uuid (zmqmesh._ids makes the node's and the messages' ids)": {"uuid", "_uuid"},
}
NOT_FOR_A_PLAIN_SYNC_NODE = {
    "queue (the history fetcher makes its queue with its thread)": {"queue"},  # (asyncio's executor loads it)
}
"""What a node loads only once it uses the feature (a CURVE key, a subscription that
replays, ...): each import costs every process's cold start."""


@pytest.mark.parametrize("kind", ["Node", "AsyncNode"])
def test_a_plain_node_started_and_stopped_loads_none_of_the_features_it_does_not_use(
        kind: str, mesh: dict[str, Any]) -> None:
    path = os.pathsep.join(p for p in sys.path if p)
    run = ("node = zmqmesh.Node('plain', **options).start()\nnode.stop()\n" if kind == "Node" else
           "import asyncio\n"
           "async def main() -> None:\n"
           "    node = zmqmesh.AsyncNode('plain', **options)\n"
           "    await node.start()\n"
           "    await node.stop()\n"
           "asyncio.run(main())\n")
    code = (f"import json, sys, zmqmesh\noptions = {mesh!r}\n{run}"
            f"print(json.dumps(sorted(sys.modules)))")
    result = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": path})
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout.splitlines()[-1]))
    assert "zmqmesh._engine.engine" in loaded  # (it ran a node)
    features = {**NOT_FOR_A_PLAIN_NODE, **(NOT_FOR_A_PLAIN_SYNC_NODE if kind == "Node" else {})}
    wrong = {feature: sorted(modules & loaded) for feature, modules in features.items() if modules & loaded}
    assert not wrong, f"a plain {kind} loaded modules of features it does not use: {wrong}"


def test_the_ids_made_without_the_uuid_module_are_version_4_uuids() -> None:
    import uuid

    from zmqmesh._ids import uuid4_bytes, uuid4_hex

    made = {uuid4_hex() for _ in range(1000)}
    assert len(made) == 1000
    for text in made:
        parsed = uuid.UUID(text)
        assert parsed.hex == text and parsed.version == 4 and parsed.variant == uuid.RFC_4122
    raw = uuid.UUID(bytes=uuid4_bytes())
    assert raw.version == 4 and raw.variant == uuid.RFC_4122


def test_a_sync_node_does_not_import_asyncio() -> None:
    # asyncio (and the ssl module it loads) is most of a node's memory; Node must not need it
    code = ("import sys, zmqmesh\n"
            "node = zmqmesh.Node('lean', mesh='lean-import', discovery=False).start()\n"
            "node.stop()\n"
            "print(sorted(m for m in ('asyncio', 'ssl') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_every_attribute_a_slots_class_sets_on_itself_is_one_of_its_slots() -> None:
    """A class with ``__slots__`` keeps its attributes in them, but one assigned on ``self``
    and left out of them goes, unnoticed, to the ``__dict__`` of a subclass that has one (the
    inbox drivers subclass the `Dispatcher`): correct, but every method looked up on the
    object then takes CPython's slow path (a sync provider's inbox, past 30 attributes, cost
    ~250 instructions a call so). Every ``self.<name> = ...`` in the methods of such a class
    must name a slot (or a settable descriptor) of the class or its bases."""
    import ast
    import importlib

    missing: list[str] = []
    checked = 0
    for path in sorted((ROOT / "zmqmesh").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef) or not any(
                    isinstance(s, ast.Assign) and any(getattr(t, "id", None) == "__slots__" for t in s.targets)
                    for s in node.body):
                continue
            cls = getattr(importlib.import_module(module), node.name, None)
            if not isinstance(cls, type):
                continue  # (a class made inside a function)
            checked += 1
            for sub in ast.walk(node):
                if not isinstance(sub, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                    continue
                targets = sub.targets if isinstance(sub, ast.Assign) else [sub.target]
                for target in targets:
                    for leaf in (target.elts if isinstance(target, ast.Tuple) else [target]):
                        if (isinstance(leaf, ast.Attribute) and isinstance(leaf.value, ast.Name)
                                and leaf.value.id == "self"):
                            found = next((k.__dict__[leaf.attr] for k in cls.__mro__ if leaf.attr in k.__dict__), None)
                            if not hasattr(type(found), "__set__"):
                                missing.append(f"{module}.{node.name}.{leaf.attr}")
    assert checked >= 20, checked
    assert not missing, missing
