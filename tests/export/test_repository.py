"""The repository contract: generated configs, versions, atomic writes, and --check."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from export.check import check_repository, versions
from export.configs import build_configs, io_names, parse, render
from export.parity import ParityError
from export.repository import ExportError, export_repository
from tests.conftest import random_export_cfg
from wsss.config import load_config, with_overrides
from wsss.errors import InputError, WsssError
from wsss.palette import VOC_PALETTE
from wsss.tensors import (
    ENSEMBLES,
    EXPORT_ID,
    PIPELINE,
    PIPELINE_BYTES,
    label_parameters,
    read_label_parameters,
    served_models,
)

GOLDEN = Path(__file__).parent / "golden"


def _golden_configs():
    """Fixed specs and non-default settings, so the golden files cover every option."""
    cfg = load_config(
        None,
        [
            "export.classifier.format=torchscript",
            "export.segmenter.onnxruntime.graph_level=1",
            "export.segmenter.onnxruntime.intra_op_threads=2",
            "export.segmenter.onnxruntime.gpu_accelerator=tensorrt",
            "export.segmenter.onnxruntime.shrink_arena=true",
            "export.segmenter.kind=KIND_GPU",
            "export.segmenter.instances=2",
            "export.refiner.max_batch_size=4",
            "export.preprocess.warmup=false",
        ],
    )
    specs = served_models(64, 3, 2)
    versions = {name: [3, 4] for name in specs}
    params = {"refiner": {"refine": '{"method": "otsu"}', "multi_label": "false"}}
    labels = label_parameters(["bear", "cat", "dog"], VOC_PALETTE)
    return build_configs(specs, cfg.export, params, versions, labels=labels)


def test_configs_match_golden_files_byte_for_byte():
    first = {n: render(c) for n, c in _golden_configs().items()}
    again = {n: render(c) for n, c in _golden_configs().items()}
    assert first == again
    if os.environ.get("WSSS_UPDATE_GOLDEN"):
        for name, text in first.items():
            (GOLDEN / f"{name}.pbtxt").write_text(text)
    for name, text in first.items():
        assert (GOLDEN / f"{name}.pbtxt").read_text() == text, (
            f"{name}: regenerate with WSSS_UPDATE_GOLDEN=1 if the change is intended"
        )
        assert render(parse(text)) == text  # round-trips through Triton's schema


def test_generated_settings_land_where_triton_reads_them():
    configs = _golden_configs()
    seg, cls, ref = configs["segmenter"], configs["classifier"], configs["refiner"]
    assert seg.backend == "onnxruntime" and seg.optimization.graph.level == 1
    assert seg.parameters["intra_op_thread_count"].string_value == "2"
    assert seg.parameters["memory.enable_memory_arena_shrinkage"].string_value == "cpu:0"
    (acc,) = seg.optimization.execution_accelerators.gpu_execution_accelerator
    assert acc.name == "tensorrt" and acc.parameters["precision_mode"] == "FP16"
    assert seg.instance_group[0].count == 2 and list(seg.version_policy.specific.versions) == [3, 4]
    assert cls.backend == "pytorch" and [i.name for i in cls.input] == ["IMAGE__0"]
    assert cls.parameters["INTRA_OP_THREAD_COUNT"].string_value == "1"  # one an instance
    assert [o.name for o in cls.output] == ["SCORES__0", "CAMS__1"]
    assert ref.max_batch_size == 4 and ref.model_warmup[0].inputs["CAMS"].zero_data
    # Generated inputs warm up at the largest batch (ONNX Runtime's arena reaches its size
    # at load); an encoded image read from a file stays one sample.
    assert ref.model_warmup[0].batch_size == 4 and seg.model_warmup[0].batch_size == 8
    assert configs["postprocess"].model_warmup[0].batch_size == 1
    assert not configs["preprocess"].model_warmup
    pipe, chain = configs["wsss_pipeline"], configs["wsss_pipeline_steps"]
    assert chain.max_batch_size == pipe.max_batch_size == 4  # no more than its smallest member
    (outer,) = pipe.ensemble_scheduling.step  # one step, its chain, asked for all it maps
    assert outer.model_name == "wsss_pipeline_steps"
    assert set(outer.output_map) == {o.name for o in pipe.output} == {o.name for o in chain.output}
    step = chain.ensemble_scheduling.step[0]
    assert dict(step.input_map) == {"IMAGE__0": "IMAGE"}
    assert dict(step.output_map) == {"SCORES__0": "SCORES", "CAMS__1": "CAMS"}
    spec = served_models(64, 3, 2)["classifier"]
    assert io_names(spec, "onnx")["SCORES"] == "SCORES"


def _export_ids(repo: Path) -> dict[str, str]:
    """Each model's EXPORT_ID parameter, where its config has one."""
    ids = {}
    for config in repo.glob("*/config.pbtxt"):
        params = parse(config.read_text()).parameters
        if EXPORT_ID in params:
            ids[config.parent.name] = params[EXPORT_ID].string_value
    return ids


