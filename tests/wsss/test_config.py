import pytest

from wsss.config import ConfigError, load_config, load_profile, save_config, with_overrides


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 3\ndata:\n  task: voc\n")
    cfg = load_config(path, ["train.lr=0.01", "export.segmenter.preferred_batch_sizes=[1,2]"])
    assert cfg.train.epochs == 3 and cfg.data.task == "voc"
    assert cfg.train.lr == 0.01 and cfg.export.segmenter.preferred_batch_sizes == [1, 2]
    assert cfg.serve.host == "127.0.0.1"


def test_a_float_yaml_reads_as_a_string_is_a_float():
    """YAML 1.1 reads 1e-3 (no dot) as a string: train.lr=1e-3 said 'expected float'."""
    assert load_config(None, ["train.lr=1e-3"]).train.lr == 0.001
    for bad in ("abc", ".nan", "inf"):
        with pytest.raises(ConfigError, match="train.weight_decay"):
            load_config(None, [f"train.weight_decay={bad}"])


def test_int_is_accepted_for_float():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0


def test_a_path_starting_with_a_tilde_is_under_the_home_folder(tmp_path, monkeypatch):
    # "--set data.root=~/photos" reaches wsss unexpanded: bash expands a tilde only at a
    # word's start or in an assignment, and it is the first thing a user types.
    monkeypatch.setenv("HOME", str(tmp_path))
    path = tmp_path / "wsss.yaml"
    path.write_text("runs: ~/runs\nevaluate:\n  runs: [~/a, b]\n")
    cfg = load_config(path, ["data.root=~/photos", "export.repository=~"])
    assert cfg.data.root == str(tmp_path / "photos")
    assert cfg.runs == str(tmp_path / "runs")
    assert cfg.evaluate.runs == [str(tmp_path / "a"), "b"]
    assert cfg.export.repository == str(tmp_path)
    assert load_config(None, ["data.root=a~b"]).data.root == "a~b"


