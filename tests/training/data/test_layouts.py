"""The COCO, VOC train_aug and plain-folder readers: what they read, and how bad data fails.

Each layout is written by ``wsss data synth`` (tiny), read back against the files it wrote,
then copied and broken once per error the issue names: the message must name the file.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import shutil
import typing

import numpy as np
import pytest
from PIL import Image

from training.data import (
    IGNORE,
    LAYOUTS,
    DataLayoutError,
    describe,
    get_layout,
    list_samples,
    read_class_names,
    read_image,
    read_mask,
)
from training.data.coco import load_index
from training.data.dataset import WSSSDataset
from training.data.synth import ANIMALS, SynthOptions, write_synth
from training.data.writers import COCO_CATEGORIES
from wsss.config import Layout

COUNT, SIZE = 16, 48  # 12 train, 4 test


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """One tiny synthetic copy per layout; tests that break one work on a copy."""
    out = {}
    for layout, task in (("coco", "voc"), ("voc_aug", "voc"), ("folder", "voc")):
        folder = tmp_path_factory.mktemp(layout)
        out[layout] = write_synth(folder, SynthOptions(task, COUNT, SIZE, 5, layout=layout))
    folder = tmp_path_factory.mktemp("folder_pets")
    out["folder_pets"] = write_synth(folder, SynthOptions("pets", COUNT, SIZE, 5, layout="folder"))
    return out


def test_the_registry_and_the_config_name_the_same_layouts():
    assert tuple(LAYOUTS) == typing.get_args(Layout)


def test_a_layout_refuses_a_task_it_cannot_feed(tmp_path):
    with pytest.raises(DataLayoutError, match="coco layout does not fit data.task=pets"):
        get_layout("pets", "coco")
    with pytest.raises(DataLayoutError, match="unknown layout 'imagenet'"):
        get_layout("voc", "imagenet")
    with pytest.raises(DataLayoutError, match="voc_aug layout does not fit"):
        write_synth(tmp_path, SynthOptions("pets", 10, 32, layout="voc_aug"))


def test_coco_categories_are_cocos_own():
    from torchvision.models._meta import _COCO_CATEGORIES  # index = COCO category id

    assert COCO_CATEGORIES == {i: n for i, n in enumerate(_COCO_CATEGORIES) if n[0] not in "N_"}


# -- COCO ----------------------------------------------------------------------------------


def test_coco_classes_labels_and_masks_are_the_annotations(roots):
    root = roots["coco"]
    names = read_class_names(root, "voc", "coco")
    assert names == list(COCO_CATEGORIES.values()) and len(names) == 80
    # ids 1..90 with gaps, numbered in order: bear (id 23) is class 21, toothbrush (90) 79
    assert names[79] == "toothbrush" and names.index("bear") == 21
    for split, json_name in (("train", "instances_train2017"), ("test", "instances_val2017")):
        content = json.loads((root / "annotations" / f"{json_name}.json").read_text())
        index = {c: i for i, c in enumerate(sorted(COCO_CATEGORIES))}
        samples = list_samples(root, "voc", split, "coco")
        assert len(samples) == (12 if split == "train" else 4)
        assert [s.image_path.name for s in samples] == [i["file_name"] for i in content["images"]]
        for s in samples:
            anns = [a for a in content["annotations"] if a["image_id"] == s.image_id]
            assert s.labels == tuple(sorted({index[a["category_id"]] for a in anns}))
            _check_semantic_mask(read_mask(s, "voc"), anns, index)
    crowds = [a for a in json.loads((root / "annotations/instances_train2017.json").read_text())[
        "annotations"] if a["iscrowd"]]  # fmt: skip
    assert crowds, "the synthetic COCO has crowd regions to ignore"


def _check_semantic_mask(mask, anns, index):
    """Crowd pixels are 255; a pixel of one instance alone has its class; no instance: 0."""
    import pycocotools.mask as cm

    h, w = mask.shape
    pixels = []
    for a in anns:
        seg = a["segmentation"]
        rles = cm.frPyObjects(seg, h, w) if isinstance(seg, list) else [seg]
        if isinstance(seg, dict) and isinstance(seg["counts"], list):
            rles = [cm.frPyObjects(seg, h, w)]
        pixels.append(cm.decode(cm.merge(rles)).astype(bool) if rles else np.zeros((h, w), bool))
    crowd = np.zeros((h, w), bool)
    for a, p in zip(anns, pixels, strict=True):
        if a["iscrowd"]:
            crowd |= p
    assert (mask[crowd] == IGNORE).all()
    cover = np.sum([p for a, p in zip(anns, pixels, strict=True) if not a["iscrowd"]], axis=0)
    for a, p in zip(anns, pixels, strict=True):
        alone = p & (cover == 1) & ~crowd
        if not a["iscrowd"]:
            assert (mask[alone] == index[a["category_id"]] + 1).all()
    anywhere = np.any(pixels, axis=0) if pixels else np.zeros((h, w), bool)
    assert (mask[~anywhere] == 0).all()


def _tiny_coco(root, year=2014):
    """A hand-made COCO tree: category 90 (toothbrush), a dog over a person, a crowd."""
    folder = root / f"train{year}"
    folder.mkdir(parents=True)
    (root / "annotations").mkdir()
    name = f"COCO_train{year}_000000000042.jpg"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(folder / name)
    person = np.zeros((20, 30), np.uint8, order="F")
    person[2:18, 2:20] = 1
    import pycocotools.mask as cm

    rle = cm.encode(np.asfortranarray(person))
    crowd = np.zeros((20, 30), np.uint8)
    crowd[15:20, 22:30] = 1
    flat = crowd.ravel(order="F")
    runs = np.diff(np.flatnonzero(np.diff(np.r_[2, flat, 2])))  # run lengths, zeros first
    content = {
        "images": [{"id": 42, "file_name": name, "height": 20, "width": 30}],
        "categories": [
            {"id": 90, "name": "toothbrush"},
            {"id": 1, "name": "person"},
            {"id": 18, "name": "dog"},
        ],
        "annotations": [
            # the dog (smaller) listed first: it must still be drawn over the person
            {"id": 1, "image_id": 42, "category_id": 18, "iscrowd": 0,
             "segmentation": [[5, 5, 10, 5, 10, 10, 5, 10]]},
            {"id": 2, "image_id": 42, "category_id": 1, "iscrowd": 0,
             "segmentation": {"size": [20, 30], "counts": rle["counts"].decode()}},
            {"id": 3, "image_id": 42, "category_id": 90, "iscrowd": 0,
             "segmentation": [[22, 2, 28, 2, 28, 6, 22, 6]]},
            {"id": 4, "image_id": 42, "category_id": 1, "iscrowd": 1,
             "segmentation": {"size": [20, 30], "counts": runs.tolist()}},
        ],
    }  # fmt: skip
    (root / "annotations" / f"instances_train{year}.json").write_text(json.dumps(content))
    return root


def test_coco_maps_category_90_and_ignores_crowds(tmp_path):
    root = _tiny_coco(tmp_path)
    assert read_class_names(root, "voc", "coco") == ["person", "dog", "toothbrush"]
    (s,) = list_samples(root, "voc", "train", "coco")  # the year found from the files
    assert "train2014" in describe(root, "voc", "train", "coco")
    assert s.name == "COCO_train2014_000000000042" and s.labels == (0, 1, 2)
    mask = read_mask(s, "voc", (20, 30), 3)
    assert mask[3, 25] == 3  # category 90 -> class 2 (toothbrush) -> mask value 3
    assert mask[7, 7] == 2 and mask[3, 3] == 1  # the dog drawn over the person
    assert (mask[15:20, 22:30] == IGNORE).all()  # the crowd
    assert mask[0, 0] == 0 and mask[10, 25] == 0
    both = tmp_path / "annotations" / "instances_train2017.json"
    shutil.copy(tmp_path / "annotations" / "instances_train2014.json", both)
    with pytest.raises(DataLayoutError, match="both COCO 2014 and 2017.*coco2014"):
        list_samples(root, "voc", "train", "coco")
    assert len(list_samples(root, "voc", "train", "coco2014")) == 1


# -- VOC train_aug ---------------------------------------------------------------------------


def test_voc_aug_trains_on_train_aug_and_tests_on_val(roots):
    root = roots["voc_aug"]
    aug = list_samples(root, "voc", "train", "voc_aug")
    plain = list_samples(root, "voc", "train", "voc")
    assert len(aug) == 12 and len(plain) == 4  # VOC's train is a third of train_aug here
    assert {s.name for s in plain} < {s.name for s in aug}
    assert all(s.mask_path.parent.name == "SegmentationClassAug" for s in aug)
    assert [s.name for s in list_samples(root, "voc", "test", "voc_aug")] == [
        s.name for s in list_samples(root, "voc", "test", "voc")
    ]
    said = describe(root, "voc", "train", "voc_aug")
    assert "train_aug" in said and "train_aug.txt" in said and "SegmentationClassAug/" in said
    data = WSSSDataset(root, "voc", "train", SIZE, layout="voc_aug")
    assert data.source.endswith(": 12 images, 10 classes") and data.class_names == list(ANIMALS)
    for s, mask in zip(aug, data.masks, strict=True):
        truth = np.asarray(Image.open(s.mask_path))
        assert (mask == truth).all()
        assert set(s.labels) == {int(v) - 1 for v in np.unique(truth) if 0 < v < IGNORE}


def test_voc_aug_reads_deeplabs_two_column_list(roots, tmp_path):
    root = shutil.copytree(roots["voc_aug"], tmp_path / "voc")
    listing = root / "ImageSets/Segmentation/train_aug.txt"
    ids = listing.read_text().split()
    listing.write_text("".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in ids))
    assert [s.name for s in list_samples(root, "voc", "train", "voc_aug")] == ids


def test_voc_aug_refuses_a_train_aug_that_holds_val_images(roots, tmp_path):
    root = shutil.copytree(roots["voc_aug"], tmp_path / "voc")
    sets = root / "ImageSets/Segmentation"
    val = sets.joinpath("val.txt").read_text().split()
    with (sets / "train_aug.txt").open("a") as f:
        f.write(val[0] + "\n")
    with pytest.raises(DataLayoutError, match=f"{sets / 'train_aug.txt'}: 1 of its images"):
        list_samples(root, "voc", "train", "voc_aug")
    # val.txt in DeepLab's two columns too: its ids, not its lines, are compared
    sets.joinpath("val.txt").write_text(
        "".join(f"/JPEGImages/{n}.jpg /SegmentationClass/{n}.png\n" for n in val)
    )
    with pytest.raises(DataLayoutError, match="1 of its images are also in val.txt"):
        list_samples(root, "voc", "train", "voc_aug")


@pytest.mark.parametrize("layout", ["pets", "voc"])
def test_a_training_list_that_holds_test_images_is_refused(tmp_path, layout):
    """Only voc_aug's train_aug.txt was checked: Pet's trainval.txt and VOC's train.txt
    trained on the photos they were scored on, silently."""
    task = "pets" if layout == "pets" else "voc"
    root = write_synth(tmp_path / layout, SynthOptions(task, 20, 32, layout=layout))
    if layout == "pets":
        train, test = root / "annotations/trainval.txt", root / "annotations/test.txt"
    else:
        train, test = (root / f"ImageSets/Segmentation/{n}.txt" for n in ("train", "val"))
    first = test.read_text().splitlines()[0]
    with train.open("a") as f:
        f.write(first + "\n")
    with pytest.raises(DataLayoutError, match=f"{train}: 1 of its images are also in {test.name}"):
        list_samples(root, task, "train", layout)
    assert list_samples(root, task, "test", layout)  # the scored list itself still reads


# -- a plain folder --------------------------------------------------------------------------


def test_folder_reads_labels_csv_classes_and_masks(roots):
    root = roots["folder"]
    assert read_class_names(root, "voc", "folder") == list(ANIMALS)
    rows = list(csv.DictReader((root / "labels.csv").open()))
    for split in ("train", "test"):
        samples = list_samples(root, "voc", split, "folder")
        wanted = [r for r in rows if r["split"] == split]
        assert [s.image_path.name for s in samples] == [r["image"] for r in wanted]
        for s, r in zip(samples, wanted, strict=True):
            listed = r["labels"].split(";")
            assert [ANIMALS[c] for c in s.labels] == sorted(listed, key=ANIMALS.index)
            shown = {ANIMALS[v - 1] for v in np.unique(read_mask(s, "voc")) if 0 < v < IGNORE}
            assert shown == set(listed)


def test_folder_of_single_labels_feeds_the_pets_task(roots):
    root = roots["folder_pets"]
    data = WSSSDataset(root, "pets", "test", SIZE, layout="folder")
    assert set(np.unique(data.masks)) == {0, 1, IGNORE}  # any class is the foreground
    rows = [r for r in csv.DictReader((root / "labels.csv").open()) if r["split"] == "test"]
    assert [int(data[i][1]) for i in range(len(data))] == [ANIMALS.index(r["labels"]) for r in rows]
    with pytest.raises(DataLayoutError, match="takes one per image"):
        list_samples(roots["folder"], "pets", "test", "folder")


def test_folder_without_masks_or_splits(roots, tmp_path):
    """No masks/: every mask is ignored. No split column: one image in five is test, by
    a hash of its path; adding photos moves none of the others."""
    root = shutil.copytree(roots["folder"], tmp_path / "mine")
    shutil.rmtree(root / "masks")
    (root / "classes.txt").unlink()  # the class list: the sorted names in labels.csv
    rows = list(csv.DictReader((root / "labels.csv").open()))
    _write_csv(root, [[r["image"], r["labels"]] for r in rows], ["image", "labels"])
    train = list_samples(root, "voc", "train", "folder")
    test = list_samples(root, "voc", "test", "folder")
    assert len(train) + len(test) == COUNT and len(test) > 0
    found = {n for r in rows for n in r["labels"].split(";")}
    assert read_class_names(root, "voc", "folder") == sorted(found)
    data = WSSSDataset(root, "voc", "test", SIZE, layout="folder")
    assert not data.has_masks and (data.masks == IGNORE).all()
    extra = root / "images" / "extra.jpg"
    shutil.copy(train[0].image_path, extra)
    more = [[r["image"], r["labels"]] for r in rows] + [["extra.jpg", "cat"]]
    _write_csv(root, more, ["image", "labels"])
    again = list_samples(root, "voc", "test", "folder")
    assert [s.name for s in again if s.name != "extra"] == [s.name for s in test]


def test_a_folder_without_the_class_list_a_learned_class_needs_says_to_write_it(roots, tmp_path):
    """A profile with a learned class (coco_voc's person) on a folder whose labels.csv
    never uses it and that has no classes.txt: the message said the classes' order only."""
    from training import stages
    from wsss.config import load_config
    from wsss.errors import InputError

    root = shutil.copytree(roots["folder"], tmp_path / "mine")
    shutil.rmtree(root / "masks")
    (root / "classes.txt").unlink()
    cfg = load_config(
        None,
        [
            f"data.root={root}",
            "data.task=voc",
            "data.layout=folder",
            f"data.image_size={SIZE}",
            "classifier.arch=efficientnet_lite0",
            "classifier.pretrained=true",
            "classifier.head=imagenet",
            "classifier.class_groups={cat: ['281-285'], dog: ['151-268'], person: []}",
            f"runs={tmp_path / 'runs'}",
        ],
    )
    with pytest.raises(InputError, match=r"no class person \(a folder's classes .* classes.txt"):
        stages.run(cfg, ("classifier",))


def test_folder_labels_as_spreadsheets_save_them_and_as_users_misspell_them(roots, tmp_path):
    """Excel's "CSV UTF-8" (a byte-order mark) reads as written; another encoding, a
    misspelt split column (the split would silently be the hash's), a photo listed twice,
    and masks/ without classes.txt (a label's typo would shift every index) are one line
    naming the file."""
    root = shutil.copytree(roots["folder"], tmp_path / "mine")
    labels = root / "labels.csv"
    text = labels.read_text()
    want = [s.name for s in list_samples(root, "voc", "test", "folder")]
    labels.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert [s.name for s in list_samples(root, "voc", "test", "folder")] == want
    first = text.splitlines()[1].split(",")[0]
    cases = {
        text.replace(first, "caf\xe9.jpg", 1).encode("cp1252"): "not UTF-8 text (byte 0xe9",
        text.replace("split", "spilt", 1).encode(): "column 'spilt': did you mean 'split'?",
        (text + text.splitlines()[1] + "\n").encode(): f"{first} is listed twice: remove one",
        (text + "./" + text.splitlines()[1] + "\n").encode(): "is listed twice: remove one",
        (text + text.splitlines()[1].replace(".jpg", ".png", 1) + "\n").encode(): (
            f"{first} and {first.replace('.jpg', '.png')} share the name"  # in the lines' order
        ),
        # A photo's labels split by commas: DictReader filed the rest under None, dropped.
        (text + "extra.jpg,cat,dog,horse,train\n").encode(): "horse, train would be lost; sep",
        text.replace("image,labels,split", "image,labels", 1).encode(): "train would be lost",
        (text + ".,cat,train\n").encode(): "'.' names no photo",
        text.replace(",", ";").encode(): "the header is one column, 'image;labels;split'",
    }
    for data, said in cases.items():
        labels.write_bytes(data)
        with pytest.raises(DataLayoutError, match=re.escape(said)):
            list_samples(root, "voc", "train", "folder")
    labels.write_text(text.replace("split", "split,notes", 1).replace(",train", ",train,x"))
    assert [s.name for s in list_samples(root, "voc", "test", "folder")] == want  # left alone
    for column in ("site", "plot", "slide", "list"):  # near split, yet columns of their own
        labels.write_text(text.replace("split", column, 1))  # no split column: the hash's
        assert list_samples(root, "voc", "train", "folder")
    labels.write_text(text + ",,\n,,\n")  # a spreadsheet's trailing empty rows
    assert [s.name for s in list_samples(root, "voc", "test", "folder")] == want
    (root / "classes.txt").unlink()
    with pytest.raises(DataLayoutError, match="list the classes in .*classes.txt"):
        read_class_names(root, "voc", "folder")


def test_training_names_the_classes_it_has_one_photo_or_none_of(roots, tmp_path, capsys):
    """Without classes.txt a misspelt label is a class of its own: training says so."""
    from training.stages import load_train_set
    from wsss.config import load_config

    root = shutil.copytree(roots["folder"], tmp_path / "mine")
    shutil.rmtree(root / "masks")
    (root / "classes.txt").unlink()
    rows = list(csv.DictReader((root / "labels.csv").open()))
    first = next(r for r in rows if r["split"] == "train")
    first["labels"] = first["labels"].replace(first["labels"].split(";")[0], "dgo", 1)
    _write_csv(root, [[r["image"], r["labels"], r["split"]] for r in rows])
    sets = [f"data.root={root}", "data.layout=folder", "data.task=voc", f"data.image_size={SIZE}"]
    load_train_set(load_config(None, sets))
    said = capsys.readouterr().out.splitlines()[-1]
    assert said.startswith("train data: one photo or none to learn from: ") and "dgo (1)" in said


def _write_csv(root, rows, header=("image", "labels", "split")):
    with (root / "labels.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


# -- malformed copies: one per error, each message names the file ---------------------------


def _coco_json(root, split="val"):
    return root / "annotations" / f"instances_{split}2017.json"


def _edit_json(path, change):
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content))
    return path


