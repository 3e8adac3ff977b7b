"""The synthetic benchmark, and the readers on tiny trees in the real layouts."""

import hashlib

import numpy as np
import pytest
from PIL import Image

from training.data import (
    IGNORE,
    DataLayoutError,
    list_samples,
    read_class_names,
    read_mask,
)
from training.data.dataset import WSSSDataset
from training.data.layouts import VOC_CLASSES, VOC_PALETTE
from training.data.synth import (
    ANIMALS,
    SYNTH_RECORD,
    WRITERS,
    SynthOptions,
    ensure_synth,
    write_synth,
)
from wsss.errors import InputError


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_synth_is_deterministic(tmp_path):
    a = write_synth(tmp_path / "a", SynthOptions("voc", 10, 48, seed=3))
    b = write_synth(tmp_path / "b", SynthOptions("voc", 10, 48, seed=3))
    c = write_synth(tmp_path / "c", SynthOptions("voc", 10, 48, seed=4))
    assert _digest(a) == _digest(b) != _digest(c)


def test_synth_writes_over_its_own_benchmark_only(tmp_path):
    """A folder of someone's own photos is refused (wsss data synth aimed at it by a
    profile's data.root); an earlier benchmark is replaced whole, none of its files left."""
    own = tmp_path / "own"
    (own / "annotations").mkdir(parents=True)
    (own / "annotations" / "trainval.txt").write_text("my_cat 1 1 1\n")
    with pytest.raises(InputError, match="holds files this command did not write"):
        write_synth(own, SynthOptions("pets", 10, 32))
    assert (own / "annotations" / "trainval.txt").read_text() == "my_cat 1 1 1\n"
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        write_synth(tmp_path / "file", SynthOptions("pets", 10, 32))
    ours = write_synth(tmp_path / "ours", SynthOptions("pets", 20, 32))
    write_synth(ours, SynthOptions("pets", 10, 32))
    assert len(list((ours / "images").iterdir())) == 10
    # through a link to it, as a data.root may be
    (tmp_path / "link").symlink_to(ours)
    write_synth(tmp_path / "link", SynthOptions("pets", 20, 32))
    assert (tmp_path / "link").is_symlink() and len(list((ours / "images").iterdir())) == 20


def test_a_benchmark_stopped_halfway_is_written_again(tmp_path, monkeypatch):
    """Ctrl-C or a full disk mid-write: the folder is still this command's, and unfinished."""
    opts = SynthOptions("pets", 10, 32)

    def stopped(root, records, names):
        (root / "images").mkdir()
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setitem(WRITERS, "pets", stopped)
        with pytest.raises(KeyboardInterrupt):
            write_synth(tmp_path / "data", opts)
    assert ensure_synth(tmp_path / "data", opts)  # not taken for done, nor for someone's
    assert not ensure_synth(tmp_path / "data", opts)
    assert len(list((tmp_path / "data" / "images").iterdir())) == 10


def test_a_damaged_record_or_a_size_it_cannot_draw_is_said_and_keeps_the_benchmark(tmp_path):
    """A record cut off mid-file (a JSON traceback) is this command's folder: written again.
    A side above 512 px failed deep in the compositor (numpy's "high <= 0") after the
    earlier benchmark was already deleted: refused first, that benchmark kept."""
    opts = SynthOptions("pets", 10, 32)
    root = write_synth(tmp_path / "data", opts)
    (root / SYNTH_RECORD).write_text('{"task": "pe')
    assert ensure_synth(root, opts) and not ensure_synth(root, opts)
    before = _digest(root)
    with pytest.raises(InputError, match="size 32 to 512 \\(got count 10, size 520\\)"):
        ensure_synth(root, SynthOptions("pets", 10, 520))
    assert _digest(root) == before


def test_synth_pets_layout(pets_root):
    names = read_class_names(pets_root, "pets")
    assert names == list(ANIMALS)
    train = list_samples(pets_root, "pets", "train")
    test = list_samples(pets_root, "pets", "test")
    assert len(train) + len(test) == 40 and len(test) == 10
    for s in train[:5]:
        trimap = np.asarray(Image.open(s.mask_path))
        assert set(np.unique(trimap)) <= {1, 2, 3} and 1 in trimap and 3 in trimap
        mask = read_mask(s, "pets")
        assert set(np.unique(mask)) <= {0, 1, IGNORE}
        assert names[s.labels[0]] == s.name.rsplit("_", 1)[0]


