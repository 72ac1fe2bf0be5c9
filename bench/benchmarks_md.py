#!/usr/bin/env python3
"""Writes BENCHMARKS.md, the current state of linattn's performance, from the JSON
results in bench/results/: for each device the newest run, one table with linattn's
times beside the peers measured in the same run, the ratios, the floors and the targets.
Ratios, fractions of the floor and the targets' verdicts are computed here, never typed.
The dated history of what was tried and why is docs/perf-journal.md.

Usage: python3 bench/benchmarks_md.py [--results DIR] [--output FILE] [--check]
  --check  write nothing; exit 1 if FILE differs from what would be written.

Standard library only (Python 3.11).

Schema of bench/results/*.json: one file per run on one device (schema 1).

  schema       1
  kind         "gpu" or "cpu"
  device_id    short key naming the device kind, e.g. "gpu-h100"; the newest run of
               each device_id is the one shown (newest by date, then time, then file name)
  name         optional: a short name for the section's heading (default: device)
  device       the machine in words, e.g. "one NVIDIA H100 80GB HBM3, driver 580,
               CUDA 13.0 NVRTC" or "2-core AMD EPYC VM (AVX-512, 1 MiB L2 per core)"
  software     optional: the peers' and tools' versions
  date         "YYYY-MM-DD" of the run
  time         "HH:MM" or null where the record does not say
  commit       linattn's commit that was measured
  command      the exact command that produced the run
  setup        optional: what the command needs prepared, what it runs
  conditions   optional: dtype, shapes, medians, timing method
  journal      optional: the docs/perf-journal.md entry that tells the run's story
  outputs      raw outputs of the run (paths from the repository root)
  ceilings     [{name, value, unit, measured_by}]: the machine's rates measured in the run
  notes        optional: lines printed under the table
  rows         the cases, in the order the table shows them:
    case        what was timed, e.g. "causal linear forward, normalised"
    dtype       e.g. "bf16", "f32", "bf16 tokens, f32 state"
    shape       e.g. "B=4 T=8192 H=16 D=128"
    linattn_ms  linattn's time in ms, or null
    floor_ms    the least time the machine allows for the call (ms), or null
    floor_fraction  optional: floor / linattn as the run recorded it; used (and marked
                with a dagger) only where floor_ms is null
    peers       [{name, ms}]: peers timed in the same run (ms may be null); ratios are
                peer ms / linattn ms, so above 1 linattn is faster
    target      optional: [{label, and at most one check}], the check one of
                  ms_at_most / ms_below: linattn_ms <= / < the value
                  ratio_at_least / ratio_above: first peer / linattn >= / > the value
                  fraction_at_least: floor / linattn >= the value
                  runs: true, met when linattn_ms is recorded
                a target with no check is printed as its label alone
    note        optional: printed under the table, after the case's name
Numbers are printed exactly as written in the JSON (0.3930 stays 0.3930).
"""

import argparse
import json
import sys
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DASH = "–"
DAGGER = "†"

RUN_KEYS = ["schema", "kind", "device_id", "device", "date", "time", "commit", "command", "outputs", "ceilings", "rows"]
ROW_KEYS = ["case", "dtype", "shape", "linattn_ms", "floor_ms", "peers"]


def load(path):
    run = json.loads(path.read_text(encoding="utf-8"), parse_float=Decimal)
    missing = [key for key in RUN_KEYS if key not in run]
    if run.get("schema") != 1 or run.get("kind") not in ("gpu", "cpu"):
        missing.append("schema 1 and kind gpu or cpu")
    for index, row in enumerate(run.get("rows", [])):
        missing += [f"rows[{index}].{key}" for key in ROW_KEYS if key not in row]
    if missing:
        sys.exit(f"{path}: missing or wrong: {', '.join(missing)}")
    run["file"] = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return run


def newest_per_device(runs):
    chosen = {}
    for run in runs:
        key = (run["date"], run["time"] or "", str(run["file"]))
        if run["device_id"] not in chosen or key > chosen[run["device_id"]][0]:
            chosen[run["device_id"]] = (key, run)
    # GPUs first, then CPUs; by device key within each.
    return [run for _, run in sorted(chosen.values(), key=lambda kr: (kr[1]["kind"] != "gpu", kr[1]["device_id"]))]


def number(value):
    """A figure as the JSON writes it."""
    return DASH if value is None else str(value)


def ratio(value):
    if value is None:
        return DASH
    digits = 2 if value < 10 else 1 if value < 100 else 0
    return f"{value:.{digits}f}x"


def divide(a, b):
    return None if a is None or b is None or b == 0 else float(a) / float(b)


def fraction(row):
    """floor / linattn, computed, and whether it was taken from the record instead."""
    computed = divide(row["floor_ms"], row["linattn_ms"])
    if computed is not None:
        return computed, False
    recorded = row.get("floor_fraction")
    return (None, False) if recorded is None else (float(recorded), True)