def _first_image(root, folder):
    return sorted((root / folder).iterdir())[0]


def _resize_mask(path):
    Image.open(path).resize((SIZE + 2, SIZE), Image.NEAREST).save(path)
    return path


def _break_coco(root, error):
    ann = _coco_json(root)
    if error == "missing annotations":
        ann.unlink()
        return "test", ann, "is missing"
    if error == "image absent":
        image = _first_image(root, "val2017")
        image.unlink()
        return "test", image, "is missing"
    if error == "mask size":
        _edit_json(ann, lambda c: c["images"][0].update(width=SIZE + 2))
        return "test", ann, "but its image"
    if error == "unknown label":
        _edit_json(ann, lambda c: c["annotations"][0].update(category_id=999))
        return "test", ann, "category_id 999, which is not in its categories"
    _edit_json(ann, lambda c: c.update(images=[]))
    return "test", ann, "the test split is empty"


def _break_voc_aug(root, error):
    listing = root / "ImageSets/Segmentation/train_aug.txt"
    first = listing.read_text().split()[0]
    if error == "missing annotations":
        listing.unlink()
        return "train", listing, "is missing"
    if error == "image absent":
        image = root / "JPEGImages" / f"{first}.jpg"
        image.unlink()
        return "train", image, "is missing"
    mask = root / "SegmentationClassAug" / f"{first}.png"
    if error == "mask size":
        return "train", _resize_mask(mask), "but its image"
    if error == "unknown label":
        truth = np.asarray(Image.open(mask)).copy()
        truth[0, 0] = 15  # 10 classes
        Image.fromarray(truth, mode="L").save(mask)
        return "train", mask, "class index 15 is not in the class list"
    listing.write_text("\n")
    return "train", listing, "the train split is empty"


