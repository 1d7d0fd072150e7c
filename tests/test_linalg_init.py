"""svdkit.core.linalg's seeded initializers: kaiming_uniform is nn.Linear's kaiming_uniform_(a=√5) bound,
drawn as torch.rand·2b − b from a (seed, name) generator."""

from __future__ import annotations

import math

import torch
from torch import nn

from svdkit.core.linalg import kaiming_uniform, layer_generator, layer_seed


def test_kaiming_uniform_is_the_formula_on_torch_rand():
    fan_in = 12
    A = kaiming_uniform((4, fan_in), fan_in, layer_generator(3, "q_proj"), torch.float64)
    bound = 1.0 / math.sqrt(fan_in)
    g = torch.Generator().manual_seed(layer_seed(3, "q_proj"))
    expected = torch.rand(4, fan_in, generator=g, dtype=torch.float64) * (2 * bound) - bound
    torch.testing.assert_close(A, expected, rtol=0, atol=0)
    assert float(A.abs().max()) <= bound
    gain = nn.init.calculate_gain("leaky_relu", math.sqrt(5))  # nn.Linear's default init
    assert math.isclose(bound, gain * math.sqrt(3.0 / fan_in))  # gain·√(3/fan_in) = 1/√fan_in


def test_consecutive_draws_share_one_generator_and_the_default_dtype():
    g1, g2 = layer_generator(0, "a"), layer_generator(0, "a")
    first, second = kaiming_uniform((3, 5), 5, g1), kaiming_uniform((3, 3), 3, g1)
    assert first.dtype == torch.get_default_dtype()
    torch.testing.assert_close(first, kaiming_uniform((3, 5), 5, g2), rtol=0, atol=0)
    torch.testing.assert_close(second, kaiming_uniform((3, 3), 3, g2), rtol=0, atol=0)
    assert not torch.equal(kaiming_uniform((3, 5), 5, layer_generator(0, "b")), first)
