"""Fault-injection support: real tiny ONNX models, signed manifests and an in-process gateway.

``Gateway`` is the real ``edge_agent.agent.Agent`` (store, updater, engine, outbox) with the
network left out: manifests and chunks are handed to the updater exactly as its thread does
(``_dispatch`` then ``_tick``, ``except Exception`` abandons the step), so every update step
runs deterministically in the test's thread and a ``SimulatedCrash`` raised by the
filesystem seam escapes like a real process death would end it.

Models are real ONNX graphs built with ``onnx.helper`` (deterministic bytes per version), so
onnxruntime really loads them, and the golden outputs in each manifest are what the model
computes. Everything is signed with the RFC 8032 test-1 key (deterministic signatures).

Run as a script (``python -m tests.support.faults update-loop STATE_DIR``), it is the child
process the ``kill -9`` tests kill: it opens the store, serves, and installs versions
``accepted + 1, + 2, ...`` forever, printing one line per committed version.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.fsio import FileSystem
from edge_agent.mqtt import Message
from edge_agent.protocol.chunks import describe, split
from edge_agent.protocol.topics import Topics
from registry_sync.signing import key_id, public_key_bytes, sign_manifest

KEY = Ed25519PrivateKey.from_private_bytes(
    bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
)
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(
    bytes.fromhex("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb")
)
ROOT = "lineside"
GROUP = "line-1"
MODEL = "pump"
VARIANT = "onnx-fp32"
FEATURES = ["vibration", "temperature", "pressure", "current"]
ISSUED = 1_764_000_000
GOLDEN_X = [[0.5, 21.0, 1.5, 3.0], [-1.0, 0.0, 2.0, 0.25], [0.0, 0.0, 0.0, 0.0]]
CHUNK = 4096


# ---- models ----------------------------------------------------------------------------


def weights(version: int, n_features: int = 4, padding: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(version)
    w = rng.normal(size=(n_features, 1)).astype(np.float32)
    pad = rng.normal(size=(padding,)).astype(np.float32)
    return w, pad


def onnx_model(
    version: int,
    *,
    n_features: int = 4,
    kind: str = "good",
    padding: int = 6000,
    slow_layers: int = 2000,
) -> bytes:
    """A real ONNX model ``score = X @ W`` unique to ``version``.

    ``kind``: ``good``; ``nan`` (``sqrt(X @ W - 1e6)``: NaN on any ordinary input);
    ``unloadable`` (valid protobuf, an operator onnxruntime does not have: fails at load);
    ``slow`` (a chain of 256x256 MatMuls, milliseconds per call). ``padding`` float32s in an
    unused initializer make the file span several chunks (24 KB by default).
    """
    from onnx import TensorProto, helper, numpy_helper

    w, pad = weights(version, n_features, padding)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(pad, "pad")]
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, n_features])
    y = helper.make_tensor_value_info("score", TensorProto.FLOAT, [None, 1])
    if kind == "good":
        nodes = [helper.make_node("MatMul", ["input", "W"], ["score"])]
    elif kind == "nan":
        inits.append(numpy_helper.from_array(np.array([1e6], np.float32), "big"))
        nodes = [
            helper.make_node("MatMul", ["input", "W"], ["xw"]),
            helper.make_node("Sub", ["xw", "big"], ["neg"]),
            helper.make_node("Sqrt", ["neg"], ["score"]),
        ]
    elif kind == "unloadable":
        nodes = [helper.make_node("NoSuchOp", ["input", "W"], ["score"], domain="lineside.bad")]
    elif kind == "slow":
        rng = np.random.default_rng(version)
        up = rng.normal(size=(n_features, 256)).astype(np.float32) * 0.01
        sq = (np.eye(256) * 0.999).astype(np.float32)
        down = np.ones((256, 1), np.float32) * 0.0
        inits += [
            numpy_helper.from_array(up, "up"),
            numpy_helper.from_array(sq, "sq"),
            numpy_helper.from_array(down, "down"),
        ]
        nodes = [helper.make_node("MatMul", ["input", "up"], ["h0"])]
        for i in range(slow_layers):
            nodes.append(helper.make_node("MatMul", [f"h{i}", "sq"], [f"h{i + 1}"]))
        nodes += [
            helper.make_node("MatMul", [f"h{slow_layers}", "down"], ["zero"]),
            helper.make_node("MatMul", ["input", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "zero"], ["score"]),
        ]
    else:
        raise ValueError(kind)
    graph = helper.make_graph(nodes, f"v{version}", [x], [y], inits)
    opsets = [helper.make_opsetid("", 17)]
    if kind == "unloadable":
        opsets.append(helper.make_opsetid("lineside.bad", 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="lineside-faults")
    model.ir_version = 8
    return bytes(model.SerializeToString())


def golden_for(version: int, n_features: int = 4) -> dict[str, Any]:
    w, _ = weights(version, n_features, 0)
    x = np.asarray(GOLDEN_X, np.float32)[:, :n_features]
    out = (x @ w).astype(np.float32)
    return {
        "inputs": x.tolist(),
        "outputs": {"score": [[float(v) for v in row] for row in out]},
        "atol": 1e-4,
        "rtol": 1e-3,
    }


# ---- manifests -------------------------------------------------------------------------


def signed_object(
    files: dict[str, bytes],
    *,
    version: int,
    sequence: int,
    model_file: str = "model.onnx",
    chunk_size: int = CHUNK,
    golden: Any = "auto",
    issued_at: int | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    signed: dict[str, Any] = {
        "type": "lineside.manifest",
        "schema_version": "1.0",
        "model": MODEL,
        "version": version,
        "selector": {"alias": "champion"},
        "variant": VARIANT,
        "runtime": "onnxruntime",
        "model_file": model_file,
        "files": [describe(p, d, chunk_size).to_json() for p, d in files.items()],
        "feature_names": list(FEATURES),
        "outputs": ["score"],
        "classes": None,
        "signature": None,
        "golden": golden_for(version) if golden == "auto" else golden,
        "baseline": None,
        "targets": {"groups": [GROUP], "device_classes": []},
        "sequence": sequence,
        "issued_at": ISSUED + sequence if issued_at is None else issued_at,
        "expires_at": None,
    }
    signed.update(overrides)
    return signed


@dataclass
class Release:
    """One signed version: wire manifest and the files it names."""

    version: int
    sequence: int
    wire: bytes
    files: dict[str, bytes]
    chunk_size: int = CHUNK

    @property
    def sha256(self) -> str:
        return str(json.loads(self.wire)["signed"]["files"][0]["sha256"])

    def chunks(self) -> list[tuple[str, bytes]]:
        """(chunk id, bytes) once per distinct chunk, in file order."""
        out: dict[str, bytes] = {}
        for data in self.files.values():
            for c in split(data, self.chunk_size):
                out.setdefault(describe("x", c, max(1, len(c))).sha256, c)
        return list(out.items())


def release(
    version: int,
    sequence: int | None = None,
    *,
    kind: str = "good",
    key: Ed25519PrivateKey = KEY,
    n_features: int = 4,
    **overrides: Any,
) -> Release:
    seq = version if sequence is None else sequence
    files = {"model.onnx": onnx_model(version, kind=kind, n_features=n_features)}
    signed = signed_object(files, version=version, sequence=seq, **overrides)
    return Release(version, seq, sign_manifest(signed, key), files)


# ---- the in-process gateway -------------------------------------------------------------


def write_agent_config(path: Path, state_dir: Path, **extra: Any) -> Path:
    from tests.support.publisher import write_config

    extra.setdefault("port", 1)  # nothing listens: the link is never started in-process
    return write_config(
        path,
        device="gw-1",
        state_dir=state_dir,
        keys={key_id(KEY): public_key_bytes(KEY)},
        **extra,
    )


class Gateway:
    """The real Agent without its network and threads; steps run in the caller's thread."""

    def __init__(self, root: Path, *, fs: FileSystem | None = None, **config: Any) -> None:
        from edge_agent.agent import Agent
        from edge_agent.config import load_config

        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.state_dir = root / "state"
        cfg = root / "agent.toml"
        write_agent_config(cfg, self.state_dir, **config)  # always: trees are copied around
        self.agent = Agent(load_config(cfg), fs=fs or FileSystem())
        self.updater = self.agent.updater
        self.store = self.agent.store
        self.engine = self.agent.engine
        self.topics = Topics(ROOT)
        self.serving = self.updater.load_active()

    def set_fs(self, fs: FileSystem) -> None:
        """Route every later mutating call of the store and updater through ``fs``."""
        self.store._fs = fs
        self.updater._fs = fs
        self.updater._undeployed._fs = fs
        self.updater._starts._fs = fs
        self.updater._degraded._fs = fs
        self.updater._stalled_file._fs = fs

    def step(self, kind: str, item: Any) -> None:
        """One iteration of the updater thread's loop, for one queue item."""
        self.updater.step(kind, item)

    def manifest(self, wire: bytes, group: str = GROUP, model: str = MODEL) -> None:
        self.step("manifest", Message(self.topics.manifest(group, model), wire, 1, True))

    def chunk(self, cid: str, data: bytes) -> None:
        self.step("chunk", Message(self.topics.chunk(cid), data, 1, True))

    def deliver(
        self,
        rel: Release,
        *,
        chunks: Iterable[tuple[str, bytes]] | None = None,
        group: str = GROUP,
    ) -> None:
        """The manifest, then the chunks (the broker sends retained chunks on SUBSCRIBE)."""
        self.manifest(rel.wire, group)
        for cid, data in rel.chunks() if chunks is None else chunks:
            self.chunk(cid, data)

    def events(self, code: str | None = None) -> list[dict[str, Any]]:
        topic = self.topics.events("gw-1")
        entries = self.agent.outbox.oldest(0, 1_000_000)
        out = [json.loads(e.payload) for e in entries if e.topic == topic]
        return [e for e in out if code is None or e.get("code") == code]

    def active_sha(self) -> str | None:
        cur = self.engine.current(MODEL)
        return None if cur is None else str(cur.sha256)

    def predict(self, row: list[float] | None = None) -> np.ndarray:
        """One inference on the serving session (what the engine calls per batch)."""
        cur = self.engine.current(MODEL)
        assert cur is not None, "no model serving"
        x = np.asarray([row or [0.1, 0.2, 0.3, 0.4]], np.float32)
        return cur.session.run(x)["score"]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.agent.outbox.close()