def test_synth_pets_names_the_species_of_its_cat_and_dog_only(pets_root, tmp_path):
    """The lists' species column: 1 for the cat, 2 for the dog, none for the other animals
    (all were 1, so make serve's cat/dog model, scored on the benchmark, took a zebra for
    a cat: accuracy 0.1). A folder written before is written again."""
    import json

    from training.data.layouts import get_layout
    from training.pipeline import translate_labels

    info = get_layout("pets").class_info(pets_root)
    aliases = {c["name"]: c["alias"] for c in info}
    assert aliases == {a: a if a in ("cat", "dog") else None for a in ANIMALS}
    names = [c["name"] for c in info]
    labels = [(c,) for c in range(len(names))]
    kept = translate_labels(labels, names, ["cat", "dog"], [c["alias"] for c in info])
    assert [k for k in kept if k is not None] == [(0,), (1,)]  # the cat's and the dog's
    opts = SynthOptions("pets", 40, 64, seed=1)
    root = write_synth(tmp_path / "pets", opts)
    record = json.loads((root / SYNTH_RECORD).read_text())
    del record["species"]  # as an earlier writer recorded it
    (root / SYNTH_RECORD).write_text(json.dumps(record))
    assert ensure_synth(root, opts)


def test_a_synthetic_benchmark_says_so_where_it_is_read_and_photos_do_not(tmp_path):
    # make serve's profile reads its synthetic stand-in for the class names; scored on it by
    # mistake, the figures must not pass for a real-photo score
    synthetic = WSSSDataset(
        write_synth(tmp_path / "s", SynthOptions("pets", 12, 64)), "pets", "test", 32
    )
    assert "synthetic (drawn by `wsss data synth`, not photos)" in synthetic.source
    real = WSSSDataset(_real_pets_tree(tmp_path / "r"), "pets", "train", 32)
    assert "not photos" not in real.source  # (the tmp path names the test: "synthetic")


def test_synth_voc_layout(tmp_path):
    root = write_synth(tmp_path, SynthOptions("voc", 12, 64, seed=0))
    assert read_class_names(root, "voc") == list(ANIMALS)
    samples = list_samples(root, "voc", "train") + list_samples(root, "voc", "test")
    assert len(samples) == 12
    assert any(len(s.labels) > 1 for s in samples)
    for s in samples:
        png = Image.open(s.mask_path)
        assert png.mode == "P"
        mask = read_mask(s, "voc")
        present = {int(v) - 1 for v in np.unique(mask) if 0 < v < IGNORE}
        assert present == set(s.labels) and IGNORE in mask


def _real_pets_tree(root):
    """A tiny Oxford-IIIT Pet tree, named and encoded exactly like the real one."""
    (root / "images").mkdir(parents=True)
    (root / "annotations" / "trimaps").mkdir(parents=True)
    rows = [
        ("Abyssinian_1", 1, 1, 1),
        ("american_pit_bull_terrier_10", 2, 2, 1),
        ("Abyssinian_2", 1, 1, 1),
    ]
    for name, *_ in rows:
        Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(root / "images" / f"{name}.jpg")
        trimap = np.full((30, 40), 2, np.uint8)
        trimap[10:20, 10:30] = 1
        trimap[9, 10:30] = 3
        Image.fromarray(trimap).save(root / "annotations" / "trimaps" / f"{name}.png")
    lines = [" ".join(map(str, r)) for r in rows]
    (root / "annotations" / "trainval.txt").write_text("\n".join(lines[:2]) + "\n")
    (root / "annotations" / "test.txt").write_text(lines[2] + "\n")
    return root


def test_reads_a_real_oxford_pet_tree(tmp_path):
    root = _real_pets_tree(tmp_path)
    assert read_class_names(root, "pets") == ["Abyssinian", "american_pit_bull_terrier"]
    train = list_samples(root, "pets", "train")
    assert [s.labels for s in train] == [(0,), (1,)]
    mask = read_mask(train[0], "pets")
    assert mask[15, 15] == 1 and mask[0, 0] == 0 and mask[9, 15] == IGNORE
    ds = WSSSDataset(root, "pets", "train", 32, 2)
    image, target, mask = ds[1]
    assert image.shape == (32, 32, 3) and int(target) == 1 and mask.shape == (32, 32)


