"""``ecaseg refine``: CAM files of other pipelines (IRN-style dicts, plain arrays) -> pseudo-label PNGs."""

from __future__ import annotations

import hashlib
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from ecaseg.cli import main
from ecaseg.data.io import read_mask
from ecaseg.data.synthetic import SyntheticConfig, write_synthetic_dataset
from ecaseg.engine.refine import RefineJob, precision_recall, read_cam_file, refine_folder, write_cam_file
from ecaseg.errors import DatasetError
from ecaseg.refine import DEFAULT_METHOD, REFINE_METHODS

RNG = np.random.default_rng(0)
RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The synthetic benchmark on disk (FolderDataset layout) plus IRN-style CAMs from its masks."""
    root = write_synthetic_dataset(
        tmp_path_factory.mktemp("data"), SyntheticConfig(image_size=32, num_train=1, num_val=5, seed=3)
    )
    cams = root.parent / "cams"
    cams.mkdir()
    ids = (root / "val.txt").read_text().split()
    gen = torch.Generator().manual_seed(0)
    for i in ids:
        mask = read_mask(root / "masks" / f"{i}.png", 6)
        keys = np.array(sorted({int(v) - 1 for v in np.unique(mask) if 0 < v < 255}), dtype=np.int64)
        high = np.stack([(mask == k + 1).astype(np.float32) * 0.8 + 0.1 for k in keys]) if keys.size else None
        if high is None:
            high = np.zeros((0, 32, 32), np.float32)
        high = high + 0.05 * torch.rand(high.shape, generator=gen).numpy()
        write_cam_file(cams / f"{i}.npy", keys, high / high.max(axis=(1, 2), keepdims=True).clip(1e-5))
    return {"root": root, "images": root / "images", "masks": root / "masks", "cams": cams}


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def _job(dataset: dict[str, Path], out: Path, **kw: object) -> RefineJob:
    args: dict[str, object] = {
        "cams": dataset["cams"],
        "images": dataset["images"],
        "out": out,
        "num_classes": 6,
        "method": "threshold",
        "masks": dataset["masks"],
        "dino": "vit_nano_p8_synthetic",
        "progress": False,
        "device": "cpu",
    }
    args.update(kw)
    return RefineJob(**args)  # type: ignore[arg-type]


def test_reads_both_dict_layouts_and_plain_arrays(tmp_path: Path) -> None:
    high = np.zeros((2, 16, 12), np.float32)
    high[0, :8] = 2.0
    high[1, 8:] = 1.0
    write_cam_file(tmp_path / "hr.npy", np.array([3, 0]), high)
    f = read_cam_file(tmp_path / "hr.npy", num_fg=4, image_size=(16, 12))
    assert f.layout == "dict" and f.labels.tolist() == [1, 0, 0, 1]
    assert torch.equal(f.cams[3], torch.from_numpy(high[0] / 2.0)) and torch.equal(
        f.cams[0], torch.from_numpy(high[1])
    )
    # IRN's stride-4 "cam" as a torch tensor, no high_res
    np.save(tmp_path / "low.npy", {"keys": np.array([1]), "cam": torch.ones(1, 4, 3) * 0.5})
    f = read_cam_file(tmp_path / "low.npy", num_fg=4, image_size=(16, 12))
    assert tuple(f.cams.shape) == (4, 4, 3) and float(f.cams[1].max()) == pytest.approx(1.0)
    # a plain [C, H, W] array and an .npz with its labels from the labels file
    np.save(tmp_path / "plain.npy", RNG.random((4, 16, 12), dtype=np.float32))
    f = read_cam_file(tmp_path / "plain.npy", 4, (16, 12), labels=np.array([0, 1, 1, 0]))
    assert f.layout == "array" and f.cams[0].abs().sum() == 0 and float(f.cams[1].max()) == pytest.approx(1.0)
    np.savez(tmp_path / "z.npz", cam=RNG.random((4, 16, 12), dtype=np.float32))
    assert read_cam_file(tmp_path / "z.npz", 4, (16, 12), labels=np.array([1, 0, 0, 0])).layout == "array"


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"high_res": np.ones((1, 16, 12))}, "has no 'keys'"),
        ({"keys": np.array([7]), "high_res": np.ones((1, 16, 12))}, "class index 7, outside 0..3"),
        ({"keys": np.array([1]), "high_res": np.ones((1, 12, 16))}, "does not match its image of 16x12"),
        ({"keys": np.array([1, 2]), "high_res": np.ones((1, 16, 12))}, "has 1 maps but 'keys' names 2"),
        ({"keys": np.array([1]), "high_res": np.full((1, 16, 12), np.nan)}, "NaN or infinite"),
        ({"keys": np.array([1])}, "neither 'high_res' nor 'cam'"),
        (np.ones((5, 16, 12), np.float32), "drop the background channel"),
        (np.ones((4, 16, 12), np.float32), "give the image labels"),
    ],
)
def test_malformed_files_name_the_file(tmp_path: Path, payload: object, message: str) -> None:
    path = tmp_path / "bad_file.npy"
    np.save(path, payload, allow_pickle=True)
    with pytest.raises(DatasetError, match=message) as info:
        read_cam_file(path, num_fg=4, image_size=(16, 12))
    assert "bad_file.npy" in str(info.value)


def test_truncated_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "cut.npy"
    path.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DatasetError, match=r"cannot read CAM file .*cut.npy"):
        read_cam_file(path, 4)


def test_refine_writes_labels_metrics_and_resumes(dataset: dict[str, Path], tmp_path: Path) -> None:
    before = {k: _digest(v) for k, v in dataset.items() if k != "root"}
    out = tmp_path / "out"
    summary = refine_folder(_job(dataset, out, save_npy=True))
    ids = sorted(p.stem for p in dataset["cams"].glob("*.npy"))
    assert summary["refined"] == len(ids) and summary["skipped"] == 0
    assert sorted(p.stem for p in out.glob("*.png")) == ids
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.5 < metrics["miou"] <= 1.0  # CAMs built from the masks
    assert set(metrics["per_class"]["background"]) == {"iou", "precision", "recall"}
    assert (out / "report.md").read_text().startswith("# ecaseg refine")
    saved = np.load(out / "npy" / f"{ids[0]}.npy", allow_pickle=True).item()
    assert {"keys", "high_res", "bg"} <= set(saved)
    # resume: a deleted label is redone, the others are kept as they are
    kept = {p.name: p.read_bytes() for p in out.glob("*.png")}
    (out / f"{ids[1]}.png").unlink()
    summary = refine_folder(_job(dataset, out, save_npy=True))
    assert summary["refined"] == 1 and summary["skipped"] == len(ids) - 1
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == kept
    assert json.loads((out / "metrics.json").read_text())["miou"] == metrics["miou"]
    assert {k: _digest(v) for k, v in dataset.items() if k != "root"} == before  # inputs untouched


def test_refine_refuses_unsafe_outputs(dataset: dict[str, Path], tmp_path: Path) -> None:
    from ecaseg.errors import ConfigError

    with pytest.raises(ConfigError, match=r"inside the input folder --images"):
        refine_folder(_job(dataset, dataset["images"] / "labels"))
    with pytest.raises(ConfigError, match=r"inside the input folder --cams"):
        refine_folder(_job(dataset, dataset["cams"]))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("mine")
    with pytest.raises(ConfigError, match=r"not empty and holds no refine.json"):
        refine_folder(_job(dataset, mine))
    assert (mine / "thesis.tex").read_text() == "mine"
    out = tmp_path / "run"
    refine_folder(_job(dataset, out))
    with pytest.raises(ConfigError, match=r"another refine run .*method"):
        refine_folder(_job(dataset, out, method="carm"))


def test_cli_refine_carm_par_and_errors(
    dataset: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = [
        "refine",
        "--cams",
        str(dataset["cams"]),
        "--images",
        str(dataset["images"]),
        "--num-classes",
        "6",
    ]
    common += ["--dino", "vit_nano_p8_synthetic", "--no-progress", "--device", "cpu"]
    out = tmp_path / "carm"
    assert main([*common, "--out", str(out), "--masks", str(dataset["masks"])]) == 0
    assert "mIoU" in capsys.readouterr().out
    assert json.loads((out / "refine.json").read_text())["method"] == DEFAULT_METHOD
    bad = tmp_path / "badcams"
    bad.mkdir()
    np.save(
        bad / "val_000000.npy", {"keys": np.array([9]), "high_res": np.ones((1, 32, 32))}, allow_pickle=True
    )
    argv = ["refine", "--cams", str(bad), "--images", str(dataset["images"]), "--num-classes", "6"]
    assert main([*argv, "--out", str(tmp_path / "o"), "--method", "threshold", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "val_000000.npy" in err and "class index 9" in err
    assert main([*argv, "--out", str(tmp_path / "o2"), "--method", "nope"]) == 2
    assert "--method must be one of" in capsys.readouterr().err


def test_plain_arrays_with_a_labels_file(dataset: dict[str, Path], tmp_path: Path) -> None:
    cams = tmp_path / "plain"
    cams.mkdir()
    labels = json.loads((dataset["root"] / "labels.json").read_text())
    ids = (dataset["root"] / "val.txt").read_text().split()
    for i in ids:
        np.save(cams / f"{i}.npy", RNG.random((5, 8, 8), dtype=np.float32))
    summary = refine_folder(
        _job(
            dataset,
            tmp_path / "out",
            cams=cams,
            labels=dataset["root"] / "labels.json",
            classes=dataset["root"] / "classes.txt",
            masks=None,
        )
    )
    assert summary["refined"] == len(ids) and "miou" not in summary
    names = (dataset["root"] / "classes.txt").read_text().split()
    for i in ids:
        allowed = {0} | {names.index(n) for n in labels[i]}
        assert set(np.unique(read_mask(tmp_path / "out" / f"{i}.png", 6)).tolist()) <= allowed


def test_precision_recall_known_values() -> None:
    precision, recall = precision_recall([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    assert precision[:2] == [1.0, 2 / 3] and recall[:2] == [0.75, 1.0]
    assert np.isnan(precision[2]) and np.isnan(recall[2])


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    import ecaseg

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"ecaseg {ecaseg.__version__}"


def test_default_method_is_the_best_recorded() -> None:
    """DEFAULT_METHOD has the highest mean pseudo-label mIoU over the recorded sources and seeds."""
    records = sorted(RESULTS.glob("refine-cpu-*.json"))
    assert records, "no benchmarks/results/refine-cpu-*.json record"
    summary = json.loads(records[-1].read_text())["figures"]["summary"]
    means = {m: statistics.mean(src[m]["miou_mean"] for src in summary.values()) for m in REFINE_METHODS}
    assert max(means, key=lambda m: means[m]) == DEFAULT_METHOD, means


def test_nothing_is_written_before_the_checks_and_the_vit_pass(
    dataset: dict[str, Path], tmp_path: Path
) -> None:
    """A wrong --dino-weights or a labels file without a row stops the run before --out is created, so the
    corrected run is not refused as "another run"; a manifest without any label does not block a new run."""
    from ecaseg.errors import CheckpointError

    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"--dino vit_nano_p8: .*no.pth.*--dino-weights FILE"):
        refine_folder(
            _job(dataset, out, method="carm", dino="vit_nano_p8", dino_weights=str(tmp_path / "no.pth"))
        )
    assert not out.exists()
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"val_000000": ["circle"]}))
    with pytest.raises(DatasetError, match=r"has no row for val_000001 \(4 ids missing\)"):
        refine_folder(_job(dataset, out, labels=labels, classes=dataset["root"] / "classes.txt"))
    assert not out.exists()
    out.mkdir()
    (out / "refine.json").write_text(json.dumps({"method": "crf"}))  # an earlier run that wrote no label
    assert refine_folder(_job(dataset, out))["refined"] == 5
    assert json.loads((out / "refine.json").read_text())["method"] == "threshold"


def test_a_mask_of_another_size_is_named(dataset: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from ecaseg.data.io import write_mask

    masks = tmp_path / "masks"
    shutil.copytree(dataset["masks"], masks)
    write_mask(masks / "val_000002.png", np.zeros((16, 32), np.uint8))
    with pytest.raises(DatasetError, match=r"val_000002.png is 16x32 but its image is 32x32"):
        refine_folder(_job(dataset, tmp_path / "out", masks=masks))