def pass_health_windows(gw: Gateway) -> None:
    """Let every watched version's health window elapse (no time passes) and tick."""
    for loaded in gw.updater._watching.values():
        if loaded.health is not None:
            loaded.health.started -= loaded.health.window_s + 1
    gw.step("tick", None)


def leftovers(state_dir: Path) -> list[Path]:
    """Files recovery must have removed: partial downloads, temp files, unfinished installs."""
    models = state_dir / "models"
    junk = [*state_dir.rglob("*.partial"), *state_dir.rglob(".*.tmp")]
    if models.is_dir():
        junk += [d for d in models.iterdir() if not (d / "manifest.json").is_file()]
    return junk


def check_invariants(
    root: Path, allowed: dict[str, int], *, min_sequence: int, serve_bound_s: float = 5.0
) -> tuple[str, int, float]:
    """Restart the gateway on ``root`` and check the issue-6 invariants.

    ``allowed`` maps each acceptable active sha256 to its sequence. Returns
    (active sha, accepted sequence, seconds from process-level start to first answer).
    """
    t0 = time.monotonic()
    gw = Gateway(root)
    try:
        sha = gw.active_sha()
        assert sha in allowed, f"active model {sha} is neither the old nor the new signed one"
        gw.predict()  # serving: the loaded session answers
        served = time.monotonic() - t0
        assert served <= serve_bound_s, f"served after {served:.2f}s"
        active = gw.store.active(MODEL)
        assert active is not None and active.sha256 == sha
        data = active.model_path.read_bytes()
        import hashlib

        assert hashlib.sha256(data).hexdigest() == sha, "a partial or foreign file is active"
        seq = gw.store.accepted_sequence(GROUP, MODEL)
        assert seq is not None and seq >= min_sequence, f"sequence went down: {seq}"
        assert seq >= allowed[sha], "active model newer than the accepted sequence"
        assert not leftovers(gw.state_dir), leftovers(gw.state_dir)
        return sha, seq, served
    finally:
        gw.close()


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


# ---- the child process the kill -9 tests kill -------------------------------------------


def _update_loop(root: Path) -> None:
    t0 = time.monotonic()
    gw = Gateway(root)
    active = gw.store.active(MODEL)
    if active is not None:
        gw.predict()
    print(
        json.dumps(
            {
                "event": "serving",
                "sha": None if active is None else active.sha256,
                "seconds": time.monotonic() - t0,
            }
        ),
        flush=True,
    )
    while True:
        seq = (gw.store.accepted_sequence(GROUP, MODEL) or 0) + 1
        rel = release(seq)
        gw.deliver(rel)
        print(json.dumps({"event": "committed", "sequence": seq}), flush=True)
        pass_health_windows(gw)


if __name__ == "__main__":
    if sys.argv[1] == "update-loop":
        _update_loop(Path(sys.argv[2]))