def test_a_text_key_keeps_the_text_yaml_would_read_as_a_number_or_switch():
    """--set export.repository=0123 said 'expected str, got 83' (YAML 1.1's octal), =no
    'got False': a key that holds text takes what was typed; numbers stay numbers."""
    for text in ("0123", "no", "2024", "off", "1e3", "null"):
        assert load_config(None, [f"export.repository={text}"]).export.repository == text
    assert load_config(None, ["runs= 2024 "]).runs == "2024"
    assert load_config(None, ["export.repository='0123'"]).export.repository == "0123"
    vit = load_config(None, ["export.vit.onnxruntime.graph_level=1"]).export.vit
    assert vit.onnxruntime.graph_level == 1
    assert load_config(None, ["train.epochs=12"]).train.epochs == 12
    with pytest.raises(ConfigError, match="train.epochs: expected int, got False"):
        load_config(None, ["train.epochs=no"])  # a switch where a number goes: refused


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epoch=3", "unknown config key"),
        ("train.epochs=three", "expected int"),
        ("data.task=coco", "not one of"),
        ("train.epochs", "key=value"),
        ("train.epochs=true", "expected int"),
        ("levelset.seed=levelset", "levelset.seed 'levelset': one of fixed, otsu, saliency"),
        ("levelset.seed=otsu+vit", "optionally \\+grabcut or \\+chanvese or \\+crf"),
        ("train.epochs=[1", r"not a YAML value \(expected ',' or '\]', but got .* at line 1"),
        ("train.batch_size=-1", "train.batch_size -1: at least 1"),
        ("train.lr=0", "train.lr 0.0: above 0 and finite"),
        ("train.weight_decay=-1", "train.weight_decay -1.0: at least 0"),
        # the segmenter's and level set's own schedules fail at load, not hours in
        ("segmenter.lr=-0.001", "segmenter.lr -0.001: above 0 and finite"),
        ("segmenter.epochs=0", "segmenter.epochs 0: at least 1"),
        ("levelset.lr=-1", "levelset.lr -1.0: above 0 and finite"),
        ("levelset.epochs=-2", "levelset.epochs -2: at least 1"),
        ("segmenter.output_stride=8", "segmenter.output_stride 8: 16 or 32"),
        # values that failed deep inside a stage or an export: refused at load, by their path
        ("data.image_size=0", "data.image_size 0: at least 32"),
        ("data.val_fraction=1", "data.val_fraction 1.0: at least 0, below 1"),
        ("data.num_workers=-3", "data.num_workers -3: at least 0"),
        ("export.classifier.max_batch_size=0", "export.classifier.max_batch_size 0: at least 1"),
        ("export.vit.instances=0", "export.vit.instances 0: at least 1"),
        ("export.vit.calibration_photos=0", "export.vit.calibration_photos 0: at least 1"),
        ("export.preprocess.preferred_batch_sizes=[0,4]", r"preferred_batch_sizes \[0, 4\]"),
        ("export.atol=-1", "export.atol -1.0: above 0 and finite"),
        ("serve.http_port=99999", "serve.http_port 99999: a TCP port, 1 to 65535"),
        ("serve.metrics_port=8000", "serve.http_port and metrics_port are both 8000: each"),
        # a mistyped key: the close one named, else the section's keys
        ("train.epoch=3", r"\(did you mean train.epochs\?\)"),
        ("serve.nope=1", r"\(serve takes exit_timeout_seconds, grpc_port, host, http_port,"),
        ("serve.poll_seconds=0", "serve.poll_seconds 0: at least 1"),
        ("serve.restarts=-1", "serve.restarts -1: at least 0"),
        ("classifier.output_stride=4", "classifier.output_stride 4: 8, 16 or 32"),
        ("classifier.output_stride=8", "classifier.output_stride 8: efficientnet_lite0/1/2 only"),
        ("export.repository=", "export.repository: expected str, got None"),  # not the cwd
        ("refine.score_threshold=1.5", r"refine.score_threshold 1.5, .*: scores in \[0, 1\]"),
        ("refine.score_threshold=[0.2,-1]", r"score_threshold \[0.2, -1.0\]"),
        ("refine.min_score=2", r"min_score 2.0: scores in \[0, 1\]"),
        ("classifier.threshold_folds=-1", "classifier.threshold_folds -1: at least 0"),
        ("classifier.tiles=1.5", "classifier.tiles 1.5: 0 \\(off\\) or a fraction"),
        ("refine.vit_layers=[]", r"refine.vit_layers \[\]: one or more layers"),
        ("refine.vit_layers=[-1]", r"refine.vit_layers \[-1\]: one or more layers, 0-based"),
        # a refiner's keys named by the section they are in: export.refine is one too
        ("export.refine.vit_layers=[]", r"^export.refine.vit_layers \[\]: one or more"),
        ("export.refine.walk_steps=0", r"^export.refine.walk_layer 8, walk_steps 0"),
        ("export.refine.method=magic", r"^export.refine.method 'magic': one of"),
        ("segmenter.dice=-0.5", "segmenter.dice -0.5: a weight, 0 \\(off\\) or above"),
        ("export.lock_wait_seconds=-2", "export.lock_wait_seconds -2.0: 0 or more seconds"),
        # failed after a stage had trained (an IndexError, a NaN loss, out of memory), or
        # after a study was written
        ("data.image_size=100000", "data.image_size 100000: at most 4096"),
        ("refine.threshold=1.5", r"refine.threshold 1.5: a CAM level in \(0, 1\)"),
        ("segmenter.depth=-1", "segmenter.depth -1: at least 1"),
        ("segmenter.base_channels=0", "segmenter.base_channels 0: at least 1"),
        ("levelset.hidden=0", "levelset.hidden 0: at least 1"),
        ("levelset.eps=0", "levelset.eps 0.0: a width above 0"),
        ("evaluate.figure_images=-1", "evaluate.figure_images -1: at least 0"),
    ],
)
def test_bad_overrides_are_explained(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_a_config_file_that_is_not_yaml_or_is_a_folder_is_one_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("train: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML \(.* at line 2, column 1\)"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="is a folder: name a config file in it"):
        load_config(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "absent.yaml")
    (tmp_path / "latin.yaml").write_bytes(
        "# r\u00e9glages\ntrain:\n  epochs: 1\n".encode("latin-1")
    )
    with pytest.raises(ConfigError, match="latin.yaml: not UTF-8 text"):
        load_config(tmp_path / "latin.yaml")
    (tmp_path / "twice.yaml").write_text("train:\n  epochs: 1\ntrain:\n  epochs: 5\n")
    with pytest.raises(ConfigError, match="the key 'train' is given twice at line 3"):
        load_config(tmp_path / "twice.yaml")
    (tmp_path / "merged.yaml").write_text(  # YAML's merge key is no key given twice
        "export:\n  classifier: &net {instances: 3}\n  segmenter: {<<: *net, format: torchscript}\n"
    )
    merged = load_config(tmp_path / "merged.yaml").export.segmenter
    assert (merged.instances, merged.format) == (3, "torchscript")
    (tmp_path / "empty.yaml").write_text("data:\ntrain:\n  epochs: 2\n")  # a section left empty
    empty = load_config(tmp_path / "empty.yaml")
    assert (empty.data.image_size, empty.train.epochs) == (128, 2)
    (tmp_path / "listkey.yaml").write_text("? [1, 2]\n: 3\n")
    with pytest.raises(ConfigError, match="unhashable key"):
        load_config(tmp_path / "listkey.yaml")
    # wsss reproduce's profiles are read the same way
    for path, message in ((tmp_path, "is a folder"), (tmp_path / "latin.yaml", "not UTF-8")):
        with pytest.raises(ConfigError, match=message):
            load_profile(path)


def test_an_unset_optional_section_takes_overrides():
    """export.refine is None until set: --set export.refine.method=... makes the section,
    on a config read from YAML and on one already built (with_overrides)."""
    cfg = load_config(None, ["export.refine.method=fixed", "export.refine.threshold=0.2"])
    assert cfg.export.refine.method == "fixed" and cfg.export.refine.threshold == 0.2
    assert load_config(None, []).export.refine is None
    again = with_overrides(load_config(None, []), ["export.refine.method=otsu"])
    assert again.export.refine.method == "otsu"
    # Unset, export.refine serves `refine`: a key set on it starts from refine as it stands,
    # so the served refiner changes in that key only (not to the defaults' method).
    served = load_config(None, ["refine.method=saliency", "export.refine.saliency_size=168"])
    assert served.export.refine.method == "saliency" and served.refine.saliency_size == 224
    assert served.export.refine.saliency_size == 168
    built = with_overrides(
        load_config(None, ["refine.method=fixed"]), ["export.refine.threshold=0.2"]
    )
    assert (built.export.refine.method, built.export.refine.threshold) == ("fixed", 0.2)
    with pytest.raises(ConfigError, match="runs is 'runs', not a section"):
        with_overrides(load_config(None, []), ["runs.deeper=1"])


def test_levelset_seed_takes_a_refiner_spelling():
    assert load_config(None, ["levelset.seed=fixed+crf"]).levelset.seed == "fixed+crf"
    assert load_config(None, []).levelset.seed == "otsu"


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.epochs=7", "classifier.weights=/x.pt"])
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == cfg


def test_configs_saved_by_older_runs_still_load(tmp_path):
    # levelset.feature_energy was a bool before it became a weight.
    path = tmp_path / "old.yaml"
    path.write_text("levelset:\n  feature_energy: true\n")
    assert load_config(path).levelset.feature_energy == 1.0
    assert load_config(None, ["levelset.feature_energy=false"]).levelset.feature_energy == 0.0
    with pytest.raises(ConfigError, match="expected a finite number"):
        load_config(None, ["levelset.lambda_energy=true"])
    # every network's export section carries calibration settings (saved configs of the
    # time when only the ViT's were read hold them at their defaults), each its own
    path.write_text(
        "export:\n  classifier:\n    calibration: ''\n    calibration_photos: 60\n"
        "  segmenter:\n    calibration: photos\n"
        "  vit:\n    calibration: photos\n    calibration_photos: 8\n"
    )
    export = load_config(path).export
    assert (export.vit.calibration, export.vit.calibration_photos) == ("photos", 8)
    assert (export.classifier.calibration, export.segmenter.calibration) == ("", "photos")


def test_wsss_help_loads_no_torch():
    """The lists `wsss --help` shows (stages, CAM methods) are defined once, on the ground
    floor, so the help needs no torch; training reads the same lists."""
    import subprocess
    import sys

    from training import cams, stages
    from wsss import config

    code = (
        "import sys\nfrom cli.main import main\n"
        "for args in (['--help'], ['train', '--help'], ['evaluate', '--help']):\n"
        "    try:\n        main(args)\n    except SystemExit:\n        pass\n"
        "print('torch' in sys.modules, file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stderr.strip().splitlines()[-1] == "False", done.stderr[-2000:]
    assert "--stages" in done.stdout and "supervised" in done.stdout  # the train help ran
    assert stages.STAGES is config.STAGES and tuple(cams.CAM_METHODS) == config.CAM_METHODS


def test_class_groups_from_yaml_and_overrides(tmp_path):
    from training.models.imagenet import expand_ids, parse_class_groups

    cfg = load_config(
        None,
        ["classifier.head=imagenet", "classifier.class_groups={cat: ['281-285'], fox: [277, 278]}"],
    )
    names, groups = parse_class_groups(cfg.classifier.class_groups)
    assert names == ["cat", "fox"] and groups == [[281, 282, 283, 284, 285], [277, 278]]
    with pytest.raises(ConfigError, match="class_groups"):
        load_config(None, ["classifier.class_groups=[1, 2]"])
    for bad in (["5-1"], ["cat"], [1000], []):
        with pytest.raises(ValueError, match="class group"):
            expand_ids(bad)


def test_old_study_settings_become_refiners(tmp_path):
    saved = tmp_path / "config.yaml"
    saved.write_text("evaluate:\n  thresholds: [otsu]\n  grabcut: [false, true]\n")
    assert load_config(saved).evaluate.refiners == ["otsu", "otsu+grabcut"]


def test_one_threshold_fold_is_one_pass_where_no_class_is_learned():
    """classifier.threshold_folds 1: an ImageNet head's thresholds from one pass over the
    training photos (nothing it learns to hold out), so it loads; its stage refuses it for
    a learned class."""
    cfg = load_config(None, ["classifier.threshold_folds=1"])
    assert cfg.classifier.threshold_folds == 1


def test_a_config_a_run_saved_reads_past_keys_this_version_does_not_know(tmp_path):
    """A run's config.yaml written by another version of wsss (export.prune, since renamed)
    stopped `wsss evaluate` with "unknown config key(s)"; a user's own config still does."""
    import yaml

    from wsss.config import ConfigError, load_config, load_saved_config, save_config

    saved = tmp_path / "config.yaml"
    save_config(load_config(None, ["train.epochs=3"]), saved)
    raw = yaml.safe_load(saved.read_text())
    raw["export"]["prune"] = True
    raw["gone_section"] = {"x": 1}
    saved.write_text(yaml.safe_dump(raw))
    cfg = load_saved_config(saved)
    assert cfg.train.epochs == 3 and cfg == load_config(None, ["train.epochs=3"])
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(saved)


def test_a_files_unknown_key_names_the_file_and_a_key_out_of_its_section_its_place(tmp_path):
    """`root:` not indented under `data:` got the top level's list of sections, and neither
    error said which file held the key."""
    from wsss.config import ConfigError, load_config

    path = tmp_path / "mine.yaml"
    path.write_text("data:\n  task: pets\nroot: photos\n")
    with pytest.raises(
        ConfigError,
        match=r"mine.yaml: unknown config key\(s\) \['root'\] "
        r"\(did you mean data.root\?\)",
    ):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^unknown config key\(s\) \['trian'\]"):
        load_config(None, ["trian.lr=1"])  # a --set key: said as given, no file
    with pytest.raises(ConfigError, match=r"^unknown config key\(s\) \['trian'\]"):
        load_config("configs/quick.yaml", ["trian.lr=1"])  # not the file's: not named
