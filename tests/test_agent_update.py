"""The agent end to end on a real Mosquitto: deploy, hot swap, every refusal, rollback.

Models are real: logged with MLflow, converted by ``converter.pipeline.convert``, signed
with ``registry_sync.signing`` and published as retained chunks + manifest.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from registry_sync.signing import generate_private_key, sign_manifest
from tests.support.publisher import ROOT, World, resign, signed_for, wait_until


@pytest.fixture
def world(tmp_path: Path, broker: Any, registry: Any) -> Iterator[World]:
    w = World(tmp_path, broker, registry)
    yield w
    w.close()


def active_sha(agent: Any) -> str | None:
    current = agent.engine.current("pump")
    return None if current is None else str(current.sha256)


def test_deploy_predict_and_hot_swap(world: World) -> None:
    agent = world.start_agent()
    world.deploy("v1", version=1, sequence=1)
    activated = world.wait_event("activated")
    assert activated["version"] == 1 and activated["model"] == "pump"
    steps = [e["code"] for e in world.col.events()]
    assert steps.index("accepted") < steps.index("installed") < steps.index("activated")

    world.send(1)
    assert wait_until(lambda: len(world.predictions()) == 1)
    p = world.predictions()[0]
    v1 = world.bundles["v1"]
    assert p["device"] == "gw-1" and p["model"] == "pump" and p["version"] == 1
    assert p["variant"] == "onnx-fp32" and p["sha256"] == v1.meta["files"]["model.onnx"]["sha256"]
    assert p["source"]["id"] == "m1" and isinstance(p["source"]["ts"], float)
    assert p["latency_ms"] >= 0 and isinstance(p["seq"], int)
    assert p["outputs"]["label"][0] in ("fault", "ok")  # mapped through classes
    assert len(p["outputs"]["probabilities"][0]) == 2

    world.deploy("v2", version=2, sequence=2)
    world.wait_event("activated", count=2)
    world.send(2)
    assert wait_until(lambda: len(world.predictions()) == 2)
    p2 = world.predictions()[1]
    assert p2["version"] == 2 and p2["seq"] > p["seq"]
    state = [s for s in world.col.on("/state") if s.get("online")][-1]
    assert state["models"]["pump"]["version"] == 2 and state["models"]["pump"]["sequence"] == 2
    assert state["trusted_keys"] == sorted(agent.config.trusted_keys)
    assert agent.store.accepted_sequence("line-1", "pump") == 2


def test_retained_manifest_resent_on_reconnect_is_skipped(world: World) -> None:
    world.start_agent()
    world.deploy("v1", version=1, sequence=1)
    world.wait_event("activated")
    world.agents[0].stop(timeout=3)
    world.agents.clear()
    world.start_agent()  # gets the same retained manifest again
    world.send(1)
    assert wait_until(lambda: len(world.predictions()) == 1)
    codes = [e["code"] for e in world.col.events()]
    assert codes.count("accepted") == 1 and "replayed_sequence" not in codes


def _tamper_signed_after_signing(wire: bytes) -> bytes:
    doc = json.loads(wire)
    doc["signed"]["version"] = 99
    return json.dumps(doc).encode()


def test_each_refusal_reports_its_code_and_keeps_the_active_model(world: World) -> None:
    agent = world.start_agent()
    v1_wire = world.deploy("v1", version=1, sequence=5)
    world.wait_event("activated")
    v1_sha = active_sha(agent)
    v2 = world.bundles["v2"]
    group, model = "line-1", "pump"

    def publish(wire: bytes) -> None:
        world.pub.manifest(group, model, wire)

    def expect(code: str) -> None:
        world.wait_event(code)
        assert active_sha(agent) == v1_sha
        assert agent.store.accepted_sequence(group, model) == 5

    # bad signature: a trusted key id, bytes changed after signing
    world.pub.chunks(v2.files)
    publish(
        _tamper_signed_after_signing(
            sign_manifest(
                signed_for(v2, model=model, version=2, sequence=6, groups=[group]), world.key
            )
        )
    )
    expect("bad_signature")
    # unknown key
    publish(
        sign_manifest(
            signed_for(v2, model=model, version=2, sequence=7, groups=[group]),
            generate_private_key(),
        )
    )
    expect("unknown_key")
    # replayed (equal) and lower sequences
    publish(resign(v1_wire, world.key, lambda s: s.update(version=3)))
    expect("replayed_sequence")
    publish(
        sign_manifest(signed_for(v2, model=model, version=2, sequence=4, groups=[group]), world.key)
    )
    wait_until(lambda: len(world.col.events("replayed_sequence")) >= 2)
    assert len(world.col.events("replayed_sequence")) == 2
    # wrong group: signed for another group, published on ours
    publish(
        sign_manifest(
            signed_for(v2, model=model, version=2, sequence=8, groups=["line-9"]), world.key
        )
    )
    expect("wrong_target")
    # oversize: above the device's max_model_bytes (config: 64 MiB) by the manifest's sizes
    files = signed_for(v2, model=model, version=2, sequence=9, groups=[group])["files"]
    big = dict(files[0], size=65 * 2**20)
    big["chunks"] = [files[0]["chunks"][0]] * -(-big["size"] // big["chunk_size"])
    publish(
        sign_manifest(
            signed_for(v2, model=model, version=2, sequence=9, groups=[group], files=[big]),
            world.key,
        )
    )
    expect("too_large")
    assert agent.store.is_installed(v1_sha or "")


def test_corrupt_chunk_and_truncated_file(world: World) -> None:
    agent = world.start_agent()
    world.deploy("v1", version=1, sequence=1)
    world.wait_event("activated")
    v1_sha = active_sha(agent)
    v2 = world.bundles["v2"]
    data = v2.files["model.onnx"]
    # corrupt chunk: the retained payload on chunks/<id> does not hash to <id>
    signed = signed_for(v2, model="pump", version=2, sequence=2, groups=["line-1"], chunk_size=256)
    world.pub.chunks(v2.files, 256, tamper=lambda _cid, b: b[:-1] + bytes([b[-1] ^ 1]))
    world.pub.manifest("line-1", "pump", sign_manifest(signed, world.key))
    world.wait_event("chunk_hash")
    assert active_sha(agent) == v1_sha
    # truncated file: every chunk is genuine but the file they make is short
    short = data[: len(data) - 100]
    files = signed_for(v2, model="pump", version=2, sequence=3, groups=["line-1"], chunk_size=128)[
        "files"
    ]
    from edge_agent.protocol.chunks import describe

    entry = describe("model.onnx", short, 128).to_json()
    entry["size"], entry["sha256"] = files[0]["size"], files[0]["sha256"]
    # size says full length, so one chunk id more is required: repeat the last genuine one
    need = -(-entry["size"] // 128)
    entry["chunks"] = entry["chunks"] + [entry["chunks"][-1]] * (need - len(entry["chunks"]))
    world.pub.chunks({"model.onnx": short}, 128)
    world.pub.manifest(
        "line-1",
        "pump",
        sign_manifest(
            signed_for(v2, model="pump", version=2, sequence=3, groups=["line-1"], files=[entry]),
            world.key,
        ),
    )
    world.wait_event("file_hash")
    assert active_sha(agent) == v1_sha
    assert not list(agent.store.models_dir.rglob("*.partial"))


def test_onnx_external_data_is_refused(world: World) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    agent = world.start_agent()
    world.deploy("v1", version=1, sequence=1)
    world.wait_event("activated")
    v1_sha = active_sha(agent)
    w = numpy_helper.from_array(np.ones((4, 2), dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["probabilities"])],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2])],
        [w],
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out = world.tmp / "ext"
    out.mkdir()
    onnx.save_model(
        onnx_model,
        str(out / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    files = {p: (out / p).read_bytes() for p in ("model.onnx", "weights.bin")}
    from tests.support.publisher import Bundle

    evil = Bundle(out, world.bundles["v2"].meta, files)
    world.pub.deploy(evil, world.key, group="line-1", model="pump", version=2, sequence=2)
    world.wait_event("unsafe_model")
    assert active_sha(agent) == v1_sha


def test_golden_mismatch_keeps_old_model_and_marks_bad(world: World) -> None:
    agent = world.start_agent()
    world.deploy("v1", version=1, sequence=1)
    world.wait_event("activated")
    v1_sha = active_sha(agent)
    v2 = world.bundles["v2"]
    golden = json.loads(json.dumps(v2.meta["golden"]))
    golden["outputs"]["probabilities"] = [[0.5, 0.5] for _ in golden["outputs"]["probabilities"]]
    world.deploy("v2", version=2, sequence=2, golden=golden)
    world.wait_event("golden_mismatch")
    assert active_sha(agent) == v1_sha
    v2_sha = v2.meta["files"]["model.onnx"]["sha256"]
    assert wait_until(lambda: agent.store.is_bad(v2_sha), 5)
    assert agent.store.accepted_sequence("line-1", "pump") == 2  # not retried


def test_variant_not_in_preference_list_is_wrong_target(world: World) -> None:
    world.write_config(variants=("tflite-fp32",))
    agent = world.start_agent()
    world.deploy("v1", version=1, sequence=1)
    event = world.wait_event("wrong_target")
    assert "variant" in event["message"]
    assert active_sha(agent) is None


def test_health_window_failure_rolls_back(world: World) -> None:
    # An impossible latency budget: v1 passes its (idle) window, v2 fails it under load.
    world.write_config(window_s=1.0, latency_budget_ms=0.01)
    agent = world.start_agent()
    world.deploy("v1", version=1, sequence=1)
    world.wait_event("activated")
    v1_sha = active_sha(agent)
    world.wait_event("healthy")
    world.deploy("v2", version=2, sequence=2)
    world.wait_event("activated", count=2)
    for i in range(40):
        world.send(i)
    event = world.wait_event("rolled_back")
    assert "latency" in event["reason"]
    assert active_sha(agent) == v1_sha
    assert agent.store.is_bad(world.bundles["v2"].meta["files"]["model.onnx"]["sha256"])
    assert agent.store.accepted_sequence("line-1", "pump") == 2  # never lowered


def test_cmd_rollback_report_resync(world: World) -> None:
    agent = world.start_agent()
    world.deploy("v1", version=1, sequence=1)
    world.wait_event("activated")
    v1_sha = active_sha(agent)
    world.deploy("v2", version=2, sequence=2)
    world.wait_event("activated", count=2)
    cmd = f"{ROOT}/devices/gw-1/cmd"
    world.pub.publish(
        cmd, json.dumps({"id": "c-1", "cmd": "rollback", "model": "pump"}).encode(), retain=False
    )
    assert wait_until(lambda: any(e.get("id") == "c-1" for e in world.col.events()))
    reply = next(e for e in world.col.events() if e.get("id") == "c-1")
    assert reply["kind"] == "cmd" and reply["code"] == "ok"
    assert active_sha(agent) == v1_sha
    world.pub.publish(cmd, b'{"id": "c-2", "cmd": "report"}', retain=False)
    world.pub.publish(cmd, b'{"id": "c-3", "cmd": "resync"}', retain=False)
    world.pub.publish(cmd, b'{"id": "c-4", "cmd": "explode"}', retain=False)
    assert wait_until(lambda: {"c-2", "c-3", "c-4"} <= {e.get("id") for e in world.col.events()})
    codes = {e["id"]: e["code"] for e in world.col.events() if e.get("id")}
    assert codes["c-2"] == "ok" and codes["c-3"] == "ok" and codes["c-4"] == "unknown_cmd"
    assert active_sha(agent) == v1_sha  # resync re-reads v2's manifest: settled, not re-taken


def test_download_deadline_gives_download_timeout(world: World) -> None:
    world.write_config(deadline_s=1.0)
    agent = world.start_agent()
    world.deploy("v1", version=1, sequence=1)
    world.wait_event("activated")
    v1_sha = active_sha(agent)
    v2 = world.bundles["v2"]
    # the manifest arrives, its chunks never do (chunk size unseen before: new ids)
    world.pub.manifest(
        "line-1",
        "pump",
        sign_manifest(
            signed_for(v2, model="pump", version=2, sequence=2, groups=["line-1"], chunk_size=96),
            world.key,
        ),
    )
    world.wait_event("download_timeout", timeout=10)
    # The event names the state it failed in; the job is dropped just after it.
    assert wait_until(lambda: agent.updater.state.value == "idle")
    assert active_sha(agent) == v1_sha
    assert wait_until(lambda: not list(agent.store.models_dir.rglob("*.partial")))


def test_signed_undeploy_keeps_serving_and_reports_not_desired(world: World) -> None:
    agent = world.start_agent()
    wire = world.deploy("v1", version=1, sequence=1)
    world.wait_event("activated")
    world.pub.manifest(
        "line-1",
        "pump",
        resign(
            wire, world.key, lambda s: s.update(sequence=2, undeployed=True, on_undeploy="keep")
        ),
    )
    world.wait_event("undeployed")
    assert agent.engine.current("pump") is not None  # the last model keeps serving
    assert wait_until(
        lambda: any(
            s.get("online") and s["models"].get("pump", {}).get("desired") is False
            for s in world.col.on("/state")
        ),
        10,
    )
    world.send(1)
    assert wait_until(lambda: len(world.predictions()) == 1)
