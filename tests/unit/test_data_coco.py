"""COCO source: real minicoco (polygons + crowd RLEs) and a corpus of bad inputs."""
import io
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from maskx_jax.data.coco import CocoSource
from maskx_jax.data.issues import Issues
from maskx_jax.data import masks as mask_lib
import resources

# pycocotools calls numpy.asarray(copy=False) internally (numpy 2 deprecation): not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

@pytest.fixture(scope="module")
def minicoco():
    root = resources.minicoco()
    return CocoSource(os.path.join(root, "annotations_train.json"), os.path.join(root, "images"))


def test_minicoco_classes_crowd_and_polygons(minicoco):
    assert minicoco.class_names == ("__background__", "person", "car", "airplane")
    assert minicoco.cat_id_to_contiguous == {1: 1, 2: 2, 3: 3}
    assert len(minicoco) == 30
    assert minicoco.issues.total() == 0
    raw = json.load(open(os.path.join(resources.MINICOCO, "annotations_train.json")))
    crowd_imgs = {a["image_id"] for a in raw["annotations"] if a["iscrowd"]}
    assert crowd_imgs
    n_crowd = 0
    for i, rec in enumerate(minicoco.records):
        if rec.image_id not in crowd_imgs:
            continue
        ex = minicoco.load(i)
        assert ex.image.shape == (rec.height, rec.width, 3) and ex.image.dtype == np.uint8
        assert ex.crowd.any()
        n_crowd += int(ex.crowd.sum())
        # Polygons decode to non-empty masks inside their boxes; crowd RLEs are ignore regions.
        for k in np.nonzero(~ex.crowd)[0]:
            if not ex.has_segm[k]:
                continue
            ys, xs = np.nonzero(ex.masks[k])
            x0, y0, x1, y1 = ex.boxes[k]
            assert xs.min() >= np.floor(x0) - 1 and xs.max() <= np.ceil(x1) + 1
            assert ys.min() >= np.floor(y0) - 1 and ys.max() <= np.ceil(y1) + 1
        assert not ex.has_segm[ex.crowd].any()
    assert n_crowd == sum(a["iscrowd"] for a in raw["annotations"])
    # A crowd RLE (uncompressed in this file) decodes through the same helper.
    crowd_ann = next(a for a in raw["annotations"] if a["iscrowd"])
    img = next(im for im in raw["images"] if im["id"] == crowd_ann["image_id"])
    m = mask_lib.decode(crowd_ann["segmentation"], img["height"], img["width"])
    rle = mask_utils.frPyObjects(crowd_ann["segmentation"], img["height"], img["width"])
    np.testing.assert_array_equal(m, mask_utils.decode(rle))
    assert m.sum() > 0


def test_minicoco_polygon_masks_match_pycocotools(minicoco):
    from pycocotools.coco import COCO
    import contextlib
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(os.path.join(resources.MINICOCO, "annotations_train.json"))
    ex = minicoco.load(0)
    rec = minicoco.records[0]
    ref = {a["id"]: coco.annToMask(a) for a in coco.loadAnns(coco.getAnnIds(imgIds=rec.image_id))}
    for k, inst in enumerate(rec.instances):
        if ex.has_segm[k]:
            assert np.array_equal(ex.masks[k], ref[inst.ann_id])