def _break_folder(root, error):
    labels = root / "labels.csv"
    rows = list(csv.reader(labels.open()))[1:]
    if error == "missing annotations":
        labels.unlink()
        return "train", labels, "is missing"
    if error == "image absent":
        image = root / "images" / rows[0][0]
        image.unlink()
        return rows[0][2], image, "is missing"
    if error == "mask size":
        test = next(r for r in rows if r[2] == "test")
        mask = root / "masks" / test[0].replace(".jpg", ".png")
        return "test", _resize_mask(mask), "but its image"
    if error == "unknown label":
        rows[0][1] = "unicorn"
        _write_csv(root, rows)
        return rows[0][2], labels, "line 2: label 'unicorn' is not in the class list"
    _write_csv(root, [[r[0], r[1], "train"] for r in rows])
    return "test", labels, "the test split is empty"


@pytest.mark.parametrize(
    "change, message",
    [
        pytest.param(
            lambda c: c["images"][0].pop("file_name"),
            r"images\[0\] \(id \d+\) has file_name missing",
            id="no file_name",
        ),
        pytest.param(
            lambda c: c["images"][0].update(height="tall"),
            "has height 'tall': expected int",
            id="height a string",
        ),
        pytest.param(
            lambda c: c["annotations"][0].pop("category_id"),
            "has category_id missing",
            id="no category_id",
        ),
        pytest.param(
            lambda c: c["annotations"][0].pop("image_id"), "has image_id missing", id="no image_id"
        ),
        pytest.param(
            lambda c: c.update(annotations=None),
            "annotations is NoneType, not a list",
            id="null annotations",
        ),
        pytest.param(
            lambda c: c.update(categories=["cat", "dog"]),
            "each of categories must be a JSON",
            id="categories as names",
        ),
        pytest.param(
            lambda c: c["annotations"][0].update(segmentation=7),
            "segmentation 7: expected a list",
            id="segmentation a number",
        ),
        pytest.param(
            lambda c: c["annotations"][0].update(segmentation=[["a", "b"]]),
            "segmentation is neither polygons nor an RLE",
            id="segmentation of strings",
        ),
    ],
)
def test_a_coco_file_with_a_malformed_entry_is_one_line_naming_it(roots, tmp_path, change, message):
    """KeyErrors and TypeErrors of pycocotools' own, before: each named by its entry now."""
    root = shutil.copytree(roots["coco"], tmp_path / "coco")
    ann = _edit_json(_coco_json(root), change)
    load_index.cache_clear()
    with pytest.raises(DataLayoutError, match=message) as info:
        WSSSDataset(root, "voc", "test", 32, layout="coco")  # reads the masks too
    assert str(ann) in str(info.value)