def test_versions_accumulate_with_the_policy(tmp_path):
    cfg = random_export_cfg(tmp_path, "export.keep_versions=2", "export.keep_on_disk=1")
    repo = Path(cfg.export.repository)
    results, ids = [], []
    for _ in range(3):
        results.append(export_repository(cfg))
        ids.append(_export_ids(repo))
    assert [r.version for r in results] == [1, 2, 3]
    # Each export names itself in both ensembles a client reads (wsss infer's records), and
    # beside the classifier's metadata; the same models exported again are another export.
    for result, named in zip(results, ids, strict=True):
        assert named == dict.fromkeys((PIPELINE, PIPELINE_BYTES), result.export_id)
        path = repo / "classifier" / str(result.version) / "export_id.txt"
        assert path.read_text() == result.export_id + "\n"
    assert len({r.export_id for r in results}) == 3

    def on_disk() -> dict[str, list[int]]:
        return {name: versions(repo / name) for name in served_models(48, 3, 2)}

    # Past the newest export.keep_on_disk (1 here), an old version stays while a config
    # serves it: the new ones, and those before this export, which a running server serves
    # until its reload lands (1 for the networks; the ensembles served their latest alone).
    expected = {name: [2, 3] if name in ENSEMBLES else [1, 2, 3] for name in on_disk()}
    assert on_disk() == expected
    classifier = parse((repo / "classifier" / "config.pbtxt").read_text())
    assert list(classifier.version_policy.specific.versions) == [2, 3]
    report = check_repository(repo)
    assert report.ok, str(report)
    assert report.models["classifier"] == [2, 3]
    assert not list(tmp_path.glob(".wsss-staging-*"))
    # The repository grows by one export, not by every export ever made ...
    assert export_repository(cfg).version == 4
    assert on_disk() == {n: [3, 4] if n in ENSEMBLES else [2, 3, 4] for n in expected}
    assert not list(tmp_path.glob(".wsss-staging-*"))  # moved out in the commit, then deleted
    assert check_repository(repo).ok
    # ... unless told to keep every one (0), and by default the newest 4.
    export_repository(with_overrides(cfg, ["export.keep_on_disk=0"]))
    assert on_disk() == {n: [3, 4, 5] if n in ENSEMBLES else [2, 3, 4, 5] for n in expected}
    export_repository(with_overrides(cfg, ["export.keep_on_disk=4"]))
    assert on_disk() == dict.fromkeys(expected, [3, 4, 5, 6])
    with pytest.raises(InputError, match="export.keep_on_disk -1: at least 0"):
        export_repository(with_overrides(cfg, ["export.keep_on_disk=-1"]))
    assert on_disk() == dict.fromkeys(expected, [3, 4, 5, 6]) and check_repository(repo).ok


