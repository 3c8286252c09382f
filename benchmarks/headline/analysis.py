"""From the raw measurements of one model to the figures the report shows.

Every figure over repeats is ``{"median", "min", "max", "n", "values"}``; ratios are taken
within a repeat (peers measured back to back) and then summarised. Definitions are in
:data:`DEFINITIONS`, which the JSON carries.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from benchmarks.headline.scaling import (
    BlockCost,
    Link,
    predict_backprop,
    predict_pipelocal,
    predict_torchpipe,
)
from pipelocal.pipeline.partition import stage_ranges

__all__ = [
    "DEFINITIONS",
    "analyse_micro",
    "analyse_model",
    "breakdown",
    "calibrated",
    "concurrent_steps",
    "stat",
    "time_to_accuracy",
]

MIB = 2**20

DEFINITIONS = {
    "throughput": "samples/s of training steps after warm-up; (a), (b), (d): N timed steps; "
    "(c): the second epoch's samples / time/epoch(s) (fill and drain included)",
    "activation": "peak bytes autograd holds for backward (saved_tensors_hooks), per device; "
    "(c): per stage, the largest of its blocks' peaks (measured alone) + in-flight buffers "
    "(channel_depth x (input + output wire bytes))",
    "state": "parameter + gradient + optimiser-state bytes per device",
    "model_memory": "activation + state bytes, largest device",
    "peak_rss": "peak resident set size of the device's process (MiB; ~0.7 GiB is torch itself)",
    "busy_fraction": "(c): stage busy(s) / wall(s) from metrics.jsonl; (d): process CPU "
    "seconds / (wall x threads)",
    "efficiency_vs_ideal": "(c) / (batch / slowest stage's step time measured alone)",
    "ideal_concurrent": "batch / slowest stage's mean step time when every stage computes its "
    "own blocks on prepared inputs at the same time, one process per stage, threaded as the "
    "pipeline's and bound to the cores its stages are bound to, without communication or loader: "
    "what the machine allows S processes at once",
    "efficiency_vs_concurrent": "(c) / ideal_concurrent, same repeat; the concurrent ideal is "
    "measured just before and just after (c) and its step times averaged",
    "ideal_in_stages": "batch / slowest stage's mean step time in the concurrent ideal measured "
    "in (c)'s own stage processes (pipeline.ideal_steps): every stage trains its blocks on a "
    "copy of its last batch at the same time, without communication, after every epoch, "
    "then gets its state back; same processes, cores, threads and "
    "memory as the epoch it is compared with",
    "efficiency_vs_in_stages": "each measured epoch of (c) / the ideal in the stages measured "
    "just before and just after it; median over every measured epoch of every repeat",
    "contention": "a stage's step time with every stage computing at once / alone",
    "breakdown": "(c), per stage, the measured epoch's wall time split into compute at the "
    "ideal's speed (ideal_in_stages where measured, each measured epoch against the ideal "
    "around it, else ideal_concurrent: breakdown_ideal), "
    "compute above it, receive wait, receive handling (the rest of the channel's receive "
    "calls: posting the next receive, the header; on CPU the transport's copy when its thread "
    "runs then), send wait, send handling (likewise) and other (stage 0: its loader, the "
    "coordinator's work; any stage: bookkeeping), from metrics.jsonl and the ideal; "
    "threads_cpu, not part of the sum: CPU seconds of the stage's other threads (gloo's "
    "transport, stage 0's prefetch), which on a bound stage run on its cores",
    "efficiency_vs_Sb": "(c) / (S x (b)), same repeat",
    "ratio": "within one repeat, then median over repeats",
    "scaling_error": "predicted / measured - 1",
}


def stat(values: Sequence[float]) -> dict[str, Any]:
    xs = [float(v) for v in values]
    return {"median": _median(xs), "min": min(xs), "max": max(xs), "n": len(xs), "values": xs}


def _median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def _state(d: dict[str, Any]) -> int:
    return d["params(B)"] + d["grads(B)"] + d["optimizer(B)"]


def _single(reps: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "throughput(samples/s)": stat([r["throughput(samples/s)"] for r in reps]),
        "activation(MiB)": [max(r["activation_peak(B)"] for r in reps) / MIB],
        "state(MiB)": [_state(reps[0]) / MIB],
        "peak_rss(MiB)": [max(r["peak_rss(MiB)"] for r in reps)],
        "busy_fraction": None,
    }


def _pipelocal_memory(profile: dict[str, Any], partition: list[int],
                      depth: int) -> list[dict[str, float]]:
    blocks = profile["blocks"]
    out = []
    for k, r in enumerate(stage_ranges(partition)):
        wire_in = blocks[r.start - 1]["wire_bytes"] if k > 0 else 0
        wire_out = blocks[r[-1]]["wire_bytes"] if k < len(partition) - 1 else 0
        out.append({
            "activation": max(blocks[i]["saved_local_bytes"] for i in r),
            "in_flight": depth * (wire_in + wire_out),
            "state": sum(blocks[i]["state_local_bytes"] for i in r),
        })
    return out


def _best_setting(ranks: list[dict[str, Any]], schedule: str) -> dict[str, Any]:
    """The schedule's fastest micro-batch count in this run; throughput = slowest rank's."""
    rows = []
    for i, s in enumerate(ranks[0]["settings"]):
        if s["schedule"] != schedule:
            continue
        per_rank = [r["settings"][i] for r in ranks]
        rows.append({
            "microbatches": s["microbatches"],
            "throughput(samples/s)": min(p["throughput(samples/s)"] for p in per_rank),
            "activation(B)": [p["activation_peak(B)"] for p in per_rank],
            "state(B)": [_state(p) for p in per_rank],
            "peak_rss(MiB)": [p["peak_rss(MiB)"] for p in per_rank],
            "busy_fraction": [p["busy_fraction"] for p in per_rank],
        })
    return max(rows, key=lambda x: x["throughput(samples/s)"]) | {"sweep": rows}


def _torchpipe_peer(reps: list[dict[str, Any]], sched: str) -> dict[str, Any]:
    """Peer (d) with ``sched`` at its fastest micro-batch count of the first repeat."""
    best = [_best_setting(r["d"], sched) for r in reps]
    return {
        "throughput(samples/s)": stat([b["throughput(samples/s)"] for b in best]),
        "microbatches": best[0]["microbatches"],
        "activation(MiB)": [v / MIB for v in best[0]["activation(B)"]],
        "state(MiB)": [v / MIB for v in best[0]["state(B)"]],
        "peak_rss(MiB)": best[0]["peak_rss(MiB)"],
        "busy_fraction": [_median(col) for col in zip(*(b["busy_fraction"] for b in best))],
        "sweep": best[0]["sweep"],
    }


def _pipelocal_peer(cs: list[dict[str, Any]], mem: list[dict[str, float]]) -> dict[str, Any]:
    """Peer (c) from its runs over the repeats and its memory per stage."""
    return {
        "throughput(samples/s)": stat([c["throughput(samples/s)"] for c in cs]),
        "activation(MiB)": [m["activation"] / MIB for m in mem],
        "in_flight(MiB)": [m["in_flight"] / MIB for m in mem],
        "state(MiB)": [m["state"] / MIB for m in mem],
        "peak_rss(MiB)": [max(col) for col in zip(*(c["peak_rss(MiB)"] for c in cs))],
        "busy_fraction": [_median(col) for col in zip(*(c["busy_fraction"] for c in cs))],
    }


def analyse_model(raw: dict[str, Any]) -> dict[str, Any]:
    reps, rules = raw["repeats"], raw["rules"]
    s, depth, batch = raw["stages"], raw["channel_depth"], raw["batch_size"]
    peers: dict[str, Any] = {"a glob": _single([r["a"] for r in reps])}
    for rule in rules:
        peers[f"b {rule}"] = _single([r["b"][rule] for r in reps])
    ratios: dict[str, Any] = {}
    efficiency: dict[str, Any] = {}
    for sched in ("gpipe", "1f1b"):
        peers[f"d {sched}"] = _torchpipe_peer(reps, sched)
    for rule in rules:
        cs = [r["c"][rule] for r in reps]
        part = raw["partitions"][rule]
        mem = _pipelocal_memory(reps[0]["profile"]["rules"][rule], part, depth)
        peers[f"c {rule}"] = _pipelocal_peer(cs, mem)
        alone = [r["profile"]["rules"][rule]["stage_alone(s)"] for r in reps]
        conc = [concurrent_steps(r["concurrent"][rule]) for r in reps]
        ideal = [batch / max(a) for a in alone]
        ideal_c = [batch / max(c) for c in conc]
        efficiency[rule] = {
            "ideal_alone(samples/s)": stat(ideal),
            "vs_ideal_alone": stat([c["throughput(samples/s)"] / i for c, i in zip(cs, ideal)]),
            "ideal_concurrent(samples/s)": stat(ideal_c),
            "vs_ideal_concurrent": stat([c["throughput(samples/s)"] / i
                                         for c, i in zip(cs, ideal_c)]),
            "vs_S_x_b": stat([c["throughput(samples/s)"] / (s * r["b"][rule][
                "throughput(samples/s)"]) for c, r in zip(cs, reps)]),
            "stage_alone(s)": [_median(col) for col in zip(*alone)],
            "stage_concurrent(s)": [_median(col) for col in zip(*conc)],
            "stage_pipeline(s)": [_median([c["busy(s)"][k] * batch / c["samples"] for c in cs])
                                  for k in range(s)],
            "contention": [_median([c / a for c, a in zip(cc, aa)])
                           for cc, aa in zip(zip(*conc), zip(*alone))],
        }
        # Where the run measured the concurrent ideal in its stage processes
        # (pipeline.ideal_steps): every measured epoch of every repeat against the ideal
        # measured around it, and the breakdown compares compute with it.
        epochs = [e for c in cs for e in c.get("epochs") or [
            {"throughput(samples/s)": c["throughput(samples/s)"],
             "ideal_step(s)": c.get("ideal_step(s)"), "record": c["record"]}]]
        if all(e["ideal_step(s)"] for e in epochs):
            ideal_i = [batch / max(e["ideal_step(s)"]) for e in epochs]
            efficiency[rule] |= {
                "ideal_in_stages(samples/s)": stat(ideal_i),
                "vs_ideal_in_stages": stat([e["throughput(samples/s)"] / i
                                            for e, i in zip(epochs, ideal_i)]),
                "stage_in_stages(s)": [_median(col) for col in
                                       zip(*(e["ideal_step(s)"] for e in epochs))],
            }
            efficiency[rule]["breakdown_ideal"] = "in_stages"
            efficiency[rule]["breakdown"] = [breakdown(e["record"], e["ideal_step(s)"], batch)
                                             for e in epochs]
        else:
            efficiency[rule]["breakdown_ideal"] = "concurrent"
            efficiency[rule]["breakdown"] = [breakdown(c["record"], st, batch)
                                             for c, st in zip(cs, conc)]
    for name in peers:
        if name != "a glob":
            ratios[f"{name} / a glob"] = _ratio(reps, name, "a glob")
    for rule in rules:
        ratios[f"c {rule} / d 1f1b"] = _ratio(reps, f"c {rule}", "d 1f1b")
        ratios[f"c {rule} / d gpipe"] = _ratio(reps, f"c {rule}", "d gpipe")
    out = {"peers": peers, "ratios": ratios, "efficiency": efficiency,
           "transport": reps[0]["d"][0]["transport"]}
    out["targets"] = _targets(out, rules, s)
    out["scaling"] = _scaling(raw, out)
    return out


def concurrent_steps(runs: dict[str, list[dict[str, Any]]]) -> list[float]:
    """Each stage's concurrent-ideal step time: the mean of the runs just before and just
    after (c)'s (``{"before": [...], "after": [...]}``, one entry per stage), so that a drift
    of the machine's speed over the minutes between them hits the ideal as it hits (c)."""
    sides = list(runs.values())
    return [sum(side[k]["step_mean(s)"] for side in sides) / len(sides)
            for k in range(len(sides[0]))]


