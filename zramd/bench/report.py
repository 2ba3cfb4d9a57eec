"""Summaries, the markdown report and the chart of a benchmark run.

Theory of operation
-------------------
Input is the raw results dict the runner saves as ``results.json`` (samples, density samples,
image facts, micro rows, machine and versions). :func:`summarize` reduces samples to medians per
(workload, server) and ratios zramd / peer of the median throughput; :func:`write_report` renders
``results.md`` and ``chart.png`` from it. Rendering is pure: ``python -m zramd.bench report``
rebuilds both from a saved ``results.json``. matplotlib is optional (the ``bench`` extra): without
it the chart is skipped and the report says so.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from zramd.bench.fio import FILL, FILL_LABEL, WORKLOADS
from zramd.bench.servers import ALL_SERVERS, COLD, GROUP, GROUP_19, RECOMPRESS, REFERENCE

#: issue 6's speed targets: zramd-lz4 / nbdkit-zstd, median throughput, same run
TARGETS: dict[str, float] = {
    "rand-write-qd32": 3.0,
    "rand-rw7030-qd16": 2.0,
    "rand-read-qd32": 1.0,
    "rand-read-qd1": 1.0,
    "seq-write": 1.0,
    FILL: 1.0,
    "seq-read": 0.6,
    "zero-seq-write": 1.0,
    "zero-seq-read": 1.0,
    "zero-rand-write-qd32": 1.0,
    "zero-rand-read-qd32": 1.0,
}
TARGET_SERVER = "zramd-lz4"
METRICS = ("mbps", "iops", "p99_us", "cpu_pct")
#: one colour per series, the same in every panel
COLORS = {
    "zramd-lz4": "tab:blue",
    "zramd-zstd": "tab:orange",
    "nbdkit-zstd": "tab:green",
    "nbdkit-sparse": "tab:red",
    "qemu-nbd-tmpfs": "tab:purple",
    "ideal lz4": "lightsteelblue",
    "ideal zstd": "navajowhite",
}


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _labels() -> dict[str, str]:
    lab = {w.name: w.label for w in WORKLOADS}
    lab[FILL] = FILL_LABEL
    return lab


def workload_order(samples: list[dict[str, Any]]) -> list[str]:
    present = {s["workload"] for s in samples}
    order = []
    for w in WORKLOADS:
        if w.name == "seq-write" and FILL in present:
            order.append(FILL)
        if w.name in present:
            order.append(w.name)
    return order


def server_order(names: set[str]) -> list[str]:
    known = [s.name for s in ALL_SERVERS if s.name in names]
    return known + sorted(names - set(known))


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    samples = raw.get("fio_samples", [])
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    errors: dict[tuple[str, str], list[str]] = {}
    suspect: dict[str, list[str]] = {}
    for s in samples:
        key = (s["workload"], s["server"])
        if s.get("warning"):
            suspect.setdefault(f"{s['workload']}/{s['server']}", []).append(s["warning"])
        if s.get("exit_code") not in (None, 0):
            suspect.setdefault(f"{s['workload']}/{s['server']}", []).append(
                f"exit code {s['exit_code']} after SIGTERM"
            )
        if s.get("error"):
            errors.setdefault(key, []).append(s["error"])
        else:
            groups.setdefault(key, []).append(s)
    med: dict[str, dict[str, dict[str, Any]]] = {}
    for (wl, srv), ss in groups.items():
        m = {k: _median([x.get(k) for x in ss]) for k in METRICS}
        m["n"] = len(ss)
        mb = [x["mbps"] for x in ss]
        m["spread_pct"] = (100.0 * (max(mb) - min(mb)) / m["mbps"]) if m["mbps"] else None
        med.setdefault(wl, {})[srv] = m
    ratios: dict[str, dict[str, dict[str, float | None]]] = {}
    for wl, per in med.items():
        for num in per:
            for den in per:
                if num == den:
                    continue
                a, b = per[num]["mbps"], per[den]["mbps"]
                ratios.setdefault(wl, {}).setdefault(num, {})[den] = a / b if a and b else None
    # density
    dens: dict[str, dict[str, dict[str, Any]]] = {}
    dgroups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for d in raw.get("density_samples", []):
        if not d.get("error"):
            dgroups.setdefault((d["image"], d["server"]), []).append(d)
    for (img, srv), ds in dgroups.items():
        dens.setdefault(img, {})[srv] = {
            "copy_in_mbps": _median([x["copy_in_mbps"] for x in ds]),
            "copy_out_mbps": _median([x["copy_out_mbps"] for x in ds]),
            "mem_per_byte": _median([x["mem_per_byte"] for x in ds]),
            "sha256_ok": all(x["sha256_ok"] for x in ds),
            "n": len(ds),
        }
    return {
        "medians": med,
        "ratios": ratios,
        "errors": {f"{w}/{s}": e for (w, s), e in errors.items()},
        "suspect": suspect,
        "density": dens,
    }


def _fmt(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def _thr(m: dict[str, Any] | None, wl: str) -> str:
    if not m or m.get("mbps") is None:
        return "-"
    if wl.startswith("seq") or wl.startswith("zero-seq") or wl == FILL:
        return _fmt(m["mbps"])
    return f"{_fmt(m['mbps'])} ({m['iops'] / 1000:.1f}k)"


def render_markdown(raw: dict[str, Any], summ: dict[str, Any], chart: str | None) -> str:
    info = raw.get("sysinfo", {})
    cfg = raw.get("config", {})
    mach = info.get("machine", {})
    vers = info.get("versions", {})
    med = summ["medians"]
    ratios = summ["ratios"]
    wls = workload_order(raw.get("fio_samples", []))
    srvs = server_order({s for per in med.values() for s in per})
    lab = _labels()
    out: list[str] = []
    out.append("# zramd benchmarks\n")
    if wls:
        what = (
            f"device {cfg.get('size_mib', '?')} MiB, {cfg.get('runtime', '?')} s per measured "
            f"job, {cfg.get('repeat', '?')} repetitions"
        )
    else:
        what = f"real-data density only, {cfg.get('density_repeat', '?')} sample(s) per image"
    out.append(
        f"Run {info.get('date', '?')} with `python -m zramd.bench {cfg.get('argv', '')}`"
        f" ({cfg.get('mode', '?')} mode): {what},"
        f" servers interleaved and started fresh for every sample; figures are medians."
        f" Total wall time {cfg.get('elapsed_s', 0) / 60:.1f} min.\n"
    )
    out.append(
        f"Machine: {mach.get('nproc', '?')} CPUs ({mach.get('cpu', '?')}), "
        f"{mach.get('ram_gib', '?')} GiB RAM, load average at start "
        f"{mach.get('loadavg_at_start', '?')}. fio, the client, runs on the same cores as the "
        "server. " + (f"**Note:** {cfg['note']}\n" if cfg.get("note") else "\n")
    )
    out.append("Versions: " + "; ".join(f"{k} {v}" for k, v in vers.items()) + ".\n")
    if chart:
        out.append(f"![chart]({chart})\n")
    if wls:
        out.append("## Throughput\n")
        out.append(
            "Median MB/s (10^6 B/s); for 4 KiB jobs the IOPS follow in parentheses. Reads and "
            "overwrites run after a full sequential prefill of the same data; "
            f"'{FILL_LABEL}' is that prefill on a new device. 'comp' data is about 2.5:1 "
            "compressible per page, 'zero' data is all-zero pages.\n"
        )
        out.append("| workload | " + " | ".join(srvs) + " |")
        out.append("| --- |" + " ---: |" * len(srvs))
        for wl in wls:
            cells = [_thr(med.get(wl, {}).get(s), wl) for s in srvs]
            out.append(f"| {lab.get(wl, wl)} | " + " | ".join(cells) + " |")
        out.append("")
        out.append(f"## Ratios against {REFERENCE}\n")
        out.append(
            f"Median throughput of each server divided by {REFERENCE}'s in the same run "
            f"(>1 = faster). Target: issue 6's goal for {TARGET_SERVER}.\n"
        )
        others = [s for s in srvs if s != REFERENCE]
        out.append("| workload | " + " | ".join(others) + " | target | met |")
        out.append("| --- |" + " ---: |" * len(others) + " ---: | :---: |")
        for wl in wls:
            r = ratios.get(wl, {})
            cells = [_fmt(r.get(s, {}).get(REFERENCE), 2) for s in others]
            tgt = TARGETS.get(wl)
            got = r.get(TARGET_SERVER, {}).get(REFERENCE)
            met = "-" if tgt is None or got is None else ("yes" if got >= tgt else "**no**")
            tcell = f"{tgt:g}x" if tgt is not None else "-"
            out.append(f"| {lab.get(wl, wl)} | " + " | ".join(cells) + f" | {tcell} | {met} |")
        out.append("")
        peers = [s for s in srvs if not s.startswith("zramd")]
        zr = [s for s in srvs if s.startswith("zramd")]
        if zr and peers:
            out.append("## zramd against every peer\n")
            heads = [f"{z} / {p}" for z in zr for p in peers]
            out.append("| workload | " + " | ".join(heads) + " |")
            out.append("| --- |" + " ---: |" * len(heads))
            for wl in wls:
                r = ratios.get(wl, {})
                cells = [_fmt(r.get(z, {}).get(p), 2) for z in zr for p in peers]
                out.append(f"| {lab.get(wl, wl)} | " + " | ".join(cells) + " |")
            out.append("")
        out.append("## p99 completion latency (µs)\n")
        out.append("The larger of the read and write p99 for mixed jobs.\n")
        out.append("| workload | " + " | ".join(srvs) + " |")
        out.append("| --- |" + " ---: |" * len(srvs))
        for wl in wls:
            cells = [_fmt((med.get(wl, {}).get(s) or {}).get("p99_us")) for s in srvs]
            out.append(f"| {lab.get(wl, wl)} | " + " | ".join(cells) + " |")
        out.append("")
        out.append("## Server CPU (% of one core during the measured job)\n")
        out.append(
            "utime+stime of the server process (all threads) from /proc/PID/stat over the "
            "job's wall time; the rest of the machine is fio and the other tenants.\n"
        )
        out.append("| workload | " + " | ".join(srvs) + " |")
        out.append("| --- |" + " ---: |" * len(srvs))
        for wl in wls:
            cells = [_fmt((med.get(wl, {}).get(s) or {}).get("cpu_pct")) for s in srvs]
            out.append(f"| {lab.get(wl, wl)} | " + " | ".join(cells) + " |")
        out.append("")
        spreads = [
            (m.get("spread_pct") or 0.0, wl, s) for wl, per in med.items() for s, m in per.items()
        ]
        if spreads:
            worst = max(spreads)
            out.append(
                f"Spread (max-min)/median of MB/s across repetitions: median "
                f"{statistics.median(x[0] for x in spreads):.0f}%, worst {worst[0]:.0f}% "
                f"({worst[1]}, {worst[2]}).\n"
            )
    if summ["errors"]:
        out.append("## Failed samples\n")
        for k, errs in summ["errors"].items():
            out.append(f"- {k}: {len(errs)} failed, e.g. `{errs[0][:300]}`")
        out.append("")
    if summ.get("suspect"):
        out.append("## Suspect samples (kept in the medians)\n")
        for k, notes in summ["suspect"].items():
            out.append(f"- {k}: {len(notes)} samples, e.g. `{notes[0][:300]}`")
        out.append("")
    images = raw.get("images", {})
    for img, err in raw.get("image_errors", {}).items():
        out.append(f"**The {img} image could not be built:** `{err[:500]}`\n")
    if images:
        out.append("## Real-data density\n")
        out.append(
            "Each image is copied into a fresh server with `nbdcopy`, read back and compared by "
            "sha256. Memory is the server's VmRSS growth (plus the bytes of its tmpfs backing file "
            "for qemu-nbd) per byte of image: lower is better, 1.00 = stored raw. 'ideal' is a "
            "perfect zram storing each 4 KiB page compressed on its own (zero and same-filled "
            "pages free, pages that do not shrink stored raw), i.e. the floor a page-granular "
            "store reaches before allocator overhead.\n"
        )
        for img, facts in images.items():
            pages = facts["pages"]
            ideal = facts["ideal_bytes"]
            out.append(
                f"**{img}**: {facts['description']}; {facts['bytes'] / (1 << 20):.0f} MiB, "
                f"{pages} pages, {100 * facts['zero_pages'] / pages:.0f}% zero, "
                f"{100 * facts['same_pages'] / pages:.1f}% same-filled; ideal bytes per byte: "
                + ", ".join(f"{k} {v / facts['bytes']:.3f}" for k, v in ideal.items())
                + ".\n"
            )
            dens = summ["density"].get(img, {})
            out.append("| server | copy-in MB/s | copy-out MB/s | memory per byte | sha256 |")
            out.append("| --- | ---: | ---: | ---: | :---: |")
            for s in server_order(set(dens)):
                d = dens[s]
                out.append(
                    f"| {s} | {_fmt(d['copy_in_mbps'])} | {_fmt(d['copy_out_mbps'])} | "
                    f"{_fmt(d['mem_per_byte'], 3)} | {'ok' if d['sha256_ok'] else '**MISMATCH**'} |"
                )
            for k, v in ideal.items():
                out.append(f"| ideal {k} | | | {v / facts['bytes']:.3f} | |")
            out.append("")
        out += _cold_table(images, summ["density"])
    micro = raw.get("micro")
    if micro:
        from zramd.bench.micro import format_micro

        out.append("## Microbenchmarks of the hot parts\n")
        out.append("In-process, best of 5 rounds, one core (`python -m zramd.bench micro`).\n")
        out.append(format_micro(micro))
        out.append("")
    return "\n".join(out) + "\n"


def _cold_table(images: dict[str, Any], dens: dict[str, dict[str, Any]]) -> list[str]:
    """Cold pages against the reference: one row per image, RAM per byte per page (lz4, zstd),
    after the cold runs' stages (:data:`zramd.bench.servers.COLD`), the reference, the ideal
    per-page figures, and the reference's RAM per byte divided by each grouped device's (the
    effective ratio against it: >= 1.00 is as dense or denser). Empty without a cold run."""
    stages = [f"{spec.name} {name}" for spec in COLD for name, _ in spec.stages]
    grouped = [f"{spec.name} {spec.stages[-1][0]}" for spec in (GROUP, GROUP_19)]
    if not any(g in per for per in dens.values() for g in grouped):
        return []
    cols = ["zramd-lz4", "zramd-zstd", *stages, REFERENCE]
    out = ["## Cold pages: recompression and multi-page groups\n"]
    out.append(
        "RAM per logical byte (lower is better) of the same images in the same run, each "
        "server fresh. After the copy-in, every page is marked idle (`zramd idle --all`), then "
        f"{RECOMPRESS.name} (`algorithm={RECOMPRESS.option}`) recompresses page by page "
        f"(`zramd recompress`), {GROUP.name} packs runs of up to 16 pages into groups "
        "(`zramd recompress --group-pages 16`) with the default group codec, zstd level 9, and "
        f"{GROUP_19.name} with zstd level 19 (`{GROUP_19.option}`); the copy-out then checks "
        f"the data. 'vs' is {REFERENCE}'s RAM per byte divided by the grouped device's "
        "(>= 1.00: as dense or denser).\n"
    )
    ideal_names = list(next(iter(images.values()))["ideal_bytes"])
    out.append("| image | " + " | ".join(cols) + " | "
               + " | ".join(f"ideal {k}" for k in ideal_names) + " | "
               + " | ".join(f"{g} vs {REFERENCE}" for g in grouped) + " |")  # fmt: skip
    out.append("| --- |" + " ---: |" * (len(cols) + len(ideal_names) + len(grouped)))
    for img, facts in images.items():
        per = dens.get(img, {})
        vals = [per.get(c, {}).get("mem_per_byte") for c in cols]
        ideal = [facts["ideal_bytes"][k] / facts["bytes"] for k in ideal_names]
        ref = vals[-1]
        ratios = []
        for g in grouped:
            mine = per.get(g, {}).get("mem_per_byte")
            ratios.append(f"**{ref / mine:.2f}x**" if mine and ref else "-")
        out.append(f"| {img} | " + " | ".join(_fmt(v, 3) for v in vals) + " | "
                   + " | ".join(f"{v:.3f}" for v in ideal) + " | "
                   + " | ".join(ratios) + " |")  # fmt: skip
    out.append("")
    return out


def render_chart(raw: dict[str, Any], summ: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        return False
    med = summ["medians"]
    ratios = summ["ratios"]
    wls = workload_order(raw.get("fio_samples", []))
    srvs = [s for s in server_order({s for per in med.values() for s in per}) if s != REFERENCE]
    dens = summ["density"]
    images = raw.get("images", {})
    nplots = (1 if wls else 0) + (1 if images else 0)
    if nplots == 0:
        return False
    fig, axes = plt.subplots(
        nplots, 1, figsize=(12, 5 * nplots), squeeze=False,
        gridspec_kw={"height_ratios": [2, 1][:nplots]},
    )  # fmt: skip
    ax_i = 0
    lab = _labels()
    if wls:
        ax = axes[ax_i][0]
        ax_i += 1
        width = 0.8 / max(1, len(srvs))
        for i, s in enumerate(srvs):
            xs, ys = [], []
            for j, wl in enumerate(wls):
                v = ratios.get(wl, {}).get(s, {}).get(REFERENCE)
                if v:
                    xs.append(j + (i - (len(srvs) - 1) / 2) * width)
                    ys.append(v)
            ax.bar(xs, ys, width, label=s, color=COLORS.get(s))
        for j, wl in enumerate(wls):
            t = TARGETS.get(wl)
            if t:
                ax.plot([j - 0.4, j + 0.4], [t, t], "k--", lw=1)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _pos: f"{v:g}x"))
        ax.set_xticks(range(len(wls)))
        ax.set_xticklabels([lab.get(w, w) for w in wls], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(f"throughput / {REFERENCE} (log)")
        ax.set_title(
            f"Median throughput relative to {REFERENCE}; dashed: target for {TARGET_SERVER}"
        )
        ax.legend(fontsize=8)
    if images:
        ax = axes[ax_i][0]
        names = list(images)
        dsrvs = server_order({s for img in dens.values() for s in img})
        cols = dsrvs + [f"ideal {k}" for k in next(iter(images.values()))["ideal_bytes"]]
        width = 0.8 / max(1, len(cols))
        for i, c in enumerate(cols):
            ys = []
            for img in names:
                if c.startswith("ideal "):
                    v = images[img]["ideal_bytes"][c[6:]] / images[img]["bytes"]
                else:
                    v = (dens.get(img, {}).get(c) or {}).get("mem_per_byte")
                ys.append(v if v is not None else 0.0)
            xs = [j + (i - (len(cols) - 1) / 2) * width for j in range(len(names))]
            hatch = "//" if c.startswith("ideal") else None
            ax.bar(xs, ys, width, label=c, hatch=hatch, color=COLORS.get(c))
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names)
        ax.set_ylabel("memory per byte of data")
        ax.set_title("Real-data density (lower is better)")
        ax.legend(fontsize=8, ncol=2)
    info = raw.get("sysinfo", {})
    fig.suptitle(f"zramd {info.get('versions', {}).get('zramd', '?')}, {info.get('date', '?')}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write_report(raw: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    summ = summarize(raw)
    raw = dict(raw)
    raw["summary"] = summ
    (out_dir / "results.json").write_text(json.dumps(raw, indent=1, sort_keys=False) + "\n")
    chart = "chart.png" if render_chart(raw, summ, out_dir / "chart.png") else None
    md = render_markdown(raw, summ, chart)
    if chart is None:
        md += "\n(chart skipped: matplotlib not installed; `pip install -e '.[bench]'`)\n"
    (out_dir / "results.md").write_text(md)
    return summ