# ------------------------------------------------------------------------------ bad inputs
def _save(path, array, **kw):
    Image.fromarray(array).save(path, **kw)


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    _save(images / "good.jpg", rgb)
    _save(images / "noann.jpg", rgb)
    _save(images / "dup.jpg", rgb)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG")
    (images / "trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    (images / "notimage.jpg").write_bytes(b"this is not an image")
    _save(images / "gray.png", rgb[:, :, 0])
    _save(images / "rgba.png", np.concatenate([rgb, np.full((48, 64, 1), 128, np.uint8)], axis=2))
    _save(images / "wide16.png", (rgb[:, :, 0].astype(np.uint16) * 257))  # 16-bit grayscale PNG
    _save(images / "small.jpg", rgb[:24, :32])  # annotation claims 64x48: size mismatch
    files = ["good.jpg", "trunc.jpg", "gray.png", "rgba.png", "wide16.png", "noann.jpg", "missing.jpg",
             "notimage.jpg", "small.jpg"]
    imgs = [{"id": i + 1, "file_name": f, "height": 48, "width": 64} for i, f in enumerate(files)]
    imgs.append({"id": 1, "file_name": "dup.jpg", "height": 48, "width": 64})  # duplicate id
    imgs.append({"id": 20, "file_name": "good.jpg"})  # no size: read from the header
    square = [[10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]]
    mask = np.zeros((48, 64), np.uint8)
    mask[5:20, 40:60] = 1
    compressed = mask_lib.encode(mask)
    uncompressed = {"size": [48, 64], "counts": []}
    flat = mask.flatten(order="F")
    val, run = 0, 0
    for v in flat:
        if v != val:
            uncompressed["counts"].append(run)
            val, run = v, 0
        run += 1
    uncompressed["counts"].append(run)

    def ann(aid, image_id, bbox, segm=square, cat=1, crowd=0):
        return {"id": aid, "image_id": image_id, "category_id": cat, "bbox": bbox, "segmentation": segm,
                "iscrowd": crowd, "area": 1.0}

    anns = [
        ann(1, 1, [10, 10, 20, 20]),  # fine
        ann(2, 1, [10, 10, 0, 20]),  # zero width
        ann(3, 1, [10, 10, -5, 20]),  # negative width
        ann(4, 1, [100, 100, 10, 10]),  # outside the image
        ann(5, 1, [50, 30, 30, 30]),  # partly outside: clipped
        ann(6, 1, [10, 10, 20, 20], segm=[[10, 10, 30, 10]]),  # polygon of 2 points only
        ann(7, 1, [10, 10, 20, 20], segm=[[10, 10, 30, 10], square[0]]),  # one bad part, one good
        ann(8, 1, [10, 10, 20, 20], segm=[]),  # empty segmentation
        ann(9, 1, [10, 10, 20, 20], cat=99),  # unknown category
        ann(10, 555, [10, 10, 20, 20]),  # unknown image
        ann(11, 1, [40, 5, 20, 15], segm=compressed),  # compressed RLE
        ann(12, 1, [40, 5, 20, 15], segm=uncompressed, cat=2),  # uncompressed RLE
        ann(13, 1, [40, 5, 20, 15], segm={"size": [10, 10], "counts": [100]}),  # RLE of the wrong size
        ann(14, 1, [0, 0, 64, 48], segm=uncompressed, crowd=1),  # crowd region
        ann(15, 1, [float("nan"), 1, 2, 3]),  # non-finite box
        ann(16, 1, [10, 10, 20, 20], segm=[[10, 10, 10, 10, 10, 10]]),  # degenerate polygon: empty mask
        {"id": 17, "category_id": 1, "bbox": [1, 2, 3, 4]},  # no image id
        ann(21, 2, [10, 10, 20, 20]), ann(22, 3, [10, 10, 20, 20]), ann(23, 4, [10, 10, 20, 20]),
        ann(24, 5, [10, 10, 20, 20]), ann(25, 7, [10, 10, 20, 20]), ann(26, 8, [10, 10, 20, 20]),
        ann(27, 9, [10, 10, 20, 20]), ann(28, 20, [10, 10, 20, 20]),
    ]
    cats = [{"id": 1, "name": "thing"}, {"id": 2, "name": "other"}, {"id": 2, "name": "again"}]
    path = root / "ann.json"
    path.write_text(json.dumps({"images": imgs, "annotations": anns, "categories": cats}))
    return str(path), str(images)


def test_bad_corpus_repaired_or_skipped_with_counts(bad_corpus, caplog):
    path, images = bad_corpus
    with caplog.at_level(logging.WARNING, logger="maskx_jax.data"):
        src = CocoSource(path, images, drop_empty_images=True)
    counts = src.issues.summary()
    expected_load = {
        "image_missing": 1, "image_duplicate_id": 1, "image_bad_size": 1, "image_no_annotations": 1,
        "box_degenerate": 1, "box_negative_size": 1, "box_outside_image": 1, "box_clipped": 1,
        "box_invalid": 1, "polygon_too_few_points": 2, "segmentation_empty": 2, "unknown_category": 1,
        "annotation_unknown_image": 1, "annotation_malformed": 1, "rle_size_mismatch": 1,
        "duplicate_category": 1,
    }
    assert counts == expected_load, counts
    # Every problem is also logged, naming the record.
    assert any("ann 3 (image 1)" in r.getMessage() and "box_negative_size" in r.getMessage() for r in caplog.records)
    assert src.class_names == ("__background__", "thing", "other")
    ids = [r.image_id for r in src.records]
    assert ids == [1, 2, 3, 4, 5, 8, 9, 20]  # missing (7), no annotations (6), duplicate 1 dropped
    good = src.records[0]
    assert [i.ann_id for i in good.instances] == [1, 5, 6, 7, 8, 11, 12, 13, 14, 16]
    clipped = good.instances[1]
    np.testing.assert_allclose(clipped.box, [50, 30, 64, 48])
    assert good.instances[2].segmentation is None  # box-only
    assert len(good.instances[3].segmentation) == 1  # bad part dropped

    # Decoding: conversions and failures are counted, nothing raises.
    results = {src.records[i].image_id: src.load(i) for i in range(len(src))}
    assert results[2] is None  # truncated JPEG
    assert results[8] is None  # not an image
    for iid in (1, 3, 4, 5, 9, 20):
        ex = results[iid]
        assert ex.image.shape == (48, 64, 3) and ex.image.dtype == np.uint8
    counts = src.issues.summary()
    # Exact counts per kind: the load-time ones above, plus what decoding found.
    expected_decode = {
        "image_unreadable": 2,  # trunc.jpg, notimage.jpg
        "image_grayscale": 2,  # gray.png and wide16.png (16-bit grayscale)
        "image_rgba": 1, "image_16bit": 1, "image_size_mismatch": 1,  # rgba.png, wide16.png, small.jpg
    }
    assert counts == {**expected_load, **expected_decode, "segmentation_empty": 3}, counts
    # (segmentation_empty: + the degenerate polygon, found when rasterised)
    # 16-bit values were scaled down, not clipped.
    src_img = np.asarray(Image.open(os.path.join(images, "gray.png")))
    np.testing.assert_array_equal(results[5].image[:, :, 0], src_img)
    ex = results[1]
    k = {i.ann_id: n for n, i in enumerate(src.records[0].instances)}
    assert ex.has_segm[k[11]] and ex.has_segm[k[12]] and not ex.has_segm[k[6]] and not ex.has_segm[k[16]]
    np.testing.assert_array_equal(ex.masks[k[11]], ex.masks[k[12]])  # compressed == uncompressed
    assert ex.crowd[k[14]] and not ex.has_segm[k[14]]
    # Loading again does not count the same records twice.
    before = src.issues.summary()
    for i in range(len(src)):
        src.load(i)
    assert src.issues.summary() == before
    assert "image_unreadable" in src.issues.report()


def test_bad_corpus_cleaned_json_loads_in_pycocotools(bad_corpus, tmp_path):
    import contextlib
    from pycocotools.coco import COCO
    path, images = bad_corpus
    src = CocoSource(path, images)
    out = tmp_path / "clean.json"
    out.write_text(json.dumps(src.to_coco_dict()))
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(out))
    for a in coco.loadAnns(coco.getAnnIds()):
        assert coco.annToMask(a).shape == (48, 64)
    assert sorted(coco.getImgIds()) == sorted(r.image_id for r in src.records)


