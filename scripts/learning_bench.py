#!/usr/bin/env python3
"""The learning benchmark's Python peers and its report.

`cargo bench --bench learning` runs banditflow's policies and exports the simulated shop
(`shop.json`: the ZOZOTOWN-calibrated catalogues with their appeal before and after the trend
shift, the traffic mix, the examination curve, and the context variant's truth). This script
runs the same simulator (slates of 3, position-biased clicks, the trend shift) for the
peers people would pick instead, installed from PyPI into a venv of their own (the shift after `shift_at` impressions, as for
banditflow):

- Vowpal Wabbit 9.11.9, `--cb_explore_adf` with epsilon-greedy (ε 0.05) and with SquareCB;
- MABWiser 2.7.4, Thompson sampling (one bandit per campaign) and LinTS (context variant);
- uniform random and the oracle (analytic: expected clicks under the truth).

Peers are per-decision bandits: a slate is their ranking (VW: drawn without replacement from
its pmf; MABWiser: its sampled expectations, best first), and they learn every placement as a
decision with its click. Then it prints the table for BENCHMARKS.md (CTR relative to uniform
random over the whole run and cumulative regret, mean and 95 % interval over seeds, wall time
per impression) for banditflow and the peers on the common prefix (`--impressions`, `--seeds`),
and writes `learning.json` for the plots (`cargo run --release -- plot-learning`).

Run: `python3 scripts/learning_bench.py --install`, then
`python3 scripts/learning_bench.py --dir target/learning --impressions 200000 --seeds 3`.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

BATCH = 1000
VENV = os.path.join(os.path.expanduser("~"), ".cache", "banditflow", "peers-venv")
PACKAGES = ["vowpalwabbit==9.11.9", "mabwiser==2.7.4"]


def install():
    py = os.path.join(VENV, "bin", "python")
    if not os.path.exists(py):
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    check = subprocess.run([py, "-c", "import vowpalwabbit, mabwiser"], capture_output=True)
    if check.returncode != 0:
        subprocess.run([py, "-m", "pip", "install", "--quiet", *PACKAGES], check=True)
    return py


def in_venv():
    return os.path.realpath(sys.prefix) == os.path.realpath(VENV)


class Shop:
    """The simulator: the same truth and process as benches/learning.rs."""

    def __init__(self, shop, variant, n, rng):
        self.exam = shop["examination"]
        self.shift_at = shop["shift_at"]
        self.variant = variant
        self.n = n
        self.rng = rng
        if variant == "context":
            c = shop["context"]
            self.catalogues = [("all", c["items"])]
            self.traffic = [1.0]
            self.features = c["features"]
            self.base = c["base"]
            self.weights = c["weights"]
        else:
            z = shop["zozotown"]
            self.catalogues = [(c["segment"], c["items"]) for c in z["campaigns"]]
            self.appeal = [c["appeal"] for c in z["campaigns"]]
            self.after = [c["after_shift"] for c in z["campaigns"]]
            self.traffic = z["traffic"]

    def visit(self, t):
        """(campaign index, context features or None, true rates of its items)."""
        u = self.rng.random()
        acc, c = 0.0, len(self.traffic) - 1
        for i, s in enumerate(self.traffic):
            acc += s
            if u < acc:
                c = i
                break
        if self.variant == "context":
            x = [self.rng.uniform(-0.5, 0.5) for _ in self.features]
            rates = [b + sum(w * v for w, v in zip(ws, x)) for b, ws in zip(self.base, self.weights)]
            return c, x, rates
        rates = self.after[c] if self.variant == "shift" and t >= self.shift_at else self.appeal[c]
        return c, None, rates

    def benchmarks(self, rates):
        best = sorted(rates, reverse=True)
        oracle = sum(a * e for a, e in zip(best, self.exam))
        return oracle, sum(self.exam) * sum(rates) / len(rates)


class Random:
    def __init__(self, shop, rng, **_):
        self.rng = rng

    def slate(self, c, x, items, k):
        return self.rng.sample(range(len(items)), k)

    def learn(self, c, x, items, placed, clicks):
        pass


class Oracle:
    def __init__(self, shop, rng, **_):
        self.rates = None

    def slate(self, c, x, items, k):
        return sorted(range(len(items)), key=lambda i: -self.rates[i])[:k]

    def learn(self, c, x, items, placed, clicks):
        pass


class VowpalWabbit:
    def __init__(self, shop, rng, args):
        import vowpalwabbit

        self.rng = rng
        self.vw = vowpalwabbit.Workspace(f"--cb_explore_adf {args} --quiet --random_seed {rng.randrange(1 << 30)}")
        self.shop = shop

    def _shared(self, c, x):
        shared = f"shared |s campaign={self.shop.catalogues[c][0]}"
        if x is not None:
            shared += " " + " ".join(f"{f}:{v:.6f}" for f, v in zip(self.shop.features, x))
        return shared

    def slate(self, c, x, items, k):
        pmf = self.vw.predict([self._shared(c, x)] + [f"|a item={item}" for item in items])
        self.pmf = pmf
        chosen, weights = [], list(pmf)
        for _ in range(k):
            total = sum(weights)
            u, acc, pick = self.rng.random() * total, 0.0, None
            for i, w in enumerate(weights):
                acc += w
                if u < acc and w > 0:
                    pick = i
                    break
            if pick is None:
                pick = max((i for i in range(len(weights)) if i not in chosen), key=lambda i: weights[i])
            chosen.append(pick)
            weights[pick] = 0.0
        return chosen

    def learn(self, c, x, items, placed, clicks):
        # Each placement a decision with its probability under the pmf (the first drawn from
        # the pmf; later ones renormalised over what was left), cost −click. The learn
        # example holds the shared features and the chosen action only: cb_explore_adf's
        # default reduction (MTR) updates the chosen action's regressor alone, so the other
        # actions change nothing but the time it takes (measured: 0.63 ms against 0.03 ms).
        left = 1.0
        shared = self._shared(c, x)
        for i, click in zip(placed, clicks):
            p = max(self.pmf[i] / left, 1e-6) if left > 0 else 1.0
            left -= self.pmf[i]
            self.vw.learn([shared, f"0:{-float(click)}:{min(p, 1.0)} |a item={items[i]}"])


class Mabwiser:
    """MABWiser, updated in batches of `BATCH` impressions (the batch size of banditflow's
    batched policies): it predicts a whole batch in one call and learns it in one partial_fit
    (per impression it costs 1–18 ms, which would take days here)."""

    batched = True

    def __init__(self, shop, rng, args):
        from mabwiser.mab import MAB, LearningPolicy

        self.shop = shop
        self.linear = args == "lints"
        policy = LearningPolicy.LinTS() if self.linear else LearningPolicy.ThompsonSampling()
        self.bandits = [
            MAB(arms=list(range(len(items))), learning_policy=policy, seed=rng.randrange(1 << 30))
            for _, items in shop.catalogues
        ]
        self.fitted = [False] * len(self.bandits)
        self.rng = rng

    def slates(self, visits, k):
        """Slates for a batch of visits [(campaign, context, rates)], from the model as it is."""
        import numpy as np

        out = [None] * len(visits)
        for c, bandit in enumerate(self.bandits):
            rows = [j for j, v in enumerate(visits) if v[0] == c]
            if not rows:
                continue
            n_items = len(self.shop.catalogues[c][1])
            if not self.fitted[c]:
                for j in rows:
                    out[j] = self.rng.sample(range(n_items), k)
                continue
            if self.linear:
                xs = np.array([visits[j][1] for j in rows])
            else:
                xs = np.zeros((len(rows), 1))
            es = bandit.predict_expectations(xs)
            if isinstance(es, dict):
                es = [es]
            for j, e in zip(rows, es):
                out[j] = sorted(range(n_items), key=lambda i: -e[i])[:k]
        return out

    def learn_batch(self, visits, slates, clicks):
        for c, bandit in enumerate(self.bandits):
            d, r, xs = [], [], []
            for (vc, x, _), placed, cl in zip(visits, slates, clicks):
                if vc != c:
                    continue
                d.extend(placed)
                r.extend(cl)
                if self.linear:
                    xs.extend([x] * len(placed))
            if not d:
                continue
            kw = {"contexts": xs} if self.linear else {}
            if self.fitted[c]:
                bandit.partial_fit(d, r, **kw)
            else:
                bandit.fit(d, r, **kw)
                self.fitted[c] = True


PEERS = {
    "uniform random": (Random, None, ["zozotown", "shift", "context"]),
    "oracle": (Oracle, None, ["zozotown", "shift", "context"]),
    "VW cb_explore_adf, epsilon-greedy 0.05": (VowpalWabbit, "--epsilon 0.05", ["zozotown", "shift", "context"]),
    "VW cb_explore_adf, SquareCB": (VowpalWabbit, "--squarecb", ["zozotown", "shift", "context"]),
    "MABWiser TS": (Mabwiser, "ts", ["zozotown", "shift", "context"]),
    "MABWiser LinTS": (Mabwiser, "lints", ["context"]),
}


def run_peer(shop_json, variant, name, n, seed, checkpoints):
    import random as pyrandom

    cls, args, _ = PEERS[name]
    rng = pyrandom.Random(seed * 7919 + 17)
    shop = Shop(shop_json, variant, n, pyrandom.Random(seed * 104729 + 3))
    policy = cls(shop=shop, rng=rng, args=args)
    got = best = rand = 0.0
    out, every = [], max(n // checkpoints, 1)
    k = len(shop.exam)
    batched = getattr(policy, "batched", False)
    t = 0
    while t < n:
        # A batched policy gets a whole batch of visits at once; the others one at a time.
        size = min(BATCH if batched else 1, n - t)
        visits = [shop.visit(t + j) for j in range(size)]
        if batched:
            slates = policy.slates(visits, k)
        else:
            if isinstance(policy, Oracle):
                policy.rates = visits[0][2]
            c, x, _ = visits[0]
            slates = [policy.slate(c, x, shop.catalogues[c][1], k)]
        all_clicks = []
        for (c, x, rates), placed in zip(visits, slates):
            clicks = []
            for p, i in enumerate(placed):
                q = shop.exam[p] * rates[i]
                got += q
                clicks.append(1 if rng.random() < q else 0)
            all_clicks.append(clicks)
            o, r = shop.benchmarks(rates)
            best += o
            rand += r
            t += 1
            if t % every == 0:
                out.append([t, got, best, rand])
        if batched:
            policy.learn_batch(visits, slates, all_clicks)
        else:
            c, x, _ = visits[0]
            policy.learn(c, x, shop.catalogues[c][1], slates[0], all_clicks[0])
    return out


def interval(values):
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    return m, 1.959963984540054 * sd / math.sqrt(len(values))


def at(run, n):
    """The checkpoint at n impressions (the last at or before it)."""
    row = run[0]
    for r in run:
        if r[0] <= n:
            row = r
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--install", action="store_true")
    ap.add_argument("--dir", default="target/learning")
    ap.add_argument("--impressions", type=int, default=200_000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--variants", default="zozotown,shift,context")
    ap.add_argument("--no-report", action="store_true", help="run the peers only")
    ap.add_argument("--peers", default=";".join(PEERS), help="peer names separated by ;")
    a = ap.parse_args()
    if a.install:
        install()
        return
    if not in_venv():
        py = install()
        os.execv(py, [py, *sys.argv])
    with open(os.path.join(a.dir, "shop.json")) as f:
        shop = json.load(f)
    checkpoints = shop["checkpoints"]
    peers_path = os.path.join(a.dir, "peers.json")
    results = []
    if os.path.exists(peers_path):
        with open(peers_path) as f:
            results = json.load(f)
    done = {(r["variant"], r["policy"], r["impressions"], r["seeds"]) for r in results}
    for variant in a.variants.split(","):
        for name in a.peers.split(";"):
            if variant not in PEERS[name][2] or (variant, name, a.impressions, a.seeds) in done:
                continue
            start = time.time()
            runs = [run_peer(shop, variant, name, a.impressions, s, checkpoints) for s in range(a.seeds)]
            wall = time.time() - start
            last = [r[-1][1] / r[-1][3] for r in runs]
            print(f"{variant:9} {name:40} CTR/random {sum(last) / len(last):.3f}  {wall:.0f} s", file=sys.stderr)
            results.append(
                {"variant": variant, "policy": name, "impressions": a.impressions, "seeds": a.seeds, "wall_s": wall, "runs": runs}
            )
            with open(peers_path, "w") as f:
                json.dump(results, f)
    if a.no_report:
        return
    with open(os.path.join(a.dir, "banditflow.json")) as f:
        ours = json.load(f)
    report(ours, results, a.impressions, a.seeds, a.dir)


def report(ours, peers, n, seeds, out_dir):
    rows = []
    for r in ours + [p for p in peers if p["impressions"] >= n and p["seeds"] >= seeds]:
        runs = r["runs"][:seeds]
        ratio = [at(x, n)[1] / at(x, n)[3] for x in runs]
        regret = [at(x, n)[2] - at(x, n)[1] for x in runs]
        full = None
        if r["impressions"] > n:
            full = interval([x[-1][1] / x[-1][3] for x in r["runs"]])
        per_impr = r["wall_s"] / (r["impressions"] * len(r["runs"])) * 1e6
        rows.append((r["variant"], r["policy"], interval(ratio), interval(regret), per_impr, full, len(r["runs"]), r["impressions"]))
    print(f"\nOn the common prefix: {n:,} impressions × {seeds} seeds (mean ± 95 % interval over seeds).\n")
    for variant in ["zozotown", "shift", "context"]:
        vrows = [x for x in rows if x[0] == variant]
        if not vrows:
            continue
        print(f"**{variant}**\n")
        print("| policy | CTR / random | cumulative regret (clicks) | wall µs / impression | over the full run |")
        print("|---|---:|---:|---:|---|")
        for _, name, (rm, rh), (gm, gh), us, full, s, imps in sorted(vrows, key=lambda x: -x[2][0]):
            tail = f"{full[0]:.3f} ± {full[1]:.3f} ({imps:,} × {s} seeds)" if full else ""
            print(f"| {name} | {rm:.3f} ± {rh:.3f} | {gm:,.0f} ± {gh:,.0f} | {us:.1f} | {tail} |")
        print()
    with open(os.path.join(out_dir, "learning.json"), "w") as f:
        json.dump({"banditflow": ours, "peers": peers, "prefix": n, "seeds": seeds}, f)


if __name__ == "__main__":
    main()
