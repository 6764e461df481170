"""Datasets of ecaseg.data: layouts, splits, label cache and bad input, on tiny fixtures in tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import ecaseg.data.labels as labels_module
from ecaseg.data import (
    COCO_CLASSES,
    VOC_CLASSES,
    COCOSegDataset,
    FolderDataset,
    TrainTransform,
    VOCAugDataset,
    read_image,
    read_mask,
    voc_palette,
    write_mask,
)
from ecaseg.errors import DatasetError

# ----------------------------------------------------------------------------------------------- helpers


def write_jpg(path: Path, h: int, w: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    assert cv2.imwrite(str(path), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def write_png_mask(path: Path, mask: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if palette:  # like VOC's SegmentationClass: a "P" image whose indices are the labels
        img = Image.frombytes("P", (mask.shape[1], mask.shape[0]), mask.astype(np.uint8).tobytes())
        img.putpalette(voc_palette().reshape(-1).tolist())
        img.save(path)
    else:
        assert cv2.imwrite(str(path), mask.astype(np.uint8))


def make_mask(h: int, w: int, classes: list[int], ignore_border: bool = True) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    for k, c in enumerate(classes):
        mask[k % h, (2 * k) % w :] = c
    if ignore_border:
        mask[-1, :] = 255
    return mask


def reference_labels(masks: dict[str, np.ndarray], ids: list[str], num_classes: int) -> np.ndarray:
    """Loop-based reference: label c-1 is set iff class c (1..K-1) occurs in the mask."""
    out = np.zeros((len(ids), num_classes - 1), np.uint8)
    for row, image_id in enumerate(ids):
        for value in np.unique(masks[image_id]):
            if 1 <= value < num_classes:
                out[row, value - 1] = 1
    return out


H, W = 6, 8
# id -> classes in its SegmentationClassAug mask
AUG = {"a1": [1, 15], "a2": [8], "a3": [], "t1": [12, 3], "v1": [3], "v2": [20, 7]}
# SegmentationClass (VOC's own palette masks) for train/val ids; v1 deliberately differs from its Aug mask
VOCSEG = {"t1": [12, 3], "a1": [1, 15], "v1": [9], "v2": [20, 7]}
TRAIN, VAL, TEST = ["t1", "a1"], ["v1", "v2"], ["x1"]


@pytest.fixture
def voc(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray], dict[str, np.ndarray]]:
    root = tmp_path / "VOCdevkit" / "VOC2012"
    aug, seg = {}, {}
    for seed, image_id in enumerate([*AUG, "x1"]):
        write_jpg(root / "JPEGImages" / f"{image_id}.jpg", H, W, seed)
    for image_id, classes in AUG.items():
        aug[image_id] = make_mask(H, W, classes)
        write_png_mask(root / "SegmentationClassAug" / f"{image_id}.png", aug[image_id])
    for image_id, classes in VOCSEG.items():
        seg[image_id] = make_mask(H, W, classes)
        write_png_mask(root / "SegmentationClass" / f"{image_id}.png", seg[image_id], palette=True)
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    for name, ids in (("train", TRAIN), ("val", VAL), ("test", TEST)):
        (sets / f"{name}.txt").write_text("\n".join(ids) + "\n")
    return root, aug, seg


# ----------------------------------------------------------------------------------------------- io


def test_read_image_rgb_and_errors(tmp_path: Path) -> None:
    img = np.zeros((3, 4, 3), np.uint8)
    img[..., 2] = 200  # BGR red
    cv2.imwrite(str(tmp_path / "a.png"), img)
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (3, 4, 3)
    assert (out[..., 0] == 200).all() and (out[..., 2] == 0).all()
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(DatasetError, match=r"bad\.jpg"):
        read_image(tmp_path / "bad.jpg")
    with pytest.raises(DatasetError, match=r"missing\.jpg"):
        read_image(tmp_path / "missing.jpg")


def test_read_mask_palette_values_and_errors(tmp_path: Path) -> None:
    mask = np.array([[0, 5, 255], [20, 1, 0]], np.uint8)
    write_png_mask(tmp_path / "p.png", mask, palette=True)
    write_png_mask(tmp_path / "g.png", mask)
    np.testing.assert_array_equal(read_mask(tmp_path / "p.png", 21), mask)
    np.testing.assert_array_equal(read_mask(tmp_path / "g.png", 21), mask)
    write_png_mask(tmp_path / "bad.png", np.array([[0, 30], [100, 255]], np.uint8))
    with pytest.raises(DatasetError, match=r"bad\.png.*30, 100"):
        read_mask(tmp_path / "bad.png", 21)
    assert read_mask(tmp_path / "bad.png", 101).max() == 255  # valid with more classes
    cv2.imwrite(str(tmp_path / "rgb.png"), np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"rgb\.png.*single-channel"):
        read_mask(tmp_path / "rgb.png", 21)
    (tmp_path / "junk.png").write_bytes(b"junk")
    with pytest.raises(DatasetError, match=r"junk\.png"):
        read_mask(tmp_path / "junk.png", 21)
    with pytest.raises(DatasetError, match=r"nothere\.png"):
        read_mask(tmp_path / "nothere.png", 21)


def test_write_mask_roundtrip_gray_and_palette(tmp_path: Path) -> None:
    mask = np.array([[0, 7], [255, 20]])
    write_mask(tmp_path / "g.png", mask)
    write_mask(tmp_path / "sub" / "p.png", mask, palette=voc_palette())
    gray = cv2.imread(str(tmp_path / "g.png"), cv2.IMREAD_UNCHANGED)
    assert gray is not None and gray.tolist() == mask.tolist()
    with Image.open(tmp_path / "sub" / "p.png") as img:
        assert img.mode == "P"
    assert read_mask(tmp_path / "sub" / "p.png", 21).tolist() == mask.tolist()
    with pytest.raises(ValueError):
        write_mask(tmp_path / "x.png", np.array([[256]]))


def test_class_tables_and_palette() -> None:
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[0] == "background" and VOC_CLASSES[15] == "person"
    assert VOC_CLASSES[20] == "tvmonitor"
    assert len(COCO_CLASSES) == 81 and COCO_CLASSES[1] == "person" and COCO_CLASSES[80] == "toothbrush"
    assert (
        COCO_CLASSES[61] == "dining table" and COCO_CLASSES[62] == "toilet" and len(set(COCO_CLASSES)) == 81
    )
    pal = voc_palette()
    known = {
        0: (0, 0, 0),
        1: (128, 0, 0),
        2: (0, 128, 0),
        4: (0, 0, 128),
        15: (192, 128, 128),
        20: (0, 64, 128),
    }
    for index, colour in known.items():
        assert tuple(pal[index]) == colour
    assert len({tuple(c) for c in pal}) == 256


# ----------------------------------------------------------------------------------------------- VOC


def test_voc_train_aug_is_aug_minus_val(voc) -> None:
    root, aug, _ = voc
    ds = VOCAugDataset(root, "train_aug")
    expected = sorted(set(AUG) - set(VAL))
    assert ds.ids == expected and len(ds) == 4
    assert ds.num_classes == 21 and ds.class_names == VOC_CLASSES and ds.has_masks and ds.has_labels
    np.testing.assert_array_equal(ds.labels, reference_labels(aug, expected, 21))
    item = ds[expected.index("a1")]
    assert item["id"] == "a1" and item["image"].shape == (H, W, 3) and item["image"].dtype == np.uint8
    np.testing.assert_array_equal(item["mask"], aug["a1"])
    assert item["label"].dtype == torch.float32 and item["label"].shape == (20,)
    assert torch.nonzero(item["label"]).flatten().tolist() == [0, 14]
    assert ds.image_path(0) == root / "JPEGImages" / f"{expected[0]}.jpg"
    assert ds[expected.index("a3")]["label"].sum() == 0  # image with background only


def test_voc_root_may_be_vocdevkit_or_voc2012(voc) -> None:
    root, _, _ = voc
    assert VOCAugDataset(root.parent, "val").ids == VOCAugDataset(root, "val").ids == VAL


def test_voc_train_and_val_prefer_segmentation_class(voc) -> None:
    root, aug, seg = voc
    train = VOCAugDataset(root, "train")
    assert train.ids == TRAIN and train.mask_dir == root / "SegmentationClass"
    val = VOCAugDataset(root, "val")
    np.testing.assert_array_equal(val.labels, reference_labels(seg, VAL, 21))
    np.testing.assert_array_equal(val[0]["mask"], seg["v1"])  # palette indices, not colours
    # Without a complete SegmentationClass folder the Aug masks are used.
    (root / "SegmentationClass" / "v2.png").unlink()
    val = VOCAugDataset(root, "val")
    assert val.mask_dir == root / "SegmentationClassAug"
    np.testing.assert_array_equal(val.labels, reference_labels(aug, VAL, 21))


def test_voc_test_split_has_no_masks(voc) -> None:
    root, _, _ = voc
    ds = VOCAugDataset(root, "test", transform=TrainTransform(crop_size=8, resize_long=None))
    assert ds.ids == TEST and not ds.has_masks and not ds.has_labels
    item = ds[0]
    assert "mask" not in item and item["image"].shape == (3, 8, 8) and item["label"].sum() == 0
    assert ds.mask_path(0) is None


def test_voc_id_file_split(voc, tmp_path: Path) -> None:
    root, aug, _ = voc
    ids_file = tmp_path / "mine.txt"
    ids_file.write_text("a2\n\n/JPEGImages/v1.jpg /SegmentationClassAug/v1.png\n")
    ds = VOCAugDataset(root, ids_file)
    assert ds.ids == ["a2", "v1"] and ds.mask_dir == root / "SegmentationClassAug"
    np.testing.assert_array_equal(ds.labels, reference_labels(aug, ["a2", "v1"], 21))
    only_test = tmp_path / "unlabelled.txt"
    only_test.write_text("x1\n")
    ds = VOCAugDataset(root, str(only_test))
    assert not ds.has_masks and not ds.has_labels


def test_voc_layout_errors(voc, tmp_path: Path) -> None:
    root, _, _ = voc
    with pytest.raises(DatasetError, match=r"(?s)does not exist.*SegmentationClassAug.*ImageSets"):
        VOCAugDataset(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match=r"(?s)no JPEGImages.*VOC2012"):
        VOCAugDataset(empty)
    with pytest.raises(DatasetError, match="unknown VOC split 'trian'"):
        VOCAugDataset(root, "trian")
    (root / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(DatasetError, match=r"val\.txt"):
        VOCAugDataset(root, "train_aug")


def test_voc_missing_folders_and_files(voc) -> None:
    root, _, _ = voc
    (root / "JPEGImages" / "a2.jpg").unlink()
    with pytest.raises(DatasetError, match=r"a2\.jpg"):
        VOCAugDataset(root, "train_aug")
    for name in ("SegmentationClass", "SegmentationClassAug"):
        for f in (root / name).iterdir():
            f.unlink()
        (root / name).rmdir()
    with pytest.raises(DatasetError, match=r"(?s)SegmentationClassAug.*expected layout"):
        VOCAugDataset(root, "train_aug")
    with pytest.raises(DatasetError, match=r"no mask folder"):
        VOCAugDataset(root, "val")


def test_voc_bad_image_bad_size_bad_values(voc) -> None:
    root, _, _ = voc
    (root / "JPEGImages" / "a1.jpg").write_bytes(b"\xff\xd8 broken")
    ds = VOCAugDataset(root, "train_aug")
    with pytest.raises(DatasetError, match=r"a1\.jpg"):
        ds[ds.ids.index("a1")]
    write_png_mask(root / "SegmentationClassAug" / "a2.png", np.zeros((H + 1, W), np.uint8))
    ds = VOCAugDataset(root, "train_aug")
    with pytest.raises(DatasetError, match=r"a2\.png.*7x8.*a2\.jpg.*6x8"):
        ds[ds.ids.index("a2")]
    bad = make_mask(H, W, [3])
    bad[0, :2] = (21, 99)
    write_png_mask(root / "SegmentationClassAug" / "a3.png", bad)
    with pytest.raises(DatasetError, match=r"a3\.png.*21, 99"):
        VOCAugDataset(root, "train_aug")


def test_label_cache_computed_once_and_invalidated(voc, monkeypatch) -> None:
    root, _, _ = voc
    calls: list[Path] = []
    real = labels_module.read_mask

    def counting(path, num_classes, ignore_index=255):
        calls.append(Path(path))
        return real(path, num_classes, ignore_index)

    monkeypatch.setattr(labels_module, "read_mask", counting)
    first = VOCAugDataset(root, "train_aug")
    assert len(calls) == 4 and (root / ".ecaseg-labels-voc-train_aug.npz").is_file()
    calls.clear()
    second = VOCAugDataset(root, "train_aug")
    assert calls == []  # served from the cache
    np.testing.assert_array_equal(first.labels, second.labels)
    second[0]  # reading items does not go through the label reader either
    assert calls == []

    # Changing a mask (content, size and mtime) invalidates the cache.
    new = make_mask(H, W, [19])
    write_png_mask(root / "SegmentationClassAug" / "a2.png", new)
    st = os.stat(root / "SegmentationClassAug" / "a2.png")
    os.utime(root / "SegmentationClassAug" / "a2.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = VOCAugDataset(root, "train_aug")
    assert len(calls) == 4
    assert third.labels[third.ids.index("a2")].nonzero()[0].tolist() == [18]

    # Changing the id list (a new SBD mask) invalidates it too.
    calls.clear()
    write_jpg(root / "JPEGImages" / "a4.jpg", H, W)
    write_png_mask(root / "SegmentationClassAug" / "a4.png", make_mask(H, W, [2]))
    fourth = VOCAugDataset(root, "train_aug")
    assert len(calls) == 5 and "a4" in fourth.ids
    calls.clear()
    VOCAugDataset(root, "train_aug")
    assert calls == []


def test_label_cache_dir_and_unwritable_root(voc, tmp_path: Path, monkeypatch) -> None:
    root, aug, _ = voc
    cache = tmp_path / "cache"
    ds = VOCAugDataset(root, "train_aug", cache_dir=cache)
    assert not (root / ".ecaseg-labels-voc-train_aug.npz").exists()
    assert len(list(cache.glob("labels-voc-train_aug-*.npz"))) == 1
    np.testing.assert_array_equal(ds.labels, reference_labels(aug, ds.ids, 21))

    # Data folder not writable: the user cache folder is used.
    user_cache = tmp_path / "user_cache"
    monkeypatch.setenv("ECASEG_CACHE_DIR", str(user_cache))
    real = labels_module._dir_writable
    monkeypatch.setattr(labels_module, "_dir_writable", lambda p: p != root and real(p))
    VOCAugDataset(root, "val")
    assert not (root / ".ecaseg-labels-voc-val.npz").exists()
    assert len(list(user_cache.glob("labels-voc-val-*.npz"))) == 1
    # Nothing writable: a warning, the labels are still computed.
    monkeypatch.setattr(labels_module, "_dir_writable", lambda p: False)
    with pytest.warns(RuntimeWarning, match="label cache"):
        ds = VOCAugDataset(root, "train")
    assert ds.labels.shape == (2, 20)


def test_dataset_with_transform_batches(voc) -> None:
    root, _, _ = voc
    ds = VOCAugDataset(root, "train_aug", transform=TrainTransform(crop_size=16, resize_long=(8, 12)))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["image"].shape == (2, 3, 16, 16) and batch["mask"].shape == (2, 16, 16)
    assert batch["label"].shape == (2, 20) and batch["crop_box"].shape == (2, 4)
    assert list(batch["id"]) == ds.ids[:2]


def test_masks_are_not_read_when_nothing_uses_them(voc, monkeypatch: pytest.MonkeyPatch) -> None:
    """load_masks=False (weakly supervised training): no mask key, and no mask file is opened."""
    import ecaseg.data.base as base_module

    root, _, _ = voc
    ds = VOCAugDataset(root, "train_aug", transform=TrainTransform(crop_size=16, resize_long=(8, 12)))
    torch.manual_seed(0)
    with_mask = ds[0]
    ds.load_masks = False

    def no_read(*args: object, **kwargs: object) -> None:
        raise AssertionError("a mask file was read")

    monkeypatch.setattr(base_module, "read_mask", no_read)
    torch.manual_seed(0)
    without = ds[0]
    assert "mask" not in without and ds.has_masks
    # the same random crop: the mask took no random draw
    assert torch.equal(with_mask["image"], without["image"])
    assert torch.equal(with_mask["crop_box"], without["crop_box"])


# ----------------------------------------------------------------------------------------------- COCO

COCO_TRAIN = {
    "COCO_train2014_000000000009": [1, 80],
    "COCO_train2014_000000000025": [],
    "COCO_train2014_000000000030": [62],
}
COCO_VAL = {"COCO_val2014_000000000042": [18], "COCO_val2014_000000000073": []}


@pytest.fixture
def coco(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path / "coco"
    masks = {}
    for folder, table in (("train2014", COCO_TRAIN), ("val2014", COCO_VAL)):
        for seed, (image_id, classes) in enumerate(table.items()):
            write_jpg(root / folder / f"{image_id}.jpg", 5, 7, seed)
            masks[image_id] = make_mask(5, 7, classes, ignore_border=not classes)
            write_png_mask(root / "SegmentationClass" / folder / f"{image_id}.png", masks[image_id])
    return root, masks


def test_coco_splits_drop_empty(coco) -> None:
    root, masks = coco
    train = COCOSegDataset(root, "train")
    kept = ["COCO_train2014_000000000009", "COCO_train2014_000000000030"]
    assert train.ids == kept and train.num_dropped == 1 and train.num_classes == 81
    np.testing.assert_array_equal(train.labels, reference_labels(masks, kept, 81))
    assert train[0]["label"].shape == (80,) and train[0]["label"][[0, 79]].tolist() == [1.0, 1.0]
    assert train.image_path(0) == root / "train2014" / f"{kept[0]}.jpg"
    val = COCOSegDataset(root, "val")
    assert val.ids == ["COCO_val2014_000000000042"]
    val_all = COCOSegDataset(root, "val", drop_empty=False)
    assert len(val_all) == 2 and val_all.labels[1].sum() == 0


def test_coco_jpegimages_layout_id_lists_and_id_file(coco, tmp_path: Path) -> None:
    root, masks = coco
    (root / "JPEGImages").mkdir()
    (root / "train2014").rename(root / "JPEGImages" / "train2014")
    (root / "ImageSets").mkdir()
    (root / "ImageSets" / "train.txt").write_text(
        "COCO_train2014_000000000030\nCOCO_train2014_000000000025\n"
    )
    ds = COCOSegDataset(root, "train")
    assert ds.ids == ["COCO_train2014_000000000030"]
    assert ds.image_path(0).parent == root / "JPEGImages" / "train2014"
    id_file = tmp_path / "mixed.txt"
    id_file.write_text("COCO_val2014_000000000073.jpg\nCOCO_train2014_000000000009\n")
    mixed = COCOSegDataset(root, id_file)
    assert mixed.ids == ["COCO_val2014_000000000073", "COCO_train2014_000000000009"]  # empties kept
    assert mixed.image_path(0).parent.name == "val2014"
    np.testing.assert_array_equal(mixed.labels, reference_labels(masks, mixed.ids, 81))


def test_coco_errors(coco, tmp_path: Path) -> None:
    root, _ = coco
    with pytest.raises(DatasetError, match=r"(?s)does not exist.*SegmentationClass"):
        COCOSegDataset(tmp_path / "nothing")
    with pytest.raises(DatasetError, match="unknown COCO split"):
        COCOSegDataset(root, "tarin")
    bad = np.zeros((5, 7), np.uint8)
    bad[0, 0] = 81
    write_png_mask(root / "SegmentationClass" / "val2014" / "COCO_val2014_000000000042.png", bad)
    with pytest.raises(DatasetError, match=r"COCO_val2014_000000000042\.png.*81"):
        COCOSegDataset(root, "val")
    (root / "train2014" / "COCO_train2014_000000000030.jpg").unlink()
    with pytest.raises(DatasetError, match=r"COCO_train2014_000000000030\.jpg"):
        COCOSegDataset(root, "train")
    for f in (root / "SegmentationClass" / "train2014").iterdir():
        f.unlink()
    (root / "SegmentationClass" / "train2014").rmdir()
    with pytest.raises(DatasetError, match=r"(?s)SegmentationClass/train2014 is missing.*val2014"):
        COCOSegDataset(root, "train")


# ----------------------------------------------------------------------------------------------- folder


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    write_jpg(images / "cat_001.jpg", 4, 5, 0)
    write_jpg(images / "street.png", 4, 5, 1)
    write_jpg(images / "sub" / "dog.jpeg", 4, 5, 2)
    return images


def test_folder_csv_formats(folder: Path, tmp_path: Path) -> None:
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("id,labels\ncat_001,Cat\nstreet.png,person;traffic_light\nsub/dog,3 1\n")
    ds = FolderDataset(folder, csv_file, class_names=["cat", "dog", "person", "traffic light"])
    assert ds.class_names == ("background", "cat", "dog", "person", "traffic light")
    assert ds.ids == ["cat_001", "street.png", "sub/dog"] and not ds.has_masks
    assert ds.labels.tolist() == [[1, 0, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0]]
    assert ds.image_path(2) == folder / "sub" / "dog.jpeg"
    assert ds[1]["image"].shape == (4, 5, 3)


def test_folder_json_and_class_file_and_masks(folder: Path, tmp_path: Path) -> None:
    json_file = tmp_path / "labels.json"
    json_file.write_text('{"cat_001": ["cat"], "street": [15, "background"], "sub/dog": []}')
    names = tmp_path / "names.txt"
    names.write_text("background\n" + "\n".join(VOC_CLASSES[1:]) + "\n")
    masks = tmp_path / "masks"
    mask_arrays = {
        "cat_001": make_mask(4, 5, [8]),
        "street": make_mask(4, 5, [15]),
        "sub/dog": make_mask(4, 5, []),
    }
    for image_id, m in mask_arrays.items():
        write_png_mask(masks / f"{image_id}.png", m)
    ds = FolderDataset(folder, json_file, masks_dir=masks, class_names=names)
    assert ds.class_names == VOC_CLASSES and ds.has_masks
    assert ds.labels.nonzero()[1].tolist() == [7, 14]
    np.testing.assert_array_equal(ds[2]["mask"], mask_arrays["sub/dog"])
    # No labels file: labels from the masks, cached beside them.
    ds2 = FolderDataset(folder, None, masks_dir=masks)
    assert ds2.ids == ["cat_001", "street", "sub/dog"] and ds2.class_names == VOC_CLASSES
    np.testing.assert_array_equal(ds2.labels, reference_labels(mask_arrays, ds2.ids, 21))
    assert (masks / ".ecaseg-labels-folder.npz").is_file()
    (masks / "street.png").unlink()
    with pytest.raises(DatasetError, match=r"street\.png"):
        FolderDataset(folder, json_file, masks_dir=masks, class_names=names)


def test_folder_bad_labels(folder: Path, tmp_path: Path) -> None:
    f = tmp_path / "l.csv"
    names = ["cat", "dog"]
    cases = {
        "cat_001,cat\nstreet,zebra\n": r"l\.csv:2: unknown class 'zebra'",
        "cat_001,cat\ncat_001,dog\n": r"l\.csv:2: image id 'cat_001' already listed",
        "cat_001,7\n": r"l\.csv:1: class index 7 is outside",
        "nothere,cat\n": r"not found .*'nothere'",
        "id,labels\n": r"lists no image",
    }
    for text, pattern in cases.items():
        f.write_text(text)
        with pytest.raises(DatasetError, match=pattern):
            FolderDataset(folder, f, class_names=names)
    j = tmp_path / "l.json"
    j.write_text("[1, 2]")
    with pytest.raises(DatasetError, match="JSON object"):
        FolderDataset(folder, j, class_names=names)
    j.write_text("{not json")
    with pytest.raises(DatasetError, match=r"l\.json is not valid JSON"):
        FolderDataset(folder, j, class_names=names)
    with pytest.raises(DatasetError, match="does not exist"):
        FolderDataset(tmp_path / "noimages", f, class_names=names)
    with pytest.raises(DatasetError, match=r"missing\.csv does not exist"):
        FolderDataset(folder, tmp_path / "missing.csv", class_names=names)
    with pytest.raises(DatasetError, match="appears twice"):
        FolderDataset(folder, f, class_names=["cat", "Cat"])
