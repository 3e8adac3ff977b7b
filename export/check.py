"""Validate a Triton model repository and say exactly what is wrong.

Checks that every config.pbtxt parses against Triton's schema and names its folder; that each
version it lists has its folder and each served one holds its model file, and that the file
loads (ONNX in ONNX Runtime, TorchScript in torch with the inputs and outputs its ``NAME__i``
names index, Python: model.py and the modules it imports from beside it compile) with the
inputs and outputs its config declares; that every output's ``label_filename`` is in the
model's folder with one label per class, and every warmup sample's data file in
``warmup/``; that preferred batch sizes fit ``max_batch_size``; and that every ensemble step
exists, takes the ensemble's batch size, and is fed only tensors that exist by then, with
matching dtypes and shapes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from export.configs import FORMATS, parse
from export.lock import unfinished_commit
from wsss.served.configs import onnx_mismatches


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    models: dict[str, list[int]] = field(default_factory=dict)  # name -> served versions
    notes: list[str] = field(default_factory=list)  # said, not failed

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        if self.ok:
            listing = ", ".join(f"{n} v{','.join(map(str, v))}" for n, v in self.models.items())
            return "\n".join([f"OK: {len(self.models)} models ({listing})", *self.notes])
        failed = ["repository check failed:"] + [f"- {p}" for p in self.problems]
        return "\n".join(failed + [f"note: {n}" for n in self.notes])


def versions(folder: Path) -> list[int]:
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def listed_versions_missing(
    cfg: mc.ModelConfig, folder: Path, elsewhere: Path | None = None
) -> list[int]:
    """The versions a ``specific`` policy names that have no folder (in ``folder``, or in
    ``elsewhere``: the repository a staged export's older versions are in): Triton serves
    the others, so the ensembles' steps may come from two exports."""
    if not cfg.version_policy.HasField("specific"):
        return []
    found = set(versions(folder))
    if elsewhere is not None and elsewhere.is_dir():
        found |= set(versions(elsewhere))
    return sorted(v for v in set(cfg.version_policy.specific.versions) if v not in found)


def served_versions(cfg: mc.ModelConfig, folder: Path) -> list[int]:
    """The versions Triton will load under this config's version_policy."""
    found = versions(folder)
    policy = cfg.version_policy
    if policy.HasField("specific"):
        return [v for v in found if v in set(policy.specific.versions)]
    if policy.HasField("all"):
        return found
    keep = policy.latest.num_versions if policy.HasField("latest") else 1
    return found[-keep:]


def check_repository(
    root: str | Path, load_models: bool = True, versions_in: Path | None = None
) -> Report:
    """What is wrong with the repository at ``root``. ``versions_in``: for a staged export,
    which holds its new version alone, the repository whose folders hold the older
    versions its configs go on serving."""
    root = Path(root)
    report = Report()
    if not root.is_dir():
        what = "a file, not a repository folder" if root.exists() else "no such repository folder"
        report.problems.append(f"{root}: {what}")
        return report
    configs: dict[str, mc.ModelConfig] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        cfg = _read_config(folder, report)
        if cfg is None:
            continue
        configs[folder.name] = cfg
        _check_labels(cfg, folder, report)
        _check_batching(cfg, folder, report)
        served = served_versions(cfg, folder)
        report.models[folder.name] = served
        if not served:
            report.problems.append(f"{folder.name}: no numbered version folder to serve")
        elsewhere = None if versions_in is None else Path(versions_in) / folder.name
        for v in listed_versions_missing(cfg, folder, elsewhere) if served else ():
            report.problems.append(
                f"{folder.name}: version {v} is listed in config.pbtxt but has no folder "
                "(Triton serves the others: the ensembles' steps may come from two exports)"
            )
        if cfg.platform != "ensemble" and load_models:
            for v in served:
                _check_model_file(cfg, folder / str(v), report)
    if not configs:
        report.problems.append(f"{root}: holds no model (no <model>/config.pbtxt)")
    for cfg in configs.values():
        if cfg.platform == "ensemble":
            _check_ensemble(cfg, configs, report)
    unfinished = unfinished_commit(root)  # a killed export's renames, not yet all done
    if unfinished is not None:  # servable: said; two exports served side by side: failed
        (report.notes if unfinished.servable else report.problems).append(unfinished.message)
    return report


def _read_config(folder: Path, report: Report) -> mc.ModelConfig | None:
    path = folder / "config.pbtxt"
    if not path.exists():
        report.problems.append(f"{folder.name}: config.pbtxt is missing")
        return None
    try:
        cfg = parse(path.read_text())
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        report.problems.append(f"{path}: does not parse as a Triton ModelConfig: {exc}")
        return None
    if cfg.name and cfg.name != folder.name:
        report.problems.append(f"{path}: name {cfg.name!r} differs from its folder {folder.name!r}")
    return cfg


def _check_labels(cfg: mc.ModelConfig, folder: Path, report: Report) -> None:
    """Triton refuses to load a model whose labels file is missing; a short one names no
    class past its end."""
    for output in cfg.output:
        if not output.label_filename:
            continue
        path = folder / output.label_filename
        if not path.is_file():
            report.problems.append(
                f"{cfg.name}: output {output.name}'s label_filename {path.name} is missing "
                "(Triton reads it from the model's folder)"
            )
            continue
        try:
            count = len(path.read_text().splitlines())
        except UnicodeDecodeError as exc:  # Triton reads it as text: one label a line
            report.problems.append(f"{cfg.name}: {path.name} is not UTF-8 text: {exc}")
            continue
        if len(output.dims) == 1 and count != output.dims[0]:
            report.problems.append(
                f"{cfg.name}: {path.name} has {count} labels, output {output.name} "
                f"{output.dims[0]} classes"
            )


def _check_batching(cfg: mc.ModelConfig, folder: Path, report: Report) -> None:
    """What Triton refuses at load besides the tensors: a preferred batch size past
    ``max_batch_size``, and a warmup sample whose data file is not in ``warmup/``."""
    too_big = [
        b for b in cfg.dynamic_batching.preferred_batch_size if b > max(cfg.max_batch_size, 0)
    ]
    if cfg.HasField("dynamic_batching") and too_big:
        report.problems.append(
            f"{cfg.name}: preferred_batch_size {too_big} is over max_batch_size "
            f"{cfg.max_batch_size} (Triton refuses to load it)"
        )
    for sample in cfg.model_warmup:
        for name, tensor in sample.inputs.items():
            file = tensor.input_data_file
            if file and not (folder / "warmup" / file).is_file():
                report.problems.append(
                    f"{cfg.name}: warmup {sample.name!r} reads warmup/{file} for {name}, "
                    "which is missing (Triton fails to load the model)"
                )


def _declared(cfg: mc.ModelConfig, tensors) -> dict[str, tuple[int, list[int]]]:
    batch = [-1] if cfg.max_batch_size > 0 else []
    return {t.name: (t.data_type, batch + list(t.dims)) for t in tensors}


def _check_model_file(cfg: mc.ModelConfig, version: Path, report: Report) -> None:
    backends = {backend: (fmt, filename) for fmt, (backend, filename) in FORMATS.items()}
    if cfg.backend not in backends:
        report.problems.append(f"{cfg.name}: unknown backend {cfg.backend!r}")
        return
    fmt, default = backends[cfg.backend]
    path = version / (cfg.default_model_filename or default)
    where = f"{cfg.name} v{version.name}"
    if not path.is_file():
        report.problems.append(f"{where}: {path.name} is missing")
        return
    try:
        if fmt == "onnx":
            _check_onnx(cfg, path, where, report)
        elif fmt == "torchscript":
            _check_torchscript(cfg, path, where, report)
        else:
            problems, imports = python_model_problems(version)
            report.problems += [f"{where}: {p}" for p in problems]
            report.notes += [
                f"{where}: {name} imports the project (an export from before the served "
                "code was copied beside model.py): it loads where the project is installed "
                "and runs what it is now"
                for name in imports
            ]
    except Exception as exc:  # any load failure is the finding
        report.problems.append(f"{where}: {path.name} does not load: {exc}")


# The project's own packages: a served Python model that imports one serves whatever the
# installed project has become (the repository stands alone).
_PROJECT_IMPORT = re.compile(
    r"^\s*(from|import)\s+(wsss|training|export|serving|benchmarks|cli)\b", re.M
)
_LOCAL_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import", re.M)


def python_model_problems(version_dir: Path) -> tuple[list[str], list[str]]:
    """What keeps a Python model's version folder from loading (model.py or a module it
    imports from beside it, ``from .x import`` followed through those modules, missing or
    not compiling), and the modules of it that import the project: those load where the
    project is installed (exports from before the served code was copied beside model.py)
    and run whatever it has become. Each version is judged by its own code, so one exported
    before a helper was added stays servable."""
    problems, imports, seen, todo = [], [], set(), [("model", None)]
    while todo:
        module, by = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = version_dir / f"{module}.py"
        if not path.is_file():
            problems.append(f"{path.name} is missing" + (f" ({by}.py imports it)" if by else ""))
            continue
        source = path.read_text(errors="replace")
        try:
            compile(source, str(path), "exec")
        except SyntaxError as exc:
            problems.append(f"{path.name} does not compile: {exc}")
        if _PROJECT_IMPORT.search(source):
            imports.append(path.name)
        todo += [(m, module) for m in _LOCAL_IMPORT.findall(source)]
    return problems, imports


def _check_torchscript(cfg: mc.ModelConfig, path: Path, where: str, report: Report) -> None:
    """The traced module loads and has the inputs and outputs the config's ``NAME__i``
    names point at (Triton's PyTorch backend maps them by that index)."""
    import warnings

    import torch

    with warnings.catch_warnings():  # torch.jit's deprecation notice, not a finding
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), map_location="cpu")
    schema = module.forward.schema
    takes = len(schema.arguments) - 1  # self
    returns = schema.returns[0].type if len(schema.returns) == 1 else None
    gives = len(returns.elements()) if isinstance(returns, torch.TupleType) else 1
    for kind, tensors, count in (("input", cfg.input, takes), ("output", cfg.output, gives)):
        for t in tensors:
            index = t.name.rpartition("__")[2]
            if index.isdigit() and int(index) >= count:
                report.problems.append(
                    f"{where}: {kind} {t.name} names the module's {kind} {index}, which has {count}"
                )


