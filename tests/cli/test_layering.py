"""The floors of the layout hold: data flows training -> export -> model_repository ->
serving over the ground floor (wsss/), the experiments above training and export,
benchmarks above them, the CLI on top; no import
points back up. Every import counts, those inside functions too."""

import ast
import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

# Each package and the project packages it may import.
MAY_IMPORT = {
    "wsss": set(),
    "training": {"wsss"},
    "export": {"wsss", "training"},
    "serving": {"wsss"},
    "experiments": {"wsss", "training", "export"},  # no stage imports an experiment
    "benchmarks": {"wsss", "training", "export", "serving", "experiments"},
    "cli": {"wsss", "training", "export", "serving", "experiments", "benchmarks"},
}
# `python -m wsss` / `torchrun -m wsss`: an entry point that runs the CLI, never imported.
ENTRY_POINTS = {("wsss/__main__.py", "cli")}


def _imports(path: Path) -> set[str]:
    """The project packages a module imports (absolute imports; relative ones stay home)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {n.split(".")[0] for n in names} & MAY_IMPORT.keys()
    return found


def test_no_import_points_up_a_floor():
    wrong = []
    for package, allowed in MAY_IMPORT.items():
        files = sorted((ROOT / package).rglob("*.py"))
        assert files, package
        for path in files:
            name = path.relative_to(ROOT).as_posix()
            for target in _imports(path) - allowed - {package}:
                if (name, target) not in ENTRY_POINTS:
                    wrong.append(f"{name} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_an_import_inside_a_function(tmp_path):
    module = tmp_path / "m.py"
    module.write_text(
        "import os\n\ndef f():\n    from cli.main import main\n    import training.cams\n"
    )
    assert _imports(module) == {"cli", "training"}


def test_every_command_is_made_from_the_table():
    """Every subcommand of the table has a handler; the benchmarks that once had their own
    argparse mains are `wsss` subcommands that parse to theirs, run `wsss` themselves, and
    fail as every subcommand does, naming it."""
    import sys

    from benchmarks.pseudo_scaling import pseudo_command
    from cli.main import COMMANDS, build_parser, cmd_infer_bench, cmd_scaling, main

    parser = build_parser()
    args = parser.parse_args(["scaling", "--config", "c.yaml", "--processes", "3"])
    assert args.func is cmd_scaling and args.rounds == 3 and args.threads == 1
    command = pseudo_command(args, Path("runs3"), 3)
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert command[command.index("--nproc-per-node=3") + 1 :][:5] == [
        "-m", "cli", "train", "--stages", "pseudo"
    ]  # fmt: skip
    args = parser.parse_args(["infer-bench", "--concurrency", "2"])
    assert args.func is cmd_infer_bench and args.concurrency == 2
    assert args.config == "configs/quick.yaml"  # the table's default for this command
    assert parser.parse_args(["scaling"]).config == "configs/pets_real.yaml"
    assert parser.parse_args(["train"]).config is None  # one command's default is its own
    for command in COMMANDS:
        for leaf in command.commands or (command,):
            assert leaf.run is not None, leaf.name
    for module in ("benchmarks/infer_folder.py", "benchmarks/pseudo_scaling.py"):
        assert "argparse" not in (ROOT / module).read_text(), module
    for name in ("scaling", "infer-bench"):
        with pytest.raises(SystemExit, match=f"^wsss {name}: .*nowhere.yaml"):
            main([name, "--config", "nowhere.yaml"])


def test_tests_mirror_the_packages():
    """Every test file sits under tests/<package>/ (or tests/deploy/ for the container files),
    in a folder the package has, so a module's tests are found where the module is."""
    stray = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        folder = path.parent.relative_to(ROOT / "tests")
        if folder.parts[:1] == ("deploy",):
            continue
        if not folder.parts or not (ROOT / folder).is_dir():
            stray.append(str(path.relative_to(ROOT)))
    assert not stray, stray


def test_the_suite_order_names_modules_that_exist():
    from tests.conftest import LONGEST_FIRST

    assert [m for m in LONGEST_FIRST if not (ROOT / "tests" / m).is_file()] == []


# What a refiner is (its spelling, its parts, how each is served) is decided by the table
# in wsss/served/registry.py and nowhere else: no other module takes a spelling apart or
# compares a name with a refiner's. Every other module asks the parsed RefinerSpec (its
# ``seed``, ``follow`` and entries' fields may be compared: they are the table's).
SPELLING_READERS = {"wsss/served/registry.py"}
PARTS = "fixed|otsu|saliency|vit|levelset|grabcut|chanvese|crf"
READS_A_SPELLING = re.compile(
    rf"""partition\("\+"\)|split\("\+"\)|"\+(?:{PARTS})|(?:startswith|endswith|removeprefix|"""
    rf"""removesuffix)\("[/+]?(?:{PARTS})|"""
    rf"""(?<!\.seed )(?<!\.follow )(?<!\.vit )[=!]= "(?:{PARTS})"|"""
    rf"""\bif\b.* in \("(?:{PARTS})", "(?:{PARTS})\""""
)


def test_only_the_refiner_table_reads_a_refiners_spelling():
    readers = set()
    for package in MAY_IMPORT:
        for path in sorted((ROOT / package).rglob("*.py")):
            if READS_A_SPELLING.search(path.read_text()):
                readers.add(path.relative_to(ROOT).as_posix())
    assert readers == SPELLING_READERS


@pytest.mark.parametrize(
    "line",
    [
        'seed, _, follow = method.partition("+")',
        'if spec.endswith("+grabcut"):',
        'if spec.endswith("/levelset"):',
        'if refiner == "vit":',
        'if spec in ("levelset", "vit"):',
        'name.startswith("saliency")',
        'if entry.name == "crf":',
    ],
)
def test_the_spelling_check_sees_a_reader(line):
    assert READS_A_SPELLING.search(line)
