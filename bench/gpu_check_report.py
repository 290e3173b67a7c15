"""Helpers of ``bench/gpu_check.sh``: which bench phases and variants exist, the
key figures of each step's log, the summary table and ``summary.md``.

Only the ``phases`` and ``variants`` commands import torch (through
``bench.bench_mlp``); the others use the standard library alone, so the summary
is written even when torch or the extension cannot be imported.

    python -m bench.gpu_check_report phases fwd,fwdbwd,step,train,epoch
    python -m bench.gpu_check_report variants eager,fastmlp,fastmlp-fused
    python -m bench.gpu_check_report keys STEP LOG [JSON]     (model: the perf_model comparison's summary line)
    python -m bench.gpu_check_report summary STEPS_TSV SUMMARY_MD [--title T] [--files DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path

#: What the lent machine brings back from $OUT (see the device tool's limits).
MAX_FILES = 8
MAX_FILE_BYTES = 16 << 20
MAX_DIR_DEPTH = 2  # $OUT/a/b/file comes back, $OUT/a/b/c/file does not
SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


# --------------------------------------------------------------------------
# phases / variants: the wanted names that this bench_mlp offers
# --------------------------------------------------------------------------
def available(kind: str, wanted: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(kept, missing)``: the wanted phases or variants bench_mlp knows, in the wanted order."""
    from bench import bench_mlp

    known = list(bench_mlp.PHASES) if kind == "phases" else list(bench_mlp.VARIANTS)
    kept = [w for w in wanted if w in known]
    return kept, [w for w in wanted if w not in known]


# --------------------------------------------------------------------------
# keys: one line of key figures per step
# --------------------------------------------------------------------------
def _last_match(pattern: str, text: str) -> re.Match[str] | None:
    found = None
    for found in re.finditer(pattern, text, flags=re.MULTILINE):  # noqa: B007 -- keep the last
        pass
    return found


def pytest_line(text: str) -> str | None:
    """pytest's final ``N passed, M failed in Xs`` line, without the ``=`` rule."""
    m = _last_match(r"^=*\s*((?:\d+ \w+(?: \w+)?,? ?)+ in [\d.]+s(?: \([^)]*\))?)\s*=*\s*$", text)
    if m:
        return m.group(1).strip()
    m = _last_match(r"^((?:\d+ (?:passed|failed|skipped|deselected|errors?|xfailed|xpassed|warnings?),? ?)+.*)$", text)
    return m.group(1).strip() if m else None


def sanitizer_line(text: str) -> str | None:
    """compute-sanitizer's ``ERROR SUMMARY: N errors``, and how many of its reports are
    kernel accesses or races (``Invalid __global__ read``, ``Race reported``...) and how many
    failed API calls (``Program hit cudaError...``, which torch itself can cause)."""
    m = _last_match(r"ERROR SUMMARY: (\d+ errors?)", text)
    if not m:
        return None
    kernel = len(re.findall(r"^=+ (Invalid __\w+__|Race reported|.*[Hh]azard|Barrier error|Uninitialized)", text, re.M))
    api = len(re.findall(r"^=+ Program hit ", text, re.M))
    return f"{m.group(1)} ({kernel} in kernels, {api} API calls)"


def bench_keys(text: str, json_path: Path | None) -> str:
    """Geometric-mean speedup of each variant over eager, and check failures."""
    if json_path is None or not json_path.is_file():
        done = _last_match(r"^\[(\d+)/(\d+)\]", text)
        return f"no JSON; {done.group(1)}/{done.group(2)} cases done" if done else "no JSON, no case done"
    results = json.loads(json_path.read_text())["results"]
    speedups: dict[str, list[float]] = {}
    mismatches = skipped = 0
    for r in results:
        if r["status"] != "ok":
            skipped += 1
            continue
        if r["variant"] != "eager" and r.get("speedup_vs_eager"):
            speedups.setdefault(r["variant"], []).append(r["speedup_vs_eager"])
        mismatches += r.get("check_ok") is False
    cases = len({(r["workload"], r["phase"], r["dtype"], r["batch"]) for r in results})
    parts = [f"{v} {math.exp(sum(map(math.log, s)) / len(s)):.2f}x" for v, s in speedups.items() if s and min(s) > 0]
    best = max(
        (r for r in results if r["variant"] != "eager" and r.get("speedup_vs_eager")),
        key=lambda r: r["speedup_vs_eager"],
        default=None,
    )
    text_best = ""
    if best is not None:
        text_best = (
            f"; best {best['variant']} {best['speedup_vs_eager']:.2f}x at {best['workload']} "
            f"{best['phase']} {best['dtype']} B={best['batch']}"
        )
    return (
        f"{cases} cases, geomean vs eager: {', '.join(parts) or 'none'}{text_best}; "
        f"{mismatches} mismatches, {skipped} skipped cells"
    )


