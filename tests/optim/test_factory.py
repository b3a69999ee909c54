"""create_update_rule: names, arguments passed through, unknown names."""

import pytest
import torch
from torch import nn

from hf_dp_microadam.optim import AdamBC, MicroAdam, create_update_rule


def params():
    return [nn.Parameter(torch.randn(4, 3))]


def test_microadam_gets_its_arguments():
    rule = create_update_rule(
        "microadam", params(), lr=0.1, weight_decay=0.01, betas=(0.8, 0.9), eps=1e-6, momentum=0.9,
        density=0.5, window=3, quant_bucket=16, block_size=1024, error_feedback="fp32",
    )
    assert isinstance(rule, MicroAdam)
    group = rule.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"], group["eps"]) == (0.1, 0.01, (0.8, 0.9), 1e-6)
    assert (group["density"], group["window"], group["quant_bucket"], group["block_size"]) == (0.5, 3, 16, 1024)
    assert group["error_feedback"] == "fp32"
    assert "momentum" not in group


def test_adamw_is_torch_adamw():
    rule = create_update_rule("adamw", params(), lr=0.1, weight_decay=0.01, betas=(0.8, 0.9), eps=1e-6, density=0.5)
    assert type(rule) is torch.optim.AdamW
    group = rule.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"], group["eps"]) == (0.1, 0.01, (0.8, 0.9), 1e-6)


def test_adambc_gets_offset_and_gamma():
    rule = create_update_rule("adambc", params(), lr=0.1, variance_offset=2.5e-5, gamma=1e-6, eps=1e-3)
    assert isinstance(rule, AdamBC)
    group = rule.param_groups[0]
    assert (group["variance_offset"], group["gamma"]) == (2.5e-5, 1e-6)
    assert "eps" not in group


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_momentum(momentum):
    rule = create_update_rule("sgd", params(), lr=0.1, momentum=momentum, weight_decay=0.01)
    assert type(rule) is torch.optim.SGD
    assert rule.param_groups[0]["momentum"] == momentum
    assert rule.param_groups[0]["weight_decay"] == 0.01


def test_name_is_case_insensitive():
    assert isinstance(create_update_rule("MicroAdam", params(), lr=0.1), MicroAdam)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown update rule 'adam'.*microadam, adamw, adambc, sgd"):
        create_update_rule("adam", params(), lr=0.1)


@pytest.mark.parametrize("name", ["microadam", "adamw", "adambc", "sgd"])
def test_every_rule_takes_a_step(name):
    param = nn.Parameter(torch.ones(5))
    rule = create_update_rule(name, [param], lr=0.1)
    param.grad = torch.ones(5)
    rule.step()
    assert bool((param.detach() < 1).any())