def breakdown(record: dict[str, Any], concurrent_s: Sequence[float],
              batch: int) -> list[dict[str, float]]:
    """Each stage's measured epoch (one metrics.jsonl record) in seconds: ``compute_ideal``
    (its batches at the concurrent ideal's step time), ``compute_excess`` (its compute time
    above that), ``recv_wait``, ``send_wait``, ``other`` (the rest of its wall time), which
    add up to ``wall`` (from its first batch to the end of the epoch); ``outside`` = the
    epoch's ``time/epoch(s)`` - ``wall`` (before its first batch arrived: the fill; after its
    last: the drain and the end-of-epoch gather); ``minor_faults/batch``: host memory the
    stage faulted in per batch (NaN if the record predates the count)."""
    out = []
    for k, step in enumerate(concurrent_s):
        wall, busy = record[f"stage{k}/wall(s)"], record[f"stage{k}/busy(s)"]
        recv, send = record[f"stage{k}/recv_wait(s)"], record[f"stage{k}/send_wait(s)"]
        # Time in the channel's calls beyond their waits (0 where the record predates them).
        recv_total = record.get(f"stage{k}/recv_total(s)", recv)
        send_total = record.get(f"stage{k}/send_total(s)", send)
        batches = record[f"stage{k}/samples"] / batch
        ideal = batches * step
        threads = record.get(f"stage{k}/other_threads_cpu(s)")
        out.append({"compute_ideal": ideal, "compute_excess": busy - ideal, "recv_wait": recv,
                    "recv_handling": recv_total - recv, "send_wait": send,
                    "send_handling": send_total - send,
                    "other": wall - busy - recv_total - send_total, "wall": wall,
                    "outside": record["time/epoch(s)"] - wall,
                    "threads_cpu": math.nan if threads is None else threads,
                    "minor_faults/batch": record.get(f"stage{k}/minor_faults", math.nan)
                    / batches})
    return out


