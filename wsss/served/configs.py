"""Reading a model's config as Triton hands it to a Python model (JSON), and holding an ONNX
file to the tensors that config declares.

The python-backend models (the refiner, pre- and postprocess), the project's ONNX Runtime
backend shim and the client read ``parameters`` one way; the shim (refusing a load, as the
native backend does) and ``wsss export --check`` (listing every problem) hold ONNX files to
their configs one way.
"""

# The max_pixels parameter's default (here, not in images.py, so that wsss.config reads it
# without OpenCV): the decoded pixels an image may have, checked from its header before
# decoding. A 12,000 x 12,000 PNG is 450 KB on the wire and 430 MB decoded. The served limit
# is export.max_image_pixels (the preprocess and postprocess models' max_pixels parameter);
# the postprocess model holds the masks' size (ORIGINAL_SIZE, which a client calling it
# directly gives) to it too: 8 bytes asking 16384 x 16384 would be two 268 MB masks an item.
MAX_PIXELS = 40_000_000

# ONNX Runtime's tensor types as config.pbtxt spells them.
ONNX_TYPES = {
    "tensor(float)": "TYPE_FP32",
    "tensor(float16)": "TYPE_FP16",
    "tensor(uint8)": "TYPE_UINT8",
    "tensor(int32)": "TYPE_INT32",
    "tensor(int64)": "TYPE_INT64",
    "tensor(bool)": "TYPE_BOOL",
    "tensor(string)": "TYPE_STRING",
}


def parameters(config: dict) -> dict[str, str]:
    """A config's ``parameters`` as name -> string value."""
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def declared(config: dict, kind: str) -> list[tuple[str, str, list[int]]]:
    """(name, data type, dims) of a JSON config's ``input`` or ``output`` tensors, the dims
    without the batch dimension."""
    return [(t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in config.get(kind, [])]


def onnx_mismatches(session, inputs, outputs, batched: bool) -> list[str]:
    """Where an ONNX Runtime ``session`` differs from the (name, data type, dims) its config
    declares (``declared``): as Triton's native backend, the model's inputs must be the
    config's, and every output the config declares must be the model's (it may have more);
    a dtype or a fixed dimension that differs (-1 or a named dimension matches any)."""
    problems = []
    for kind, want, have in (
        ("input", inputs, session.get_inputs()),
        ("output", outputs, session.get_outputs()),
    ):
        found = {t.name: t for t in have}
        names = [name for name, _, _ in want]
        missing = [n for n in names if n not in found]
        extra = sorted(set(found) - set(names)) if kind == "input" else []
        if missing or extra:
            problems.append(
                f"{kind}s {', '.join(names) or 'none'} in the config, "
                f"{', '.join(sorted(found)) or 'none'} in the ONNX file"
            )
            continue
        for name, dtype, dims in want:
            got = found[name]
            if ONNX_TYPES.get(got.type, got.type) != dtype:
                problems.append(
                    f"{kind} {name} is {got.type} in the ONNX file, {dtype} in the config"
                )
            shape = [d if isinstance(d, int) else -1 for d in got.shape]
            full = ([-1] if batched else []) + list(dims)
            if len(shape) != len(full) or any(
                -1 not in (s, d) and s != d for s, d in zip(shape, full, strict=True)
            ):
                problems.append(
                    f"{kind} {name} has shape {shape} in the ONNX file, {full} in the config"
                )
    return problems