def test_missing_files_are_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        CocoSource(str(tmp_path / "nope.json"), str(tmp_path))
    (tmp_path / "x.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a COCO"):
        CocoSource(str(tmp_path / "x.json"), str(tmp_path))


def test_crop_and_resample_is_exact_area():
    mask = np.zeros((10, 10), np.uint8)
    mask[2:6, 3:7] = 1
    crop = mask_lib.crop_and_resample(mask, np.array([3, 2, 7, 6], np.float32), 8)
    np.testing.assert_allclose(crop, 1.0)
    crop = mask_lib.crop_and_resample(mask, np.array([1, 2, 9, 6], np.float32), 4)
    np.testing.assert_allclose(crop, [[0, 1, 1, 0]] * 4)
    crop = mask_lib.crop_and_resample(mask, np.array([2.5, 2, 4.5, 6], np.float32), 2)
    np.testing.assert_allclose(crop, [[0.5, 1.0]] * 2)
    area = mask_lib.crop_and_resample(mask, np.array([0, 0, 10, 10], np.float32), 5)
    assert area.sum() * 4 == pytest.approx(mask.sum())


def test_issues_counter_dedups_and_reports():
    issues = Issues()
    issues.warn("box_clipped", "a", "x")
    issues.warn("box_clipped", "a", "x")
    issues.warn("box_clipped", "b")
    issues.warn("new_kind", "c")
    assert issues.summary() == {"box_clipped": 2, "new_kind": 1}
    text = issues.report()
    assert "box_clipped" in text and "e.g. a: x" in text