def analyse_micro(raw: dict[str, Any]) -> dict[str, Any]:
    """pipelocal at each micro-batch count beside torch's 1F1B at its best (``bench
    --micro-batches``): peers ``c RULE M=m`` and ``d 1f1b``, ratios to ``c RULE M=1``."""
    reps, part, depth = raw["repeats"], raw["partition"], raw["channel_depth"]
    peers: dict[str, Any] = {}
    for rule in raw["rules"]:
        for m in raw["micro_batches"]:
            mem = _pipelocal_memory(raw["memory"][rule][str(m)], part, depth)
            peers[f"c {rule} M={m}"] = _pipelocal_peer([r["c"][rule][str(m)] for r in reps], mem)
    peers["d 1f1b"] = _torchpipe_peer(reps, "1f1b")
    base = next(iter(peers))
    ratios = {f"{name} / {base}": stat([_throughput(r, name) / _throughput(r, base)
                                        for r in reps]) for name in peers if name != base}
    return {"peers": peers, "ratios": ratios}


def _throughput(rep: dict[str, Any], name: str) -> float:
    kind, _, which = name.partition(" ")
    if kind == "a":
        return rep["a"]["throughput(samples/s)"]
    if kind == "b":
        return rep["b"][which]["throughput(samples/s)"]
    if kind == "c":
        rule, _, m = which.partition(" M=")  # "pred" or, with micro-batches, "pred M=4"
        c = rep["c"][rule]
        return (c[m] if m else c)["throughput(samples/s)"]
    return _best_setting(rep["d"], which)["throughput(samples/s)"]


