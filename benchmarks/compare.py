"""This tree against an older commit, in one run, interleaved: PAR, CARMGenerator, training steps, inference.

The older commit is checked out into a temporary git worktree; two worker processes (one per tree, each
importing its own ``ecaseg``) take turns: every round runs each part once in each tree, the order of the
two trees alternating between rounds, so that both see the same machine load. Reports medians over all
rounds, the speed-ups, CARMGenerator's extra peak memory (peak RSS reset before the call, Linux) and the
largest difference between the two trees' CARM outputs, and writes
``results/compare-<device>-<date>.json`` with both commits.

    python benchmarks/compare.py --base 6103ddc                 # everything, CPU
    python benchmarks/compare.py --base 6103ddc --parts par,carm --rounds 5

Parts (CPU sizes; random weights, speed does not depend on them):

* ``par``: :func:`ecaseg.par.par_refine`, batch 2, 21 classes, 256 x 256, AFA's dilations, 10 iterations;
* ``carm``: ``CARMGenerator``, batch 4, 21 classes, N = 1024 (32 x 32 DINO grid, 16 x 16 CAMs) and
  N = 4096 (64 x 64, 32 x 32), the training call;
* ``step``: the ECA and AFA-style training steps of each tree's ``voc`` config (MiT-B1, DINO ViT-S/8,
  batch 2, 256 crops, 128 local views), each tree with its own defaults;
* ``infer``: images per second over 8 images of 256 x 256 with multi-scale (0.5, 0.75, 1.0, 1.25, 1.5) +
  flip, probabilities averaged (the protocol of 6103ddc), MiT-B1, 21 classes: the older tree one image
  at a time, this tree through ``predict_batched`` when it has it.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: the CPU size of the step comparison, on top of ``common.RANDOM_WEIGHTS``
STEP_SIZE = ["train.batch_size=2", "data.crop_size=256", "method.local_size=128", "train.device=cpu"]


# ----------------------------------------------------------------------------- worker side
def _memory_kb() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {key: int(re.search(key + r":\s+(\d+)", text).group(1)) for key in ("VmRSS", "VmHWM")}  # type: ignore[union-attr]


def _extra_peak_mb(fn: Callable[[], Any]) -> float | None:
    """Peak resident memory above the current one while ``fn`` runs (Linux; ``None`` elsewhere)."""
    try:
        import ctypes
        import gc

        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap memory back to the system: it counts again
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
        before = _memory_kb()["VmRSS"]
        fn()
        return (_memory_kb()["VmHWM"] - before) / 1024
    except (OSError, AttributeError):
        return None


class _Worker:
    """The parts, built against whichever ``ecaseg`` this process imports."""

    def __init__(self, out_dir: Path) -> None:
        import torch

        self.torch = torch
        self.out_dir = out_dir
        self.fns: dict[str, Callable[[], Any]] = {}
        self.peak: dict[str, float | None] = {}

    def _par(self) -> Callable[[], Any]:
        from ecaseg.par import par_refine

        g = self.torch.Generator().manual_seed(0)
        images = self.torch.rand(2, 3, 256, 256, generator=g)
        masks = self.torch.rand(2, 21, 256, 256, generator=g).softmax(1)
        return lambda: par_refine(images, masks)

    def _carm(self, grid: int) -> Callable[[], Any]:
        import ecaseg.carm as carm_module

        torch = self.torch
        batch, classes, dim, cam_grid = 4, 21, 384, grid // 2
        g = torch.Generator().manual_seed(0)
        cams = torch.rand(batch, classes - 1, cam_grid, cam_grid, generator=g)
        labels = (torch.rand(batch, classes - 1, generator=g) < 0.15).float()
        labels[:, 0] = 1
        keys = torch.randn(batch, grid * grid, dim, generator=g)
        query = torch.randn(batch, dim, generator=g)
        features = torch.randn(batch, 512, cam_grid, cam_grid, generator=g)
        params = inspect.signature(carm_module.CARMGenerator).parameters
        kwargs = {"validate": False} if "validate" in params else {}
        forward = inspect.signature(carm_module.CARMGenerator.forward).parameters
        if "keys" in forward:  # before 0.2: keys, query and grid as separate arguments

            def call(sae: Any) -> Any:
                return sae(cams, labels, keys, query, (grid, grid), features, update_prototypes=False)
        else:
            from ecaseg.dino_features import DINOFeatures

            dino = DINOFeatures(keys=keys, cls_query=query, grid=(grid, grid))

            def call(sae: Any) -> Any:
                return sae(cams, labels, dino, features, update_prototypes=False)

        sae = carm_module.CARMGenerator(num_classes=classes, feature_dim=512, **kwargs)
        out = call(sae)
        torch.save(out.carm, self.out_dir / f"carm{grid}.pt")
        self.peak[f"carm_n{grid * grid}"] = _extra_peak_mb(lambda: call(sae))
        return lambda: call(sae)

    def _step(self, variant: str) -> Callable[[], Any]:
        from ecaseg.engine.config import load_config
        from ecaseg.engine.trainer import ECATrainer

        torch = self.torch

        class Data(torch.utils.data.Dataset):  # type: ignore[misc]
            num_classes = 21
            class_names = tuple(f"c{i}" for i in range(21))

            def __len__(self) -> int:
                return 16

            def __getitem__(self, index: int) -> dict[str, Any]:
                g = torch.Generator().manual_seed(index)
                label = (torch.rand(20, generator=g) < 0.15).float()
                label[index % 20] = 1.0
                return {
                    "image": torch.randn(3, 256, 256, generator=g),
                    "label": label,
                    "crop_box": torch.tensor([0, 256, 0, 256]),
                    "id": str(index),
                }

        data = Data()
        from common import RANDOM_WEIGHTS, STEP_VARIANTS  # this script's folder (the worker's sys.path[0])

        cfg = load_config("voc", [*RANDOM_WEIGHTS, *STEP_SIZE, *STEP_VARIANTS[variant]])
        work = tempfile.mkdtemp(prefix="ecaseg-compare-")
        kwargs = {"overwrite": True} if "overwrite" in inspect.signature(ECATrainer).parameters else {}
        trainer = ECATrainer(cfg, work, train_dataset=data, progress=False, **kwargs)
        batch = {k: torch.stack([data[i][k] for i in range(2)]) for k in ("image", "label", "crop_box")}
        return lambda: trainer.train_step(batch)

    def _infer(self) -> Callable[[], Any]:
        import ecaseg.engine.inference as inference
        from ecaseg.models import ECANet

        torch = self.torch
        net = ECANet("mit_b1", num_classes=21).eval()
        g = torch.Generator().manual_seed(0)
        images = [torch.randn(3, 256, 256, generator=g) for _ in range(8)]
        protocol: dict[str, Any] = {"scales": (0.5, 0.75, 1.0, 1.25, 1.5), "flip": True}
        if hasattr(inference, "predict_batched"):
            protocol |= {"merge": "mean", "resize_long": 0}

            def run() -> Any:
                return list(
                    inference.predict_batched(
                        net, enumerate(images), device=torch.device("cpu"), batch_size=0, **protocol
                    )
                )
        else:

            def run() -> Any:
                return [inference.predict_labels(net, x[None], **protocol) for x in images]

        return run

    def build(self, part: str) -> Callable[[], Any]:
        if part == "par":
            return self._par()
        if part.startswith("carm_n"):
            return self._carm(round(int(part[len("carm_n") :]) ** 0.5))
        if part.startswith("step_"):
            return self._step(part[len("step_") :])
        if part == "infer":
            return self._infer()
        raise ValueError(f"unknown part {part!r}")

    def run(self, part: str, repeats: int) -> list[float]:
        if part not in self.fns:
            self.fns[part] = self.build(part)
            for _ in range(3 if part.startswith("step_") else 1):  # warm-up (the first steps are slower)
                self.fns[part]()
        fn = self.fns[part]
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1000.0)
        return samples


def worker_main(out_dir: Path, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    import ecaseg

    worker = _Worker(out_dir)
    print(json.dumps({"ready": str(Path(ecaseg.__file__).resolve())}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        samples = worker.run(request["part"], int(request["repeats"]))
        print(json.dumps({"ms": samples, "peak_mb": worker.peak}), flush=True)


# ----------------------------------------------------------------------------- coordinator side
def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


class _Tree:
    def __init__(self, name: str, path: Path, out_dir: Path, threads: int) -> None:
        self.name, self.path = name, path
        out_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": str(path)}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--worker",
                str(out_dir),
                "--threads",
                str(threads),
            ],
            cwd=out_dir,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        hello = self._read()
        if not Path(hello["ready"]).is_relative_to(path):
            raise RuntimeError(f"the {name} worker imported {hello['ready']}, not the tree at {path}")
        self.peak_mb: dict[str, float | None] = {}

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} worker stopped (exit code {self.proc.wait()})")
        result: dict[str, Any] = json.loads(line)
        return result

    def run(self, part: str, repeats: int) -> list[float]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"part": part, "repeats": repeats}) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        self.peak_mb = reply["peak_mb"]
        samples: list[float] = reply["ms"]
        return samples

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="6103ddc", help="the older commit")
    parser.add_argument("--parts", default="par,carm,step,infer")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="calls per part, tree and round")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--results-dir", type=Path, default=None, help="default: benchmarks/results")
    parser.add_argument("--tag", default="", help="record as compare-TAG-<device>-<date>.json")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker_main(args.worker, args.threads)
        return

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import record

    try:
        base_sha = _git("rev-parse", "--verify", f"{args.base}^{{commit}}")
    except subprocess.CalledProcessError:
        parser.error(f"--base {args.base!r} is not a commit of {ROOT}")
    wanted = set(args.parts.split(","))
    parts = [p for p in ("par",) if p in wanted]
    parts += ["carm_n1024", "carm_n4096"] if "carm" in wanted else []
    parts += ["step_eca", "step_afa"] if "step" in wanted else []
    parts += ["infer"] if "infer" in wanted else []
    scratch = Path(tempfile.mkdtemp(prefix="ecaseg-compare-"))
    base_tree = scratch / "base"
    _git("worktree", "add", "--detach", str(base_tree), base_sha)
    trees: list[_Tree] = []
    try:
        trees = [
            _Tree("base", base_tree, scratch / "out-base", args.threads),
            _Tree("head", ROOT, scratch / "out-head", args.threads),
        ]
        samples: dict[str, dict[str, list[float]]] = {t.name: {p: [] for p in parts} for t in trees}
        for r in range(args.rounds):
            for part in parts:
                for tree in trees if r % 2 == 0 else trees[::-1]:
                    samples[tree.name][part] += tree.run(part, args.repeats)
            print(f"round {r + 1}/{args.rounds} done", flush=True)
        figures: dict[str, Any] = {}
        for part in parts:
            base_ms = statistics.median(samples["base"][part])
            head_ms = statistics.median(samples["head"][part])
            figures[part] = {"base_ms": base_ms, "head_ms": head_ms, "speedup": base_ms / head_ms}
            if part.startswith("carm"):
                grid = round(int(part[len("carm_n") :]) ** 0.5)
                a = torch.load(scratch / "out-base" / f"carm{grid}.pt")
                b = torch.load(scratch / "out-head" / f"carm{grid}.pt")
                figures[part]["max_abs_diff"] = float((a - b).abs().max())
                peak_base, peak_head = trees[0].peak_mb[part], trees[1].peak_mb[part]
                figures[part] |= {"base_extra_peak_mb": peak_base, "head_extra_peak_mb": peak_head}
                if peak_base and peak_head:
                    figures[part]["memory_ratio"] = peak_head / peak_base
            if part == "infer":
                figures[part] |= {"base_images_per_s": 8000 / base_ms, "head_images_per_s": 8000 / head_ms}
            print(part, json.dumps(figures[part]), flush=True)
        if "step_eca" in figures and "step_afa" in figures:
            for name in ("base", "head"):
                ratio = figures["step_eca"][f"{name}_ms"] / figures["step_afa"][f"{name}_ms"]
                figures[f"eca_over_afa_{name}"] = ratio
                print(f"ECA / AFA-style step, {name}: {ratio:.2f}")
        settings = {
            "base_commit": base_sha,
            "rounds": args.rounds,
            "repeats": args.repeats,
            "threads": args.threads,
            "samples": samples,
        }
        torch.set_num_threads(args.threads)
        kind = f"compare-{args.tag}" if args.tag else "compare"
        path = record(kind, torch.device("cpu"), figures, settings, results_dir=args.results_dir)
        print(f"wrote {path}")
    finally:
        for tree in trees:
            tree.close()
        subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT, check=False)


if __name__ == "__main__":
    main()
