"""The served contract stands alone: tensor names spelled once, serving free of training."""

from __future__ import annotations

import re
import subprocess
import sys

import wsss.tensors as tensors
from tests.conftest import ROOT

PACKAGES = ("training", "export", "serving", "wsss", "benchmarks", "cli")


def test_no_served_tensor_name_is_spelled_outside_wsss_tensors():
    names = [v for k, v in vars(tensors).items() if isinstance(v, str) and k == v]  # tensors
    assert {"IMAGE", "SCORES", "CAMS", "SEGMENTATION", "IMAGE_BYTES"} <= set(names)
    names += list(tensors.ENSEMBLES)  # and the ensembles clients call
    alternatives = "|".join(map(re.escape, names))
    quoted = re.compile(rf"""["']({alternatives})["']""")
    found = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            # The health check is copied alone into the serve-gpu image: it spells the
            # names it asks for, and tests/deploy checks them against wsss/tensors.py.
            if path in (ROOT / "wsss" / "tensors.py", ROOT / "serving" / "health.py"):
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if quoted.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert found == [], "use the constants of wsss/tensors.py:\n" + "\n".join(found)


def test_serving_imports_neither_training_nor_torch():
    code = (
        "import sys, serving.client, serving.infer, serving.server, serving.perf\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('training', 'export', 'torch', 'torchvision', 'timm'))\n"
        "print(' '.join(bad))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert done.stdout.strip() == ""
