"""Tests of the synthetic WSSS benchmark (ecaseg.data.synthetic)."""

from __future__ import annotations

import json
import time
from collections import defaultdict

import cv2
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ecaseg.data.synthetic import (
    SYNTHETIC_CLASSES,
    SyntheticConfig,
    SyntheticWSSSDataset,
    generate_sample,
    render_sample,
    synthetic_class_names,
    write_synthetic_dataset,
)
from ecaseg.errors import ConfigError, DatasetError

SMALL = SyntheticConfig(image_size=64, num_train=40, num_val=10)


def labels_from_mask(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """Reference: a pixel loop collecting the non-background values of the mask."""
    label = np.zeros(num_classes, dtype=np.uint8)
    for value in mask.ravel().tolist():
        if value != 0:
            label[value - 1] = 1
    return label


# ----------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "field, value",
    [
        ("seed", -1),
        ("image_size", 16),
        ("num_fg_classes", 0),
        ("num_fg_classes", 9),
        ("min_objects", 0),
        ("max_objects", 0),
        ("num_train", -1),
        ("head_scale", 0.9),
        ("head_shade", 1.0),
        ("object_scale", 3.0),
        ("context_prob", 1.5),
        ("spurious_context_prob", -0.1),
        ("noise_std", -1.0),
    ],
)
def test_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        SyntheticConfig(**{field: value})  # type: ignore[arg-type]


def test_class_names() -> None:
    assert synthetic_class_names(5) == ("background", "circle", "square", "triangle", "cross", "ring")
    assert synthetic_class_names(8) == SYNTHETIC_CLASSES
    assert len(set(SYNTHETIC_CLASSES)) == len(SYNTHETIC_CLASSES)
    with pytest.raises(ConfigError):
        synthetic_class_names(9)


def test_bad_split_and_index() -> None:
    with pytest.raises(ConfigError, match="test"):
        generate_sample(SMALL, "test", 0)
    with pytest.raises(IndexError):
        generate_sample(SMALL, "val", SMALL.num_val)
    with pytest.raises(IndexError):
        generate_sample(SMALL, "train", -1)


# ------------------------------------------------------------------------------------------ determinism


def test_same_config_gives_identical_samples() -> None:
    for index in range(5):
        a_img, a_mask = generate_sample(SMALL, "train", index)
        b_img, b_mask = generate_sample(
            SyntheticConfig(image_size=64, num_train=40, num_val=10), "train", index
        )
        assert a_img.dtype == np.uint8 and a_mask.dtype == np.uint8
        assert a_img.shape == (64, 64, 3) and a_mask.shape == (64, 64)
        np.testing.assert_array_equal(a_img, b_img)
        np.testing.assert_array_equal(a_mask, b_mask)


def test_different_seeds_splits_and_indices_differ() -> None:
    img0, _ = generate_sample(SMALL, "train", 0)
    img_seed, _ = generate_sample(
        SyntheticConfig(seed=1, image_size=64, num_train=40, num_val=10), "train", 0
    )
    img_val, _ = generate_sample(SMALL, "val", 0)
    img1, _ = generate_sample(SMALL, "train", 1)
    for other in (img_seed, img_val, img1):
        assert np.abs(img0.astype(int) - other.astype(int)).mean() > 5.0


def test_sample_independent_of_generation_order() -> None:
    forward = [generate_sample(SMALL, "train", i) for i in range(8)]
    backward = [generate_sample(SMALL, "train", i) for i in reversed(range(8))][::-1]
    interleaved = {i: generate_sample(SMALL, "train", i) for i in (5, 0, 7, 2, 1, 6, 3, 4)}
    for i in range(8):
        for other in (backward[i], interleaved[i]):
            np.testing.assert_array_equal(forward[i][0], other[0])
            np.testing.assert_array_equal(forward[i][1], other[1])


