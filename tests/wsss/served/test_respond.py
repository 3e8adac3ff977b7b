"""``respond``: input the project refuses is the client's fault (INVALID_ARG), anything else
the server's (INTERNAL), a plain ``ValueError`` from numpy included; each request apart."""

import sys

import numpy as np

from tests.served_stub import _fake_backend_utils
from wsss.served.errors import InputError
from wsss.served.respond import respond

INTERNAL, INVALID_ARG = 1, 3  # the fake TritonError's codes, as Triton's


def test_refused_input_is_invalid_arg_and_a_bug_internal(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_backend_utils())

    def handle(request):
        if request == "bad input":
            raise InputError("item 0: cannot decode the bytes as an image")
        if request == "bug":
            np.zeros(3).reshape(2, 2)  # numpy's own ValueError: a fault of the server's
        return []

    ok, refused, bug = respond(["fine", "bad input", "bug"], handle, "preprocess")
    assert ok.error is None
    assert refused.error.code() == INVALID_ARG
    assert refused.error.message() == "preprocess: item 0: cannot decode the bytes as an image"
    assert bug.error.code() == INTERNAL and "reshape" in bug.error.message()
