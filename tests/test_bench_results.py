"""Every benchmark figure in the README's Benchmarks section comes from a committed results file.

A figure is a number in a table cell of that section, or a number with a unit (``x``, ``s``,
``tokens/s``, ``pairs/s``, ``GB``, ``MB``, ``GFLOP/s``) in its prose; dates, times, code blocks,
cells that say "to be re-measured" or "not run", and numbers marked ``~`` (arithmetic on backed
figures, said so in the text) are not figures. A figure written with d decimals is backed when a
number in some ``bench/results/*.json`` rounds to it (within half a unit of its last digit)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
UNMEASURED = ("to be re-measured", "not run")
NUMBER = r"(?<![\w.~-])(\d+(?:\.\d+)?)x?(?![\w.-])"
WITH_UNIT = r"(?<![\w.~-])(\d+(?:\.\d+)?)\s*(?:x\b|s\b|tokens/s|pairs/s|GB\b|MB\b|GFLOP/s)"
NOT_FIGURES = (r"\d{4}-\d{2}-\d{2}", r"\d{1,2}:\d{2}(?: UTC)?", r"`[^`]*`")  # dates, times, code


def benchmark_section(readme: str) -> str:
    start = readme.index("\n## Benchmarks")
    end = readme.find("\n## ", start + 1)
    return readme[start : end if end > 0 else None]


def _clean(text: str) -> str:
    for pattern in NOT_FIGURES:
        text = re.sub(pattern, " ", text)
    return re.sub(r"(\d)-(\d)", r"\1 \2", text)  # ranges: 170-272 is two figures


def figures(section: str) -> list[str]:
    """The figures of a README section, as written."""
    found, fenced = [], False
    for line in section.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if fenced or line.startswith("    ") or set(line.strip()) <= set("|-: "):
            continue
        if line.lstrip().startswith("|"):
            cells = [c for c in line.strip().strip("|").split("|") if not any(u in c for u in UNMEASURED)]
            found += [m for c in cells for m in re.findall(NUMBER, _clean(c))]
        else:
            found += re.findall(WITH_UNIT, _clean(line))
    return found


def numbers(value) -> list[float]:
    """Every number in a JSON value (bools are not numbers)."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [n for v in value for n in numbers(v)]
    return []


def results() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))}


def backed(figure: str, values: list[float]) -> bool:
    decimals = len(figure.partition(".")[2])
    half = 0.5 * 10**-decimals + 1e-9
    return any(abs(v - float(figure)) <= half for v in values)


def unbacked(readme: str, files: dict[str, dict]) -> list[str]:
    values = [n for data in files.values() for n in numbers(data)]
    return [f for f in figures(benchmark_section(readme)) if not backed(f, values)]


def test_every_benchmark_figure_in_the_readme_is_in_a_committed_results_file():
    files = results()
    assert files, "no bench/results/*.json"
    missing = unbacked((ROOT / "README.md").read_text(), files)
    assert not missing, f"README benchmark figures with no committed result behind them: {missing}"


@pytest.mark.parametrize("name", sorted(p.name for p in RESULTS.glob("*.json")))
def test_each_results_file_names_its_commit_date_and_cpu(name):
    data = json.loads((RESULTS / name).read_text())
    assert re.fullmatch(r"[0-9a-f]{40}", data.get("commit", "")), f"{name}: no full commit hash"
    assert re.match(r"\d{4}-\d{2}-\d{2}", data.get("date", "")), f"{name}: no date"
    assert data.get("cpu"), f"{name}: no cpu"
    assert name.startswith(data["date"][:10]), f"{name}: the file's date is not its measurement date"


def test_the_check_fails_on_an_unbacked_figure():
    readme = """# x

## Benchmarks

    python bench/x.py --pairs 64

| machine, 2026-12-01 05:17 UTC | pairs/s | ratio |
|---|---|---|
| AVX-512 box | 0.134 (0.130-0.140) | **1.90x** |
| GPU | to be re-measured 7.5 | not run 9.9 |

Earlier it was 0.61x the memory in 8.2 s, ~138 s by arithmetic, `--steps 3`.

## Next

| 12345 |
"""
    files = {"r.json": {"pairs_per_s": 0.1342, "min": 0.1301, "runs": [{"max": 0.1404}], "ratio": 1.899}}
    assert figures(benchmark_section(readme)) == ["0.134", "0.130", "0.140", "1.90", "0.61", "8.2"]
    assert unbacked(readme, files) == ["0.61", "8.2"]
    assert backed("239", [238.6]) and backed("47", [46.5]) and not backed("239", [238.4])