def test_the_config_written_beside_an_export_says_what_was_trained(tmp_path, capsys):
    """Export builds the networks from their checkpoints' architectures and task: a config
    that names others is noted, and the config written beside the export names the
    checkpoints' (it said resnet18 beside a MobileNetV2 graph)."""
    import yaml

    from training.pipeline import load_model

    cfg = random_export_cfg(tmp_path)
    _, cmeta = load_model(Path(cfg.runs) / "classifier" / "best.pt")
    _, smeta = load_model(Path(cfg.runs) / "segmenter" / "best.pt")
    other = "resnet18" if cmeta["arch"] != "resnet18" else "resnet50"
    assert (cmeta["kwargs"]["output_stride"], smeta["kwargs"]["base_channels"]) == (16, 4)
    overrides = ["classifier.arch=" + other, "classifier.output_stride=32"]
    overrides.append("segmenter.base_channels=16")  # a UNet 4 wide was trained
    result = export_repository(with_overrides(cfg, overrides))
    saved = Path(cfg.export.repository) / "classifier" / str(result.version) / "wsss_config.yaml"
    written = yaml.safe_load(saved.read_text())
    assert written["classifier"]["arch"] == cmeta["arch"]
    assert written["classifier"]["output_stride"] == cmeta["kwargs"]["output_stride"]
    assert written["segmenter"]["base_channels"] == 4  # the builder's arguments, as trained
    err = capsys.readouterr().err
    assert f"classifier.arch is '{other}' in the config, '{cmeta['arch']}' in the checkpoint" in err
    assert "segmenter.base_channels is 16 in the config, 4 in the checkpoint" in err


def test_an_export_at_another_size_than_training_says_so(tmp_path, capsys):
    """`--set data.image_size=160` at export over networks trained at 128 px exported and
    passed its parity checks (graph against PyTorch, both at 160) in silence."""
    from wsss.config import save_config

    cfg = random_export_cfg(tmp_path)  # data.image_size 48
    save_config(cfg, Path(cfg.runs) / "segmenter" / "config.yaml")
    save_config(
        with_overrides(cfg, ["data.image_size=64"]), Path(cfg.runs) / "classifier" / "config.yaml"
    )
    export_repository(cfg)
    err = capsys.readouterr().err
    assert f"{Path(cfg.runs) / 'classifier'} was trained at 64 px and is exported at 48 px" in err
    assert "segmenter was trained" not in err  # trained at the size exported: nothing said


def test_build_if_missing_says_when_the_repository_holds_another_profiles_export(tmp_path, capsys):
    """`wsss serve --build-if-missing` serves a repository that exists as it is; one that
    another profile exported into (make serve's model_repository) is said so, not served
    silently in this profile's place."""
    from export.check import versions
    from export.repository import build_if_missing, exported_runs

    cfg = random_export_cfg(tmp_path)
    export_repository(cfg)
    repo = Path(cfg.export.repository)
    assert Path(exported_runs(repo)).resolve() == Path(cfg.runs).resolve()
    capsys.readouterr()
    build_if_missing(cfg)
    assert "holds an export of" not in capsys.readouterr().err
    other = with_overrides(cfg, [f"runs={tmp_path / 'other_runs'}"])
    build_if_missing(other)
    err = capsys.readouterr().err
    assert f"holds an export of {cfg.runs}, not of this config's runs" in err
    assert versions(repo / "classifier") == [1]  # nothing built over it
    assert exported_runs(tmp_path / "nothing") is None


def test_make_serves_first_build_says_what_wsss_export_says(tmp_path, capsys, monkeypatch):
    """The parity and int8 checks were printed by `wsss export` alone; `make serve`'s first
    build said only the version."""
    import export.repository as repository
    import training.data.synth as synth

    cfg = random_export_cfg(tmp_path, f"export.repository={tmp_path / 'fresh'}")
    result = repository.ExportResult(
        tmp_path / "fresh",
        1,
        {"classifier": {"SCORES": 1e-6}},
        "e1",
        {
            "vit": {
                "quantize": "static",
                "mask_iou": 0.95,
                "pixel_agreement": 0.98,
                "photos": "16 photos",
            }
        },
    )
    monkeypatch.setattr(synth, "ensure_synth", lambda root, opts: False)
    monkeypatch.setattr(repository, "export_repository", lambda cfg: result)
    repository.build_if_missing(cfg)
    out = capsys.readouterr().out
    assert out == result.summary() + "\n"
    assert "classifier: parity with PyTorch" in out and "vit: quantize static; int8 masks" in out


def test_format_switch_serves_only_versions_in_the_new_format(tmp_path):
    cfg = random_export_cfg(tmp_path, "export.keep_versions=3")
    export_repository(cfg)
    cfg.export.classifier.format = "torchscript"
    result = export_repository(cfg)
    repo = Path(cfg.export.repository)
    assert (repo / "classifier" / "2" / "model.pt").exists()
    classifier = parse((repo / "classifier" / "config.pbtxt").read_text())
    assert classifier.backend == "pytorch"
    assert list(classifier.version_policy.specific.versions) == [2]  # v1 holds model.onnx
    assert list(
        parse((repo / "segmenter" / "config.pbtxt").read_text()).version_policy.specific.versions
    ) == [1, 2]
    assert result.parity["classifier"]["SCORES"] < 1e-4
    assert check_repository(repo).ok


