"""fastmm.nn norm modules: one-line conversion of mPLUG-Owl2's MultiwayNetwork with identical outputs."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import fastmm

transformers_llama = pytest.importorskip("transformers.models.llama.modeling_llama")


class MultiwayNetwork(nn.Module):
    """The structure of mPLUG-Owl2's MultiwayNetwork (modeling_llama2.py): one module per modality, rows
    found with nonzero, gathered, run, scattered back."""

    def __init__(self, module_provider, num_multiway=2):
        super().__init__()
        self.multiway = nn.ModuleList([module_provider() for _ in range(num_multiway)])

    def forward(self, hidden_states, multiway_indices):
        output = torch.empty(*hidden_states.shape[:-1], self.out_width(hidden_states), dtype=hidden_states.dtype)
        for idx, subway in enumerate(self.multiway):
            local = multiway_indices.eq(idx).nonzero(as_tuple=True)
            hidden = hidden_states[local].unsqueeze(1).contiguous()
            if hidden.numel():
                output[local] = subway(hidden).squeeze(1)
        return output

    def out_width(self, hidden_states):
        first = self.multiway[0]
        return first.out_features if isinstance(first, nn.Linear) else hidden_states.shape[-1]


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return module


PROVIDERS = {
    "LlamaRMSNorm": (functools.partial(transformers_llama.LlamaRMSNorm, 48, eps=1e-5), fastmm.nn.ModalityRMSNorm),
    "torch RMSNorm": (functools.partial(nn.RMSNorm, 48, eps=1e-6), fastmm.nn.ModalityRMSNorm),
    "LayerNorm": (functools.partial(nn.LayerNorm, 48), fastmm.nn.ModalityLayerNorm),
    "LayerNorm no bias": (functools.partial(nn.LayerNorm, 48, bias=False), fastmm.nn.ModalityLayerNorm),
    "Linear": (functools.partial(nn.Linear, 48, 20), fastmm.nn.RoutedLinear),
    "Linear no bias": (functools.partial(nn.Linear, 48, 20, bias=False), fastmm.nn.RoutedLinear),
}


@pytest.mark.parametrize("name", list(PROVIDERS))
def test_from_modules_matches_multiway(name):
    provider, cls = PROVIDERS[name]
    multiway = _randomize(MultiwayNetwork(provider, num_multiway=2), seed=len(name))
    converted = cls.from_modules(multiway)  # the one line a user writes
    hidden = torch.randn(3, 70, 48)
    modality = torch.zeros(3, 70, dtype=torch.long)
    modality[:, 5:70] = 1  # a 65-token image span after a short text prefix
    modality[1] = 0  # one text-only row
    expected = multiway(hidden, modality)
    torch.testing.assert_close(converted(hidden, modality), expected, rtol=1e-5, atol=1e-5)


def test_modules_train():
    norm = fastmm.nn.ModalityRMSNorm(2, 16)
    linear = fastmm.nn.RoutedLinear(2, 16, 8)
    x = torch.randn(4, 16, requires_grad=True)
    modality = torch.tensor([0, 1, 1, 0])
    linear(norm(x, modality), modality).square().sum().backward()
    assert x.grad is not None and norm.weight.grad.shape == (2, 16) and linear.weight.grad.shape == (2, 8, 16)
    assert linear.bias.grad.shape == (2, 8)


def test_from_modules_rejects_mismatched():
    with pytest.raises(ValueError, match="one shape"):
        fastmm.nn.RoutedLinear.from_modules([nn.Linear(4, 3), nn.Linear(4, 5)])
    with pytest.raises(ValueError, match="at least one"):
        fastmm.nn.ModalityRMSNorm.from_modules([])