BREAK = {"coco": _break_coco, "voc_aug": _break_voc_aug, "folder": _break_folder}
ERRORS = ("missing annotations", "image absent", "mask size", "unknown label", "empty split")


@pytest.mark.parametrize("error", ERRORS)
@pytest.mark.parametrize("layout", list(BREAK))
def test_a_malformed_copy_fails_naming_the_file(roots, tmp_path, layout, error):
    root = shutil.copytree(roots[layout], tmp_path / layout)
    split, culprit, message = BREAK[layout](root, error)
    with pytest.raises(DataLayoutError, match=message) as info:
        WSSSDataset(root, "voc", split, 32, layout=layout)
    assert str(culprit) in str(info.value)


@pytest.mark.parametrize("layout", list(BREAK))
def test_a_missing_image_is_left_out_with_skip_unreadable_in_every_layout(roots, tmp_path, layout):
    """data.skip_unreadable left out a missing Pet image only: the other layouts refused
    theirs while listing, before the dataset could skip it."""
    root = shutil.copytree(roots[layout], tmp_path / layout)
    split, image, _ = BREAK[layout](root, "image absent")
    whole = len(list_samples(roots[layout], "voc", split, layout))
    data = WSSSDataset(root, "voc", split, 32, layout=layout, skip_unreadable=True)
    assert len(data) == whole - 1 and len(data.skipped) == 1
    assert str(image) in data.skipped[0] and "the image is missing" in data.skipped[0]


