"""The model of Triton 2.51's ensemble pruning, and the outputs to request around it.

Every export since ``wsss.tensors.CHAINS`` serves each ensemble as one step, its chain, and
any subset is answered; the model is for the chains themselves and the repositories exported
before them (``served_models(..., chains=False)``), whose ensembles stepped through the models.
Held to the live server's behaviour request by request in tests/serving/test_passthrough_e2e.py.
"""

from __future__ import annotations

import itertools

import pytest

from export.configs import build_configs
from serving.client import requested_outputs
from wsss.config import load_config
from wsss.pruning import answered, ensemble_steps, outputs_to_request, pruned_steps
from wsss.tensors import (
    CAMS,
    CHAINS,
    CLASSIFIER,
    ENSEMBLES,
    IMAGE,
    PIPELINE,
    PIPELINE_BYTES,
    POSTPROCESS,
    PSEUDO_MASK,
    REFINER,
    SALIENCY,
    SCORES,
    SEGMENTATION,
    SEGMENTER,
    ensemble_aliases,
    ensemble_members,
    served_models,
)

LAYOUTS = {  # segmenter input x level-set FEATURES x the ViT's map
    "trained": (IMAGE, None, None),
    "trained, level set": (IMAGE, (8, 4, 4), None),
    "trained, ViT": (IMAGE, None, SALIENCY),
    "passthrough": (PSEUDO_MASK, None, None),
    "passthrough, level set": (PSEUDO_MASK, (8, 4, 4), None),
    "passthrough, ViT": (PSEUDO_MASK, None, SALIENCY),
}


def _specs(layout: str, chains: bool = False):
    segmenter_input, features, vit = LAYOUTS[layout]
    return served_models(32, 3, 2, features, segmenter_input, vit, chains=chains)


def _names(specs, model):
    return [t.name for t in specs[model].inputs], [t.name for t in specs[model].outputs]


