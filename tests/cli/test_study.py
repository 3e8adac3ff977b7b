"""`wsss study <name>` runs the studies; `wsss evaluate`'s old flags still run them, saying
the new spelling."""

from __future__ import annotations

import pytest

from cli import main as cli


@pytest.mark.parametrize("name", ["cams", "levelset", "photos", "served"])
def test_each_study_is_a_subcommand(name):
    args = cli.build_parser().parse_args(["study", name, "--config", "configs/quick.yaml"])
    assert args.func is getattr(cli, f"study_{name}") and args.action == name
    assert args.config == "configs/quick.yaml"


@pytest.mark.parametrize(
    "flags, study",
    [
        (["--study"], "cams"),
        (["--levelset", "--reuse"], "levelset"),
        (["--photos"], "photos"),
        (["--served", "--served-label", "mine"], "served"),
    ],
)
def test_the_old_evaluate_flags_run_their_study(monkeypatch, capsys, flags, study):
    ran = []
    flag = flags[0].removeprefix("--")
    assert cli.STUDY_FLAGS[flag] is getattr(cli, f"study_{study}")

    def handler(args):
        ran.append(args)

    handler.__name__ = f"study_{study}"
    monkeypatch.setitem(cli.STUDY_FLAGS, flag, handler)
    cli.main(["evaluate", "--config", "configs/quick.yaml", *flags])
    (args,) = ran
    assert f"is now `wsss study {study}`" in capsys.readouterr().err
    if study == "served":
        assert args.label == "mine"
    if study == "levelset":
        assert args.reuse


def test_evaluate_alone_scores_the_profile(monkeypatch):
    import experiments.studies

    ran = []
    monkeypatch.setattr(experiments.studies, "evaluate_profile", lambda cfg: ran.append(cfg))
    cli.main(["evaluate", "--config", "configs/quick.yaml"])
    assert len(ran) == 1


@pytest.mark.parametrize("flag", ["--task", "--flavour"])
def test_synth_takes_the_task_and_the_old_flavour_flag(monkeypatch, capsys, tmp_path, flag):
    import training.data.synth as synth

    written = []
    monkeypatch.setattr(synth, "write_synth", lambda root, opts: written.append(opts))
    cli.main(["data", "synth", flag, "voc", "--out", str(tmp_path), "--count", "4"])
    assert [o.task for o in written] == ["voc"]
    assert ("is now --task" in capsys.readouterr().err) == (flag == "--flavour")


def test_bad_input_is_one_line_and_a_bug_keeps_its_traceback(monkeypatch):
    from wsss.errors import InputError

    def refused(args):
        raise InputError("levelset.seed 'magic': one of fixed, otsu, saliency")

    monkeypatch.setitem(cli.STUDY_FLAGS, "study", refused)
    with pytest.raises(SystemExit, match=r"^wsss evaluate: levelset.seed 'magic'"):
        cli.main(["evaluate", "--config", "configs/quick.yaml", "--study"])

    def bug(args):
        raise ValueError("operands could not be broadcast together")

    monkeypatch.setitem(cli.STUDY_FLAGS, "study", bug)
    with pytest.raises(ValueError, match="broadcast"):
        cli.main(["evaluate", "--config", "configs/quick.yaml", "--study"])


@pytest.mark.parametrize("flags", [["--folds", "0"], ["--protocol", "http"], ["--reuse"]])
def test_a_study_option_alone_is_refused_not_ignored(flags, capsys):
    """--folds and --protocol had defaults, so wsss evaluate could not tell them given."""
    with pytest.raises(SystemExit) as stopped:
        cli.main(["evaluate", "--config", "configs/quick.yaml", *flags])
    assert stopped.value.code == 2
    assert f"wsss evaluate: error: {flags[0]}: a study's" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, said",
    [
        (["study", "levelset", "--folds", "2"], "wsss study levelset: error: --folds goes with"),
        (
            ["study", "levelset", "--variants", "v.yaml", "--merge", "a"],
            "wsss study levelset: error: --variants and --merge are separate runs",
        ),
        (["bench", "--report", "--quantized"], "wsss bench: error: --quantized and --report are"),
        (["bench", "--report", "--refiners"], "wsss bench: error: --report and --refiners are"),
        (["export", "--check", "--no-wait"], "wsss export: error: --no-wait is for an export"),
    ],
)
def test_options_that_would_be_ignored_together_are_refused(argv, said, capsys):
    """Each of these ran one of its options and dropped the other without a word; now
    refused with the command's usage and argparse's status for a usage error, 2."""
    with pytest.raises(SystemExit) as stopped:
        cli.main([*argv, "--config", "configs/quick.yaml"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: {said.split(':')[0]} ") and said in err


def test_stages_are_read_with_spaces_a_misspelling_is_named_and_a_lone_levelset_refused(
    tmp_path, monkeypatch
):
    from training import stages

    ran = []
    monkeypatch.setattr(stages, "train_classifier", lambda cfg, data, resume: ran.append(1))
    monkeypatch.setattr(stages, "check_architectures", lambda cfg, names: None)
    monkeypatch.setattr(stages, "load_train_set", lambda cfg: None)
    base = ["--config", "configs/quick.yaml", "--set", f"runs={tmp_path}"]
    cli.main(["train", "--stages", "classifier, ", *base])  # a space after the comma
    assert ran == [1]
    with pytest.raises(SystemExit, match=r"unknown stage\(s\) \['classifer'\] \(did you mean"):
        cli.main(["train", "--stages", "classifer", *base])
    with pytest.raises(SystemExit, match="trains no level set"):
        cli.main(["train", "--stages", "levelset", *base])
    with pytest.raises(SystemExit, match="--stages names none"):
        cli.main(["train", "--stages", ",", *base])  # an empty shell variable: not a no-op


def test_variants_that_are_not_a_yaml_mapping_of_lists_are_one_line(tmp_path):
    from experiments.levelset_tuning import read_variants
    from wsss.errors import InputError

    with pytest.raises(InputError, match="does not exist: --variants names a YAML file"):
        read_variants(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("a: [\n")
    with pytest.raises(InputError, match="bad.yaml: not valid YAML"):
        read_variants(tmp_path / "bad.yaml")
    (tmp_path / "latin.yaml").write_bytes("a: ['levelset.gamma=0.5'] # \u00e9\n".encode("latin-1"))
    with pytest.raises(InputError, match="latin.yaml: not UTF-8 text"):
        read_variants(tmp_path / "latin.yaml")
    (tmp_path / "flat.yaml").write_text("a: levelset.gamma=0.5\n")
    with pytest.raises(InputError, match="a mapping of variant names to lists"):
        read_variants(tmp_path / "flat.yaml")
    (tmp_path / "good.yaml").write_text("a: [levelset.gamma=0.5]\n")
    assert read_variants(tmp_path / "good.yaml") == {"a": ["levelset.gamma=0.5"]}