# -- palettes: the masks' colours follow the data into exports and `wsss infer` ---------------


def test_the_masks_palette_is_the_datas(roots):
    from training.data.writers import folder_palette
    from wsss.palette import VOC_PALETTE

    for layout, palette in (
        ("folder", folder_palette(len(ANIMALS))),
        ("voc_aug", VOC_PALETTE),
        ("coco", VOC_PALETTE),  # COCO has no colours of its own
    ):
        assert WSSSDataset(roots[layout], "voc", "test", 32, layout=layout).palette == palette
    assert folder_palette(len(ANIMALS)) != VOC_PALETTE


def test_infer_writes_masks_in_the_exported_palette(tmp_path):
    from serving.infer import top_class, write_mask
    from training.data.writers import folder_palette

    palette = folder_palette(2)
    path = write_mask(np.ones((8, 8), np.uint8), palette, tmp_path / "x_segmentation.png")
    png = Image.open(path)
    assert png.getpalette()[:9] == palette[:9]
    assert top_class(np.array([0.2, 0.9], np.float32), ["a", "b"])[0] == "b"


@pytest.mark.parametrize(
    ("layout", "listing"), [("voc", "class_names.txt"), ("folder", "classes.txt")]
)
def test_a_class_list_naming_a_class_twice_is_refused(tmp_path, layout, listing):
    """VOC's class_names.txt and a folder's classes.txt are read by one reader: a name listed
    twice would send its masks' values to the last copy, so both refuse it, naming it."""
    (tmp_path / listing).write_text("cat\ndog\n\ncat\n")
    with pytest.raises(DataLayoutError, match=rf"{listing}: cat listed more than once"):
        get_layout("voc", layout).class_names(tmp_path)
    (tmp_path / listing).write_text("cat\n dog \n\n")
    assert get_layout("voc", layout).class_names(tmp_path) == ["cat", "dog"]