def test_reads_a_real_voc_tree(tmp_path):
    root = tmp_path
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    mask = np.zeros((20, 20), np.uint8)
    mask[2:8, 2:8] = 15  # person
    mask[10:18, 10:18] = 12  # dog
    mask[8, :] = 255
    png = Image.fromarray(mask, mode="P")
    png.putpalette(VOC_PALETTE)
    png.save(root / "SegmentationClass" / "2007_000032.png")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "JPEGImages" / "2007_000032.jpg")
    (root / "ImageSets/Segmentation/train.txt").write_text("2007_000032\n")
    assert read_class_names(root, "voc") == list(VOC_CLASSES)
    (s,) = list_samples(root, "voc", "train")
    assert [VOC_CLASSES[i] for i in s.labels] == ["dog", "person"]
    ds = WSSSDataset(root, "voc", "train", 20, 20)
    assert ds[0][1].nonzero().flatten().tolist() == [11, 14]


def test_layout_errors_are_clear(tmp_path):
    with pytest.raises(DataLayoutError, match="trainval.txt is missing"):
        read_class_names(tmp_path, "pets")
    with pytest.raises(DataLayoutError, match="unknown task"):
        read_class_names(tmp_path, "coco")
    with pytest.raises(DataLayoutError, match="VOC segmentation image set"):
        list_samples(tmp_path, "voc", "train")


def _pet_subset(root, ids=(1, 2, 6)):
    """A Pet folder of three official breeds with non-contiguous ids, its images saved as
    the real release has some: JPEG, PNG and GIF under .jpg, greyscale, CMYK, alpha."""
    breeds = {1: ("Abyssinian", 1), 2: ("american_bulldog", 2), 6: ("Bengal", 1)}
    (root / "images").mkdir(parents=True)
    (root / "annotations" / "trimaps").mkdir(parents=True)
    rng = np.random.default_rng(0)
    formats = [("JPEG", "RGB"), ("PNG", "RGB"), ("GIF", "P"), ("JPEG", "L"), ("JPEG", "CMYK"),
               ("PNG", "RGBA")]  # fmt: skip
    lines = {"trainval": ["#Image CLASS-ID SPECIES BREED ID"], "test": []}
    k = 0
    for cid in ids:
        breed, species = breeds[cid]
        for n in range(1, 5):
            name = f"{breed}_{n}"
            fmt, mode = formats[k % len(formats)]
            k += 1
            rgb = Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
            rgb.convert(mode).save(root / "images" / f"{name}.jpg", format=fmt)
            Image.fromarray(np.full((20, 30), 1 + n % 3, np.uint8)).save(
                root / "annotations" / "trimaps" / f"{name}.png"
            )
            split = "test" if n == 4 else "trainval"
            lines[split].append(f"{name} {cid} {species} {n}")
    for split, rows in lines.items():
        (root / "annotations" / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return root


def test_a_pet_subset_reads_with_its_official_ids(tmp_path):
    root = _pet_subset(tmp_path)
    assert read_class_names(root, "pets") == ["Abyssinian", "american_bulldog", "Bengal"]
    data = WSSSDataset(root, "pets", "train", 16)
    assert len(data) == 9 and not data.skipped
    assert sorted({s.labels for s in data.samples}) == [(0,), (1,), (2,)]
    assert [(c["official_id"], c["species"]) for c in data.class_info] == [(1, 1), (2, 2), (6, 1)]
    assert data.aliases == ["cat", "dog", "cat"]
    assert data.images.shape == (9, 16, 16, 3)
    assert data.full_mask(0).shape == (20, 30)


@pytest.mark.parametrize("broken", ["corrupt", "missing"])
def test_an_unreadable_pet_image_is_named_or_skipped_and_counted(tmp_path, broken):
    root = _pet_subset(tmp_path)
    bad = root / "images" / "Bengal_2.jpg"
    if broken == "corrupt":
        bad.write_bytes(b"\xff\xd8not a jpeg at all")
    else:
        bad.unlink()
    with pytest.raises(DataLayoutError, match=r"Bengal_2\.jpg.*skip_unreadable"):
        WSSSDataset(root, "pets", "train", 16)
    data = WSSSDataset(root, "pets", "train", 16, skip_unreadable=True)
    assert len(data) == 8 and len(data.skipped) == 1 and "Bengal_2.jpg" in data.skipped[0]
    assert "Bengal_2" not in [s.name for s in data.samples]
    assert "1 unreadable skipped" in data.source


def test_a_pet_class_id_given_to_two_breeds_is_refused(tmp_path):
    root = _pet_subset(tmp_path)
    listing = root / "annotations" / "test.txt"
    listing.write_text(listing.read_text().replace("Bengal_4 6", "Bengal_4 1"))
    with pytest.raises(DataLayoutError, match="class id 1"):
        read_class_names(root, "pets")
