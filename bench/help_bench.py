"""Benchmark `ctfix --help` as a user installs it (a wheel in a fresh virtual
environment, not this checkout's editable install), against a bare interpreter.

    .venv/bin/python -m bench.help_bench [--runs 21]

1. Builds a wheel of this checkout (`pip wheel --no-deps`) and installs it into a
   temporary venv (`--without-pip`; the wheel is unpacked by this venv's pip with
   `--target`). ctfix's dependencies are this checkout's venv's: a `.pth` file puts its
   site-packages *after* the new venv's own, so `import ctfix` finds the wheel while
   pyroute2, yaml, ... resolve as installed (the venv's own `.pth` files, which hold
   the editable install's finder, are not read from a path added so).
2. Alternately, `--runs` times: `python -c pass` (the reference: what any Python
   program costs to start), the wheel's `ctfix --help` and the editable install's
   `ctfix --help`; wall time of each process. Median, spread (min-max) and ratios.

Know before changing: figures are printed, never asserted; no root, no network
namespaces (building the wheel may fetch setuptools through pip, as any build does).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def wall(argv: list[str], cwd: Path) -> float:
    """Wall time of one run, from a directory outside the checkout (`python -m` puts
    the working directory first on sys.path)."""
    start = time.perf_counter()
    subprocess.run(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, cwd=cwd
    )
    return time.perf_counter() - start


def spread(values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    return f"median {statistics.median(ms):.0f} ms (min {ms[0]:.0f}, max {ms[-1]:.0f})"


def install(work: Path) -> Path:
    """A venv with the wheel of this checkout installed; its python."""
    wheels = work / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
        check=True,
    )
    wheel = next(wheels.glob("ctfix-*.whl"))
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    )  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
         str(wheel)],
        check=True,
    )  # fmt: skip
    (site / "zz_ctfix_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ctfix-help-"))
    try:
        python = install(work)
        where = subprocess.run(
            [str(python), "-c", "import ctfix; print(ctfix.__file__)"],
            capture_output=True, text=True, check=True, cwd=work,
        ).stdout.strip()  # fmt: skip
        print(f"wheel installed: ctfix imported from {where}")
        commands = {
            "python -c pass": [str(python), "-c", "pass"],
            "ctfix --help (wheel)": [str(python), "-m", "ctfix", "--help"],
            "ctfix --help (editable)": [sys.executable, "-m", "ctfix", "--help"],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for argv in commands.values():
            wall(argv, work)  # warm the page cache
        for _ in range(args.runs):
            for name, argv in commands.items():
                times[name].append(wall(argv, work))
        bare = statistics.median(times["python -c pass"])
        for name, values in times.items():
            ratio = statistics.median(values) / bare
            print(f"{name}: {spread(values)}; ratio to a bare interpreter {ratio:.2f}")
        wheel = statistics.median(times["ctfix --help (wheel)"])
        print(f"goal: ctfix --help (wheel) < 150 ms: {'met' if wheel < 0.150 else 'NOT met'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
