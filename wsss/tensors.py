"""The served contract: every tensor's name, dtype and shape, defined once.

The in-process pipeline returns dicts keyed by these names; the exporter names ONNX inputs and
outputs with them and generates each config.pbtxt and the ensemble's maps from them; the
client and the perf_analyzer flags are generated from them too. Nothing else spells a name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from wsss.errors import InputError
from wsss.served.classical import VIT_SIZE  # the side of the ViT's maps: its own input

_TRITON_DTYPES = {
    "uint8": "UINT8",
    "int32": "INT32",
    "int64": "INT64",
    "float32": "FP32",
    "bytes": "BYTES",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name (or "bytes"): one of _TRITON_DTYPES
    shape: tuple[int, ...]  # per item, without the batch dimension; -1 = any size
    doc: str = ""
    # One value per class, in class order: served with a labels file, so Triton's
    # classification extension answers top-k requests with the class names.
    labelled: bool = False

    @property
    def triton_dtype(self) -> str:
        """The client/protocol spelling, e.g. FP32; config.pbtxt prefixes it with TYPE_."""
        return _TRITON_DTYPES[self.dtype]

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(object) if self.dtype == "bytes" else np.dtype(self.dtype)

    def check(self, array: np.ndarray, batched: bool = True) -> None:
        """Raise ValueError unless ``array`` fits this spec: what a client must send."""
        shape = array.shape[1:] if batched else array.shape
        if array.dtype != self.np_dtype:
            raise InputError(f"{self.name}: dtype {array.dtype}, expected {self.dtype}")
        if len(shape) != len(self.shape) or any(
            want != -1 and got != want for got, want in zip(shape, self.shape, strict=True)
        ):
            raise InputError(
                f"{self.name}: shape {tuple(shape)}, expected {self.shape} (per item, -1 = any)"
            )


@dataclass(frozen=True)
class ModelSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # (output, input) pairs the model returns unchanged: the pass-through segmenter's
    # SEGMENTATION is the PSEUDO_MASK it reads. A chain that needs no other output of the
    # model reads the input in the output's place and skips the step (``ensemble_aliases``).
    passes: tuple[tuple[str, str], ...] = ()


# Tensor names: importable, so no served name is spelled anywhere else.
IMAGE = "IMAGE"
SCORES = "SCORES"
CAMS = "CAMS"
FEATURES = "FEATURES"
PSEUDO_MASK = "PSEUDO_MASK"
SEG_PROBS = "SEG_PROBS"
SEGMENTATION = "SEGMENTATION"
IMAGE_BYTES = "IMAGE_BYTES"
ORIGINAL_SIZE = "ORIGINAL_SIZE"
PSEUDO_MASK_FULL = "PSEUDO_MASK_FULL"
SEGMENTATION_FULL = "SEGMENTATION_FULL"
# What the ViT model returns: one [0, 1] map per image at the ViT's input side, the extent a
# saliency- or attention-guided refiner reads (a class-agnostic saliency model's output, or
# a ViT's fused CLS attention).
SALIENCY = "SALIENCY"
ATTENTION = "ATTENTION"
# Or one layer's patch tokens [N, C], whose affinity the random walk spreads the CAMs over
# (refine.method walk).
TOKENS = "TOKENS"
VIT_MAPS = (SALIENCY, ATTENTION, TOKENS)
# The ViT output a refiner reads, by the kind its entry in the refiner table names
# (wsss.served.registry.RefinerEntry.vit).
VIT_OUTPUT = {"saliency": SALIENCY, "attention": ATTENTION, "tokens": TOKENS}

# Model names in the repository; the ensembles are what clients call.
CLASSIFIER, REFINER, SEGMENTER = "classifier", "refiner", "segmenter"
VIT = "vit"  # the saliency or attention ViT, where the refiner reads one: beside the classifier
PREPROCESS, POSTPROCESS = "preprocess", "postprocess"
PIPELINE, PIPELINE_BYTES = "wsss_pipeline", "wsss_pipeline_bytes"
# Each ensemble clients call is one step: the ensemble of the steps below (``ENSEMBLES``).
# Triton 2.51 prunes an ensemble's steps for the outputs a request names, and its walk drops
# steps the request needs (``wsss.pruning``): asking SEGMENTATION alone of a chain whose
# SCORES and CAMS feed the refiner fails with "unexpected deadlock". A step that is itself
# an ensemble is asked for all it maps, so the inner chain is never pruned and any subset of
# the outer one's outputs is answered (tested on the real server, every subset).
CHAINS = {PIPELINE: "wsss_pipeline_steps", PIPELINE_BYTES: "wsss_pipeline_bytes_steps"}

# What the outputs mean travels with the served models, so a client never guesses it: the
# config parameters of every model with a labelled output (the classifier, the ensembles) hold
# these two JSON strings, and each such model's folder holds LABELS_FILE (Triton reads
# ``label_filename`` relative to the model's folder).
CLASS_NAMES = "class_names"  # ["cat", "dog"]: SCORES[n] and CAMS[n] are class n
PALETTE = "palette"  # 256 RGB triples, flat: the colours of mask values in PNGs
# Which classes a photo holds, as the refiner decides (wsss.served.classical.present_classes):
# {"multi_label": true, "threshold": 0.3 or one per class, "min_score": 0.0}.
PRESENCE = "presence"
# A name each export gives itself (a random hex string in both ensembles' configs): records of
# what answered (`wsss infer`'s predictions) tell two exports apart where both are version 1
# (a new repository).
EXPORT_ID = "export_id"
LABELS_FILE = "labels.txt"  # one class name per line, in class order


# The bytes ensemble's input: the one tensor whose spec needs no model's sizes.
ENCODED_IMAGE = TensorSpec(
    IMAGE_BYTES, "bytes", (1,), "an encoded image file, any size: JPEG, PNG, GIF, BMP, WebP or TIFF"
)


def label_parameters(
    class_names: list[str], palette: list[int], presence: dict | None = None
) -> dict[str, str]:
    """The config parameters that name the classes, colour the masks and (``presence``)
    say which classes a photo holds."""
    bad = [n for n in class_names if not n.strip() or "\n" in n or "\r" in n]
    if bad:
        raise InputError(f"class names must be one non-empty line each, not {bad!r}")
    if len(palette) != 768:
        raise InputError(f"a palette is 256 RGB triples (768 numbers), not {len(palette)}")
    params = {
        CLASS_NAMES: json.dumps(list(class_names)),
        PALETTE: json.dumps(list(palette), separators=(",", ":")),
    }
    if presence is not None:
        threshold = presence["threshold"]
        if not isinstance(threshold, (int, float)) and len(threshold) != len(class_names):
            raise InputError(f"{len(threshold)} score thresholds for {len(class_names)} classes")
        params[PRESENCE] = json.dumps(presence, sort_keys=True)
    return params


def labels_text(class_names: list[str]) -> str:
    """LABELS_FILE's contents: line n names class n."""
    return "".join(f"{name}\n" for name in class_names)