def test_voc_reads_a_classes_txt_beside_the_data_as_a_folder_does(tmp_path):
    """The shared COCO subset (VOC layout) ships classes.txt: VOC read only class_names.txt."""
    assert get_layout("voc", "voc").class_names(tmp_path)[:2] == ["aeroplane", "bicycle"]
    (tmp_path / "classes.txt").write_text("kiwi\nmoa\n")
    assert get_layout("voc", "voc").class_names(tmp_path) == ["kiwi", "moa"]
    (tmp_path / "class_names.txt").write_text("tui\n")  # the older name first, as before
    assert get_layout("voc", "voc").class_names(tmp_path) == ["tui"]
    (tmp_path / "class_names.txt").write_text("background\ntui\n")  # would shift each class
    with pytest.raises(DataLayoutError, match="without 'background'"):
        get_layout("voc", "voc").class_names(tmp_path)


def test_an_image_listed_twice_is_refused(roots, tmp_path):
    """A duplicated line of a VOC (or Pet) list was trained on twice and could land in both
    the training and the validation part of the split."""
    root = shutil.copytree(roots["voc_aug"], tmp_path / "voc_aug")
    listing = root / "ImageSets/Segmentation/train_aug.txt"
    lines = listing.read_text().splitlines()
    listing.write_text("\n".join([*lines, lines[1]]) + "\n")
    first = lines[1].split()[0].rsplit("/", 1)[-1].removesuffix(".jpg")
    with pytest.raises(DataLayoutError, match=rf"1 image\(s\) listed more than once \({first}\)"):
        list_samples(root, "voc", "train", "voc_aug")


