#!/usr/bin/env python3
"""Export ZOZOTOWN's production Bernoulli Thompson sampling priors as JSON.

The Open Bandit Pipeline (`obp`, by ZOZO Research, Apache-2.0) ships the Beta(alpha, beta)
priors that ZOZOTOWN's fashion e-commerce recommender used in production, per campaign
("all", "men", "women") and per item, in `obp/policy/conf/prior_bts.yaml`. This script
fetches obp 0.5.7 from PyPI with pip (download only: nothing is installed, and the file is
not vendored into this repository), reads that one member out of the wheel or sdist, parses
it with a small strict parser for exactly its structure (standard library only, no PyYAML):

    all:
      alpha:
        - 47.0
        ...
      beta:
        - 12198.0
        ...
    men:
      ...

and writes, atomically, to --out (default <cache>/zozotown-priors.json):

    {"source": "obp==0.5.7 obp/policy/conf/prior_bts.yaml", "sha256": "<of the yaml bytes>",
     "campaigns": {"all": {"alpha": [...], "beta": [...]}, "men": {...}, "women": {...}}}

Numbers are kept as the file's floats, in file order. Prints the output path on stdout and a
short summary on stderr. Exit codes: 0 ok, 2 usage, 3 pip download failed, 4 archive or
member missing, 5 parse or validation error, 6 output not written.

    python3 scripts/zozotown_priors.py [--cache DIR] [--out PATH]

Check:
    python3 scripts/zozotown_priors.py --cache /tmp/zz && python3 -c 'import json, math; \
d = json.load(open("/tmp/zz/zozotown-priors.json")); c = d["campaigns"]; \
assert list(c) == ["all", "men", "women"] and len(d["sha256"]) == 64; \
assert all(len(v["alpha"]) == len(v["beta"]) > 0 for v in c.values()); \
assert all(math.isfinite(x) and x > 0 for v in c.values() for x in v["alpha"] + v["beta"]); \
print({k: len(v["alpha"]) for k, v in c.items()})'
"""

import argparse
import hashlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

VERSION = "0.5.7"
MEMBER = "obp/policy/conf/prior_bts.yaml"
CAMPAIGNS = ("all", "men", "women")


class Fail(Exception):
    def __init__(self, code: int, msg: str):
        super().__init__(msg)
        self.code = code


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "banditflow"


def find_archive(d: Path) -> Path | None:
    found = sorted(d.glob(f"obp-{VERSION}-*.whl")) + sorted(d.glob(f"obp-{VERSION}.tar.gz"))
    return found[0] if found else None


def fetch(cache: Path) -> Path:
    """The obp archive in the cache, downloaded with pip if it is not there yet."""
    d = cache / f"obp-{VERSION}"
    archive = find_archive(d) if d.is_dir() else None
    if archive:
        return archive
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--ignore-requires-python",
           f"obp=={VERSION}", "-d", str(d)]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        last = (r.stdout.strip().splitlines() or ["no output"])[-1]
        raise Fail(3, f"pip download of obp=={VERSION} failed (exit {r.returncode}): {last}")
    archive = find_archive(d)
    if not archive:
        raise Fail(4, f"pip download succeeded but no obp-{VERSION} wheel or sdist is in {d}")
    return archive


def read_member(archive: Path) -> bytes:
    """The bytes of MEMBER from a wheel (zip) or sdist (tar.gz, under obp-VERSION/)."""
    wanted = (MEMBER, f"obp-{VERSION}/{MEMBER}")
    try:
        if archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as z:
                for name in wanted:
                    if name in z.namelist():
                        return z.read(name)
        else:
            with tarfile.open(archive, "r:gz") as t:
                for name in wanted:
                    try:
                        f = t.extractfile(name)
                    except KeyError:
                        continue
                    if f is not None:
                        return f.read()
    except (zipfile.BadZipFile, tarfile.TarError, OSError) as e:
        raise Fail(4, f"cannot read archive {archive}: {e}") from e
    raise Fail(4, f"member {MEMBER} missing from {archive.name}")


CAMPAIGN_RE = re.compile(r"([a-z]+):")
PARAM_RE = re.compile(r"  (alpha|beta):")
ITEM_RE = re.compile(r"    - ([0-9.eE+-]+)")


def parse(text: str) -> dict:
    """Parse exactly `campaign:` / `  alpha:`|`  beta:` / `    - <float>` lines (blank lines ok)."""
    out: dict[str, dict[str, list[float]]] = {}
    campaign = param = None
    for n, line in enumerate(text.splitlines(), 1):
        line = line.rstrip()
        if not line:
            continue
        if m := CAMPAIGN_RE.fullmatch(line):
            campaign, param = m[1], None
            if campaign in out:
                raise Fail(5, f"prior_bts.yaml line {n}: campaign {campaign!r} repeated")
            out[campaign] = {}
        elif (m := PARAM_RE.fullmatch(line)) and campaign:
            param = m[1]
            if param in out[campaign]:
                raise Fail(5, f"prior_bts.yaml line {n}: {campaign}.{param} repeated")
            out[campaign][param] = []
        elif (m := ITEM_RE.fullmatch(line)) and param:
            try:
                x = float(m[1])
            except ValueError:
                raise Fail(5, f"prior_bts.yaml line {n}: not a number: {m[1]!r}") from None
            if not (math.isfinite(x) and x > 0):
                raise Fail(5, f"prior_bts.yaml line {n}: {campaign}.{param} value {x} is not finite and > 0")
            out[campaign][param].append(x)
        else:
            raise Fail(5, f"prior_bts.yaml line {n}: unexpected structure: {line[:60]!r}")
    if tuple(out) != CAMPAIGNS:
        raise Fail(5, f"prior_bts.yaml: campaigns are {list(out)}, expected {list(CAMPAIGNS)}")
    for c, params in out.items():
        if list(params) != ["alpha", "beta"]:
            raise Fail(5, f"prior_bts.yaml: {c} has {list(params)}, expected ['alpha', 'beta']")
        if not params["alpha"] or len(params["alpha"]) != len(params["beta"]):
            raise Fail(5, f"prior_bts.yaml: {c} has {len(params['alpha'])} alpha "
                          f"and {len(params['beta'])} beta values")
    return out


def write_atomic(path: Path, data: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        raise Fail(6, f"cannot write {path}: {e}") from e


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=default_cache(),
                    help="cache directory (default: $XDG_CACHE_HOME/banditflow or ~/.cache/banditflow)")
    ap.add_argument("--out", type=Path, help="output JSON (default: <cache>/zozotown-priors.json)")
    args = ap.parse_args()
    out = args.out or args.cache / "zozotown-priors.json"
    try:
        raw = read_member(fetch(args.cache))
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Fail(5, f"prior_bts.yaml is not UTF-8: {e}") from None
        campaigns = parse(text)
        doc = {"source": f"obp=={VERSION} {MEMBER}",
               "sha256": hashlib.sha256(raw).hexdigest(),
               "campaigns": campaigns}
        write_atomic(out, json.dumps(doc, indent=1) + "\n")
    except Fail as e:
        print(f"zozotown_priors: error: {e}", file=sys.stderr)
        return e.code
    print(out)
    for c, p in campaigns.items():
        means = [a / (a + b) for a, b in zip(p["alpha"], p["beta"])]
        print(f"{c}: {len(means)} items, alpha/(alpha+beta) min {min(means):.5f} "
              f"median {statistics.median(means):.5f} max {max(means):.5f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