def _check_onnx(cfg: mc.ModelConfig, path: Path, where: str, report: Report) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs, outputs = (
        [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in tensors]
        for tensors in (cfg.input, cfg.output)
    )
    for problem in onnx_mismatches(session, inputs, outputs, cfg.max_batch_size > 0):
        report.problems.append(f"{where}: {problem}")


def _shapes_agree(a: list[int], b: list[int]) -> bool:
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b, strict=True))


def _check_ensemble(
    cfg: mc.ModelConfig, configs: dict[str, mc.ModelConfig], report: Report
) -> None:
    where = f"ensemble {cfg.name}"
    available = dict(_declared(cfg, cfg.input))
    read = {t for step in cfg.ensemble_scheduling.step for t in step.input_map.values()}
    read |= {t.name for t in cfg.output}
    for i, step in enumerate(cfg.ensemble_scheduling.step):
        model = configs.get(step.model_name)
        if model is None:
            report.problems.append(f"{where} step {i}: model {step.model_name!r} does not exist")
            return
        if 0 < model.max_batch_size < cfg.max_batch_size:
            report.problems.append(
                f"{where} step {i} ({model.name}): max_batch_size {model.max_batch_size} is "
                f"under the ensemble's {cfg.max_batch_size} (Triton refuses the ensemble)"
            )
        inputs, outputs = _declared(model, model.input), _declared(model, model.output)
        missing = set(inputs) - set(step.input_map)
        if missing:
            report.problems.append(
                f"{where} step {i} ({model.name}): inputs {sorted(missing)} are not mapped"
            )
        for model_name, tensor in step.input_map.items():
            if model_name not in inputs:
                report.problems.append(
                    f"{where} step {i}: {model.name} has no input {model_name!r}"
                )
            elif tensor not in available:
                report.problems.append(
                    f"{where} step {i}: {model.name}.{model_name} reads "
                    f"{tensor!r}, which no earlier step or input provides"
                )
            elif not _compatible(available[tensor], inputs[model_name]):
                report.problems.append(
                    f"{where} step {i}: {tensor!r} "
                    f"{_fmt(available[tensor])} does not fit "
                    f"{model.name}.{model_name} {_fmt(inputs[model_name])}"
                )
        for model_name, tensor in step.output_map.items():
            if model_name not in outputs:
                report.problems.append(
                    f"{where} step {i}: {model.name} has no output {model_name!r}"
                )
            elif tensor not in read:
                report.problems.append(
                    f"{where} step {i}: {tensor!r} is produced but never used "
                    "(Triton refuses unused ensemble tensors)"
                )
            else:
                available[tensor] = outputs[model_name]
    for name, want in _declared(cfg, cfg.output).items():
        if name not in available:
            report.problems.append(f"{where}: output {name!r} is produced by no step")
        elif not _compatible(available[name], want):
            report.problems.append(
                f"{where}: output {name!r} is {_fmt(available[name])} from "
                f"its step but {_fmt(want)} in the ensemble config"
            )


def _compatible(a: tuple[int, list[int]], b: tuple[int, list[int]]) -> bool:
    return a[0] == b[0] and _shapes_agree(a[1], b[1])


def _fmt(t: tuple[int, list[int]]) -> str:
    return f"{mc.DataType.Name(t[0])}{t[1]}"
