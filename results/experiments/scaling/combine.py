"""The sweep's measurements (run dirs: sweep, separate run, out dir) plus the separate d = 128, n = 2^27 run, plotted by the
experiment's own plot function (results/experiments/scaling/scaling.png)."""
import csv, sys
from pathlib import Path
from streamattn.experiments.scaling import _plots

def load(path):
    out = []
    for r in csv.DictReader(open(path)):
        m = {}
        for k, v in r.items():
            if k in ("source", "sampler"):
                m[k] = v
            elif v == "":
                m[k] = None
            else:
                m[k] = float(v) if any(c in v for c in ".e") else int(v)
        out.append(m)
    return out

def joined(run_dir):
    """measurements.csv rows with their results.csv columns (|U|, sample size, ...)."""
    key = lambda m: (m["n"], m["d"], m["source"], m["sampler"])
    res = {key(r): r for r in load(Path(run_dir) / "results.csv")}
    return [{**res[key(m)], **m} for m in load(Path(run_dir) / "measurements.csv")]

meas = joined(sys.argv[1])
extra = [m for m in joined(sys.argv[2]) if m["n"] == 2**27]
for m in extra:
    m["sample_size"] = None
print(len(meas), len(extra))
_plots(meas + extra, Path(sys.argv[3]))