def _subsets(names):
    return [s for k in range(1, len(names) + 1) for s in itertools.combinations(names, k)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_steps_are_those_the_generated_ensembles_map(layout, fmt):
    specs = _specs(layout, chains=True)
    export = load_config(None, [f"export.{m}.format={fmt}" for m in ("classifier", "segmenter")])
    params = {REFINER: {"refine": "{}", "multi_label": "false"}}
    configs = build_configs(specs, export.export, params, {n: [1] for n in specs})
    for model in ENSEMBLES:
        mapped = [
            (frozenset(s.input_map.values()), frozenset(s.output_map.values()))
            for s in configs[model].ensemble_scheduling.step
        ]
        assert mapped == ensemble_steps(specs, model)


def test_the_model_fails_and_prunes_what_the_live_server_does():
    """What tests/serving/test_passthrough_e2e.py and serving.client's comments record of
    Triton 2.51."""
    specs = _specs("trained")
    steps, (inputs, outputs) = ensemble_steps(specs, PIPELINE), _names(specs, PIPELINE)
    order = ensemble_members(PIPELINE, specs)
    assert {order[i] for i in pruned_steps(steps, outputs, [SEGMENTATION])} == {
        CLASSIFIER,
        REFINER,
    }
    assert answered(steps, inputs, outputs, [SEGMENTATION])
    for alone in (PSEUDO_MASK, SCORES):  # "unexpected deadlock"
        assert not answered(steps, inputs, outputs, [alone])
    assert answered(steps, inputs, outputs, [SCORES, CAMS, PSEUDO_MASK])


@pytest.mark.parametrize("segmenter", ["trained", "passthrough"])
@pytest.mark.parametrize("model", [PIPELINE, PIPELINE_BYTES])
def test_the_client_asks_for_what_answers_every_subset(model, segmenter):
    specs = _specs(segmenter)
    steps, (inputs, outputs) = ensemble_steps(specs, model), _names(specs, model)
    for asked in _subsets(outputs):
        assert answered(steps, inputs, outputs, requested_outputs(specs, model, asked)), asked


def test_the_pass_through_needs_the_whole_chain_for_any_output():
    """Every output of wsss_pipeline then needs the classifier and refiner: SEGMENTATION
    alone, or PSEUDO_MASK without a segmenter output, is pruned to a deadlock."""
    specs = _specs("passthrough")
    steps, (inputs, outputs) = ensemble_steps(specs, PIPELINE), _names(specs, PIPELINE)
    assert not answered(steps, inputs, outputs, [SEGMENTATION])
    assert not answered(steps, inputs, outputs, [SCORES, CAMS, PSEUDO_MASK])
    assert outputs_to_request(specs, PIPELINE, [SEGMENTATION]) == [
        SCORES,
        PSEUDO_MASK,
        SEGMENTATION,
    ]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("model", [PIPELINE, PIPELINE_BYTES])
def test_every_subset_is_answered_asking_the_fewest_extra_outputs(layout, model):
    specs = _specs(layout)
    steps, (inputs, outputs) = ensemble_steps(specs, model), _names(specs, model)
    for asked in _subsets(outputs):
        requested = outputs_to_request(specs, model, asked)
        assert set(asked) <= set(requested) and answered(steps, inputs, outputs, requested)
        assert requested == [n for n in outputs if n in requested]  # in the ensemble's order
        for extra in set(requested) - set(asked):  # none of them is spare
            fewer = [n for n in requested if n != extra]
            assert not answered(steps, inputs, outputs, fewer), (asked, extra)


@pytest.mark.parametrize("segmenter", ["trained", "passthrough"])
@pytest.mark.parametrize("model", [PIPELINE, PIPELINE_BYTES])
def test_the_vit_step_changes_no_request(segmenter, model):
    """The client models the ensembles without the ViT step (it reads the classifier's and
    segmenter's metadata only): the outputs it asks for are the same with it."""
    plain, vit = _specs(segmenter), _specs(f"{segmenter}, ViT")
    for asked in _subsets(_names(plain, model)[1]):
        assert outputs_to_request(plain, model, asked) == outputs_to_request(vit, model, asked)


def test_an_unknown_output_is_refused():
    with pytest.raises(ValueError, match="CAMS_TYPO"):
        outputs_to_request(_specs("trained"), PIPELINE, ["CAMS_TYPO"])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("model", [PIPELINE, PIPELINE_BYTES])
def test_an_ensemble_of_its_chain_answers_every_subset_as_asked(layout, model):
    """As exported: the ensemble's one step is its chain, and nothing is pruned."""
    specs = _specs(layout, chains=True)
    assert ensemble_members(model, specs) == [CHAINS[model]]
    steps, outputs = ensemble_steps(specs, model), _names(specs, model)[1]
    for asked in _subsets(outputs):
        assert pruned_steps(steps, outputs, asked) == set()
        assert outputs_to_request(specs, model, asked) == [n for n in outputs if n in asked]
    # an export from before the chains: the ensemble steps through the chain's models, the
    # bytes one through a pass-through segmenter too (the chains leave it out)
    before = _specs(layout)
    assert CHAINS[model] not in before
    skipped = [SEGMENTER] if model == PIPELINE_BYTES and layout.startswith("passthrough") else []
    chain = ensemble_members(CHAINS[model], specs)
    assert [m for m in ensemble_members(model, before) if m not in skipped] == chain
    assert not set(skipped) & set(chain)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_bytes_chain_reads_a_pass_through_mask_for_both_masks(layout):
    """Its postprocess reads the refiner's PSEUDO_MASK as SEGMENTATION: no segmenter step,
    whose SEG_PROBS no bytes ensemble returns. A trained segmenter keeps its step."""
    specs = _specs(layout, chains=True)
    export = load_config(None, [])
    params = {REFINER: {"refine": "{}", "multi_label": "false"}}
    configs = build_configs(specs, export.export, params, {n: [1] for n in specs})
    steps = {s.model_name: s for s in configs[CHAINS[PIPELINE_BYTES]].ensemble_scheduling.step}
    post = steps[POSTPROCESS].input_map
    if layout.startswith("passthrough"):
        assert SEGMENTER not in steps
        assert post[PSEUDO_MASK] == post[SEGMENTATION] == PSEUDO_MASK
        assert ensemble_aliases(CHAINS[PIPELINE_BYTES], specs) == {SEGMENTATION: PSEUDO_MASK}
    else:
        assert SEGMENTER in steps and post[SEGMENTATION] == SEGMENTATION
        assert ensemble_aliases(CHAINS[PIPELINE_BYTES], specs) == {}
    # the pixels' chain returns SEG_PROBS and SEGMENTATION: its segmenter step stays
    assert SEGMENTER in {s.model_name for s in configs[CHAINS[PIPELINE]].ensemble_scheduling.step}
    assert ensemble_aliases(CHAINS[PIPELINE], specs) == {}
