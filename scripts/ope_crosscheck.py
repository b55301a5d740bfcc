#!/usr/bin/env python3
"""Cross-checks `banditflow evaluate` against the Open Bandit Pipeline's own estimators.

The Open Bandit Dataset sample that ships inside obp 0.5.7 (ZOZOTOWN, campaign "all", 10,000
rounds logged by the uniform random policy and 10,000 by Bernoulli Thompson sampling, 80
items, 3 positions) is fetched with `pip download` (not vendored) and converted to a banditflow
recording: one impression per round (the item at its position with its logged propensity) and
a click feedback for every clicked round. `banditflow evaluate --rounds` evaluates two policies
on each log (epsilon-greedy, whose placement probabilities are exact, and Thompson sampling,
estimated by Monte Carlo) and writes every round's evaluation-policy distribution and
direct-method rewards over the 80 items at the logged position. obp's
InverseProbabilityWeighting, SelfNormalizedInverseProbabilityWeighting and DoublyRobust are
then run on exactly those arrays; their policy values must equal banditflow's to 1e-9.
(obp's estimators read action_dist and the regression model only at the logged position; the
other positions' columns are filled with the same, valid distribution.)

obp and its numerical dependencies are installed from PyPI into a virtual environment under
the cache (~/.cache/banditflow/ope-venv, about 6 GB with torch, which obp imports; 2-3 minutes
the first time). Prints one JSON object with every figure on stdout; exit code 0 when all agree,
1 on a mismatch, 2 on a usage or setup error.

    python3 scripts/ope_crosscheck.py --banditflow target/release/banditflow [--work DIR]
    python3 scripts/ope_crosscheck.py --install     # only the virtual environment (scripts/test.sh)
"""

import argparse
import csv
import datetime
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

OBP = "obp==0.5.7"
# obp 0.5.7's wheel pins torch==1.12, which has no build for this Python; obp is installed
# without its dependencies and these are installed beside it (the versions verified here).
DEPS = [
    "numpy==1.26.4",
    "pandas==3.0.6",
    "scikit-learn==1.9.1",
    "scipy==1.17.1",
    "torch==2.15.0",
    "tqdm==4.70.1",
    "PyYAML==6.0.4",
    "matplotlib==3.11.2",
    "seaborn==0.13.2",
    "mypy_extensions==1.2.0",
]
TOLERANCE = 1e-9
POLICIES = {
    "greedy": '[policy]\nstrategy = "greedy"\nepsilon = 0.1\n',
    "thompson": '[policy]\nstrategy = "thompson"\nepsilon = 0.05\n',
}
CONFIG = """
[input]
topics = [
  { name = "impressions", role = "impressions", encoding = "json" },
  { name = "feedback", role = "feedback", encoding = "json" },
]

[rewards]
click = { reward = 1.0, window = "1h" }
scale = 1.0

[[models]]
id = "obd"
algorithm = "beta"
position_model = "pbm"
examination = "estimated"
half_life = "3650d"
prior = { alpha = 1.0, beta = 99.0 }
"""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "banditflow"


def venv_python() -> Path:
    """The cross-check's virtual environment, created and filled on first use."""
    venv = cache_dir() / "ope-venv"
    python = venv / "bin" / "python"
    marker = venv / ".complete"
    want = "\n".join([OBP] + DEPS)
    if marker.exists() and marker.read_text() == want:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run(pip + DEPS, check=True)
    subprocess.run(pip + ["--no-deps", "--ignore-requires-python", OBP], check=True)
    marker.write_text(want)
    return python


def obd_csv(work: Path, policy: str) -> Path:
    """obp's bundled Open Bandit Dataset sample for `policy` ("random" or "bts"), campaign "all"."""
    out = work / f"obd-{policy}.csv"
    if out.exists():
        return out
    dl = work / "obp-download"
    dl.mkdir(exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--ignore-requires-python",
         "--no-binary", ":all:", "-d", str(dl), OBP],
        check=True,
    )
    sdist = next(dl.glob("obp-*.tar.gz"))
    member = f"obp-0.5.7/obp/dataset/obd/{policy}/all/all.csv"
    with tarfile.open(sdist) as t:
        data = t.extractfile(member)
        if data is None:
            raise SystemExit(f"{member} missing from {sdist}")
        out.write_bytes(data.read())
    return out