def _versions(repo: Path, model: str) -> list[int]:
    return list(parse((repo / model / "config.pbtxt").read_text()).version_policy.specific.versions)


def test_a_refiner_that_now_reads_the_vit_serves_only_its_new_version(tmp_path, capsys):
    """Triton serves every version under the one config: where the refiner's tensors change
    (it now reads the ViT model's map), its older versions are not served under it; the
    models whose tensors stay keep theirs, and the repository stays valid."""
    cfg = random_export_cfg(tmp_path, "refine.method=fixed+grabcut")
    export_repository(cfg)
    capsys.readouterr()
    saliency = random_export_cfg(tmp_path, "refine.method=saliency")
    result = export_repository(saliency)
    # A running server would swap the refiner apart from the ensembles: export says so.
    assert (
        "the tensors or classes of refiner change (their older versions" in capsys.readouterr().err
    )
    repo = Path(cfg.export.repository)
    assert result.version == 2 and _versions(repo, "refiner") == [2]
    assert _versions(repo, "classifier") == [1, 2] and _versions(repo, "vit") == [2]
    refiner = parse((repo / "refiner" / "config.pbtxt").read_text())
    assert [i.name for i in refiner.input] == ["IMAGE", "SCORES", "CAMS", "SALIENCY"]
    assert check_repository(repo).ok
    # The random walk: the ViT model now returns a layer's patch tokens (12 x 12 patches of
    # 384 channels at 168 px), not a map; its older versions are not served under it. The
    # walk's settings reach the refiner.
    walk = random_export_cfg(
        tmp_path,
        "refine.method=walk",
        "refine.walk_side=168",
        "refine.walk_layer=5",
        "refine.walk_steps=3",
        "refine.walk_beta=4",
    )
    assert export_repository(walk).version == 3 and _versions(repo, "vit") == [3]
    vit = parse((repo / "vit" / "config.pbtxt").read_text())
    assert [(o.name, list(o.dims)) for o in vit.output] == [("TOKENS", [144, 384])]
    refiner = parse((repo / "refiner" / "config.pbtxt").read_text())
    assert [i.name for i in refiner.input] == ["IMAGE", "SCORES", "CAMS", "TOKENS"]
    settings = json.loads(refiner.parameters["refine"].string_value)
    assert [settings[f"walk_{k}"] for k in ("side", "layer", "steps", "beta")] == [168, 5, 3, 4]
    assert _versions(repo, "refiner") == [3] and check_repository(repo).ok
    # Back to the GrabCut refiner: the ViT is no step any more, and no model Triton loads.
    export_repository(cfg)
    bytes_ensemble = parse((repo / "wsss_pipeline_bytes" / "config.pbtxt").read_text())
    assert "vit" not in [s.model_name for s in bytes_ensemble.ensemble_scheduling.step]
    assert not (repo / "vit").exists() and not (repo / ".vit.retired").exists()
    assert _versions(repo, "refiner") == [4] and check_repository(repo).ok


def _snapshot(repo):
    return {p: p.read_bytes() for p in sorted(Path(repo).rglob("*")) if p.is_file()}


def test_a_failed_export_changes_nothing(tmp_path, monkeypatch):
    import export.repository as repository

    cfg = random_export_cfg(tmp_path)
    export_repository(cfg)
    before = _snapshot(cfg.export.repository)

    def broken(*args, **kwargs):
        raise ParityError("injected")

    monkeypatch.setattr(repository, "check_parity", broken)
    with pytest.raises(ParityError):
        export_repository(cfg)
    monkeypatch.undo()
    monkeypatch.setattr(
        repository,
        "check_repository",
        lambda root, **kwargs: type("R", (), {"ok": False, "__str__": lambda s: "bad"})(),
    )
    with pytest.raises(ExportError, match="nothing was changed"):
        export_repository(cfg)
    assert _snapshot(cfg.export.repository) == before
    assert not list(tmp_path.glob(".wsss-staging-*"))


