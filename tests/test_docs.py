"""The documentation: every ```python block of README.md and docs/*.md runs (the blocks of one page in order, in a
namespace and working directory of the page's own; all pages in one subprocess with TRITON_INTERPRET=1 and a
timeout), the README is a front page, every relative link and anchor resolves, no page names an issue number, and
docs/benchmarks.md is what `bench report` generates.

A block that cannot run here starts with the line `# doc: skip (<reason>)`, e.g. `# doc: skip (needs CUDA)`;
such blocks are counted and must give a reason."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = re.compile(r"#\s*doc:\s*skip\b(.*)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
TIMEOUT = 300


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """(first line number, source) of every ```python block of a markdown file."""
    blocks, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip().startswith("```python"):
            start, i = i + 1, i + 1
            while not lines[i].strip().startswith("```"):
                i += 1
            blocks.append((start + 1, textwrap.dedent("\n".join(lines[start:i]))))
        i += 1
    return blocks


def skip_reason(source: str) -> str | None:
    first = source.strip().splitlines()[0] if source.strip() else ""
    m = SKIP.fullmatch(first.strip())
    return None if m is None else m.group(1).strip()


def runnable(path: Path) -> list[tuple[int, str]]:
    return [(line, src) for line, src in python_blocks(path) if skip_reason(src) is None]


RUNNER = """
import json, os, sys, time, traceback
results, top = {}, os.getcwd()
for page, blocks in PAGES_BLOCKS:
    os.makedirs(os.path.join(top, page.replace("/", "_")))
    os.chdir(os.path.join(top, page.replace("/", "_")))
    ns, t0, error = {"__name__": "__doc_example__"}, time.perf_counter(), None
    for line, source in blocks:
        try:
            exec(compile(source, f"{page}:{line}", "exec"), ns)
        except BaseException:
            error = f"block at {page}:{line} failed:\\n" + traceback.format_exc()
            break
    results[page] = dict(error=error, seconds=time.perf_counter() - t0)
json.dump(results, open(sys.argv[1], "w"))
"""


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.fixture(scope="module")
def example_results(tmp_path_factory):
    """Runs every page's blocks in one subprocess (torch is imported once), each page in a fresh namespace and
    working directory of its own; {page: {"error": traceback or None, "seconds": s}}."""
    work = tmp_path_factory.mktemp("doc_examples")
    pages = [(rel(p), runnable(p)) for p in PAGES if runnable(p)]
    env = dict(os.environ, TRITON_INTERPRET="1", MPLBACKEND="Agg",
               PYTHONPATH=str(ROOT / "python") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = work / "results.json"
    r = subprocess.run([sys.executable, "-c", f"PAGES_BLOCKS = {pages!r}\n{RUNNER}", str(out)], capture_output=True,
                       text=True, timeout=TIMEOUT, env=env, cwd=work)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("page", [p for p in PAGES if runnable(p)], ids=rel)
def test_examples_run(page, example_results):
    result = example_results[rel(page)]
    assert result["error"] is None, result["error"][-4000:]


def test_skipped_blocks_say_why():
    skipped = [(rel(p), line, skip_reason(src)) for p in PAGES for line, src in python_blocks(p)
               if skip_reason(src) is not None]
    for name, line, reason in skipped:
        assert re.fullmatch(r"\(.+\)", reason), f"{name}:{line}: write the reason: # doc: skip (needs CUDA)"
    total = sum(len(python_blocks(p)) for p in PAGES)
    print(f"{len(skipped)} of {total} python blocks skipped: {skipped}")
    assert len(skipped) < total / 2


def test_readme_is_a_front_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    out, fence = set(), False
    for line in path.read_text().splitlines():
        fence ^= line.strip().startswith("```")
        if not fence and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_relative_links_resolve(page):
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        assert dest.exists(), f"{rel(page)}: broken link {target}"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), f"{rel(page)}: no heading #{anchor} in {rel(dest)}"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_no_issue_numbers(page):
    found = re.findall(r"(?i)\bissues? \d+|\bissue #?\d+|(?<![\w&(])#\d+\b", page.read_text())
    assert not found, f"{rel(page)}: {found}"


def test_benchmarks_page_is_generated(monkeypatch):
    from diffsampler.bench import report

    monkeypatch.chdir(ROOT)  # the page names the JSON files relative to the repository root
    expected = report.page(Path("bench/results"), [8, 4, 128, 128], "smooth-16d")
    assert (ROOT / "docs" / "benchmarks.md").read_text() == expected, \
        "regenerate: python -m diffsampler.bench report --write docs/benchmarks.md"