def ncu_keys(text: str) -> str:
    """Per profiled kernel: duration and memory throughput, from the CSV the step prints."""
    rows: dict[str, dict[str, str]] = {}
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    for row in csv.DictReader(lines):
        name = re.split(r"[<(]", (row.get("Kernel Name") or "").strip())[0].split()[-1:] or ["?"]
        key = f"{row.get('ID', '?')}:{name[0]}"
        metric, value, unit = row.get("Metric Name"), row.get("Metric Value"), row.get("Metric Unit") or ""
        if metric in ("Duration", "Memory Throughput", "DRAM Throughput"):
            rows.setdefault(key, {})[metric] = f"{value} {unit}".strip()
    if not rows:
        return "no kernel metrics parsed" if "==PROF==" in text else ""
    cells = []
    for key, metrics in rows.items():
        name = key.split(":", 1)[1]
        figures = ", ".join(f"{k.split()[0].lower()} {v}" for k, v in metrics.items())
        cells.append(f"{name}: {figures}")
    return "; ".join(cells)


def model_keys(text: str) -> str:
    """The model step's figures: ``bench.perf_model --compare``'s last ``model vs measured: ...``
    line (rows matched, measured over predicted), else what its log says went wrong."""
    m = _last_match(r"^model vs measured: (.*)$", text)
    if m:
        return m.group(1).strip()
    err = _last_match(r"^error: (.*)$", text)
    return f"no comparison: {err.group(1).strip()}" if err else "no comparison in the log"


def keys(step: str, log: Path, json_path: Path | None = None) -> str:
    """The key figures of one step, from its log (and JSON for the bench steps)."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    if step == "model":
        return model_keys(text)
    if step.startswith("bench"):
        return bench_keys(text, json_path)
    if step.startswith("sanitizer") or step in ("memcheck", "racecheck"):
        parts = [p for p in (sanitizer_line(text), pytest_line(text)) if p]
        return "; ".join(parts)
    if step.startswith("pytest"):
        return pytest_line(text) or ""
    if step == "ncu":
        return ncu_keys(text)
    # env, build, info: the lines the step prints for the summary (prefixed 'key:')
    found = [m.group(1).strip() for m in re.finditer(r"^key: (.*)$", text, flags=re.MULTILINE)]
    return "; ".join(found)


# --------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------
def read_steps(tsv: Path) -> list[dict[str, str]]:
    """Rows written by gpu_check.sh: name, status, seconds, budget, key figures (tab-separated)."""
    rows = []
    if tsv.is_file():
        for line in tsv.read_text().splitlines():
            name, status, seconds, budget, *rest = [*line.split("\t"), "", "", "", ""][:5]
            rows.append({"step": name, "status": status, "seconds": seconds, "budget": budget, "keys": rest[0]})
    return rows


def out_problems(folder: Path) -> list[str]:
    """Where ``folder`` breaks what the lent machine brings back from $OUT."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink())
    problems = []
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files > {MAX_FILES}")
    for p in files:
        rel = p.relative_to(folder)
        if len(rel.parts) - 1 > MAX_DIR_DEPTH:
            problems.append(f"{rel}: deeper than {MAX_DIR_DEPTH} folders")
        if not all(SAFE_NAME.match(part) for part in rel.parts):
            problems.append(f"{rel}: name not in [A-Za-z0-9._-]")
        if p.is_symlink():
            problems.append(f"{rel}: a link")
        elif p.stat().st_size > MAX_FILE_BYTES:
            problems.append(f"{rel}: {p.stat().st_size} bytes > {MAX_FILE_BYTES}")
    return problems