def class_label(class_names: list[str] | None, c: int) -> str:
    """Class ``c``'s name, or ``class c`` where none is known (an export that serves none)."""
    return class_names[c] if class_names and 0 <= c < len(class_names) else f"class {c}"


def read_presence(parameters: dict[str, str]) -> dict | None:
    """``PRESENCE`` from a served config's parameters; None from an export before it."""
    presence = parameters.get(PRESENCE)
    return json.loads(presence) if presence else None


def read_label_parameters(parameters: dict[str, str]) -> tuple[list[str] | None, list[int] | None]:
    """Class names and palette from a served config's parameters; None where it has none
    (an export from before they were served)."""
    names, palette = parameters.get(CLASS_NAMES), parameters.get(PALETTE)
    return (json.loads(names) if names else None, json.loads(palette) if palette else None)


# Each ensemble's steps in order; tensors flow between steps by their names above. A step
# whose model the repository does not hold (the ViT, for a refiner that reads none) is left
# out: ``ensemble_members``. The chains come first: an export commits (and a server loads)
# them before the ensembles that step through them.
ENSEMBLES: dict[str, tuple[str, ...]] = {
    CHAINS[PIPELINE]: (CLASSIFIER, VIT, REFINER, SEGMENTER),
    CHAINS[PIPELINE_BYTES]: (PREPROCESS, CLASSIFIER, VIT, REFINER, SEGMENTER, POSTPROCESS),
    PIPELINE: (CHAINS[PIPELINE],),
    PIPELINE_BYTES: (CHAINS[PIPELINE_BYTES],),
}


