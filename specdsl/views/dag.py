"""The plan graph's layered layout (Sugiyama-style), whose edges never pass behind a box.

1. **Layers**: a node's layer is one more than its deepest input's (inputs and trained models it uses).
2. **Dummy nodes**: an edge that spans several layers gets a thin dummy in every layer in between, so it
   is routed through a lane of its own in each column instead of across the boxes there.
3. **Order**: barycentre sweeps, down and up, put each node and dummy near the mean position of its
   neighbours in the layer before (after), which removes most crossings; ties keep declaration order.
4. **Coordinates**: each layer is a column; its boxes and dummy lanes are stacked top to bottom without
   overlap and the column is centred. An edge is drawn as a horizontal run through each of its dummy lanes
   and a curve across each gap between columns, whose control points stay inside the gap.

No box sits in a gap and no box shares a lane's height in its column, so no edge can pass behind a box
it does not connect: :func:`edge_hits_box` checks that geometrically (the tests run it on every shipped
spec's plan).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

BOX_W, BOX_H, GAP_X, GAP_Y, PAD = 172, 52, 58, 14, 12
LANE_H = 10     # the height a dummy lane takes in a column
SWEEPS = 4      # barycentre passes (down + up each)


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    is_model: bool          # the source is used as a model (dashed)
    points: tuple[tuple[float, float], ...]  # the control polygon: start, (in, out) per lane, end
    curves: tuple[bool, ...]  # per segment: a curve across a gap (True) or a straight run through a lane


@dataclass(frozen=True)
class Geometry:
    width: int
    height: int
    boxes: Mapping[str, tuple[float, float, float, float]]  # node id -> (x, y, w, h)
    edges: tuple[Edge, ...]
    order: Mapping[str, tuple[int, int]]                    # node id -> (layer, index in its layer)


def _upstream(nodes: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[str, bool]]]:
    known = {n["id"] for n in nodes}
    return {n["id"]: [(src, False) for _, src in n.get("inputs", []) if src in known]
            + [(ref, True) for _, ref in n.get("models", []) if ref in known] for n in nodes}


def _layers(ids: list[str], ups: Mapping[str, list[tuple[str, bool]]]) -> dict[str, int]:
    from specdsl.ir.plan import topo_order

    level: dict[str, int] = {}
    for i in topo_order(ids, lambda node: [u for u, _ in ups.get(node, [])]):
        level[i] = 1 + max((level[u] for u, _ in ups.get(i, []) if u in level), default=-1)
    return level


def compute_layout(nodes: Sequence[Mapping[str, Any]]) -> Geometry:
    """Boxes and edge routes for the plan's nodes (``id``, ``inputs``, ``models`` as in plan JSON)."""
    ids = [n["id"] for n in nodes]
    ups = _upstream(nodes)
    level = _layers(ids, ups)
    n_layers = max(level.values(), default=-1) + 1
    layers: list[list[str]] = [[] for _ in range(n_layers)]
    for i in ids:
        layers[level[i]].append(i)
    # Chains of dummies: each edge becomes a path of vertices one layer apart.
    below: dict[str, list[str]] = {}   # vertex -> vertices in the next layer it connects to
    above: dict[str, list[str]] = {}
    chains: list[tuple[str, str, bool, list[str]]] = []
    for dst in ids:
        for src, is_model in ups[dst]:
            chain = [src]
            for lv in range(level[src] + 1, level[dst]):
                dummy = f"\0{src}\0{dst}\0{int(is_model)}\0{lv}"
                layers[lv].append(dummy)
                chain.append(dummy)
            chain.append(dst)
            for a, b in zip(chain, chain[1:]):
                below.setdefault(a, []).append(b)
                above.setdefault(b, []).append(a)
            chains.append((src, dst, is_model, chain))
    _order(layers, above, below)

    # Coordinates: stack each column, then centre the columns on the tallest.
    def height_of(v: str) -> int:
        return LANE_H if v.startswith("\0") else BOX_H

    heights = [sum(height_of(v) for v in layer) + GAP_Y * max(len(layer) - 1, 0) for layer in layers]
    tallest = max(heights, default=0)
    top: dict[str, int] = {}
    for lv, layer in enumerate(layers):
        y = PAD + (tallest - heights[lv]) // 2  # whole pixels: the SVG draws exactly these boxes
        for v in layer:
            top[v] = y
            y += height_of(v) + GAP_Y
    col_x = [PAD + lv * (BOX_W + GAP_X) for lv in range(n_layers)]
    boxes = {i: (col_x[level[i]], top[i], BOX_W, BOX_H) for i in ids}

    edges = []
    into: dict[str, int] = {}
    for src, dst, is_model, chain in chains:
        k = into[dst] = into.get(dst, -1) + 1
        n_in = len(ups[dst])
        points: list[tuple[float, float]] = [(col_x[level[src]] + BOX_W, top[src] + BOX_H / 2)]
        curves: list[bool] = []
        for step, v in enumerate(chain[1:-1], start=1):
            x = col_x[level[src] + step]
            mid = top[v] + LANE_H / 2
            points += [(x, mid), (x + BOX_W, mid)]
            curves += [True, False]
        # Several inputs of one node arrive spread over its left side, in the order they are drawn.
        points.append((col_x[level[dst]], top[dst] + BOX_H / 2 + (k - (n_in - 1) / 2) * min(8, BOX_H / (n_in + 1))))
        curves.append(True)
        edges.append(Edge(src, dst, is_model, tuple(points), tuple(curves)))
    width = int(PAD * 2 + n_layers * BOX_W + max(n_layers - 1, 0) * GAP_X) if n_layers else 10
    height = int(PAD * 2 + tallest) if n_layers else 10
    order = {v: (lv, k) for lv, layer in enumerate(layers) for k, v in enumerate(layer) if not v.startswith("\0")}
    return Geometry(width, height, boxes, tuple(edges), order)