# ------------------------------------------------------------------------------------- objects, labels


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    image_size=st.sampled_from([32, 48, 64, 96]),
    num_classes=st.integers(1, 8),
    min_objects=st.integers(1, 4),
    extra=st.integers(0, 4),
    index=st.integers(0, 9),
)
def test_object_count_and_labels_match_mask(
    seed: int, image_size: int, num_classes: int, min_objects: int, extra: int, index: int
) -> None:
    cfg = SyntheticConfig(
        seed=seed,
        image_size=image_size,
        num_fg_classes=num_classes,
        min_objects=min_objects,
        max_objects=min_objects + extra,
        num_train=10,
        num_val=0,
    )
    s = render_sample(cfg, "train", index)
    image, mask = generate_sample(cfg, "train", index)
    np.testing.assert_array_equal(image, s.image)
    np.testing.assert_array_equal(mask, s.mask)
    assert int(mask.max()) <= num_classes
    # every object is visible and carries a single class
    visible = sorted(set(np.unique(s.instances).tolist()) - {0})
    assert visible == list(range(1, len(s.object_classes) + 1))
    assert cfg.min_objects <= len(visible) <= cfg.max_objects
    for inst, cls in zip(visible, s.object_classes):
        assert set(np.unique(mask[s.instances == inst]).tolist()) == {cls}
    assert ((s.instances > 0) == (mask > 0)).all()
    # the cached label equals the set of classes in the mask
    ds = SyntheticWSSSDataset("train", cfg)
    np.testing.assert_array_equal(ds.labels[index], labels_from_mask(mask, num_classes))


def test_objects_have_small_head_and_large_body() -> None:
    cfg = SyntheticConfig(image_size=64, num_train=60, num_val=0)
    body_fractions = []
    for index in range(cfg.num_train):
        s = render_sample(cfg, "train", index)
        for inst in range(1, len(s.object_classes) + 1):
            obj = s.instances == inst
            head = int((obj & (s.parts == 2)).sum())
            body = int((obj & (s.parts == 1)).sum())
            assert head > 0 and body > 0
            body_fractions.append(body / (head + body))
        assert ((s.parts > 0) == (s.mask > 0)).all()
    assert 0.6 < float(np.mean(body_fractions)) < 0.9


# -------------------------------------------------------------------------------- what makes it hard


def _object_body_colours(cfg: SyntheticConfig, n: int) -> tuple[np.ndarray, np.ndarray]:
    colours, classes = [], []
    for index in range(n):
        s = render_sample(cfg, "train", index)
        for inst, cls in enumerate(s.object_classes, start=1):
            body = (s.instances == inst) & (s.parts == 1)
            colours.append(np.median(s.image[body].astype(np.float64), axis=0))
            classes.append(cls)
    return np.asarray(colours), np.asarray(classes)


def _nearest_centroid_accuracy(colours: np.ndarray, classes: np.ndarray) -> float:
    """Fit class-mean colours on the first half, classify the second half by the nearest mean."""
    half = len(classes) // 2
    labels = sorted(set(classes[:half].tolist()))
    means = np.stack([colours[:half][classes[:half] == c].mean(axis=0) for c in labels])
    correct = 0
    for colour, cls in zip(colours[half:], classes[half:]):
        pred = labels[int(np.argmin(((means - colour) ** 2).sum(axis=1)))]
        correct += int(pred == cls)
    return correct / (len(classes) - half)


def test_classes_share_object_colours() -> None:
    cfg = SyntheticConfig(image_size=64, num_train=150, num_val=0)
    colours, classes = _object_body_colours(cfg, 150)
    # the set of (coarsely quantised) colours drawn by each class: every pair of classes shares colours
    drawn: dict[int, set[tuple[int, ...]]] = defaultdict(set)
    for colour, cls in zip(colours, classes):
        drawn[int(cls)].add(tuple(int(v) for v in np.round(colour / 64.0)))
    assert sorted(drawn) == list(range(1, cfg.num_fg_classes + 1))
    for a in drawn:
        for b in drawn:
            assert len(drawn[a] & drawn[b]) >= 2, (a, b)
    # colour alone does not tell the classes apart: a colour classifier is near chance (1/5)
    assert _nearest_centroid_accuracy(colours, classes) < 0.4