def ensemble_members(ensemble: str, specs: dict[str, ModelSpec]) -> list[str]:
    """``ensemble``'s steps, in order, among the models of ``specs`` (``served_models``); a
    chain ``specs`` lacks (an export from before them) stands for its own steps, and a step
    the chain skips (``ensemble_aliases``) is left out."""
    skipped = _skipped(ensemble, specs)[0]
    members = []
    for name in ENSEMBLES[ensemble]:
        if name in specs and name not in skipped:
            members.append(name)
        elif name in ENSEMBLES and name not in specs:
            members += ensemble_members(name, specs)
    return members


def ensemble_aliases(ensemble: str, specs: dict[str, ModelSpec]) -> dict[str, str]:
    """Tensors that ``ensemble``'s steps read in another tensor's place: those of a step it
    skips, one that returns every output the chain needs of it unchanged (``passes``) and
    none that the chain returns. The bytes chain skips a pass-through segmenter: its
    SEGMENTATION is the PSEUDO_MASK it reads and no bytes ensemble returns its SEG_PROBS (a
    one-hot of floats: 400 kB for two classes at 224 px), so ``postprocess`` reads
    PSEUDO_MASK for both its masks; the pixels' chain returns both and keeps the step.
    Only in a chain ``specs`` hold: an export from before them stepped through every model.
    """
    return _skipped(ensemble, specs)[1]


def _skipped(ensemble: str, specs: dict[str, ModelSpec]) -> tuple[set[str], dict[str, str]]:
    """The steps ``ensemble`` skips, and the tensors read in their outputs' place."""
    if ensemble not in CHAINS.values() or ensemble not in specs:
        return set(), {}
    returned = {t.name for t in specs[ensemble].outputs}
    names = [n for n in ENSEMBLES[ensemble] if n in specs]
    skipped, aliases = set(), {}
    for k, name in enumerate(names):
        passes, made = dict(specs[name].passes), {t.name for t in specs[name].outputs}
        read_later = {t.name for n in names[k + 1 :] for t in specs[n].inputs}
        if passes and not made & returned and made & read_later <= set(passes):
            skipped.add(name)
            aliases.update({out: passes[out] for out in made & read_later})
    return skipped, aliases


