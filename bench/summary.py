#!/usr/bin/env python
"""A short table of a bench/run.py result file against the performance targets.

    python bench/summary.py bench/out/bench_paper.json

Per case (shape, dtype, layout) and backend: forward and forward+backward time with their % of
the memory roofline, the speedup of forward+backward over unfold and over the torch.compile
peer, the peak extra memory, and which targets of docs/performance.md the row meets (forward
>= 80% of the roofline, forward+backward >= 50% and >= 15x the peer).
"""

from __future__ import annotations

import json
import sys

PEER = "torch.compile(shift)"
TARGETS = {"fwd_pct": 80.0, "fwdbwd_pct": 50.0, "x_peer": 15.0}


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python bench/summary.py RESULTS.json", file=sys.stderr)
        return 2
    try:
        with open(argv[0]) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        print(f"summary: cannot read {argv[0]}: {exc}", file=sys.stderr)
        return 2
    meta, rows = data.get("meta", {}), data.get("results", [])
    print(f"# {meta.get('device', '?')}, torch {meta.get('torch', '?')}, copy bandwidth "
          f"{fmt(meta.get('copy_bandwidth_GBps'), '.0f')} GB/s")  # fmt: skip
    head = ("case", "backend", "fwd ms", "%roof", "f+b ms", "%roof", "x unfold", "x peer", "extra MB", "targets")
    table = [head]
    cases = {}
    for r in rows:
        cases.setdefault((r["shape"], r["dtype"], r["layout"]), []).append(r)
    for (shape, dtype, layout), group in cases.items():
        peer = next((r for r in group if r["backend"] == PEER and "error" not in r), None)
        for r in group:
            case = f"{shape} {dtype} {layout}"
            outcome = next((k for k in ("skipped", "error") if k in r), None)
            if outcome:  # not timed: why, in short
                table.append((case, r["backend"], f"{outcome}: " + r[outcome][:60], *[""] * 7))
                continue
            x_peer = peer["fwdbwd_ms"] / r["fwdbwd_ms"] if peer else None
            met = []
            if r["backend"] not in ("unfold", "torch", PEER):
                met = [
                    name
                    for name, ok in (
                        ("fwd", (r.get("fwd_roofline_pct") or 0) >= TARGETS["fwd_pct"]),
                        ("f+b", (r.get("fwdbwd_roofline_pct") or 0) >= TARGETS["fwdbwd_pct"]),
                        ("peer", x_peer is not None and x_peer >= TARGETS["x_peer"]),
                    )
                    if ok
                ]
            table.append((case, r["backend"], fmt(r.get("fwd_ms"), ".3f"), fmt(r.get("fwd_roofline_pct"), ".0f"),
                          fmt(r.get("fwdbwd_ms"), ".3f"), fmt(r.get("fwdbwd_roofline_pct"), ".0f"),
                          fmt(r.get("fwdbwd_speedup"), ".1f"), fmt(x_peer, ".1f"),
                          fmt(r.get("peak_extra_mb"), ".0f"), ",".join(met) or "-"))  # fmt: skip
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
    print("targets met: fwd = forward >= 80% of the roofline, f+b = forward+backward >= 50%, peer = >= 15x the peer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