def test_a_missing_synthetic_benchmark_says_how_to_write_it(tmp_path):
    from wsss.config import DataConfig

    data = DataConfig(root=str(tmp_path / "pets_128"), synth_count=800)
    with pytest.raises(DataLayoutError, match="write it first with `wsss data synth`"):
        WSSSDataset.from_config(data, "train")


def test_a_photo_whose_suffix_a_camera_wrote_in_capitals_is_found(roots, tmp_path):
    """VOC and Pet list ids and read <id>.jpg: a copy holding <id>.JPG was "missing"."""
    root = shutil.copytree(roots["voc_aug"], tmp_path / "voc_aug")
    first = (root / "ImageSets/Segmentation/train_aug.txt").read_text().split()[0]
    photo = root / "JPEGImages" / f"{first}.jpg"
    want = np.asarray(Image.open(photo).convert("RGB"))
    photo.rename(photo.with_suffix(".JPG"))
    (sample,) = [s for s in list_samples(root, "voc", "train", "voc_aug") if s.name == first]
    assert sample.image_path.name == f"{first}.JPG"
    np.testing.assert_array_equal(read_image(sample.image_path), want)
    photo.with_suffix(".JPG").unlink()  # none at all: the listed name, said missing
    (sample,) = [s for s in list_samples(root, "voc", "train", "voc_aug") if s.name == first]
    assert sample.image_path == photo


def test_photos_over_the_pixel_limit_are_read_where_the_data_raises_it(roots):
    """A 45 MP camera's photos stopped training and evaluation with the server's "send it
    smaller" and no setting to raise it: data.max_image_pixels is that setting."""
    from wsss.config import DataConfig

    root = roots["folder_pets"]  # 48 x 48 photos: 2,304 pixels
    data = DataConfig(root=str(root), task="pets", layout="folder", synth_count=0, image_size=32)
    small = dataclasses.replace(data, max_image_pixels=2_000)
    with pytest.raises(DataLayoutError, match="exceeds the limit of 2,000.*data.max_image_pixels"):
        WSSSDataset.from_config(small, "train")
    wide = dataclasses.replace(data, max_image_pixels=2_304)
    assert len(WSSSDataset.from_config(wide, "train")) == len(
        WSSSDataset.from_config(data, "train")
    )