def to_recording(csv_path: Path, rec_path: Path) -> list:
    """Writes the recording; returns the rounds as (item, position, click, pscore)."""
    rounds = []
    lines = []
    offsets = {"impressions": 0, "feedback": 0}

    def put(topic, key, ts, payload):
        lines.append(json.dumps({
            "topic": topic, "partition": 0, "offset": offsets[topic], "timestamp": ts,
            "key": key, "payload": json.dumps(payload, separators=(",", ":")),
        }, separators=(",", ":")))
        offsets[topic] += 1

    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            n = int(row[""])
            t = datetime.datetime.fromisoformat(row["timestamp"])
            ms = int(t.timestamp() * 1000)
            item = f"item-{int(row['item_id']):02d}"
            pos = int(row["position"])
            click = int(row["click"])
            pscore = float(row["propensity_score"])
            rid = f"obd-{n}"
            put("impressions", rid, ms, {
                "impression_id": rid, "event_time_ms": ms, "model_id": "obd",
                "context": {"segment": row["user_feature_0"]},
                "slate": [{"item_id": item, "position": pos, "propensity": pscore}],
            })
            if click:
                put("feedback", rid, ms, {
                    "impression_id": rid, "item_id": item, "position": pos, "kind": "click",
                    "event_time_ms": ms,
                })
            rounds.append((item, pos, click, pscore))
    rec_path.write_text("\n".join(lines) + "\n")
    return rounds


OBP_SIDE = r"""
import json, sys
import numpy as np
from obp.ope import (InverseProbabilityWeighting, SelfNormalizedInverseProbabilityWeighting,
                     DoublyRobust)
catalog, rows = None, []
for line in open(sys.argv[1]):
    d = json.loads(line)
    if "catalog" in d:
        catalog = d["catalog"]
    else:
        rows.append(d)
n, k = len(rows), len(catalog)
len_list = max(r["position"] for r in rows)
reward = np.array([r["reward"] for r in rows], dtype=float)
action = np.array([r["action"] for r in rows], dtype=int)
position = np.array([r["position"] - 1 for r in rows], dtype=int)
pscore = np.array([r["pscore"] for r in rows], dtype=float)
pi = np.array([r["pi"] for r in rows], dtype=float)
q = np.array([r["q"] for r in rows], dtype=float)
# Every position's column holds the logged position's vectors (only that one is read).
action_dist = np.repeat(pi[:, :, None], len_list, axis=2)
q_hat = np.repeat(q[:, :, None], len_list, axis=2)
args = dict(reward=reward, action=action, position=position, pscore=pscore, action_dist=action_dist)
out = {
    "rounds": n,
    "ipw": float(InverseProbabilityWeighting().estimate_policy_value(**args)),
    "snipw": float(SelfNormalizedInverseProbabilityWeighting().estimate_policy_value(**args)),
    "dr": float(DoublyRobust().estimate_policy_value(estimated_rewards_by_reg_model=q_hat, **args)),
}
print(json.dumps(out))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--banditflow", help="path of the banditflow binary")
    ap.add_argument("--work", help="working directory (default: a temporary one)")
    ap.add_argument("--install", action="store_true", help="only make the virtual environment")
    args = ap.parse_args()
    if args.install:
        print(venv_python())
        return 0
    if not args.banditflow:
        print("--banditflow is required", file=sys.stderr)
        return 2
    binary = Path(args.banditflow)
    if not binary.exists():
        print(f"no banditflow binary at {binary}", file=sys.stderr)
        return 2
    python = venv_python()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="ope-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    ok = True
    for log in ("random", "bts"):
        rec = work / f"obd-{log}.jsonl"
        rounds = to_recording(obd_csv(work, log), rec)
        for name, policy in POLICIES.items():
            cfg = work / f"{name}.toml"
            cfg.write_text(policy + CONFIG)
            dump = work / f"rounds-{log}-{name}.jsonl"
            ev = subprocess.run(
                [str(binary), "evaluate", "--input", str(rec), "--config", str(cfg), "--json",
                 "--rounds", str(dump), "--samples", "200"],
                check=True, capture_output=True, text=True,
            )
            ours = json.loads(ev.stdout)["models"][0]["report"]
            theirs = json.loads(subprocess.run(
                [str(python), "-c", OBP_SIDE, str(dump)], check=True, capture_output=True, text=True,
            ).stdout)
            row = {"log": log, "policy": name, "rounds": ours["rounds"], "obd_rounds": len(rounds),
                   "clicks": sum(r[2] for r in rounds)}
            for est in ("ipw", "snipw", "dr"):
                a, b = ours[est]["value"], theirs[est]
                diff = abs(a - b)
                agree = ours["rounds"] == theirs["rounds"] == len(rounds) and diff <= TOLERANCE * max(1.0, abs(b))
                ok &= agree
                row[est] = {"banditflow": a, "obp": b, "abs_diff": diff, "agree": agree,
                            "low": ours[est]["low"], "high": ours[est]["high"]}
            row["effective_sample_size"] = ours["effective_sample_size"]
            row["logged"] = ours["logged"]["value"]
            results.append(row)
            print(f"{log:>6} log, {name:>8}: " + ", ".join(
                f"{e} {row[e]['banditflow']:.6f} vs obp {row[e]['obp']:.6f} (|Δ| {row[e]['abs_diff']:.1e})"
                for e in ("ipw", "snipw", "dr")), file=sys.stderr)
    print(json.dumps({"tolerance": TOLERANCE, "agree": ok, "results": results}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
