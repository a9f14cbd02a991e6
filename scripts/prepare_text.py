"""Write Jane Austen's novels as plain text files (../shared/DATA.md), for perplexity and LKD.

Source: Debian's r-cran-janeaustenr (R data, read with PyPI `rdata`; no R needed). Idempotent:
the files land in $FINEQUANT_CACHE/text (default ~/.cache/finequant/text) as <novel>.txt.
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


def prepare() -> Path:
    out = cache_dir()
    if all((out / f"{n}.txt").exists() for n in NOVELS):
        return out
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        download = ["apt-get", "download", "r-cran-janeaustenr"]
        if subprocess.run(download, cwd=tmp, stdout=subprocess.DEVNULL).returncode != 0:
            subprocess.run(["apt-get", "update"], check=True, stdout=subprocess.DEVNULL)  # a new machine has no lists
            subprocess.run(download, cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        deb = next(Path(tmp).glob("r-cran-janeaustenr_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")], check=True)
        data = next((Path(tmp) / "x").rglob("janeaustenr/data"))
        novels = _read_r_data(data / "Rdata.rdx", data / "Rdata.rdb")
    for name in NOVELS:
        (out / f"{name}.txt").write_text("\n".join(str(line) for line in novels[name]) + "\n")
    return out


def rotten_tomatoes():
    """(texts, labels) of the Rotten Tomatoes snippets labelled fresh (1) / rotten (0), in file order."""
    from finequant.evaluate import rotten_tomatoes as load  # the loader lives in the package (finequant eval)

    return load()


if __name__ == "__main__":
    path = prepare()
    print(path)
    sys.exit(0)
