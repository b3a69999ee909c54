"""Helpers shared by the privatizer tests (imported by test modules in this folder)."""

import torch


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of every gradient it is handed, one list per step."""

    def __init__(self, params, lr=0.1, **kwargs):
        super().__init__(params, lr=lr, **kwargs)
        self.received = []

    @torch.no_grad()
    def step(self, closure=None):
        grads = []
        for group in self.param_groups:
            for param in group["params"]:
                grads.append(None if param.grad is None else param.grad.detach().clone())
        self.received.append(grads)
        return super().step(closure)


def set_grad_samples(params, per_example_grads):
    """Put per-example gradients on parameters, as a per-example gradient engine would."""
    for param, grad_sample in zip(params, per_example_grads):
        param.grad_sample = grad_sample.clone()
