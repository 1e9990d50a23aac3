"""Host memory of a multi-process run: the peak resident memory of each process of a command's tree.

    python experiments/performance/ddp_host_rss.py OUT.json -- python -m src.run trainer=ddp ...

Samples every process of the command's tree (the launcher and the DDP processes it starts) every 0.2 s and
writes, per process, its command line and peak RSS, plus the peak of their sum and the wall time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil


def main(argv: list[str]) -> int:
    out, sep, *command = argv
    if sep != "--" or not command:
        raise SystemExit(__doc__)
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    peaks: dict[int, dict] = {}
    peak_total = 0
    while proc.poll() is None:
        total = 0
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in tree:
            try:
                rss = p.memory_info().rss
                entry = peaks.setdefault(p.pid, {"cmdline": " ".join(p.cmdline())[:200], "peak_rss_gib": 0.0})
            except psutil.NoSuchProcess:
                continue
            entry["peak_rss_gib"] = max(entry["peak_rss_gib"], rss / 2**30)
            total += rss
        peak_total = max(peak_total, total)
        time.sleep(0.2)
    stderr = proc.stderr.read()
    result = {
        "command": command,
        "returncode": proc.returncode,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "peak_total_rss_gib": round(peak_total / 2**30, 3),
        "processes": [{**v, "peak_rss_gib": round(v["peak_rss_gib"], 3)} for v in peaks.values()],
        "stderr_tail": stderr[-1500:],
    }
    Path(out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("returncode", "wall_seconds", "peak_total_rss_gib")}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