def _ratio(reps: list[dict[str, Any]], num: str, den: str) -> dict[str, Any]:
    return stat([_throughput(r, num) / _throughput(r, den) for r in reps])


def model_memory(peer: dict[str, Any]) -> float:
    """Largest device's activation (+ in-flight) + state, MiB."""
    flight = peer.get("in_flight(MiB)") or [0.0] * len(peer["activation(MiB)"])
    return max(a + f + st for a, f, st in zip(peer["activation(MiB)"], flight,
                                              peer["state(MiB)"]))


def _targets(out: dict[str, Any], rules: list[str], s: int) -> list[dict[str, Any]]:
    peers, rows = out["peers"], []
    act_a = peers["a glob"]["activation(MiB)"][0]
    d = peers["d 1f1b"]
    for rule in rules:
        c = peers[f"c {rule}"]
        bound = [act_a / s + f for f in c["in_flight(MiB)"]]
        rows.append({
            "target": f"c {rule}: peak activation per stage <= 1/S of (a)'s + in-flight buffers",
            "measured": [round(a + f, 3) for a, f in zip(c["activation(MiB)"],
                                                         c["in_flight(MiB)"])],
            "bound": [round(b, 3) for b in bound],
            "met": all(a + f <= b for a, f, b in zip(c["activation(MiB)"], c["in_flight(MiB)"],
                                                     bound)),
        })
        eff = out["efficiency"][rule]["vs_ideal_alone"]["median"]
        rows.append({"target": f"c {rule}: throughput >= 0.9 x ideal measured alone",
                     "measured": round(eff, 3), "bound": 0.9, "met": eff >= 0.9})
        eff = out["efficiency"][rule]["vs_ideal_concurrent"]["median"]
        rows.append({"target": f"c {rule}: throughput >= 0.95 x concurrent ideal",
                     "measured": round(eff, 3), "bound": 0.95, "met": eff >= 0.95})
        if "vs_ideal_in_stages" in out["efficiency"][rule]:
            eff = out["efficiency"][rule]["vs_ideal_in_stages"]["median"]
            rows.append({"target": f"c {rule}: throughput >= 0.95 x concurrent ideal measured "
                         "in its stage processes", "measured": round(eff, 3), "bound": 0.95,
                         "met": eff >= 0.95})
        ct, dt = (p["throughput(samples/s)"]["median"] for p in (c, d))
        rows.append({"target": f"c {rule} faster than d 1F1B (best micro-batches), same S",
                     "measured": round(ct, 1), "bound": round(dt, 1), "met": ct > dt})
        cm, dm = model_memory(c), model_memory(d)
        rows.append({"target": f"c {rule} less model memory per device than d 1F1B "
                     "(activation + in-flight + state, largest device, MiB)",
                     "measured": round(cm, 2), "bound": round(dm, 2), "met": cm < dm})
    return rows


