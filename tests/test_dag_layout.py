"""The report's plan drawing: a layered layout whose edges never pass behind a box they do not connect,
checked geometrically on every shipped spec's plan and on shapes made to tempt a naive layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from specdsl import api
from specdsl.views.dag import Edge, compute_layout, edge_hits_box

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "specs").glob("*.yaml")) + sorted((ROOT / "tests" / "specs").glob("*.yaml"))


def check_geometry(nodes: list[dict]) -> None:
    geometry = compute_layout(nodes)
    assert set(geometry.boxes) == {n["id"] for n in nodes}
    wanted = {(src, n["id"]) for n in nodes for _, src in n.get("inputs", [])} | \
        {(ref, n["id"]) for n in nodes for _, ref in n.get("models", []) if ref in geometry.boxes}
    assert {(e.src, e.dst) for e in geometry.edges} == wanted
    for edge in geometry.edges:
        assert edge_hits_box(geometry, edge) == [], f"{edge.src} -> {edge.dst} passes behind a box"
        assert edge.points[0][0] < edge.points[-1][0]  # left to right, layer by layer
    boxes = list(geometry.boxes.items())
    for i, (a, (ax, ay, aw, ah)) in enumerate(boxes):
        assert 0 <= ax and ax + aw <= geometry.width and 0 <= ay and ay + ah <= geometry.height
        for b, (bx, by, bw, bh) in boxes[i + 1:]:
            assert ax + aw <= bx or bx + bw <= ax or ay + ah <= by or by + bh <= ay, f"{a} overlaps {b}"


@pytest.mark.parametrize("spec", SHIPPED, ids=lambda p: p.name)
def test_no_edge_passes_behind_a_box_in_a_shipped_spec(spec):
    plan = api.compile_spec(spec, identities=False)
    check_geometry([n.to_dict() for n in plan.nodes])


def node(i: str, *inputs: str, models: tuple[str, ...] = ()) -> dict:
    return {"id": i, "op": "x", "inputs": [["from", s] for s in inputs], "models": [["models", m] for m in models]}


def test_long_edges_go_around_the_boxes_between():
    # held_q -> score skips four layers of boxes (the shape the issue reported: `dataset` and `lora`
    # drawn over the edge); several long edges and a model edge cross the same columns.
    nodes = [node("src"), node("held_q"), node("gen", "src"), node("kept", "gen"), node("dataset", "kept"),
             node("lora", "dataset"), node("side", "src"), node("score", "held_q", models=("lora",)),
             node("late", "src", "lora"), node("report", "gen", "score", "late")]
    check_geometry(nodes)
    geometry = compute_layout(nodes)
    long_edge = next(e for e in geometry.edges if (e.src, e.dst) == ("held_q", "score"))
    assert len(long_edge.points) == 2 + 2 * 4  # a lane in each of the four layers it crosses
    # The check sees what the issue saw: drawn straight from end to end, the edge passes behind boxes.
    straight = Edge(long_edge.src, long_edge.dst, False, (long_edge.points[0], long_edge.points[-1]), (True,))
    assert edge_hits_box(geometry, straight)


def test_a_wide_fan_in_stays_inside_its_box():
    nodes = [node(f"s{i}") for i in range(9)] + [node("all", *[f"s{i}" for i in range(9)])]
    check_geometry(nodes)
    geometry = compute_layout(nodes)
    x, y, w, h = geometry.boxes["all"]
    assert all(y < e.points[-1][1] < y + h for e in geometry.edges)
