"""What the evaluation figures say beside their panels: each row's classes, and a legend of
every colour the masks are drawn in."""

from types import SimpleNamespace

import numpy as np

from training.evaluate import figure_legend, figure_rows
from wsss.figures import legend_entries
from wsss.palette import IGNORE, VOC_PALETTE


def _data(binary: bool, has_masks: bool = True):
    truth = np.zeros((2, 4, 4), np.uint8)
    truth[0, :2] = 1 if binary else 2  # dog (class 1 -> value 2), or the pet
    truth[0, 2] = IGNORE  # the boundary VOC and Pet trimaps leave unscored
    return SimpleNamespace(
        kind=SimpleNamespace(binary_masks=binary),
        class_names=["cat", "dog", "horse"],
        samples=[SimpleNamespace(labels=(1, 2)), SimpleNamespace(labels=(0,))],
        masks=truth if has_masks else np.full_like(truth, IGNORE),
        images=np.zeros((2, 4, 4, 3), np.uint8),
        palette=None,
        has_masks=has_masks,
    )


def _results(pseudo: np.ndarray):
    return {"p": SimpleNamespace(examples={"cam": [np.zeros((4, 4))] * 2, "pseudo": pseudo})}


def test_the_legend_names_background_and_the_ignored_pixels_the_truth_is_drawn_in():
    pseudo = np.zeros((2, 4, 4), np.uint8)
    pseudo[1, 0] = 3  # horse
    labels, legend = figure_legend(_data(binary=False), _results(pseudo))
    assert labels == ["dog, horse", "cat"]
    colour = {name: rgb for name, rgb in legend}
    assert list(colour) == ["background", "dog", "horse", "ignored (255)"]
    palette = np.array(VOC_PALETTE).reshape(256, 3) / 255
    assert colour["background"] == (0.0, 0.0, 0.0)
    assert np.allclose(colour["ignored (255)"], palette[IGNORE])
    assert np.allclose(colour["horse"], palette[3])
    # The overlays of served masks tint classes only: no background, no boundary.
    assert [n for n, _ in legend_entries([pseudo], ["cat", "dog", "horse"])] == ["horse"]


def test_one_pet_a_photo_rows_name_the_breed_and_photos_without_masks_draw_no_truth():
    labels, legend = figure_legend(_data(binary=True), _results(np.zeros((2, 4, 4), np.uint8)))
    assert labels == ["dog, horse", "cat"] and legend is None  # the rows' classes, one colour
    columns = [("CAM", "p", "cam"), ("pseudo-mask", "p", "pseudo")]
    results = _results(np.zeros((2, 4, 4), np.uint8))
    assert list(figure_rows(_data(False), results, columns)[0]) == [
        "image",
        "CAM",
        "pseudo-mask",
        "ground truth",
    ]
    assert "ground truth" not in figure_rows(_data(False, has_masks=False), results, columns)[0]
    _, legend = figure_legend(_data(False, has_masks=False), results)
    assert [n for n, _ in legend] == []  # nothing drawn in a truth's colours
