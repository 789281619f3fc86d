#!/usr/bin/env python3
"""Plots of a scripts/perf-suite results folder: latency vs size and bandwidth vs size (PNG).

    perf_plot.py RESULTS_DIR

Reads the JSON files the perf tools wrote there; a file that is missing is skipped.
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(d, name):
    p = os.path.join(d, name)
    if not os.path.exists(p):
        return None
    with open(p) as f:
        return json.load(f)


def main(d):
    made = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    any_lat = False
    pp = load(d, "pingpong-shm.json")
    if pp:
        rows = pp["rows"]
        ax.loglog([r["bytes"] for r in rows], [r["t_typical_us"] for r in rows], "o-", label="eaas put_signal (shm)")
        raw = pp.get("baseline", {}).get("raw_flag")
        if raw:
            ax.axhline(raw["t_typical_us"], color="gray", ls="--", label="raw flag floor (shm), 8 B")
        any_lat = True
    for scope in ("thread", "warp", "block"):
        nv = load(d, "pingpong-nvlink-%s.json" % scope)
        if not nv:
            continue
        rows = nv["rows"]
        ax.loglog([r["bytes"] for r in rows], [r["t_typical_us"] for r in rows], "s-",
                  label="eaas put_signal (nvlink, %s)" % scope)
        if rows and "raw_floor" in rows[0]:
            ax.loglog([r["bytes"] for r in rows], [r["raw_floor"]["t_typical_us"] for r in rows], ":",
                      label="raw floor (nvlink, %s)" % scope)
        any_lat = True
    if any_lat:
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel("half round trip, t_typical (µs)")
        ax.set_title("eaas-pingpong — " + (pp or {}).get("date", ""))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(d, "latency-vs-size.png"), dpi=120)
        made.append("latency-vs-size.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    any_bw = False
    for name, label in (("bw-shm.json", "eaas put, shm"), ("bw-shm-bidir.json", "eaas put, shm, both ways (sum)")):
        bw = load(d, name)
        if bw:
            rows = bw["rows"]
            ax.semilogx([r["bytes"] for r in rows], [r["bw_avg_gbs"] for r in rows], "o-", label=label)
            if name == "bw-shm.json":
                ax.semilogx([r["bytes"] for r in rows], [r["memcpy_gbs"] for r in rows], "--", color="gray",
                            label="memcpy (same run)")
            any_bw = True
    for b in (16, 64, 132):
        bw = load(d, "bw-nvlink-%dblk.json" % b)
        if bw:
            rows = bw["rows"]
            ax.semilogx([r["bytes"] for r in rows], [r["bw_avg_gbs"] for r in rows], "^-",
                        label="eaas-bw, nvlink, %d blocks (stream)" % b)
            if b == 64:
                ax.semilogx([r["bytes"] for r in rows], [r["copy_engine_gbs"] for r in rows], "-.", color="black",
                            label="copy engine, same messages (same run)")
            any_bw = True
    nv = load(d, "nvlink-2gpu.json")
    if nv and "bandwidth" in nv:
        rows = nv["bandwidth"]
        ax.semilogx([r["bytes"] for r in rows], [max(r["put_gbps"]) for r in rows], "s-",
                    label="eaas put, nvlink (best block count)")
        ax.semilogx([r["bytes"] for r in rows], [r["copy_engine_gbps"] for r in rows], ":", color="black",
                    label="cudaMemcpyPeerAsync (same run)")
        any_bw = True
    if any_bw:
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel("bandwidth (GB/s)")
        ax.set_title("bandwidth vs size")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(d, "bandwidth-vs-size.png"), dpi=120)
        made.append("bandwidth-vs-size.png")
    plt.close("all")
    print("plots:", ", ".join(made) if made else "none (no JSON found)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
