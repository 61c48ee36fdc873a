"""The documents: every page a file points at exists, with the section named.

Docstrings once cited notes that were never part of the repository; these
checks read every file git would commit and fail on such a reference.
"""

import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Reference notes that lived outside the repository and must not be cited.
_OUTSIDE_NOTES = re.compile(r"\b(?:PAPER|DATASETS|DESIGN)\.md\b")
# A docs page named anywhere ("docs/method.md#latent-inversion").
_DOCS_REF = re.compile(r"\bdocs/([\w.-]+\.md)(?:#([\w-]+))?")
# The target of a Markdown link or image: [text](target).
_MD_LINK = re.compile(r"\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^\s*```")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def _repo_text_files() -> dict[str, str]:
  """{path: text} of the files git tracks or would add (not ignored ones)."""
  try:
    out = subprocess.run(
      ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
      cwd=ROOT,
      capture_output=True,
      check=True,
    ).stdout
  except (OSError, subprocess.CalledProcessError):
    pytest.skip("not a git checkout")
  files = {}
  for name in filter(None, out.decode().split("\0")):
    path = ROOT / name
    if not path.is_file():  # deleted from the work tree, still in the index
      continue
    try:
      files[name] = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:  # images and other binaries
      continue
  return files


def _prose_lines(markdown: str):
  """The lines of a Markdown text outside fenced code blocks."""
  fenced = False
  for line in markdown.splitlines():
    if _FENCE.match(line):
      fenced = not fenced
    elif not fenced:
      yield line


def _anchors(markdown: str) -> set[str]:
  """GitHub's anchors of a page's headings: lower case, punctuation other
  than '-' and '_' dropped, spaces to '-'."""
  out = set()
  for line in _prose_lines(markdown):
    m = _HEADING.match(line)
    if m:
      out.add(re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-"))
  return out


def _check_target(path: pathlib.Path, anchor: str | None) -> str | None:
  """Why `path#anchor` does not resolve, or None when it does."""
  if not path.is_file():
    return f"{path.relative_to(ROOT)} does not exist"
  if anchor and anchor not in _anchors(path.read_text(encoding="utf-8")):
    return f"{path.relative_to(ROOT)} has no section #{anchor}"
  return None


def test_no_file_cites_the_outside_notes():
  bad = [
    f"{name}:{i}: {line.strip()}"
    for name, text in _repo_text_files().items()
    for i, line in enumerate(text.splitlines(), 1)
    if _OUTSIDE_NOTES.search(line)
  ]
  assert not bad, "cites notes that are not in the repository:\n" + "\n".join(bad)


def test_docs_pages_named_in_the_repository_exist():
  bad = []
  for name, text in _repo_text_files().items():
    for m in _DOCS_REF.finditer(text):
      why = _check_target(ROOT / "docs" / m.group(1), m.group(2))
      if why:
        bad.append(f"{name}: {m.group(0)}: {why}")
  assert not bad, "\n".join(bad)


def test_relative_markdown_links_resolve():
  bad = []
  pages = {n: t for n, t in _repo_text_files().items() if n.endswith(".md")}
  assert "docs/method.md" in pages and "README.md" in pages
  for name, text in pages.items():
    here = (ROOT / name).parent
    for line in _prose_lines(text):
      for m in _MD_LINK.finditer(line):
        target = m.group(1)
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
          continue
        file_part, _, anchor = target.partition("#")
        path = (here / file_part).resolve() if file_part else ROOT / name
        why = _check_target(path, anchor or None)
        if why:
          bad.append(f"{name}: ({target}): {why}")
  assert not bad, "\n".join(bad)


def test_readme_lists_every_docs_page():
  readme = (ROOT / "README.md").read_text(encoding="utf-8")
  linked = {m.group(1) for m in re.finditer(r"\]\(docs/([\w.-]+\.md)", readme)}
  pages = {p.name for p in (ROOT / "docs").glob("*.md")}
  assert pages <= linked, f"README does not link {sorted(pages - linked)}"
