"""Peak RSS of repeated fresh-process runs of one scaling job (the run-to-run spread)."""
import json, sys
from streamattn.experiments.scaling import ScalingConfig, _jobs, _run_child
n, d, k = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
cfg = ScalingConfig(n=[n], d=[d], source=["generator"], sampler=None)
job = _jobs(cfg)[0]
for i in range(k):
    r = _run_child(job)
    print(json.dumps({"n": n, "d": d, "run": i, "peak_rss_mib": r["peak_rss_bytes"] / 2**20,
                      "cpu_seconds": r["cpu_seconds"], "seconds": r["seconds"]}), flush=True)