# --------------------------------------------------------------------------- scaling model


def cost_table(raw: dict[str, Any], rule: str) -> list[BlockCost]:
    """Per-block costs: local times = median over the repeats' profiles; backprop: the plan's."""
    reps = raw["repeats"]
    glob = raw["plan_profile"]["glob_blocks"]
    rows = []
    for i, g in enumerate(glob):
        local = [r["profile"]["rules"][rule]["blocks"][i] for r in reps]
        rows.append(BlockCost(
            name=local[0]["name"],
            local_s=_median([b["local_s"] for b in local]),
            glob_s=g["glob_s"],
            glob_opt_s=g.get("glob_opt_s", 0.0),  # not measured before it was split out
            wire_bytes=local[0]["wire_bytes"],
            saved_local_bytes=local[0]["saved_local_bytes"],
            saved_glob_bytes=g["saved_glob_bytes"],
            state_local_bytes=local[0]["state_local_bytes"],
            state_glob_bytes=g["state_glob_bytes"],
        ))
    return rows


def link_of(transport: dict[str, Any]) -> Link:
    """Latency from the 4-byte message, bandwidth from the rest of the large one's time.

    Noise guard: on a busy machine the small message can take as long as the large one, so the
    latency is capped at half the large message's time.
    """
    one_way = transport["gloo_one_way(s)"]
    latency = min(transport["gloo_latency(s)"], one_way / 2)
    return Link(latency_s=latency, bytes_per_s=transport["bytes"] / (one_way - latency))


