"""Checks that the pinned environments resolve from PyPI alone, without downloading them.

    python ci/check_pins.py

requirements-dev.txt must resolve on Linux x86-64 for every Python the package supports, and each
ci/requirements-transformers-*.txt on its own. pip resolves each in --dry-run mode, isolated from any
configuration (no local wheel folders, extra indexes or constraints: only https://pypi.org/simple), which fetches
package metadata only. Pins that contradict each other (say triton against what the pinned torch's wheel requires)
make the resolution fail, and so this check. pip judges the environment markers of a requirements file by the
Python that runs it, so the file's own markers are evaluated here for each target Python first.
"""

import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
PYTHONS = ("3.10", "3.11", "3.12", "3.13")
INDEX = "https://pypi.org/simple"
# a Linux x86-64 machine accepts manylinux wheels of every glibc up to its own; pip matches these tags exactly
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(17, 40)] + ["manylinux2014_x86_64", "linux_x86_64"]


def pins_for(requirements: Path, python: str) -> str:
    """The lines of `requirements` that apply to CPython `python`, without their markers."""
    environment = {"python_version": python, "python_full_version": python + ".0"}
    pins = []
    for line in requirements.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate(environment):
                requirement.marker = None
                pins.append(str(requirement))
    return "\n".join(pins) + "\n"


def resolve(requirements: Path, python: str):
    """(ok, what to print) for resolving `requirements` for CPython `python` on Linux x86-64."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull  # no pip.conf: no find-links, extra index or constraint of this machine
    with tempfile.TemporaryDirectory() as tmp:
        pins, report = Path(tmp) / "requirements.txt", Path(tmp) / "report.json"
        pins.write_text(pins_for(requirements, python))
        command = [
            sys.executable, "-m", "pip", "install", "--isolated", "--disable-pip-version-check", "--dry-run",
            "--ignore-installed", "--quiet", "--report", str(report), "--index-url", INDEX, "--only-binary=:all:",
            "--implementation", "cp", "--python-version", python, *(f"--platform={p}" for p in PLATFORMS),
            "--target", str(Path(tmp) / "target"), "-r", str(pins),
        ]
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
            return False, "\n".join(line[:400] for line in lines[-3:])
        installed = {item["metadata"]["name"].lower(): item["metadata"] for item in json.loads(report.read_text())["install"]}
    summary = [f"{name} {installed[name]['version']}" for name in ("torch", "triton", "transformers") if name in installed]
    if "torch" in installed:
        needs = [r.split(";")[0] for r in installed["torch"].get("requires_dist", []) if r.startswith("triton")]
        summary.append(f"(torch requires {', '.join(needs) or 'no triton'})")
    return True, ", ".join(summary)


def main():
    jobs = [(REPO / "requirements-dev.txt", python) for python in PYTHONS]
    jobs += [(path, "3.11") for path in sorted((REPO / "ci").glob("requirements-transformers-*.txt"))]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(lambda job: resolve(*job), jobs))
    failed = 0
    for (requirements, python), (ok, output) in zip(jobs, results):
        print(f"{'ok  ' if ok else 'FAIL'} {requirements.relative_to(REPO)}, Python {python}: " + output.replace("\n", "\n     "))
        failed += not ok
    if failed:
        sys.exit(f"{failed} pinned environment(s) do not resolve from PyPI: fix the pins above")


if __name__ == "__main__":
    main()
