"""Every named design note that the code, tests or docs cite exists, once, where the citation says.

A note is defined by a comment line holding only its title, ``# NOTE [name]``, followed by its text;
anything else that names it is a citation. A citation in the library must find its note in the library
(not in tests/), and one that says where (``... in pyramidflow/_utils.py``, ``in :mod:`.checks```) must
find it in that file: a note renamed or moved without its citations fails here.
"""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("pyramidflow", "tests", "benchmarks", "docs", "README.md")
_TAG = "NOTE"  # spelled apart so that this file's own patterns are not read as citations
DEFINITION = re.compile(rf"^\s*# {_TAG} \[([^\]\n]+)\]\s*$")
CITATION = re.compile(rf"{_TAG}\s+\[([^\]]+)\]")
# What may follow a citation to say where the note is: a path, or a module (absolute or relative).
LOCATION = re.compile(r"\]`{0,2}\s+in\s+(?::mod:)?`*([A-Za-z0-9_./]+)")


def _files():
    for name in SCANNED:
        path = REPO / name
        for file in [path] if path.is_file() else sorted(path.rglob("*")):
            if file.suffix in (".py", ".md") and file.is_file() and file != Path(__file__).resolve():
                yield file.relative_to(REPO).as_posix(), file.read_text(encoding="utf-8")


def _scan():
    definitions, citations = {}, []
    for path, text in _files():
        lines = text.splitlines()
        for number, line in enumerate(lines, 1):
            match = DEFINITION.match(line)
            if match:
                definitions.setdefault(match.group(1), []).append(path)
        for match in CITATION.finditer(text):
            number = text.count("\n", 0, match.start()) + 1
            if DEFINITION.match(lines[number - 1]):
                continue
            name = re.sub(r"\s*\n\s*(#\s*)?", " ", match.group(1)).strip()  # a title wrapped over two lines
            where = LOCATION.match(text, match.end() - 1)
            citations.append((path, number, name, where.group(1).rstrip(".,`") if where else None))
    return definitions, citations


def _module_path(module: str, citing: str) -> str:
    """``pyramidflow.data._io`` or ``.checks`` (relative to the citing file's package) as a path without suffix."""
    if module.startswith("."):
        package = citing.rsplit("/", 1)[0].split("/")
        dots = len(module) - len(module.lstrip("."))
        module = ".".join(package[: len(package) - dots + 1] + [module.lstrip(".")])
    return module.replace(".", "/")


def _names_file(location: str, citing: str, defined_in: str):
    """Whether ``location`` names the file ``defined_in``; ``None`` when it is no location ("in the engine")."""
    if location.endswith(".py") or "/" in location:
        return defined_in == location or defined_in.endswith("/" + location)
    if "." not in location and location != "pyramidflow":
        return None
    stem = _module_path(location, citing)
    return defined_in in (stem + ".py", stem + "/__init__.py")


def test_every_note_is_defined_once():
    definitions, _ = _scan()
    twice = {name: paths for name, paths in definitions.items() if len(paths) > 1}
    assert not twice, f"notes defined more than once (keep one, cite it from the others): {twice}"


def test_every_citation_finds_its_note_where_it_says():
    definitions, citations = _scan()
    assert len(citations) > 50 and len(definitions) > 30  # the scan reads the repository
    problems = []
    for path, number, name, location in citations:
        defined = definitions.get(name)
        if not defined:
            problems.append(f"{path}:{number}: NOTE [{name}] is defined nowhere")
            continue
        if path.startswith("pyramidflow/") and not defined[0].startswith("pyramidflow/"):
            problems.append(f"{path}:{number}: the library cites NOTE [{name}], defined only in {defined[0]}")
        if location is not None and _names_file(location, path, defined[0]) is False:
            problems.append(f"{path}:{number}: NOTE [{name}] is said to be in {location}, but is in {defined[0]}")
    assert not problems, "\n".join(problems)
