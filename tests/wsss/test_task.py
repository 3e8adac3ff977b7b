"""wsss.task: what each task's labels mean, read from configs and checkpoints alike."""

from __future__ import annotations

import pytest

from wsss.config import DataConfig
from wsss.task import TASKS, Task, get_task


def test_each_task_says_its_scores_loss_and_segmenter_classes():
    pets, voc = get_task("pets"), get_task("voc")
    assert (pets.multi_label, pets.binary_masks, pets.loss) == (False, True, "ce")
    assert (voc.multi_label, voc.binary_masks, voc.loss) == (True, False, "bce")
    assert (pets.metric, voc.metric) == ("accuracy", "map")
    assert (pets.iou_key("seg"), voc.iou_key("pseudo")) == ("seg_iou", "pseudo_miou")
    assert (pets.segmentation_classes(37), voc.segmentation_classes(20)) == (2, 21)
    assert DataConfig(task="voc").kind is TASKS["voc"]


def test_checkpoints_saved_with_the_name_or_the_fields_read_alike():
    for task in TASKS.values():
        assert get_task(task.name) == get_task(task.as_meta()) == get_task(task) == task
    assert get_task({"name": "mine", "multi_label": True, "binary_masks": True}) == Task(
        "mine", True, True
    )
    with pytest.raises(ValueError, match="unknown task 'coco'"):
        get_task("coco")


def test_the_configs_task_names_are_the_tasks():
    import typing

    from wsss.config import TaskName

    assert typing.get_args(TaskName) == tuple(TASKS)
