"""Write Jane Austen's novels as plain text files (../shared/DATA.md), for perplexity and LKD.

Source: Debian's r-cran-janeaustenr (R data, read with PyPI `rdata`; no R needed). Idempotent:
the files land in $FINEQUANT_CACHE/text (default ~/.cache/finequant/text) as <novel>.txt.
`--moby-dick` also writes mobydick.txt (Debian's r-cran-tokenizers; from "Call me Ishmael" to the end of
the novel): held-out text of another author and century (bench/results/ACCURACY.md, session 27).
"""
import gzip
import os
import struct
import subprocess
import sys
import tempfile
import warnings
import zlib
from pathlib import Path

NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")


def cache_dir() -> Path:
    root = Path(os.environ.get("FINEQUANT_CACHE", Path.home() / ".cache" / "finequant"))
    return root / "text"


def _read_r_data(rdx: Path, rdb: Path) -> dict:
    import rdata

    def parse(raw: bytes):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rdata warns that a bare serialization is "assumed RDS"
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = parse(gzip.decompress(rdx.read_bytes()))
    blob = rdb.read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        chunk = blob[int(offset):int(offset) + int(length)]
        (size,) = struct.unpack(">I", chunk[:4])  # big-endian length, then zlib data
        data = zlib.decompress(chunk[4:])
        assert len(data) == size, f"{name}: corrupt R data"
        out[str(name)] = parse(data)
    return out


def _debian_r_data(package: str, library: str) -> dict:
    """The R data objects of Debian package `package` (R library `library`), downloaded with apt-get."""
    with tempfile.TemporaryDirectory() as tmp:
        download = ["apt-get", "download", package]
        if subprocess.run(download, cwd=tmp, stdout=subprocess.DEVNULL).returncode != 0:
            subprocess.run(["apt-get", "update"], check=True, stdout=subprocess.DEVNULL)  # a new machine has no lists
            subprocess.run(download, cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        deb = next(Path(tmp).glob(f"{package}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")], check=True)
        data = next((Path(tmp) / "x").rglob(f"{library}/data"))
        return _read_r_data(data / "Rdata.rdx", data / "Rdata.rdb")


def prepare() -> Path:
    out = cache_dir()
    if all((out / f"{n}.txt").exists() for n in NOVELS):
        return out
    out.mkdir(parents=True, exist_ok=True)
    novels = _debian_r_data("r-cran-janeaustenr", "janeaustenr")
    for name in NOVELS:
        (out / f"{name}.txt").write_text("\n".join(str(line) for line in novels[name]) + "\n")
    return out


def prepare_moby_dick() -> Path:
    """mobydick.txt: the novel's text without Project Gutenberg's header and licence."""
    path = cache_dir() / "mobydick.txt"
    if path.exists():
        return path
    text = str(_debian_r_data("r-cran-tokenizers", "tokenizers")["mobydick"][0]).replace("\r\n", "\n")
    start, end = text.find("Call me Ishmael"), text.find("End of Project Gutenberg")
    if start < 0 or end < start:
        raise RuntimeError("r-cran-tokenizers' mobydick is not the expected Project Gutenberg text")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text[start:end])
    return path


def rotten_tomatoes():
    """(texts, labels) of the Rotten Tomatoes snippets labelled fresh (1) / rotten (0), in file order."""
    from finequant.evaluate import rotten_tomatoes as load  # the loader lives in the package (finequant eval)

    return load()


if __name__ == "__main__":
    print(prepare())
    if "--moby-dick" in sys.argv[1:]:
        print(prepare_moby_dick())
    sys.exit(0)
