"""Block replay (ranapass.block_replay): a replayed forward equals the full one, and only blocks whose outputs
cannot change are replayed."""

import pytest
import torch
from torch import nn

from ranapass.block_replay import BlockReplay
from ranapass.loss_calibration import loss_scales
from ranapass.profiling import ProfileOptions, profile
from tiny_models import tiny_llama, token_windows


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


class Stack(nn.Module):
    """Blocks run in order; ``reuse`` runs block 0 again at the end, ``early`` calls block 2's linear first,
    ``in_place`` changes each block's output in place after it returns."""

    def __init__(self, reuse=False, early=False, in_place=False):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(Block(8) for _ in range(3))
        self.reuse, self.early, self.in_place = reuse, early, in_place

    def forward(self, x):
        if self.early:
            x = x + self.layers[2].fc(x)
        for layer in self.layers:
            x = layer(x)
            if self.in_place:
                x.mul_(0.5)
        if self.reuse:
            x = self.layers[0](x)
        return x


BLOCKS = ["layers.0", "layers.1", "layers.2"]
UNITS = ["layers.0.fc", "layers.1.fc", "layers.2.fc"]


def _recorded(model, batches):
    replay = BlockReplay(model, BLOCKS, UNITS)
    with torch.no_grad():
        dense = []
        for i, b in enumerate(batches):
            with replay.recording(i):
                dense.append(model(b))
    return replay, dense


@pytest.mark.parametrize("in_place", [False, True])
def test_a_replayed_forward_equals_the_full_one_and_skips_the_blocks(in_place):
    model = Stack(in_place=in_place)
    batches = [torch.randn(2, 8), torch.randn(3, 8)]
    replay, dense = _recorded(model, batches)
    assert replay.before(["layers.2.fc"]) == ["layers.0", "layers.1"]
    assert replay.before(["layers.1.fc", "layers.2.fc"]) == ["layers.0"]
    assert replay.before(["layers.0.fc"]) == []
    ran = []
    model.layers[0].fc.register_forward_pre_hook(lambda m, a: ran.append(0))
    with torch.no_grad():
        with replay.replaying(1, ["layers.0", "layers.1"]):
            again = model(batches[1])
        torch.testing.assert_close(again, dense[1], rtol=0, atol=0)
        assert ran == []
        # The change a probe makes is seen: block 2 adapted, blocks 0 and 1 replayed.
        model.layers[2].fc.weight.data.mul_(0.0)
        with replay.replaying(0, replay.before(["layers.2.fc"])):
            changed = model(batches[0])
        full = model(batches[0])
    torch.testing.assert_close(changed, full, rtol=0, atol=0)
    assert not torch.equal(changed, dense[0])
    assert "forward" not in model.layers[0].__dict__   # the class's forward is back


def test_a_block_that_runs_twice_or_after_an_adapted_linear_is_not_replayed():
    replay, _ = _recorded(Stack(reuse=True), [torch.randn(2, 8)])
    assert replay.before(["layers.2.fc"]) == []
    replay, _ = _recorded(Stack(early=True), [torch.randn(2, 8)])
    assert replay.before(["layers.1.fc"]) == ["layers.0"]
    assert replay.before(["layers.2.fc"]) == []   # called before any block returned


def test_an_instance_forward_is_restored():
    model = Stack()
    wrapped = model.layers[0].forward
    model.layers[0].forward = lambda x: wrapped(x)   # as accelerate's hooks do
    own = model.layers[0].forward
    replay, dense = _recorded(model, [torch.randn(2, 8)])
    with torch.no_grad(), replay.replaying(0, ["layers.0"]):
        assert model.layers[0].forward is not own
        torch.testing.assert_close(model(torch.zeros(2, 8) + 1e3), model(torch.zeros(2, 8)))
    assert model.layers[0].forward is own


def test_probes_measure_the_same_kl_with_and_without_replay():
    """The loss scales of a tiny Llama are the same whether the probes replay the blocks before theirs or not."""
    model = tiny_llama()
    options = ProfileOptions(sample_tokens=512, holdout_windows=4, gradient_windows=2, batch_size=2,
                             loss_calibration=False)
    plain = profile(model, token_windows(16), options=options, cache=False)
    scales, facts = loss_scales(model, plain.sites, plain.holdout, 2)
    assert facts["replayed_blocks"] == 1   # layer 0 in the probe of layer 1
    full, full_facts = loss_scales(model, plain.sites, plain.holdout, 2, replay=False)
    assert full_facts["replayed_blocks"] == 0
    assert scales.keys() == full.keys()
    for name, scale in scales.items():
        assert list(scale.scale) == list(full[name].scale) and list(scale.at) == list(full[name].at), name