def test_objects_of_one_image_have_distinct_colours() -> None:
    """Different objects of an image differ (so an affinity can separate them); across images they do not."""

    def min_gap(cfg: SyntheticConfig) -> float:
        gaps = []
        for index in range(cfg.num_train):
            s = render_sample(cfg, "train", index)
            cols = [
                np.median(s.image[(s.instances == i) & (s.parts == 1)].astype(np.float64), axis=0)
                for i in range(1, len(s.object_classes) + 1)
            ]
            gaps += [float(np.abs(a - b).max()) for j, a in enumerate(cols) for b in cols[j + 1 :]]
        return float(np.quantile(gaps, 0.02))

    cfg = SyntheticConfig(image_size=64, num_train=120, num_val=0, min_objects=3, max_objects=3)
    assert min_gap(cfg) > 25.0
    same = SyntheticConfig(
        image_size=64, num_train=120, num_val=0, min_objects=3, max_objects=3, distinct_colours=False
    )
    assert min_gap(same) < 25.0


def test_unshared_colours_identify_classes() -> None:
    """The easy ablation: with one colour per class the same colour classifier is (almost) perfect."""
    cfg = SyntheticConfig(image_size=64, num_train=60, num_val=0, shared_colours=False)
    colours, classes = _object_body_colours(cfg, 60)
    assert _nearest_centroid_accuracy(colours, classes) > 0.9


def test_context_distractors_cooccur_with_their_class() -> None:
    cfg = SyntheticConfig(image_size=64, num_train=300, num_val=0)
    with_class = [0, 0]  # [images where class c is present, ... of which show context c]
    without_class = [0, 0]
    for index in range(cfg.num_train):
        s = render_sample(cfg, "train", index)
        present = set(s.object_classes)
        for c in range(1, cfg.num_fg_classes + 1):
            shown = c in s.context_classes
            counter = with_class if c in present else without_class
            counter[0] += 1
            counter[1] += int(shown)
        # distractors are background in the mask, and visible when drawn
        assert not (s.distractor & (s.mask != 0)).any()
        assert s.distractor.any() == bool(s.context_classes)
    p_with = with_class[1] / with_class[0]
    p_without = without_class[1] / without_class[0]
    assert p_with > 0.35
    assert p_without < 0.15
    assert p_with > 3 * p_without


def test_context_prob_zero_removes_correlated_distractors() -> None:
    cfg = SyntheticConfig(
        image_size=64, num_train=100, num_val=0, context_prob=0.0, spurious_context_prob=0.0
    )
    for index in range(cfg.num_train):
        s = render_sample(cfg, "train", index)
        assert s.context_classes == ()
        assert not s.distractor.any()


# ---------------------------------------------------------------------------------------------- dataset


def test_dataset_items_without_transform() -> None:
    ds = SyntheticWSSSDataset("val", SMALL)
    assert len(ds) == SMALL.num_val
    assert ds.num_classes == SMALL.num_classes == SMALL.num_fg_classes + 1
    assert ds.class_names == synthetic_class_names(SMALL.num_fg_classes)
    assert ds.has_masks is True
    assert ds.ids[:2] == ["val_000000", "val_000001"]
    assert ds.labels.shape == (SMALL.num_val, SMALL.num_fg_classes) and ds.labels.dtype == np.uint8
    item = ds[3]
    assert set(item) == {"id", "image", "label", "mask"}
    assert item["id"] == "val_000003"
    image, mask = generate_sample(SMALL, "val", 3)
    np.testing.assert_array_equal(item["image"], image)
    np.testing.assert_array_equal(item["mask"], mask)
    assert item["label"].dtype == torch.float32
    assert item["label"].tolist() == labels_from_mask(mask, SMALL.num_fg_classes).tolist()
    np.testing.assert_array_equal(ds[-1]["image"], generate_sample(SMALL, "val", SMALL.num_val - 1)[0])
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(DatasetError, match="write_synthetic_dataset"):
        ds.image_path(0)
    with pytest.raises(ConfigError):
        SyntheticWSSSDataset("train_aug", SMALL)