def table(rows: list[dict[str, str]], width: int = 160) -> str:
    """Plain-text table of the steps (key figures cut to fit ``width``)."""
    head = f"{'step':<16} {'status':<10} {'secs':>5} {'budget':>6}  key figures"
    lines = [head, "-" * len(head)]
    for r in rows:
        room = max(20, width - 42)
        figures = r["keys"] if len(r["keys"]) <= room else r["keys"][: room - 3] + "..."
        lines.append(f"{r['step']:<16} {r['status']:<10} {r['seconds']:>5} {r['budget']:>6}  {figures}")
    return "\n".join(lines)


def summary(tsv: Path, md: Path, title: str, files_dir: Path | None, tails: Path | None) -> str:
    """Write ``summary.md``; return the plain-text table."""
    rows = read_steps(tsv)
    out = [f"# {title}", "", "| step | status | seconds | budget | key figures |", "| --- | --- | ---: | ---: | --- |"]
    out += [
        f"| {r['step']} | {r['status']} | {r['seconds']} | {r['budget']} | {r['keys'].replace('|', '/')} |"
        for r in rows
    ]
    if files_dir is not None:
        out += [
            "",
            "Files here: " + ", ".join(sorted(p.name for p in files_dir.iterdir() if p.name != md.name) + [md.name]),
        ]
        problems = out_problems(files_dir)
        out += [f"- over the lent machine's limits: {p}" for p in problems]
    if tails is not None and tails.is_dir():
        for r in rows:
            log = tails / f"{r['step']}.log"
            if r["status"] not in ("ok", "skipped") and log.is_file():
                tail = log.read_text(errors="replace").splitlines()[-25:]
                out += ["", f"## {r['step']}: last lines of its log", "", "```", *tail, "```"]
    md.write_text("\n".join(out) + "\n")
    return table(rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check_report")
    sub = p.add_subparsers(dest="cmd", required=True)
    for kind in ("phases", "variants"):
        s = sub.add_parser(kind, help=f"the wanted {kind} that bench_mlp offers, comma-separated")
        s.add_argument("wanted")
    s = sub.add_parser("keys", help="key figures of a step's log")
    s.add_argument("step")
    s.add_argument("log", type=Path)
    s.add_argument("json", type=Path, nargs="?")
    s = sub.add_parser("summary", help="write summary.md, print the table")
    s.add_argument("tsv", type=Path)
    s.add_argument("md", type=Path)
    s.add_argument("--title", default="torch_fastmlp GPU check")
    s.add_argument("--files", type=Path, help="the folder whose files come back (checked against the limits)")
    s.add_argument("--logs", type=Path, help="the step logs (the tails of failed steps go into summary.md)")
    s = sub.add_parser("check-out", help="exit 1 and name the problems if a folder breaks the $OUT limits")
    s.add_argument("folder", type=Path)
    args = p.parse_args(argv)
    if args.cmd in ("phases", "variants"):
        kept, missing = available(args.cmd, [w.strip() for w in args.wanted.split(",") if w.strip()])
        if missing:
            print(f"note: bench_mlp has no {args.cmd} {','.join(missing)} (yet): left out", file=sys.stderr)
        print(",".join(kept))
        return 0 if kept else 1
    if args.cmd == "keys":
        try:
            print(keys(args.step, args.log, args.json))
        except Exception as exc:  # noqa: BLE001 -- a summary must never fail on a strange log
            print(f"(key figures unreadable: {type(exc).__name__}: {exc})")
        return 0
    if args.cmd == "summary":
        print(summary(args.tsv, args.md, args.title, args.files, args.logs))
        return 0
    problems = out_problems(args.folder)
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
