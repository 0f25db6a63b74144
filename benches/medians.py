#!/usr/bin/env python3
"""Prints the median of every criterion benchmark of the last run, and its
overhead over the group's `bare` row: `python3 benches/medians.py`."""
import json
import pathlib

root = pathlib.Path(__file__).resolve().parent.parent / "target" / "criterion"
for group in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "report"):
    rows = {}
    for bench in sorted(group.iterdir()):
        estimates = bench / "new" / "estimates.json"
        if estimates.exists():
            data = json.loads(estimates.read_text())
            rows[bench.name] = data["median"]["point_estimate"]
    if not rows:
        continue
    bare = rows.get("bare")
    print(f"{group.name}")
    for name, median in rows.items():
        extra = f"  (+{median - bare:.0f} ns over bare)" if bare is not None and name != "bare" else ""
        print(f"  {name:<44} {median:8.1f} ns{extra}")
