"""The markdown table and the PNG plot of a headline benchmark result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.common import markdown_table
from benchmarks.headline.analysis import MIB, model_memory

__all__ = ["markdown", "micro_markdown", "plot", "save_figure"]


def _range(s: dict[str, Any], digits: int = 0) -> str:
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def _list(xs: list[float] | None, digits: int = 1) -> str:
    return "-" if xs is None else " / ".join(f"{x:.{digits}f}" for x in xs)


_SCHED = {"gpipe": "GPipe", "1f1b": "1F1B"}


def _peer_rows(m: dict[str, Any], s: int) -> list[list[str]]:
    rows = []
    for name, p in m["peers"].items():
        ratio = m["ratios"].get(f"{name} / a glob")
        eff = m["efficiency"].get(name[2:]) if name.startswith("c ") else None
        label = {"a": "(a) backprop, 1 device", "b": f"(b) {name[2:]}, 1 device",
                 "c": f"(c) pipelocal {name[2:]}, S={s}",
                 "d": f"(d) torch {_SCHED.get(name[2:])} M={p.get('microbatches')}, S={s}"}[name[0]]
        rows.append([
            label,
            _range(p["throughput(samples/s)"]),
            "1" if ratio is None else f"{ratio['median']:.2f}",
            _list(p["activation(MiB)"]) + (f" (+{_list(p['in_flight(MiB)'])} in flight)"
                                           if p.get("in_flight(MiB)") else ""),
            _list(p["state(MiB)"]),
            f"{model_memory(p):.1f}",
            _list(p["peak_rss(MiB)"], 0),
            _list([100 * b for b in p["busy_fraction"]], 0) if p["busy_fraction"] else "-",
            " / ".join(f"{eff[key]['median']:.2f}" if key in eff else "-" for key in (
                "vs_ideal_in_stages", "vs_ideal_concurrent", "vs_ideal_alone", "vs_S_x_b"))
            if eff else "-",
        ])
    return rows


HEADERS = ["peer", "samples/s median [min-max]", "x (a)", "activation MiB per device",
           "state MiB per device", "model memory MiB (max device)", "peak RSS MiB per device",
           "busy % per stage",
           "efficiency: vs concurrent ideal in the stages / in separate processes / vs ideal "
           "alone / vs S x (b)"]


def _splits(raw: dict[str, Any]) -> str:
    return ", ".join([f"{rule} {part}" for rule, part in raw["partitions"].items()]
                     + [f"backprop {raw['partition_d']}"])


BREAKDOWN = ["rule", "stage", "wall s", "compute at the ideal", "compute above it",
             "receive wait", "receive handling", "send wait", "send handling", "other",
             "epoch outside wall s (fill, drain)", "other threads' CPU s (not in the sum)",
             "page faults per batch"]


def _breakdown_rows(m: dict[str, Any]) -> list[list[str]]:
    """Each rule's stages: the mean over repeats of each part (means add up to the mean
    wall), and its share of the wall time."""
    rows = []
    for rule, eff in m["efficiency"].items():
        for k, parts in enumerate(zip(*eff["breakdown"])):
            med = {key: sum(p[key] for p in parts) / len(parts) for key in parts[0]}
            rows.append([rule, str(k), f"{med['wall']:.2f}"] + [
                f"{med[key]:.2f} ({100 * med[key] / med['wall']:.0f}%)"
                for key in ("compute_ideal", "compute_excess", "recv_wait", "recv_handling",
                            "send_wait", "send_handling", "other")] + [
                f"{med['outside']:.2f}", f"{med['threads_cpu']:.2f}",
                f"{med['minor_faults/batch']:.0f}"])
    return rows


def _preamble(result: dict[str, Any], title: str) -> list[str]:
    hw, lines = result["hardware"], []
    lines.append(f"# {title} ({result['started']})\n")
    lines.append(f"Hardware: {hw['cpu_model']}, {hw['cpu_cores_usable']} cores, "
                 f"{hw['ram_gib']} GiB RAM, GPUs: {hw['gpus'] or 'none'}; torch "
                 f"{result['versions']['torch']}; git {str(result['git']['commit'])[:10]}"
                 f"{' (dirty)' if result['git']['dirty'] else ''}; load average before/after "
                 f"{result['load_avg_1_5_15']['before']} / {result['load_avg_1_5_15']['after']}."
                 f" {result['machine_note']}\n")
    lines.append(f"Command: `{result['command']}` ({result['duration(s)']:.0f} s"
                 + ("" if result["complete"] else "; INCOMPLETE: stopped before every model "
                    "was measured") + ")\n")
    again = result.get("reanalysed")
    if again:
        lines.append(f"Figures recomputed from these measurements by `{again['command']}` at "
                     f"git {again['git']['commit'][:10]} ({again['at']}).\n")
    return lines


def markdown(result: dict[str, Any]) -> str:
    lines = _preamble(result, "Headline benchmark")
    for m in result["models"].values():
        raw = m["raw"]
        s = raw["stages"]
        lines.append(f"## {raw['label']}, mnist-10k 28x28, batch {raw['batch_size']}, "
                     f"S={s}, split {_splits(raw)}, {raw['threads_per_process']} thread(s) "
                     f"per process, {len(raw['repeats'])} repeats\n")
        lines.append(markdown_table(HEADERS, _peer_rows(m, s)) + "\n")
        ratios = ", ".join(f"{k} = {v['median']:.2f}" for k, v in m["ratios"].items()
                           if "/ d" in k)
        lines.append(f"Ratios (median of per-repeat ratios): {ratios}.\n")
        lines.append("Targets:\n")
        lines.append(markdown_table(["target", "measured", "bound", "met"],
                                    [[t["target"], t["measured"], t["bound"],
                                      "met" if t["met"] else "NOT met"] for t in m["targets"]])
                     + "\n")
        sweep = m["peers"]["d 1f1b"]["sweep"] + m["peers"]["d gpipe"]["sweep"]
        lines.append("torch.distributed.pipelining micro-batch sweep (repeat 1): " + ", ".join(
            f"{'1F1B' if r in m['peers']['d 1f1b']['sweep'] else 'GPipe'} M={r['microbatches']}"
            f": {r['throughput(samples/s)']:.0f}" for r in sweep) + " samples/s.\n")
        t = m["transport"]
        if t:
            lines.append(f"Transport: gloo one-way {t['bytes'] / MIB:.2f} MiB in "
                         f"{1e3 * t['gloo_one_way(s)']:.2f} ms = {t['gloo(GB/s)']:.2f} GB/s "
                         f"(latency {1e6 * t['gloo_latency(s)']:.0f} us) vs a plain copy "
                         f"{t['copy(GB/s)']:.2f} GB/s: {t['gloo_vs_copy']:.3f} of it.\n")
        lines.append("Scaling model at the measured S (predicted / measured - 1): from the "
                     "blocks' costs alone, and with the contention this run measured (" + ", "
                     .join(f"{r} {c:.2f}" for r, c in m["scaling"]["contention"].items())
                     + f"; torch's pipelining {m['scaling']['contention_d']:.2f}) and backprop's "
                     "block shares calibrated on (a)'s measured step, (d)'s micro-batches "
                     "costed at their rows and scaled alike:\n")
        lines.append(markdown_table(
            ["peer", "S", "measured samples/s", "predicted (alone)", "error",
             "predicted (measured contention, calibrated)", "error", "activation error"],
            [[v["peer"], v["S"], f"{v['measured(samples/s)']:.0f}",
              f"{v['predicted(samples/s)']:.0f}", f"{100 * v['error']:+.0f}%",
              f"{v['predicted_measured(samples/s)']:.0f}",
              f"{100 * v['error_measured']:+.0f}%" + (" (fit)" if v.get("note") else ""),
              f"{100 * v['activation_error']:+.0f}%" if "activation_error" in v else "-"]
             for v in m["scaling"]["validation"]]) + "\n")
        bases = {eff["breakdown_ideal"] for eff in m["efficiency"].values()}
        ideal = ("the concurrent ideal measured in the stage processes" if bases == {"in_stages"}
                 else "the concurrent ideal in separate processes" if bases == {"concurrent"}
                 else "the concurrent ideal in the stage processes where measured")
        lines.append("Where each stage's measured epoch went (mean over the measured epochs of "
                     "every repeat; seconds and "
                     f"share of the stage's wall time; the ideal: {ideal}):\n")
        lines.append(markdown_table(BREAKDOWN, _breakdown_rows(m)) + "\n")
        lines.append("Step time per stage (ms, median over repeats), alone / all stages at once "
                     "in separate processes / all stages at once in the stage processes / in "
                     "the pipeline (busy per batch): " + "; ".join(
                         f"{rule} " + ", ".join(
                             f"stage {k} {1e3 * a:.1f} / {1e3 * c:.1f} / "
                             + (f"{1e3 * i:.1f}" if i is not None else "-")
                             + f" / {1e3 * p:.1f}"
                             for k, (a, c, i, p) in enumerate(zip(
                                 eff["stage_alone(s)"], eff["stage_concurrent(s)"],
                                 eff.get("stage_in_stages(s)") or [None] * len(
                                     eff["stage_alone(s)"]),
                                 eff["stage_pipeline(s)"])))
                         for rule, eff in m["efficiency"].items()) + ".\n")
    return "\n".join(lines)


MICRO_HEADERS = ["peer", "samples/s median [min-max]", "x (c M=1)",
                 "activation MiB per device", "state MiB per device",
                 "model memory MiB (max device)", "peak RSS MiB per device", "busy % per stage"]


def micro_markdown(result: dict[str, Any]) -> str:
    """The micro-batch comparison (``bench --micro-batches``): one table per model."""
    lines = _preamble(result, "Micro-batches: pipelocal against torch 1F1B")
    for m in result["models"].values():
        raw = m["raw"]
        lines.append(f"## {raw['label']}, mnist-10k 28x28, batch {raw['batch_size']}, "
                     f"S={raw['stages']}, split {raw['partition']}, "
                     f"{raw['threads_per_process']} thread(s) per process, "
                     f"{len(raw['repeats'])} repeats\n")
        rows = []
        base = next(iter(m["peers"]))
        for name, p in m["peers"].items():
            ratio = m["ratios"].get(f"{name} / {base}")
            label = (f"(d) torch 1F1B M={p['microbatches']}" if name.startswith("d ")
                     else f"(c) pipelocal {name[2:]}")
            rows.append([
                label, _range(p["throughput(samples/s)"]),
                "1" if ratio is None else f"{ratio['median']:.2f}",
                _list(p["activation(MiB)"]) + (f" (+{_list(p['in_flight(MiB)'])} in flight)"
                                               if p.get("in_flight(MiB)") else ""),
                _list(p["state(MiB)"]), f"{model_memory(p):.1f}",
                _list(p["peak_rss(MiB)"], 0),
                _list([100 * b for b in p["busy_fraction"]], 0) if p["busy_fraction"] else "-",
            ])
        lines.append(markdown_table(MICRO_HEADERS, rows) + "\n")
        if raw["skipped_rules"]:
            lines.append(f"Not measured: {', '.join(raw['skipped_rules'])} (their loss couples "
                         "a batch's samples).\n")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = result["models"]
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 4 * len(models)), squeeze=False)
    for row, m in zip(axes, models.values()):
        _plot_model(row, m)
    save_figure(fig, result, "pipelocal headline benchmark", path)


def save_figure(fig: Any, result: dict[str, Any], title: str, path: Path) -> None:
    """Title ``fig`` with the result's machine, torch and date; write it to ``path``; close it."""
    import matplotlib.pyplot as plt

    hw = result["hardware"]
    fig.suptitle(f"{title}: {hw['cpu_model']}, {hw['cpu_cores_usable']} cores, torch "
                 f"{result['versions']['torch']}, {result['started'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_model(row: Any, m: dict[str, Any]) -> None:
    curves, peers, raw = m["scaling"]["curves"], m["peers"], m["raw"]
    s_axis, s = curves["S"], raw["stages"]
    ax_t, ax_m = row
    for name, pts in curves.items():
        if name == "S":
            continue
        line = ax_t.plot(s_axis, [p["throughput(samples/s)"] for p in pts], label=name,
                         ls="--" if name.startswith("a") else "-")[0]
        ax_m.plot(s_axis, [p["memory_per_device(B)"] / MIB for p in pts], label=name,
                  color=line.get_color(), ls=line.get_linestyle())
        meas = {"a": [(1, name)], "c": [(s, name), (1, "b " + name[2:])], "d": [(s, name)]}
        for at, peer in meas[name[0]]:
            if peer in peers:
                ax_t.plot([at], [peers[peer]["throughput(samples/s)"]["median"]], "o",
                          color=line.get_color())
                ax_m.plot([at], [model_memory(peers[peer])], "o", color=line.get_color())
    ax_t.set(xlabel="devices S", ylabel="samples/s", yscale="log",
             title=f"{raw['label']}: throughput (lines: model, dots: measured)")
    ax_m.set(xlabel="devices S", ylabel="MiB (activation + state, largest device)",
             yscale="log", title=f"{raw['label']}: model memory per device")
    ax_t.legend(fontsize=7)