def verdict(target, row):
    mine = row["linattn_ms"]
    first_peer = row["peers"][0]["ms"] if row["peers"] else None
    peer_ratio = divide(first_peer, mine)
    floor_fraction = fraction(row)[0]
    checks = {
        "ms_at_most": lambda v: None if mine is None else float(mine) <= v,
        "ms_below": lambda v: None if mine is None else float(mine) < v,
        "ratio_at_least": lambda v: None if peer_ratio is None else peer_ratio >= v,
        "ratio_above": lambda v: None if peer_ratio is None else peer_ratio > v,
        "fraction_at_least": lambda v: None if floor_fraction is None else floor_fraction >= v,
        "runs": lambda v: mine is not None,
    }
    named = [key for key in checks if key in target]
    if len(named) > 1:
        sys.exit(f"target {target['label']!r} of {row['case']!r}: one check at most")
    if not named:
        return target["label"]
    met = checks[named[0]](float(target[named[0]]))
    return target["label"] + ("" if met is None else " ✓" if met else " ✗")


def cell(text):
    return str(text).replace("|", "\\|")


def table(run):
    lines = [
        "| case | type | shape | linattn ms | peer (same run) | peer ms | peer / linattn | floor ms | floor / linattn | target |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---|",
    ]
    recorded_fractions = False
    for row in run["rows"]:
        value, recorded = fraction(row)
        recorded_fractions |= recorded
        floor_text = DASH if value is None else f"{value:.2f}" + (DAGGER if recorded else "")
        target = "; ".join(verdict(t, row) for t in row.get("target", [])) or DASH
        peers = row["peers"] or [{"name": DASH, "ms": None}]
        for index, peer in enumerate(peers):
            first = index == 0
            cells = [
                row["case"] if first else "",
                row["dtype"] if first else "",
                row["shape"] if first else "",
                number(row["linattn_ms"]) if first else "",
                peer["name"],
                number(peer["ms"]),
                ratio(divide(peer["ms"], row["linattn_ms"])),
                number(row["floor_ms"]) if first else "",
                floor_text if first else "",
                target if first else "",
            ]
            lines.append("| " + " | ".join(cell(c) for c in cells) + " |")
    return lines, recorded_fractions


def section(run):
    when = run["date"] + (f" {run['time']}" if run["time"] else "")
    out = [f"## {run['kind'].upper()}: {run.get('name') or run['device']}", ""]
    out.append(f"- Machine: {run['device']}" + (f"; {run['software']}" if run.get("software") else ""))
    journal = f" (its story: [docs/perf-journal.md](docs/perf-journal.md), entry {run['journal']})"
    out.append(f"- Date: {when}" + (journal if run.get("journal") else ""))
    out.append(f"- Commit: `{run['commit']}`")
    out.append(f"- Command: `{run['command']}`" + (f" — {run['setup']}" if run.get("setup") else ""))
    if run.get("conditions"):
        out.append(f"- Conditions: {run['conditions']}")
    if run["ceilings"]:
        ceilings = "; ".join(
            f"{c['name']} {number(c['value'])} {c['unit']}" + (f" ({c['measured_by']})" if c.get("measured_by") else "")
            for c in run["ceilings"]
        )
        out.append(f"- Ceilings measured in the run: {ceilings}")
    out.append("- Raw output: " + ", ".join(f"`{path}`" for path in run["outputs"]))
    out.append(f"- Source of this table: `{run['file']}`")
    out.append("")
    rows, recorded_fractions = table(run)
    out += rows
    notes = [f"{row['case']} ({row['shape']}): {row['note']}" for row in run["rows"] if row.get("note")]
    notes += run.get("notes", [])
    if recorded_fractions:
        notes.append(f"{DAGGER} floor / linattn as the run recorded it; the floor in ms was not recorded.")
    if notes:
        out += ["", "Notes:", ""] + [f"- {note}" for note in notes]
    out.append("")
    return out


def render(runs):
    out = [
        "# Benchmarks",
        "",
        "The current state of linattn's performance: for each device, the newest run, with the",
        "peers measured in the same run. This file is generated from `bench/results/*.json` by",
        "`bench/benchmarks_md.py` (its header documents the JSON); do not edit it by hand: add the",
        "new run's JSON file and regenerate with",
        "",
        "    python3 bench/benchmarks_md.py",
        "",
        "The dated history — what was tried, what it measured, and why — is in",
        "[docs/perf-journal.md](docs/perf-journal.md).",
        "",
        "Reading the tables: *peer / linattn* is the peer's time over linattn's (above 1, linattn",
        "is faster); *floor* is the least time the machine allows for the call and *floor /",
        "linattn* the fraction of it linattn reaches (1 is the machine's limit); targets are the",
        "project's issues' (✓ met, ✗ not), ratios against the first peer of the row; – means not",
        "measured or not recorded in that run.",
        "",
    ]
    for run in runs:
        out += section(run)
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    paths = sorted(args.results.glob("*.json"))
    if not paths:
        sys.exit(f"no JSON results in {args.results}")
    text = render(newest_per_device([load(path) for path in paths]))
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else None
        if current != text:
            sys.exit(f"{args.output} is not what {Path(__file__).name} writes: run it")
        return
    args.output.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