def _err(pred: float, meas: float) -> float:
    return pred / meas - 1 if meas else math.nan


def calibrated(table: list[BlockCost], step_s: float,
               scaled: list[BlockCost] | None = None) -> list[BlockCost]:
    """The blocks' backprop shares scaled so that they add up to ``step_s``, a measured
    end-to-end step: timed one block at a time they miss what the whole step costs beyond
    its blocks (the chained autograd graph, the loss). ``scaled``: another table (the same
    blocks at a micro-batch's rows) scaled by the same factor instead."""
    scale = step_s / sum(b.glob_s for b in table)
    return [dataclasses.replace(b, glob_s=b.glob_s * scale, glob_opt_s=b.glob_opt_s * scale)
            for b in scaled or table]


def _micro_cal(raw: dict[str, Any], table: list[BlockCost], step_s: float,
               microbatches: int) -> list[BlockCost] | None:
    """(d)'s micro-batch costs at their rows, scaled by the batch's calibration factor: a
    stage's chained blocks cost more than the blocks timed one at a time at any rows."""
    micro = micro_table(raw, table, microbatches)
    return None if micro is None else calibrated(table, step_s, micro)


def micro_table(raw: dict[str, Any], table: list[BlockCost],
                microbatches: int) -> list[BlockCost] | None:
    """``table`` with each block's backprop share measured at one micro-batch's rows (batch /
    ``microbatches``), if the plan's profile measured those rows (None otherwise)."""
    at = raw["plan_profile"].get("glob_blocks_at", {}).get(
        str(raw["batch_size"] // microbatches))
    if at is None:
        return None
    return [dataclasses.replace(b, glob_s=g["glob_s"], glob_opt_s=g.get("glob_opt_s", 0.0))
            for b, g in zip(table, at)]


def _scaling(raw: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    """The model's prediction at each measured point, twice: from the blocks' costs alone
    (``predicted``) and with what this run measured of the machine (``predicted_measured``:
    each stage's measured contention when S processes compute at once, backprop's block
    shares calibrated on (a)'s measured step, (d)'s micro-batches costed at their rows and
    scaled by the same factor); then
    the curves for S = 1..scale_max separate devices (no contention) from the calibrated
    costs."""
    s, batch, depth = raw["stages"], raw["batch_size"], raw["channel_depth"]
    link = link_of(out["transport"])
    peers = out["peers"]
    glob_table = cost_table(raw, raw["rules"][0])
    a_step = batch / peers["a glob"]["throughput(samples/s)"]["median"]
    glob_cal = calibrated(glob_table, a_step)
    contention = {rule: _median(out["efficiency"][rule]["contention"]) for rule in raw["rules"]}
    # torch's pipelining: the mean contention the local rules' stages measured (same
    # processes per core, same threads)
    d_contention = _median(list(contention.values()))
    a = predict_backprop(glob_table, batch)
    val = [{"peer": "a glob", "S": 1,
            "predicted(samples/s)": a["throughput(samples/s)"],
            "predicted_measured(samples/s)": predict_backprop(glob_cal, batch)[
                "throughput(samples/s)"],
            "measured(samples/s)": peers["a glob"]["throughput(samples/s)"]["median"],
            "predicted_activation(MiB)": a["activation(B)"] / MIB,
            "measured_activation(MiB)": peers["a glob"]["activation(MiB)"][0],
            "note": "calibrated on itself: error 0 by construction"}]
    curves: dict[str, list[Any]] = {"S": [], "a glob": []}
    n = len(glob_table)
    top = min(raw["scale_max"], n)
    for rule in raw["rules"]:
        table = cost_table(raw, rule)
        for peer, stages, part in ((f"b {rule}", 1, [n]),
                                   (f"c {rule}", s, raw["partitions"][rule])):
            kw = {"batch_size": batch, "batches": raw["pipe_batches"] if stages > 1 else 10**6,
                  "link": link, "channel_depth": depth, "partition": part}
            pred = predict_pipelocal(table, stages, **kw)
            pred_m = predict_pipelocal(table, stages, contention=contention[rule]
                                       if stages > 1 else 1.0, **kw)
            val.append({"peer": peer, "S": stages,
                        "predicted(samples/s)": pred["throughput(samples/s)"],
                        "predicted_measured(samples/s)": pred_m["throughput(samples/s)"],
                        "measured(samples/s)": peers[peer]["throughput(samples/s)"]["median"]})
        curves[f"c {rule}"] = [
            predict_pipelocal(table, k, batch_size=batch, batches=raw["batches_per_epoch"],
                              link=link, channel_depth=depth) for k in range(1, top + 1)]
    for sched in ("gpipe", "1f1b"):
        meas = peers[f"d {sched}"]
        kw = {"schedule": sched, "microbatches": meas["microbatches"], "batch_size": batch,
              "link": link, "partition": raw["partition_d"]}
        pred = predict_torchpipe(glob_table, s, **kw)
        pred_m = predict_torchpipe(glob_cal, s, contention=d_contention, micro=_micro_cal(
            raw, glob_table, a_step, meas["microbatches"]), **kw)
        val.append({"peer": f"d {sched}", "S": s, "microbatches": meas["microbatches"],
                    "predicted(samples/s)": pred["throughput(samples/s)"],
                    "predicted_measured(samples/s)": pred_m["throughput(samples/s)"],
                    "measured(samples/s)": meas["throughput(samples/s)"]["median"],
                    "predicted_activation(MiB)": pred["activation_per_device(B)"] / MIB,
                    "measured_activation(MiB)": max(meas["activation(MiB)"])})
        curves[f"d {sched}"] = [
            max((predict_torchpipe(glob_cal, k, schedule=sched, microbatches=f * k,
                                   batch_size=batch, link=link,
                                   micro=_micro_cal(raw, glob_table, a_step, f * k))
                 for f in raw["mb_factors"]),
                key=lambda p: p["throughput(samples/s)"])
            for k in range(1, top + 1)]
    curves["S"] = list(range(1, top + 1))
    curves["a glob"] = [predict_backprop(glob_cal, batch)] * top
    for row in val:
        row["error"] = _err(row["predicted(samples/s)"], row["measured(samples/s)"])
        row["error_measured"] = _err(row["predicted_measured(samples/s)"],
                                     row["measured(samples/s)"])
        if "measured_activation(MiB)" in row:
            row["activation_error"] = _err(row["predicted_activation(MiB)"],
                                           row["measured_activation(MiB)"])
    return {"link": {"latency(s)": link.latency_s, "bytes/s": link.bytes_per_s},
            "contention": contention, "contention_d": d_contention,
            "validation": val, "curves": curves,
            "limit": f"S <= {n}: the model has {n} blocks" if raw["scale_max"] > n else None}


# --------------------------------------------------------------------------- time to accuracy


def time_to_accuracy(runs: dict[str, list[dict[str, Any]]], margin: float) -> dict[str, Any]:
    """Training seconds (sum of time/epoch(s)) each run needs to first reach a common accuracy.

    The common accuracy is the best test accuracy of the first run (glob) minus ``margin``.
    """
    curves = {}
    for name, records in runs.items():
        t, pts = 0.0, []
        for r in records:
            t += r["time/epoch(s)"]
            pts.append({"epoch": r["epoch"], "train_time(s)": t, "test/acc": r["test/acc"]})
        curves[name] = pts
    first = next(iter(curves.values()))
    target = max(p["test/acc"] for p in first) - margin
    reach = {name: next((p["train_time(s)"] for p in pts if p["test/acc"] >= target), None)
             for name, pts in curves.items()}
    return {"target_acc": target, "margin": margin, "time_to_target(s)": reach,
            "curves": curves}
