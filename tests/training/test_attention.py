"""ViT attention pseudo-masks: the post-processing, both backends, and the refiner."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.attention import ViTAttention, attention_mask
from wsss.served.classical import VIT_SIZE as SIZE


def test_post_processing_keeps_the_largest_smooth_part():
    yy, xx = np.mgrid[:SIZE, :SIZE]
    big = np.hypot(yy - 120, xx - 100) < 50
    small = np.hypot(yy - 30, xx - 190) < 12
    rng = np.random.default_rng(0)
    attention = 0.8 * big + 0.8 * small + 0.15 * rng.random((SIZE, SIZE))
    mask = attention_mask(attention.astype(np.float32))
    iou = (mask & big).sum() / (mask | big).sum()
    assert iou > 0.85 and not (mask & small).any()
    assert not attention_mask(np.full((SIZE, SIZE), 0.5, np.float32)).any()


def _photos():
    import cv2
    import skimage.data

    return np.stack(
        [cv2.resize(getattr(skimage.data, n)(), (160, 160)) for n in ("chelsea", "coffee")]
    )


def test_bundled_onnx_vit_gives_fused_maps():
    maps = ViTAttention()(_photos())
    assert maps.shape == (2, SIZE, SIZE) and maps.dtype == np.float32
    assert 0.0 <= maps.min() and maps.max() <= 1.0 + 1e-6
    with pytest.raises(ValueError, match="has no node output .*check refine.vit_layers"):
        ViTAttention(layers=(12,))


def test_a_timm_vit_from_a_checkpoint(tmp_path):
    """Any timm ViT: its attention softmax read by hooks (a small random one here)."""
    import timm

    arch = "vit_tiny_patch16_224"
    torch.manual_seed(0)
    path = tmp_path / "vit.pt"
    torch.save(timm.create_model(arch, pretrained=False, num_classes=0).state_dict(), path)
    maps = ViTAttention(layers=(0, 11), weights=str(path), arch=arch)(_photos())
    assert maps.shape == (2, SIZE, SIZE) and np.isfinite(maps).all() and maps.max() > 0.5


def test_vit_refiner_masks_the_present_class():
    from training.torch_refiners import build_refiner
    from wsss.config import RefineConfig

    images = _photos()
    cams = np.zeros((2, 3, 160, 160), np.float32)
    cams[:, 2, :, :80] = 1.0  # class 2 strongest on the left half, class 0 on the right
    cams[:, 0, :, 80:] = 1.0
    scores = np.array([[0.9, 0.0, 0.8], [0.1, 0.1, 0.1]], np.float32)
    binary = build_refiner(RefineConfig("vit"), multi_label=False)(images, scores, cams)
    assert set(np.unique(binary)) <= {0, 1} and 0.05 < binary[0].mean() < 0.95
    multi = build_refiner(RefineConfig("vit", min_score=0.5), multi_label=True)
    masks = multi(images, scores, cams)
    assert set(np.unique(masks[0][:, :80])) <= {0, 3} and set(np.unique(masks[0][:, 80:])) <= {0, 1}
    assert not masks[1].any()  # min_score: nothing present
    with pytest.raises(ValueError, match="saliency, walk optionally \\+grabcut"):
        build_refiner(RefineConfig("vit", grabcut=True), multi_label=False)


@pytest.mark.realdata
def test_bundled_vit_attention_lands_on_the_pet_of_real_photos(real_pets):
    """Real Pet test photos (every 15th: all three breeds): the attention is higher on the
    animal than around it, and its mask overlaps the trimap's pet far better than marking
    the whole photo does."""
    from training.data.dataset import WSSSDataset
    from training.data.layouts import IGNORE, list_samples

    samples = list_samples(real_pets, "pets", "test")[::15]
    data = WSSSDataset(real_pets, "pets", "test", SIZE, samples=samples)
    maps = ViTAttention()(data.images)
    pet, known = data.masks == 1, data.masks != IGNORE
    inside = np.array([m[p].mean() for m, p in zip(maps, pet, strict=True)])
    outside = np.array([m[k & ~p].mean() for m, p, k in zip(maps, pet, known, strict=True)])
    masks = np.stack([attention_mask(m) for m in maps])
    iou = (masks & pet).sum((1, 2)) / ((masks | pet) & known).sum((1, 2))
    whole = pet.sum((1, 2)) / known.sum((1, 2))
    # Measured: attention 0.210 on the pet vs 0.066 around it; IoU 0.559 vs 0.278.
    assert (inside > 2 * outside).mean() >= 0.9
    assert iou.mean() > whole.mean() + 0.2


def _embedding_graph() -> bytes:
    """x [B, 3, H, W] -> a 2x2 patch conv plus position embeddings bicubic-resized to the
    patch grid (read off x's shape, as DINOv2 does), then a flat [B, -1] (the batch read off
    the shape too)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    c = lambda name, v: numpy_helper.from_array(np.asarray(v), name)  # noqa: E731
    inits = [
        c("w", rng.normal(size=(4, 3, 2, 2)).astype(np.float32)),
        c("pos", rng.normal(size=(1, 4, 8, 8)).astype(np.float32)),
        c("hw", np.array([2, 3], np.int64)),
        c("two", np.array(2, np.int64)),
        c("lead", np.array([1, 4], np.int64)),
        c("zero", np.array([0], np.int64)),
        c("rest", np.array([-1], np.int64)),
    ]
    n = helper.make_node
    nodes = [
        n("Shape", ["x"], ["shape"]),
        n("Gather", ["shape", "hw"], ["side"]),
        n("Div", ["side", "two"], ["grid"]),
        n("Concat", ["lead", "grid"], ["sizes"], axis=0),
        n("Resize", ["pos", "", "", "sizes"], ["pos_at"], mode="cubic"),
        n("Conv", ["x", "w"], ["patches"], kernel_shape=[2, 2], strides=[2, 2]),
        n("Add", ["patches", "pos_at"], ["embedded"]),
        n("Gather", ["shape", "zero"], ["batch"]),
        n("Concat", ["batch", "rest"], ["flat"], axis=0),
        n("Reshape", ["embedded", "flat"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "embeddings",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, "h", "w"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", "n"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_what_depends_on_the_side_alone_is_computed_once(tmp_path):
    """onnx_reading at 12 px: the position embeddings' Resize becomes a weight (it ran at
    every call), the batch stays read at run time, and the outputs do not change."""
    import onnx
    import onnxruntime as ort

    from training.attention import onnx_reading

    path = tmp_path / "embeddings.onnx"
    path.write_bytes(_embedding_graph())
    folded = onnx.load_from_string(onnx_reading(path, 12))
    ops = [node.op_type for node in folded.graph.node]
    assert "Resize" not in ops and "Conv" in ops and "Reshape" in ops
    assert [t.name for t in folded.graph.initializer if t.name.endswith("_at_side")] == [
        "pos_at_at_side"
    ]
    before = ort.InferenceSession(path.read_bytes(), providers=["CPUExecutionProvider"])
    after = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 3):  # the probes ran at 1 and 2
        x = np.random.default_rng(batch).normal(size=(batch, 3, 12, 12)).astype(np.float32)
        want = before.run(None, {"x": x})[0]
        got = after.run(None, {"x": x})[0]
        assert got.shape == (batch, 4 * 6 * 6) and np.array_equal(got, want)


def test_the_bundled_vit_read_at_its_side_answers_as_the_file_does():
    """The bundled DINOv2 with its position embeddings computed once: the same saliency map
    as the file as it came, to the bit, at 224 px."""
    import onnxruntime as ort

    from training.attention import bundled_vit_onnx, onnx_reading

    path = bundled_vit_onnx()
    x = np.random.default_rng(0).normal(size=(1, 3, SIZE, SIZE)).astype(np.float32)
    maps = []
    for graph in (path.read_bytes(), onnx_reading(path, SIZE)):
        session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
        maps.append(session.run(None, {session.get_inputs()[0].name: x})[0])
    assert np.array_equal(maps[0], maps[1])


def test_a_graph_with_control_flow_is_read_as_it_is(tmp_path):
    """An If node's branches read tensors by name from outside them: the fold leaves such a
    graph whole (still probed at the side), and it answers as before."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from training.attention import onnx_reading

    def branch(name: str, op: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node(op, ["x"], [f"{name}_out"])],
            name,
            [],
            [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)],
        )

    # The branch's mean, added back: on the zeros the fold probes with it is 0.5 at any batch,
    # so a fold that did not see the branch read x would store it as a constant.
    graph = helper.make_graph(
        [
            helper.make_node(
                "If",
                ["flag"],
                ["branch"],
                then_branch=branch("then", "Sigmoid"),
                else_branch=branch("else", "Relu"),
            ),
            helper.make_node("ReduceMean", ["branch"], ["mean"], keepdims=0),
            helper.make_node("Add", ["x", "mean"], ["out"]),
        ],
        "control_flow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array(True), "flag")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "control_flow.onnx"
    path.write_bytes(model.SerializeToString())
    read = onnx_reading(path, 8)
    assert [n.op_type for n in onnx.load_from_string(read).graph.node] == [
        "If",
        "ReduceMean",
        "Add",
    ]
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    session = ort.InferenceSession(read, providers=["CPUExecutionProvider"])
    want = x + (1 / (1 + np.exp(-x))).mean()
    assert np.allclose(session.run(None, {"x": x})[0], want, atol=1e-5)


def test_a_shape_that_follows_the_pixels_is_not_stored(tmp_path):
    """A count of the positive pixels (NonZero's shape) is read off a Shape too, but it
    follows the pixels: it is 0 on zeros at any batch, and the random probe keeps it from
    being stored as a constant."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from training.attention import onnx_reading

    n = helper.make_node
    graph = helper.make_graph(
        [
            n("Greater", ["x", "zero"], ["positive"]),
            n("NonZero", ["positive"], ["where"]),
            n("Shape", ["where"], ["shape"]),
            n("Gather", ["shape", "one"], ["count"], axis=0),
            n("Cast", ["count"], ["countf"], to=TensorProto.FLOAT),
            n("Mul", ["x", "countf"], ["out"]),
        ],
        "follows_the_pixels",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 4, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", 3, 4, 4])],
        [
            numpy_helper.from_array(np.array(0, np.float32), "zero"),
            numpy_helper.from_array(np.array(1, np.int64), "one"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "follows.onnx"
    path.write_bytes(model.SerializeToString())
    read = onnx_reading(path, 4)
    assert not [t for t in onnx.load_from_string(read).graph.initializer if "_at_side" in t.name]
    x = np.random.default_rng(1).normal(size=(1, 3, 4, 4)).astype(np.float32)
    session = ort.InferenceSession(read, providers=["CPUExecutionProvider"])
    assert np.allclose(session.run(None, {"x": x})[0], x * (x > 0).sum())
