"""Run every benchmark script of this folder and write one report, ``BENCHMARKS.md``.

    python benchmarks/run_all.py            # the full set (tens of minutes on 2 cores)
    python benchmarks/run_all.py --quick    # small settings: a smoke run of every script
    python benchmarks/run_all.py --only bench_buffer.py bench_calculator.py

Each ``bench_*.py`` runs as its own subprocess (one torch thread unless
``OMP_NUM_THREADS`` is set), one after the other, so they do not compete for the cores.
The report holds the machine (CPU model, cores, memory), the library versions, the date
and every script's output from this one run: Markdown tables are copied as they are,
other output goes into text blocks. A script that fails is reported (exit code and the
end of its stderr) and the others still run; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import re
import subprocess
import sys
import time
from importlib import metadata
from typing import Dict, List, Optional

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent

#: small settings for scripts without a ``--quick`` option of their own
QUICK_ARGS: Dict[str, List[str]] = {
    "bench_calculator.py": ["--repeats", "5", "--sizes", "32"],
    "bench_buffer.py": ["--frames", "40"],
    "bench_finetune.py": ["--base-epochs", "2", "--labels", "6", "--epochs", "2"],
}
PACKAGES = ("torch", "metatrain", "metatomic-torch", "metatomic-ase", "metatensor-torch",
            "ase", "numpy", "h5py", "tblite", "ase-petft")


# ---------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gb() -> Optional[float]:
    try:
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def versions() -> Dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    found["ase-petft"] += git_state()
    return found


def git_state() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return f" (git {commit}{', uncommitted changes' if dirty else ''})" if commit else ""


# ---------------------------------------------------------------------- running
def scripts(only: Optional[List[str]]) -> List[pathlib.Path]:
    found = sorted(HERE.glob("bench_*.py"))
    if only:
        wanted = {pathlib.Path(name).name for name in only}
        missing = wanted - {p.name for p in found}
        if missing:
            raise SystemExit(f"no such benchmark script(s): {sorted(missing)}; have "
                             f"{[p.name for p in found]}")
        found = [p for p in found if p.name in wanted]
    return found


def quick_args(script: pathlib.Path) -> List[str]:
    if re.search(r"""["']--quick["']""", script.read_text()):
        return ["--quick"]
    return QUICK_ARGS.get(script.name, [])


def run_script(script: pathlib.Path, args: List[str], timeout: float) -> Dict[str, object]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    command = [sys.executable, str(script), *args]
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        code = "timeout"
        out = _text(exc.stdout)
        err = _text(exc.stderr) + f"\n(killed after {timeout:.0f} s)"
    return {"script": script.name, "args": args, "returncode": code, "stdout": out,
            "stderr": err, "wall_s": time.perf_counter() - start,
            "description": docstring_summary(script)}


def _text(value) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def docstring_summary(script: pathlib.Path) -> str:
    match = re.match(r'\s*(?:[rRuU]?)"""(.*?)(?:\n\s*\n|""")', script.read_text(), re.S)
    return " ".join(match.group(1).split()) if match else ""


# ---------------------------------------------------------------------- report
def markdown_blocks(output: str) -> List[str]:
    """Markdown tables as they are; any other run of lines in a text block."""
    blocks, current, is_table = [], [], None
    for line in output.rstrip().splitlines():
        table_line = line.lstrip().startswith("|")
        if current and table_line != is_table:
            blocks.append(_block(current, is_table))
            current = []
        current.append(line)
        is_table = table_line
    if current:
        blocks.append(_block(current, is_table))
    return blocks


def _block(lines: List[str], is_table: bool) -> str:
    text = "\n".join(lines).strip("\n")
    return text if is_table else f"```text\n{text}\n```"


def script_section(result: Dict[str, object]) -> str:
    ok = result["returncode"] == 0
    command = " ".join(["python", f"benchmarks/{result['script']}", *result["args"]])
    lines = [f"## {result['script']}", "", result["description"], "",
             f"`{command}` — {result['wall_s']:.0f} s, "
             + ("ok" if ok else f"**failed** (exit code {result['returncode']})"), ""]
    if str(result["stdout"]).strip():
        lines += ["\n\n".join(markdown_blocks(str(result["stdout"]))), ""]
    if not ok:
        tail = "\n".join(str(result["stderr"]).rstrip().splitlines()[-20:])
        lines += ["stderr (last lines):", "", f"```text\n{tail}\n```", ""]
    return "\n".join(lines)


def render(results: List[Dict[str, object]], *, quick: bool, started: datetime.datetime,
           total_s: float) -> str:
    memory = memory_gb()
    head = [
        "# ase_petft benchmarks", "",
        f"Generated by `python benchmarks/run_all.py{' --quick' if quick else ''}` on "
        f"{started:%Y-%m-%d %H:%M} UTC in {total_s / 60:.1f} min. Every table below comes "
        "from this one run on this machine, scripts run one after the other; compare "
        "ratios measured side by side within a table, not absolute times across machines.",
        "" if not quick else "\n**Quick mode:** small settings, a smoke run — not the "
        "numbers to quote.",
        "", "## Machine", "", "| | |", "|---|---|",
        f"| CPU | {cpu_model()} |",
        f"| cores usable | {usable_cores()} (of {os.cpu_count()}) |",
        f"| memory | {memory:.1f} GB |" if memory else "| memory | unknown |",
        f"| OS | {platform.system()} {platform.release()} |",
        f"| threads | OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')} |",
        "", "## Versions", "", "| package | version |", "|---|---|",
        *(f"| {name} | {version} |" for name, version in versions().items()),
        "", "## Summary", "", "| script | wall time (s) | result |", "|---|---:|---|",
        *(f"| {r['script']} | {r['wall_s']:.0f} | "
          f"{'ok' if r['returncode'] == 0 else 'failed'} |" for r in results), "",
    ]
    return "\n".join(head + [script_section(r) for r in results])


def write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small settings for every script")
    parser.add_argument("--only", nargs="+", metavar="SCRIPT", help="run only these scripts")
    parser.add_argument("-o", "--output", type=pathlib.Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--timeout", type=float, default=3600.0,
                        help="seconds per script before it is killed (default 3600)")
    args = parser.parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    start = time.perf_counter()
    results = []
    for script in scripts(args.only):
        extra = quick_args(script) if args.quick else []
        print(f"running {script.name} {' '.join(extra)} ...", file=sys.stderr, flush=True)
        result = run_script(script, extra, args.timeout)
        status = "ok" if result["returncode"] == 0 else f"FAILED ({result['returncode']})"
        print(f"  {status} in {result['wall_s']:.0f} s", file=sys.stderr, flush=True)
        results.append(result)
    text = render(results, quick=args.quick, started=started,
                  total_s=time.perf_counter() - start)
    write_atomic(args.output, text)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0 if all(r["returncode"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