def served_models(
    image_size: int,
    num_classes: int,
    num_seg_classes: int,
    features: tuple[int, int, int] | None = None,
    segmenter_input: str = IMAGE,
    vit: str | None = None,
    tokens: tuple[int, int] | None = None,
    chains: bool = True,
) -> dict[str, ModelSpec]:
    """The models of the repository, in pipeline order, with their tensors.

    ``features`` (channels, height, width of the backbone map) selects the level-set refiner:
    the classifier then also returns FEATURES, which the refiner reads beside the CAMS.
    ``segmenter_input``: IMAGE for a trained segmenter; PSEUDO_MASK for the pass-through one
    (``segmenter.arch: passthrough``), which serves the refined mask as the segmentation.
    ``vit`` (SALIENCY, ATTENTION or TOKENS) adds the ViT model, which reads IMAGE beside
    the classifier and gives the refiner that map [224, 224], or ``tokens`` (patches,
    channels) of patch tokens. ``chains``: each ensemble steps through its chain
    (``CHAINS``), as every export since them serves it; False for an export from before.
    """
    if segmenter_input not in (IMAGE, PSEUDO_MASK):
        raise InputError(f"the segmenter reads {IMAGE} or {PSEUDO_MASK}, not {segmenter_input!r}")
    if vit is not None and vit not in VIT_MAPS:
        raise InputError(f"the ViT gives {' or '.join(VIT_MAPS)}, not {vit!r}")
    if (vit == TOKENS) != (tokens is not None):
        raise InputError(f"the ViT's {TOKENS} take their (patches, channels), and only they")
    if vit is not None and features is not None:
        raise InputError("the level-set refiner reads FEATURES, not a ViT's map")
    h = w = image_size
    image = TensorSpec(IMAGE, "uint8", (h, w, 3), "RGB pixels, resized to the model size")
    scores = TensorSpec(
        SCORES,
        "float32",
        (num_classes,),
        "class probabilities: softmax (pets) or sigmoid (voc)",
        labelled=True,
    )
    cams = TensorSpec(CAMS, "float32", (num_classes, h, w), "one [0, 1] map per class")
    pseudo = TensorSpec(PSEUDO_MASK, "uint8", (h, w), "refined CAM: class index per pixel")
    probs = TensorSpec(
        SEG_PROBS, "float32", (num_seg_classes, h, w), "segmenter softmax (passed through: one-hot)"
    )
    seg = TensorSpec(SEGMENTATION, "uint8", (h, w), "segmenter argmax: class index per pixel")
    encoded = ENCODED_IMAGE
    original = TensorSpec(ORIGINAL_SIZE, "int32", (2,), "height and width of the decoded image")
    pseudo_full = TensorSpec(PSEUDO_MASK_FULL, "uint8", (-1, -1), "PSEUDO_MASK at original size")
    seg_full = TensorSpec(SEGMENTATION_FULL, "uint8", (-1, -1), "SEGMENTATION at original size")
    vit_model = {}
    if features is not None:
        feats = TensorSpec(FEATURES, "float32", features, "backbone feature map")
        classifier = ModelSpec(CLASSIFIER, (image,), (scores, cams, feats))
        refiner = ModelSpec(REFINER, (image, scores, cams, feats), (pseudo,))
    else:
        classifier = ModelSpec(CLASSIFIER, (image,), (scores, cams))
        refiner = ModelSpec(REFINER, (image, scores, cams), (pseudo,))
        if vit is not None:
            if vit == TOKENS:
                what = "patch tokens of one ViT layer, the random walk's affinity"
                extent = TensorSpec(vit, "float32", tuple(tokens), what)
            else:
                what = {SALIENCY: "class-agnostic saliency", ATTENTION: "fused CLS attention"}
                doc = f"[0, 1] {what[vit]} map"
                extent = TensorSpec(vit, "float32", (VIT_SIZE, VIT_SIZE), doc)
            vit_model = {VIT: ModelSpec(VIT, (image,), (extent,))}
            refiner = ModelSpec(REFINER, (image, scores, cams, extent), (pseudo,))
    return {
        PREPROCESS: ModelSpec(PREPROCESS, (encoded,), (image, original)),
        CLASSIFIER: classifier,
        **vit_model,
        REFINER: refiner,
        SEGMENTER: (
            ModelSpec(SEGMENTER, (image,), (probs, seg))
            if segmenter_input == IMAGE
            else ModelSpec(SEGMENTER, (pseudo,), (probs, seg), ((SEGMENTATION, PSEUDO_MASK),))
        ),
        POSTPROCESS: ModelSpec(POSTPROCESS, (pseudo, seg, original), (pseudo_full, seg_full)),
        **{
            name: ModelSpec(name, (image,), (scores, cams, pseudo, probs, seg))
            for name in ((CHAINS[PIPELINE],) if chains else ()) + (PIPELINE,)
        },
        **{
            name: ModelSpec(name, (encoded,), (scores, pseudo_full, seg_full))
            for name in ((CHAINS[PIPELINE_BYTES],) if chains else ()) + (PIPELINE_BYTES,)
        },
    }