# ------------------------------------------------------------------------------ very large images
def huge_png(height: int = 100_000, width: int = 100_000) -> bytes:
    """A valid PNG whose header announces ``height x width`` (the pixel data is that of an 8x8 image):
    what a decompression bomb looks like to a reader that trusts the header."""
    import struct
    import zlib

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_very_large_images_are_counted_skips(tmp_path, monkeypatch):
    """Images over PIL's decompression-bomb limit are refused from the annotation or the header, never
    decoded (a 100000 x 100000 header would be 30 GB of RGB), and counted as image_too_large."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "bomb.png").write_bytes(huge_png())
    rgb = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    _save(images / "big.png", rgb)  # 1200 pixels: over the lowered limit below, under twice it
    _save(images / "ok.png", rgb[:20, :20])
    imgs = [
        {"id": 1, "file_name": "bomb.png", "height": 100_000, "width": 100_000},  # refused from the annotation
        {"id": 2, "file_name": "bomb.png"},  # no size in the JSON: refused from the file header
        {"id": 3, "file_name": "bomb.png", "height": 20, "width": 20},  # the JSON lies: refused when decoded
        {"id": 4, "file_name": "big.png", "height": 10, "width": 10},  # PIL would only warn: refused too
        {"id": 5, "file_name": "ok.png", "height": 20, "width": 20},
    ]
    anns = [{"id": 10 + i, "image_id": i, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 0,
             "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]], "area": 25.0} for i in range(1, 6)]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": imgs, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    src = CocoSource(str(path), str(images))
    assert [r.image_id for r in src.records] == [3, 4, 5]
    assert src.issues.summary() == {"image_too_large": 2}
    assert src.load(0) is None and src.load(1) is None  # found when decoding: skipped, nothing decoded
    assert src.load(2).image.shape == (20, 20, 3)
    assert src.issues.summary() == {"image_too_large": 4}
    report = src.issues.report()
    for name in ("image 1 (bomb.png)", "image 2 (bomb.png)", "image 3 (bomb.png)", "image 4 (big.png)"):
        assert name in report, (name, report)

    # The default limit (~89.5 Mpx) applies without any configuration.
    monkeypatch.undo()
    assert Image.MAX_IMAGE_PIXELS and Image.MAX_IMAGE_PIXELS < 100_000 ** 2
    src = CocoSource(str(path), str(images))
    assert [r.image_id for r in src.records] == [3, 4, 5]
    assert src.load(0) is None and src.load(1).image.shape == (10, 10, 3)  # decoded, resized to its annotation
    assert src.issues.summary() == {"image_too_large": 3, "image_size_mismatch": 1}