@pytest.mark.parametrize("damage", ["jpeg", "truncated", "empty"])
def test_a_mask_that_is_not_a_whole_png_is_refused_naming_it(roots, tmp_path, damage):
    """A JPEG saved under a mask's name would be read as class indices its edges blurred
    into (labels the photo does not hold); a truncated or empty PNG was a PIL traceback."""
    root = shutil.copytree(roots["voc_aug"], tmp_path / "voc_aug")
    first = (root / "ImageSets/Segmentation/train_aug.txt").read_text().split()[0]
    mask = root / "SegmentationClassAug" / f"{first}.png"
    if damage == "jpeg":
        Image.open(mask).convert("L").save(mask, format="JPEG")
        message = "a mask must be a PNG of class indices, not JPEG"
    else:
        data = mask.read_bytes()
        mask.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
        message = "not a readable PNG mask"
    with pytest.raises(DataLayoutError, match=message) as info:
        WSSSDataset(root, "voc", "train", 32, layout="voc_aug")
    assert str(mask) in str(info.value)


# -- a folder per class (ImageFolder) --------------------------------------------------------


def _photo(path, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def test_a_folder_per_class_labels_each_photo_by_its_folder(tmp_path):
    """cat/*.jpg, dog/*.jpg: the classes are the folders, sorted; subfolders and any
    suffix the decoder reads count, hidden folders and other files do not; unsplit, one
    photo in five is test by a hash of its path, as in the plain folder layout."""
    from training.data.folder import default_split

    for k in range(20):
        _photo(tmp_path / "dog" / f"d{k}.jpg")
        _photo(tmp_path / "cat" / "indoor" / f"c{k}.PNG")
    _photo(tmp_path / "cat" / ".ipynb_checkpoints" / "c0-checkpoint.png")
    _photo(tmp_path / ".trash" / "old.jpg")
    (tmp_path / "dog" / "notes.txt").write_text("not a photo")
    (tmp_path / "empty").mkdir()
    assert read_class_names(tmp_path, "pets", "imagefolder") == ["cat", "dog"]
    train = list_samples(tmp_path, "pets", "train", "imagefolder")
    test = list_samples(tmp_path, "pets", "test", "imagefolder")
    assert len(train) + len(test) == 40 and 0 < len(test) < 20
    for s in train + test:
        assert s.labels == ((0,) if s.name.startswith("cat/") else (1,)) and s.mask_path is None
        split = default_split(s.image_path.relative_to(tmp_path).as_posix())
        assert (s in test) == (split == "test")
    assert "cat/indoor/c3" in {s.name for s in train + test}
    data = WSSSDataset(tmp_path, "pets", "test", 32, layout="imagefolder")
    assert not data.has_masks and len(data) == len(test)
    with pytest.raises(DataLayoutError, match="does not fit data.task=voc"):
        list_samples(tmp_path, "voc", "train", "imagefolder")  # one label a photo


def test_a_folder_per_class_already_split_reads_train_and_test_or_val(tmp_path):
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            for k in range(3):
                _photo(tmp_path / split / name / f"{k}.jpg")
    _photo(tmp_path / "val" / "owl" / "0.jpg")  # a class only the held-out photos have
    assert read_class_names(tmp_path, "pets", "imagefolder") == ["cat", "dog", "owl"]
    train = list_samples(tmp_path, "pets", "train", "imagefolder")
    test = list_samples(tmp_path, "pets", "test", "imagefolder")
    assert len(train) == 6 and len(test) == 7
    assert all(s.image_path.parts[-3] == "val" for s in test)
    # train/ beside cat/: train is a class (VOC has one), not a split
    _photo(tmp_path / "cat" / "x.jpg")
    assert read_class_names(tmp_path, "pets", "imagefolder") == ["cat", "train", "val"]


def test_a_folder_per_class_refuses_what_it_cannot_label(tmp_path):
    with pytest.raises(DataLayoutError, match="is missing: expected a folder per class"):
        read_class_names(tmp_path / "nowhere", "pets", "imagefolder")
    with pytest.raises(DataLayoutError, match="no folder of photos"):
        read_class_names(tmp_path, "pets", "imagefolder")
    _photo(tmp_path / "cat" / "a.jpg")
    _photo(tmp_path / "cat" / "a.png")
    with pytest.raises(DataLayoutError, match="share the name cat/a"):
        list_samples(tmp_path, "pets", "train", "imagefolder") + list_samples(
            tmp_path, "pets", "test", "imagefolder"
        )
    (tmp_path / "cat" / "a.png").unlink()
    _photo(tmp_path / "loose.jpg")
    with pytest.raises(DataLayoutError, match="1 photo.s. beside the class folders"):
        read_class_names(tmp_path, "pets", "imagefolder")