def test_a_first_export_that_fails_leaves_no_repository_and_a_file_is_refused(tmp_path):
    """A new repository's export that fails (no trained models here) leaves no empty
    folder behind ('leaves the repository as it was'); a file where the repository should
    be is said as such (it was 'File exists')."""
    cfg = load_config(None, [f"runs={tmp_path / 'runs'}"])
    new = tmp_path / "nested" / "model_repository"
    with pytest.raises((WsssError, OSError), match="best.pt"):
        export_repository(with_overrides(cfg, [f"export.repository={new}"]))
    assert not new.exists()
    afile = tmp_path / "afile.txt"
    afile.write_text("not a repository")
    with pytest.raises(InputError, match="a file, not a repository folder"):
        export_repository(with_overrides(cfg, [f"export.repository={afile}"]))
    assert afile.read_text() == "not a repository"


@pytest.fixture(scope="module")
def good_repo(tmp_path_factory):
    cfg = random_export_cfg(tmp_path_factory.mktemp("good"))
    export_repository(cfg)
    return Path(cfg.export.repository)


def _edit(repo, model, old, new):
    path = repo / model / "config.pbtxt"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


BREAKAGES = {
    "syntax": (
        lambda r: (r / "refiner" / "config.pbtxt").write_text("name: refiner {{"),
        "does not parse",
    ),
    "unknown field": (
        lambda r: _edit(r, "segmenter", "max_batch_size", "max_batch_sizes"),
        'no field named "max_batch_sizes"',
    ),
    "missing file": (
        lambda r: (r / "classifier" / "1" / "model.onnx").unlink(),
        "classifier v1: model.onnx is missing",
    ),
    "renamed input": (
        lambda r: _edit(r, "segmenter", 'name: "IMAGE"', 'name: "PIXELS"'),
        "segmenter v1: inputs PIXELS in the config, IMAGE in the ONNX file",
    ),
    "output dtype unlike the ONNX file's": (
        lambda r: _edit(
            r,
            "segmenter",
            'SEG_PROBS"\n  data_type: TYPE_FP32',
            'SEG_PROBS"\n  data_type: TYPE_FP16',
        ),
        "output SEG_PROBS is tensor(float) in the ONNX file, TYPE_FP16 in the config",
    ),
    "output shape unlike the ONNX file's": (
        lambda r: _edit(
            r,
            "segmenter",
            'SEG_PROBS"\n  data_type: TYPE_FP32\n',
            'SEG_PROBS"\n  data_type: TYPE_FP32\n  dims: 5\n',
        ),
        "output SEG_PROBS has shape [-1, ",
    ),
    "wrong dtype": (
        lambda r: _edit(r, "refiner", "TYPE_FP32", "TYPE_FP16"),
        "does not fit refiner.SCORES",
    ),
    "missing step model": (
        lambda r: shutil.rmtree(r / "postprocess"),
        "model 'postprocess' does not exist",
    ),
    "no versions": (
        lambda r: shutil.rmtree(r / "segmenter" / "1"),
        "segmenter: no numbered version folder",
    ),
    "missing labels": (
        lambda r: (r / "wsss_pipeline" / "labels.txt").unlink(),
        "wsss_pipeline: output SCORES's label_filename labels.txt is missing",
    ),
    "short labels": (
        lambda r: (r / "classifier" / "labels.txt").write_text("bear\ncat\n"),
        "classifier: labels.txt has 2 labels, output SCORES 3 classes",
    ),
    # What tritonserver refused to load while the check said OK (a review, 2026-12-07):
    "missing helper": (
        lambda r: (r / "preprocess" / "1" / "images.py").unlink(),
        "preprocess v1: images.py is missing (model.py imports it)",
    ),
    "helper that does not compile": (
        lambda r: (r / "preprocess" / "1" / "images.py").write_text("def broken(:\n"),
        "preprocess v1: images.py does not compile",
    ),
    "missing warmup data": (
        lambda r: (r / "postprocess" / "warmup" / "ORIGINAL_SIZE").unlink(),
        "postprocess: warmup 'generated_sample' reads warmup/ORIGINAL_SIZE",
    ),
    "preferred batch over the model's": (
        lambda r: _edit(r, "classifier", "preferred_batch_size: 8", "preferred_batch_size: 16"),
        "classifier: preferred_batch_size [16] is over max_batch_size 8",
    ),
    "ensemble batch over a step's": (
        lambda r: _edit(r, "wsss_pipeline", "max_batch_size: 8", "max_batch_size: 16"),
        "ensemble wsss_pipeline step 0 (wsss_pipeline_steps): max_batch_size 8 is under the "
        "ensemble's 16",
    ),
    "listed version without its folder": (
        lambda r: _edit(r, "classifier", "versions: 1", "versions: 1\n    versions: 2"),
        "classifier: version 2 is listed in config.pbtxt but has no folder",
    ),
    "config not UTF-8": (
        lambda r: (p := r / "classifier" / "config.pbtxt").write_bytes(p.read_bytes() + b"\xff"),
        "classifier/config.pbtxt: does not parse as a Triton ModelConfig",
    ),
    "labels not UTF-8": (
        lambda r: (r / "classifier" / "labels.txt").write_bytes(b"cat\n\xff\xfe\nbird\n"),
        "classifier: labels.txt is not UTF-8 text",
    ),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_check_says_exactly_what_is_wrong(good_repo, tmp_path, breakage):
    repo = tmp_path / "repo"
    shutil.copytree(good_repo, repo)
    assert check_repository(repo).ok
    damage, message = BREAKAGES[breakage]
    damage(repo)
    report = check_repository(repo)
    assert not report.ok
    assert any(message in p for p in report.problems), report.problems


@pytest.mark.slow  # two `wsss export --check` processes, each importing torch
def test_cli_check_exit_codes(good_repo, tmp_path):
    def check(repo):
        return subprocess.run(
            [sys.executable, "-m", "cli", "export", "--check", "--repository", str(repo)],
            capture_output=True,
            text=True,
        )

    ok = check(good_repo)
    assert ok.returncode == 0 and ok.stdout.startswith("OK: 9 models")
    broken = tmp_path / "broken"
    shutil.copytree(good_repo, broken)
    (broken / "classifier" / "1" / "model.onnx").write_bytes(b"not onnx")
    bad = check(broken)
    assert bad.returncode == 1 and "classifier v1: model.onnx does not load" in bad.stdout
    for where, says in [("absent", "no such repository folder"), ("a.txt", "a file, not a")]:
        if where.endswith(".txt"):
            (tmp_path / where).write_text("")
        named = check(tmp_path / where)
        assert named.returncode == 1 and f"{tmp_path / where}: {says}" in named.stdout


def test_every_ensemble_step_is_a_model_of_the_repository(good_repo):
    models = {p.name for p in good_repo.iterdir() if (p / "config.pbtxt").exists()}
    assert "vit" not in models  # an Otsu refiner reads no ViT: no ViT step
    for name, steps in ENSEMBLES.items():
        cfg = parse((good_repo / name / "config.pbtxt").read_text())
        assert [s.model_name for s in cfg.ensemble_scheduling.step] == [
            s for s in steps if s in models
        ]


def test_the_export_names_its_classes_where_clients_and_triton_read_them(good_repo):
    """Class names and palette in the config of every model a client asks (the classifier,
    the ensembles), and the labels file Triton's classification extension reads beside it."""
    labelled = {"classifier", *ENSEMBLES}
    for name in ("classifier", "refiner", "segmenter", "preprocess", "postprocess", *ENSEMBLES):
        cfg = parse((good_repo / name / "config.pbtxt").read_text())
        params = {k: v.string_value for k, v in cfg.parameters.items()}
        names, palette = read_label_parameters(params)
        files = {o.name: o.label_filename for o in cfg.output if o.label_filename}
        if name not in labelled:
            assert names is None and not files and not (good_repo / name / "labels.txt").exists()
            continue
        assert names == ["bear", "cat", "dog"] and palette == VOC_PALETTE, name
        assert set(files) in ({"SCORES"}, {"SCORES__0"}) and set(files.values()) == {"labels.txt"}
        assert (good_repo / name / "labels.txt").read_text() == "bear\ncat\ndog\n"


def test_a_training_only_refiner_is_refused_and_another_served(tmp_path):
    """The dense CRF makes training pseudo-masks only: export says so and writes nothing;
    export.refine then serves its seed."""
    cfg = random_export_cfg(tmp_path, "refine.method=fixed+crf")
    with pytest.raises(ExportError, match="fixed\\+crf is not served.*export.refine.method"):
        export_repository(cfg)
    assert not any(Path(cfg.export.repository).glob("*/1"))
    served = random_export_cfg(tmp_path, "refine.method=fixed+crf", "export.refine.method=fixed")
    assert export_repository(served).version == 1
    walk = random_export_cfg(tmp_path, "refine.method=walk+crf")
    with pytest.raises(ExportError, match="crf makes training pseudo-masks only.*e.g. walk$"):
        export_repository(walk)


def test_an_older_export_importing_the_project_is_a_note_not_a_problem(good_repo, tmp_path):
    """Exports from before the served code was copied beside model.py import the project:
    Triton loads them from the project's environment, so --check says so and passes."""
    repo = tmp_path / "repo"
    shutil.copytree(good_repo, repo)
    model = repo / "preprocess" / "1" / "model.py"
    model.write_text("from wsss.served.images import decode_resized\n" + model.read_text())
    report = check_repository(repo)
    assert report.ok, report.problems
    assert any("preprocess v1: model.py imports the project" in n for n in report.notes)


def test_a_torchscript_model_has_the_inputs_and_outputs_its_config_names(tmp_path):
    """Triton's PyTorch backend maps ``NAME__i`` to the module's i-th input or output: an
    index past them loads, then fails each request."""
    import torch

    from export.check import Report, _check_torchscript
    from export.configs import parse

    class TwoOut(torch.nn.Module):
        def forward(self, x):
            return x, x * 2

    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.trace(TwoOut(), torch.zeros(1, 2)), str(path))
    text = """name: "m" backend: "pytorch" max_batch_size: 1
      input { name: "X__0" data_type: TYPE_FP32 dims: 2 }
      output { name: "A__0" data_type: TYPE_FP32 dims: 2 }
      output { name: "B__%d" data_type: TYPE_FP32 dims: 2 }"""
    report = Report()
    _check_torchscript(parse(text % 1), path, "m v1", report)
    assert report.ok, report.problems
    _check_torchscript(parse(text % 7), path, "m v1", report)
    assert report.problems == ["m v1: output B__7 names the module's output 7, which has 2"]


