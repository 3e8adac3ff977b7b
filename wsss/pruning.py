"""Which outputs to ask an ensemble for, so that Triton 2.51's pruning keeps what they need.

For a request that names some of an ensemble's outputs, Triton drops the steps it thinks
no named output needs, walking back from each unnamed ensemble output: a step none of whose
outputs is wanted is dropped, and a tensor whose readers are all dropped is unwanted in turn
(``EnsembleContext``'s constructor in triton-inference-server/core's ensemble_scheduler.cc).
Two flaws make the walk drop steps a request needs, and the request then fails with
"unexpected deadlock": an unnamed ensemble output counts as unwanted even where a later step
reads it (SCORES and CAMS feed the refiner), and a tensor that loses its last reader counts
as unwanted even where the request names it (PSEUDO_MASK, once a pass-through segmenter that
reads it is dropped). ``pruned_steps`` models that walk; ``outputs_to_request`` finds the
fewest extra outputs to name so that every asked output is still made.

Every export since ``wsss.tensors.CHAINS`` serves each ensemble as one step, its chain,
which Triton asks for all it maps: nothing is pruned and any subset is answered as asked.
The walk matters for the repositories exported before them, which clients still talk to.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

from wsss.errors import InputError
from wsss.tensors import ModelSpec, ensemble_aliases, ensemble_members

# A step as its ensemble maps it: the tensors it reads, and those of its outputs that are
# mapped (an output that nothing reads and the ensemble does not return is left unmapped).
Step = tuple[frozenset[str], frozenset[str]]


def ensemble_steps(specs: dict[str, ModelSpec], model: str) -> list[Step]:
    """``model``'s steps as ``export.configs.ensemble_config`` maps them (a test holds the two
    to each other)."""
    steps = [specs[name] for name in ensemble_members(model, specs)]
    aliases = ensemble_aliases(model, specs)
    reads = [frozenset(aliases.get(t.name, t.name) for t in s.inputs) for s in steps]
    wanted = {t.name for t in specs[model].outputs}.union(*reads)
    return [
        (
            read,
            frozenset(t.name for t in s.outputs if t.name in wanted),
        )
        for s, read in zip(steps, reads, strict=True)
    ]


def pruned_steps(
    steps: Sequence[Step], outputs: Iterable[str], requested: Iterable[str]
) -> set[int]:
    """The indices of the steps Triton 2.51 drops for a request naming ``requested`` of the
    ensemble's ``outputs``, walked as Triton walks them."""
    readers: dict[str, set[int]] = {}
    producer: dict[str, int] = {}
    for i, (reads, writes) in enumerate(steps):
        for t in reads:
            readers.setdefault(t, set()).add(i)
        for t in writes:
            producer.setdefault(t, i)
    unwanted_left: dict[int, int] = {}  # step -> its outputs not yet counted as unwanted
    pruned: set[int] = set()
    unwanted = set(outputs) - set(requested)
    while unwanted:
        more = set()
        for tensor in unwanted:
            # Triton looks the producer up with map::operator[]: an ensemble input reads as
            # step 0. A tensor counted twice (unnamed, then readerless) counts twice.
            step = producer.get(tensor, 0)
            unwanted_left[step] = unwanted_left.get(step, len(steps[step][1])) - 1
            if unwanted_left[step] == 0:
                pruned.add(step)
                for t in steps[step][0]:
                    readers[t].discard(step)
                    if not readers[t]:
                        more.add(t)
        unwanted = more
    return pruned


def answered(
    steps: Sequence[Step], inputs: Iterable[str], outputs: Iterable[str], requested: Iterable[str]
) -> bool:
    """Whether the steps left after pruning still make every ``requested`` output from the
    ensemble's ``inputs`` (else Triton answers "unexpected deadlock")."""
    pruned = pruned_steps(steps, outputs, requested)
    made, waiting = set(inputs), [s for i, s in enumerate(steps) if i not in pruned]
    while runnable := [s for s in waiting if s[0] <= made]:
        for step in runnable:
            made |= step[1]
            waiting.remove(step)
    return set(requested) <= made


def outputs_to_request(specs: dict[str, ModelSpec], model: str, asked: Iterable[str]) -> list[str]:
    """The fewest of ``model``'s outputs, ``asked`` among them, that Triton 2.51 answers
    whole, in the ensemble's output order (of an export from before the chains, asking
    SEGMENTATION of a trained segmenter: itself alone, so Triton ran the segmenter alone;
    of an ensemble of its chain: ``asked`` itself)."""
    spec, asked = specs[model], set(asked)
    names = [t.name for t in spec.outputs]
    if not asked <= set(names):
        raise InputError(
            f"{model} has outputs {', '.join(names)}, not {sorted(asked - set(names))}"
        )
    steps, inputs = ensemble_steps(specs, model), [t.name for t in spec.inputs]
    extra = [n for n in names if n not in asked]
    for k in range(len(extra) + 1):
        for more in itertools.combinations(extra, k):
            requested = [n for n in names if n in asked or n in more]
            if answered(steps, inputs, names, requested):
                return requested
    raise InputError(f"{model}: no request of its outputs is answered whole")