def test_dataset_with_transform() -> None:
    def transform(image: np.ndarray, mask: np.ndarray | None) -> dict[str, object]:
        assert mask is not None
        return {
            "image": torch.from_numpy(image).permute(2, 0, 1).float() / 255.0,
            "mask": torch.from_numpy(mask).long(),
            "extra": 7,
        }

    ds = SyntheticWSSSDataset("train", SMALL, transform=transform)
    item = ds[2]
    assert set(item) == {"id", "image", "label", "mask", "extra"}
    assert item["image"].shape == (3, 64, 64) and item["mask"].dtype == torch.long
    assert item["id"] == "train_000002" and item["extra"] == 7
    assert item["label"].tolist() == ds.labels[2].astype(np.float32).tolist()


def test_dataset_default_config_and_fast_labels() -> None:
    start = time.perf_counter()
    ds = SyntheticWSSSDataset()
    elapsed = time.perf_counter() - start
    assert len(ds) == SyntheticConfig().num_train
    assert elapsed < 5.0  # labels come from layouts, without rendering (about 0.1 s for 1000 images)
    counts = ds.labels.sum(axis=1)
    assert counts.min() >= 1 and counts.max() <= SyntheticConfig().max_objects
    assert (ds.labels.sum(axis=0) > 0).all()  # every class occurs


# --------------------------------------------------------------------------------------------- on disk


def test_write_synthetic_dataset_reads_back(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = SyntheticConfig(image_size=48, num_fg_classes=4, num_train=5, num_val=3, seed=3)
    root = write_synthetic_dataset(tmp_path / "synth", cfg)
    assert root == tmp_path / "synth"
    assert (root / "classes.txt").read_text().splitlines() == list(synthetic_class_names(4))
    train_ids = (root / "train.txt").read_text().splitlines()
    val_ids = (root / "val.txt").read_text().splitlines()
    assert train_ids == [f"train_{i:06d}" for i in range(5)]
    assert val_ids == [f"val_{i:06d}" for i in range(3)]
    labels = json.loads((root / "labels.json").read_text())
    assert sorted(labels) == sorted(train_ids + val_ids)
    assert json.loads((root / "synthetic_config.json").read_text())["seed"] == 3
    names = synthetic_class_names(4)
    for split, ids in (("train", train_ids), ("val", val_ids)):
        for index, sample_id in enumerate(ids):
            image, mask = generate_sample(cfg, split, index)
            bgr = cv2.imread(str(root / "images" / f"{sample_id}.png"), cv2.IMREAD_UNCHANGED)
            stored_mask = cv2.imread(str(root / "masks" / f"{sample_id}.png"), cv2.IMREAD_UNCHANGED)
            assert bgr is not None and stored_mask is not None
            assert bgr.shape == (48, 48, 3) and stored_mask.shape == (48, 48)
            np.testing.assert_array_equal(bgr[..., ::-1], image)
            np.testing.assert_array_equal(stored_mask, mask)
            expected = [names[c] for c in range(1, 5) if labels_from_mask(mask, 4)[c - 1]]
            assert labels[sample_id] == expected
    assert not list(root.rglob("*.tmp"))


# ------------------------------------------------------------------------------------------------ speed


def test_generation_is_fast() -> None:
    cfg = SyntheticConfig(num_train=200)
    start = time.perf_counter()
    for index in range(200):
        generate_sample(cfg, "train", index)
    assert time.perf_counter() - start < 4.0  # about 0.5 s on one core