def _order(layers: list[list[str]], above: Mapping[str, list[str]], below: Mapping[str, list[str]]) -> None:
    """Barycentre sweeps: reorder each layer by the mean index of its neighbours in the layer just
    swept (stable: ties keep the current order)."""
    for sweep in range(SWEEPS):
        down = sweep % 2 == 0
        rng = range(1, len(layers)) if down else range(len(layers) - 2, -1, -1)
        for lv in rng:
            ref = layers[lv - 1] if down else layers[lv + 1]
            index = {v: k for k, v in enumerate(ref)}
            links = above if down else below
            current = {v: k for k, v in enumerate(layers[lv])}

            def centre(v: str) -> tuple[float, int]:
                near = [index[u] for u in links.get(v, []) if u in index]
                return (sum(near) / len(near) if near else float(current[v]), current[v])

            layers[lv].sort(key=centre)


def curve_path(edge: Edge) -> str:
    """The SVG path of an edge: straight runs through lanes, curves (control points inside the gap)
    across gaps."""
    (x0, y0), rest = edge.points[0], edge.points[1:]
    d = [f"M{x0:.0f},{y0:.0f}"]
    px, py = x0, y0
    for (x, y), curve in zip(rest, edge.curves):
        if curve:
            mx = (px + x) / 2
            d.append(f"C{mx:.0f},{py:.0f} {mx:.0f},{y:.0f} {x - (2 if (x, y) == rest[-1] else 0):.0f},{y:.0f}")
        else:
            d.append(f"L{x:.0f},{y:.0f}")
        px, py = x, y
    return " ".join(d)


def _segment_hits_rect(a: tuple[float, float], b: tuple[float, float], rect: tuple[float, float, float, float]) -> bool:
    """Whether segment a-b meets the open rectangle (Liang-Barsky clipping)."""
    x, y, w, h = rect
    t0, t1 = 0.0, 1.0
    dx, dy = b[0] - a[0], b[1] - a[1]
    for p, q in ((-dx, a[0] - x), (dx, x + w - a[0]), (-dy, a[1] - y), (dy, y + h - a[1])):
        if p == 0:
            if q <= 0:
                return False
        else:
            t = q / p
            if p < 0:
                t0 = max(t0, t)
            else:
                t1 = min(t1, t)
            if t0 >= t1:
                return False
    return True


def edge_hits_box(geometry: Geometry, edge: Edge) -> list[str]:
    """The boxes (other than its own two ends) that an edge's route passes through. A curve lies inside the
    convex hull of its control points, so its control polygon is checked: a conservative test."""
    polygon: list[tuple[float, float]] = [edge.points[0]]
    for (x, y), curve in zip(edge.points[1:], edge.curves):
        px, py = polygon[-1]
        if curve:
            mx = (px + x) / 2
            polygon += [(mx, py), (mx, y)]
        polygon.append((x, y))
    hit = []
    for node, (x, y, w, h) in geometry.boxes.items():
        if node in (edge.src, edge.dst):
            continue
        inner = (x + 0.5, y + 0.5, w - 1, h - 1)
        if any(_segment_hits_rect(a, b, inner) for a, b in zip(polygon, polygon[1:])):
            hit.append(node)
    return hit