def test_versions_from_before_a_change_of_classes_do_not_come_back(tmp_path):
    """With keep_versions past 2, the export after a change listed the versions from
    before it again (their tensors or classes unlike the config's): Triton refused them,
    or served an old model under the new class names."""
    keep = "export.keep_versions=3"
    for names in (["cat", "dog", "bird"], ["cat", "dog", "bird"], ["bird", "dog", "cat"]):
        export_repository(random_export_cfg(tmp_path, keep, class_names=names))
    repo = tmp_path / "repo"
    assert _versions(repo, "classifier") == [3]
    export_repository(random_export_cfg(tmp_path, keep, class_names=["bird", "dog", "cat"]))
    assert _versions(repo, "classifier") == [3, 4] and check_repository(repo).ok


def test_a_reexport_naming_other_classes_serves_only_its_own_version(tmp_path, capsys):
    """Another profile's classes, as many (their order changed): Triton serves every
    version under the one new config, whose class names would misname the older version's
    SCORES, so the older version is no longer served; classes kept, versions accumulate."""
    first = random_export_cfg(tmp_path, class_names=["cat", "dog", "bird"])
    assert export_repository(first).version == 1
    same = random_export_cfg(tmp_path, class_names=["cat", "dog", "bird"])
    assert export_repository(same).version == 2
    repo = Path(first.export.repository)
    classifier = parse((repo / "classifier" / "config.pbtxt").read_text())
    assert list(classifier.version_policy.specific.versions) == [1, 2]
    capsys.readouterr()
    other = random_export_cfg(tmp_path, class_names=["bird", "dog", "cat"])
    assert export_repository(other).version == 3
    classifier = parse((repo / "classifier" / "config.pbtxt").read_text())
    assert list(classifier.version_policy.specific.versions) == [3]
    assert "classifier" in capsys.readouterr().err
    assert check_repository(repo).ok
