"""The paper's Table 4 (and the foreground-cue variants) on the embedded synthetic benchmark.

Trains every row on benchmark seeds 0-2 (each seed is its own synthetic dataset and training seed) with
the demo's settings (``ecaseg/configs/synthetic.yaml``) and 300 of its 500 iterations (:data:`BUDGET`, so
that 27 runs fit in about an hour on 2 cores), and reports for each row the mean and standard deviation
over seeds of:

* ``cam``: the multi-scale CAM thresholded at alpha (Table 4's "CAM"), val split;
* ``pseudo``: the pseudo-label the decoder learns from: the CARM pseudo-label where the row trains on it,
  else the CAM pseudo-label (both are also in the JSON);
* ``seg``: the decoder with the config's multi-scale + flip inference and no CRF (Table 4's "Seg (msc)").

Rows (Table 4; AL = affinity learning, L_seg = CAM segmentation loss, L~_seg = CARM segmentation loss):

==========  ===============================================================================================
baseline    AFA: AL from CAM labels, L_seg with AFA's labels (band, then propagated), no CARM, no CCE
al_carm     + AL supervised by CARM labels
carm_seg    AL (CARM) + L~_seg only
both_seg    AL (CARM) + L_seg (ECA's alpha labels) + L~_seg
eca         both_seg + CCE: the paper's full ECA without prototype calibration
eca_calib   eca + CARM calibration (Eq. 8-10)
demo        the demo's ECA (synthetic.yaml: L~_seg only, CCE, contrast cue, no calibration)
demo_cls    demo with the class-token cue of Eq. (5)
demo_none   demo without a foreground cue
==========  ===============================================================================================

Rows that measured the demo's move to the paper's settings (``--rows differences``; the table of
differences in docs/demo.rst). ``demo_v1`` is the demo before it (commit be511eb); each ``demo_v1_*`` row is
``demo_v1`` with one setting set to the paper's (the ``voc`` config's):

===============  ========================================================================================
demo_v1          PAR with dilations 1, 2, 4, 5 iterations, at full size; radius 4; decoder width 64
demo_v1_msc      + the multi-scale CAM for the pseudo-labels: scales 1.0, 0.5, 1.5 (both with flip)
demo_v1_par      + AFA's PAR: dilations 1, 2, 4, 8, 12, 24, 10 iterations, at half size
demo_v1_radius8  + affinity-learning radius 8
demo_v1_dec256   + decoder width 256
demo             the demo now: AFA's PAR, radius 8, decoder width 256, single-scale CAM
demo_msc         the demo with the paper's multi-scale CAM too
===============  ========================================================================================

Writes ``results/ablation-<device>-<date>.json`` (every run's figures, means, standard deviations, times),
``ablation.md`` (the table) and ``ablation.png`` (bar chart) into ``--out``.

    python benchmarks/ablation.py --out ablation_out            # 9 rows x 3 seeds, about an hour, 2 cores
    python benchmarks/ablation.py --out ablation_diff --rows differences --tag differences  # 21 runs, 25 min
    python benchmarks/ablation.py --rows baseline,eca --seeds 0 --quick --out /tmp/abl   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_PAPER_CAM = ["method.cam_scales=[1.0,0.5,1.5]"]
_V1_PAR = ["method.par_dilations=[1,2,4]", "method.par_iters=5", "method.par_downsample=1"]
_V1_RADIUS = ["method.aff_radius=4"]
_V1_DECODER = ["model.decoder_dim=64"]
ROWS: dict[str, list[str]] = {
    "baseline": [
        "method.use_cam_seg=true",
        "method.use_carm_seg=false",
        "method.use_cce=false",
        "method.aff_source=cam",
        "method.cam_seg_label=afa_rw",
    ],
    "al_carm": [
        "method.use_cam_seg=true",
        "method.use_carm_seg=false",
        "method.use_cce=false",
        "method.aff_source=carm",
        "method.cam_seg_label=afa_rw",
    ],
    "carm_seg": ["method.use_cam_seg=false", "method.use_carm_seg=true", "method.use_cce=false"],
    "both_seg": ["method.use_cam_seg=true", "method.use_carm_seg=true", "method.use_cce=false"],
    "eca": ["method.use_cam_seg=true", "method.use_carm_seg=true", "method.use_cce=true"],
    "eca_calib": [
        "method.use_cam_seg=true",
        "method.use_carm_seg=true",
        "method.use_cce=true",
        "method.calibrate=true",
    ],
    "demo": [],
    "demo_cls": ["method.fg_cue=cls"],
    "demo_none": ["method.fg_cue=none"],
    # the demo's settings before it took the paper's PAR, radius and decoder width (commit be511eb): PAR with
    # dilations 1, 2, 4 and 5 iterations at full size, radius 4, decoder width 64; each demo_v1_* row moves
    # one setting to the paper's; demo_msc adds the paper's multi-scale CAM to the demo
    "demo_v1": [*_V1_PAR, *_V1_RADIUS, *_V1_DECODER],
    "demo_v1_msc": [*_PAPER_CAM, *_V1_PAR, *_V1_RADIUS, *_V1_DECODER],
    "demo_v1_par": [*_V1_RADIUS, *_V1_DECODER],
    "demo_v1_radius8": [*_V1_PAR, *_V1_DECODER],
    "demo_v1_dec256": [*_V1_PAR, *_V1_RADIUS],
    "demo_msc": [*_PAPER_CAM],
}
#: the rows of one default invocation: Table 4 and the foreground cues (about an hour on 2 cores)
TABLE4_ROWS = (
    "baseline",
    "al_carm",
    "carm_seg",
    "both_seg",
    "eca",
    "eca_calib",
    "demo",
    "demo_cls",
    "demo_none",
)
#: ``--rows differences``: the demo and each of its departures from the paper's recipe set back
DIFFERENCE_ROWS = (
    *("demo_v1", "demo_v1_msc", "demo_v1_par", "demo_v1_radius8", "demo_v1_dec256"),
    *("demo", "demo_msc"),
)
PAPER_TABLE4 = {  # VOC 2012 val, CAM / Seg (msc) in %, the paper's Table 4
    "baseline": (62.2, 63.5),
    "al_carm": (63.2, 65.0),
    "carm_seg": (66.6, 67.1),
    "both_seg": (66.8, 68.4),
    "eca": (69.1, 69.4),
}
METRICS = ("cam", "pseudo", "seg")
#: the ablation's budget: 27 runs in about an hour on 2 cores (the demo trains 500 iterations)
BUDGET = ["train.max_iters=300", "train.cls_warmup_iters=60", "optim.warmup_iters=30"]


def row_config(row: str, seed: int, quick: bool, overrides: list[str]) -> Any:
    """The config of one row on one benchmark seed: the demo's settings and budget plus the row's switches."""
    from ecaseg.engine.config import load_config
    from ecaseg.engine.demo import QUICK_BUDGET, seed_overrides

    common = [*seed_overrides(seed), *(QUICK_BUDGET if quick else BUDGET), *overrides]
    extra = list(ROWS[row])
    if "method.cam_seg_label=afa_rw" in extra:  # AFA's switch at 30 % of the iterations, as in the demo
        iters = load_config("synthetic", common).train.max_iters
        extra.append(f"method.rw_switch_iter={round(0.3 * iters)}")
    return load_config("synthetic", [*common, f"name={row}", *extra])


def run_one(
    row: str, seed: int, quick: bool, overrides: list[str], out: Path, evaluate_only: bool = False
) -> dict[str, Any]:
    """Train one row on one seed and evaluate it (runs in a worker process); ``evaluate_only`` evaluates the
    run's ``last.pth`` instead of training. The result is also written to the run's ``result.json``."""
    import torch

    from ecaseg.engine.builders import build_dataset
    from ecaseg.engine.evaluation import evaluate_segmentation
    from ecaseg.engine.trainer import ECATrainer
    from ecaseg.utils.io import atomic_write_text

    start = time.perf_counter()
    cfg = row_config(row, seed, quick, overrides)
    val = build_dataset(cfg, "val", train=False)
    run_dir = out / f"seed{seed}" / row
    if evaluate_only:
        trainer = ECATrainer(cfg, run_dir, resume=run_dir / "last.pth", val_dataset=val, progress=False)
    else:
        trainer = ECATrainer(cfg, run_dir, overwrite=True, val_dataset=val, progress=False)
        trainer.train()
    wsss = trainer.validate()
    ev = cfg.eval
    seg = evaluate_segmentation(
        trainer.net,
        val,
        device=trainer.device,
        scales=ev.scales,
        flip=ev.flip,
        crf=None,
        merge=ev.merge,
        resize_long=ev.resize_long,
        batch_size=ev.batch_size,
        progress=False,
    )
    trains_on_carm = cfg.method.use_carm_seg
    result = {
        "row": row,
        "seed": seed,
        "cam": wsss["cam_miou"],
        "pseudo": wsss["carm_pseudo_miou"] if trains_on_carm else wsss["cam_pseudo_miou"],
        "seg": float(seg["miou"]),
        "cam_pseudo": wsss["cam_pseudo_miou"],
        "carm_pseudo": wsss.get("carm_pseudo_miou", math.nan),
        "seconds": None if evaluate_only else time.perf_counter() - start,
        "evaluated_from_checkpoint": evaluate_only,
        "iterations": trainer.iteration,
        "threads": torch.get_num_threads(),
    }
    atomic_write_text(run_dir / "result.json", json.dumps(result, indent=2))
    return result


def _stats(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation of the finite values (NaN: a figure the row does not have)."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return {"mean": math.nan, "std": math.nan}
    return {"mean": statistics.fmean(finite), "std": statistics.stdev(finite) if len(finite) > 1 else 0.0}


def _table(summary: dict[str, dict[str, Any]], rows: list[str]) -> str:
    lines = [
        "| row | CAM (%) | pseudo-label (%) | Seg msc (%) | paper CAM / Seg msc (VOC) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        cells = [f"{100 * summary[row][m]['mean']:.1f} ± {100 * summary[row][m]['std']:.1f}" for m in METRICS]
        paper = PAPER_TABLE4.get(row)
        lines.append(
            f"| {row} | " + " | ".join(cells) + f" | {f'{paper[0]} / {paper[1]}' if paper else '-'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="run folders, ablation.md, ablation.png")
    parser.add_argument(
        "--rows",
        default=",".join(TABLE4_ROWS),
        help=f"comma-separated rows of {list(ROWS)}, or 'differences' ({','.join(DIFFERENCE_ROWS)})",
    )
    parser.add_argument("--tag", default="", help="record name ablation-TAG-<device>-<date>.json")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--quick", action="store_true", help="the demo's --quick budget (a smoke run)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one process, one thread each)")
    parser.add_argument("--results-dir", type=Path, default=None, help="default: benchmarks/results")
    parser.add_argument(
        "--rerun", action="store_true", help="train runs again even if their result.json exists"
    )
    parser.add_argument(
        "--evaluate-only",
        action="store_true",
        help="evaluate the runs' last.pth instead of training (runs without one are trained)",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides for every run (section.key=value)")
    args = parser.parse_args(argv)
    if args.worker is not None:  # one run: row:seed
        row, seed = args.worker.split(":")
        result = run_one(row, int(seed), args.quick, list(args.overrides), args.out, args.evaluate_only)
        print("RESULT " + json.dumps(result), flush=True)
        return

    rows = list(DIFFERENCE_ROWS) if args.rows == "differences" else args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    queue = [(row, seed) for seed in seeds for row in rows]
    running: list[tuple[subprocess.Popen[str], str, int]] = []
    results: list[dict[str, Any]] = []
    for row, seed in list(queue):  # finished runs are kept (a stopped ablation resumes)
        done = args.out / f"seed{seed}" / row / "result.json"
        if done.is_file() and not args.rerun:
            results.append(json.loads(done.read_text()))
            queue.remove((row, seed))
            print(f"{row} seed {seed}: kept {done}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    while queue or running:
        while queue and len(running) < max(1, args.jobs):
            row, seed = queue.pop(0)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(args.out)]
            cmd += ["--worker", f"{row}:{seed}", *(["--quick"] if args.quick else [])]
            checkpoint = args.out / f"seed{seed}" / row / "last.pth"
            cmd += ["--evaluate-only"] if args.evaluate_only and checkpoint.is_file() else []
            cmd += args.overrides
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
            running.append((proc, row, seed))
        time.sleep(0.5)
        for entry in list(running):
            proc, row, seed = entry
            if proc.poll() is None:
                continue
            running.remove(entry)
            out = proc.stdout.read() if proc.stdout else ""
            found = [line[len("RESULT ") :] for line in out.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not found:
                raise SystemExit(f"run {row} seed {seed} failed (exit code {proc.returncode})")
            result = json.loads(found[-1])
            results.append(result)
            took = "evaluated" if result["seconds"] is None else f"{result['seconds']:.0f} s"
            print(
                f"{row} seed {seed}: CAM {100 * result['cam']:.1f} pseudo {100 * result['pseudo']:.1f} "
                f"seg {100 * result['seg']:.1f} ({took})",
                flush=True,
            )
    summary: dict[str, dict[str, Any]] = {}
    for row in rows:
        runs = [r for r in results if r["row"] == row]
        summary[row] = {
            m: _stats([float(r[m]) for r in runs]) for m in (*METRICS, "cam_pseudo", "carm_pseudo")
        }
    elapsed = time.perf_counter() - start
    table = _table(summary, rows)
    header = (
        f"{'Table 4 on the synthetic benchmark' if not args.tag else f'ablation {args.tag}'}: seeds {seeds}, "
        "mean ± std, val split; "
        f"{len(results)} runs; this invocation took {elapsed / 60:.1f} min with {args.jobs} jobs"
        f"{'' if all(r['seconds'] is not None for r in results) else ' (some runs evaluated or kept)'}"
        ".\n\n"
    )
    from ecaseg.utils.io import atomic_write_text

    atomic_write_text(args.out / "ablation.md", header + table)
    import torch

    from ecaseg.engine.inference import write_png
    from ecaseg.engine.visualize import bar_chart

    chart = bar_chart(
        {m: [summary[row][m]["mean"] for row in rows] for m in METRICS},
        rows,
        title=f"benchmarks/ablation.py {args.tag or 'Table 4'}: mean over seeds {seeds}",
    )
    write_png(args.out / "ablation.png", chart)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import record

    settings = {
        "rows": {row: ROWS[row] for row in rows},
        "seeds": seeds,
        "quick": args.quick,
        "jobs": args.jobs,
        "overrides": args.overrides,
        "minutes": elapsed / 60,
    }
    figures = {"summary": summary, "runs": results, "paper_table4": PAPER_TABLE4}
    path = record(
        "ablation" + (f"-{args.tag}" if args.tag else ""),
        torch.device("cpu"),
        figures,
        settings,
        results_dir=args.results_dir,
    )
    print(table)
    print(f"wrote {path}, {args.out / 'ablation.md'}, {args.out / 'ablation.png'}")


if __name__ == "__main__":
    main()
