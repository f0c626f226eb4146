"""A fake run answers questions about data from the inputs' real values, as the real run does:
a model on meta then takes the branch it takes on the CPU, and keeps the same bytes."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

import remat
from remat.profiling.fake_values import known_values


class Padded(nn.Module):
    """Masks its input only where the mask has a zero, as transformers' attention masks do;
    the positions it makes itself decide a second branch."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

    def forward(self, x, mask):
        positions = torch.arange(x.shape[1], device=x.device)
        if not bool((positions.diff() == 1).all()):  # never: positions follow each other
            x = x * 0
        x = self.layers[0](x).tanh()
        if not bool(mask.all()):  # a question a fake tensor cannot answer on its own
            x = x * mask[..., None].to(x.dtype)  # (B, T, 8); keeps the (B, T, 1) float mask
        return self.layers[1](x).tanh()


def _padded(device: str) -> Padded:
    torch.manual_seed(0)
    with torch.device(device):
        return Padded()


@pytest.mark.parametrize("padding", [False, True])
def test_a_meta_model_takes_the_branch_its_cpu_inputs_take(padding):
    x = torch.randn(2, 16, 8)
    mask = torch.ones(2, 16, dtype=torch.bool)
    if padding:
        mask[0, -3:] = False
    meta, cpu = _padded("meta"), _padded("cpu")
    on_meta = remat.estimate(meta, x, mask=mask)
    on_cpu = remat.estimate(cpu, x, mask=mask)
    assert on_meta.to_dict() == on_cpu.to_dict()
    with remat.MemoryTracker(module=cpu, count_existing=[cpu, x, mask]) as real:
        cpu(x, mask).float().sum().backward()
    assert on_meta.saved_bytes == real.saved_bytes
    unpadded = remat.estimate(meta, x, mask=torch.ones_like(mask)).saved_bytes
    # the float mask, and the masked activations the second layer keeps as its input
    assert on_meta.saved_bytes - unpadded == (2 * 16 * 4 + 2 * 16 * 8 * 4 if padding else 0)
    profiles = [remat.profile(m, x, mask=mask) for m in (meta, cpu)]
    assert [(r.input_bytes, r.saved_bytes) for r in profiles[0].regions] == [
        (r.input_bytes, r.saved_bytes) for r in profiles[1].regions
    ]


def test_values_computed_from_the_weights_stay_unknown():
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    ids = torch.ones(4, dtype=torch.long)
    with fake:
        fake_ids = fake.from_tensor(ids)
        weight = fake.from_tensor(torch.empty(4))  # a parameter on meta: no values
    with fake, known_values([(fake_ids, ids)]):
        assert (fake_ids + 1).sum().item() == 8
        with pytest.raises(DataDependentOutputException):
            bool((weight > 0).all())
        changed = fake_ids.clone()
        assert bool(changed.eq(1).all())
        changed.mul_(weight.long())  # in place, by an unknown: the value is forgotten
        with pytest.raises(DataDependentOutputException):
            bool(changed.eq(1).all())


def test_random_ops_do_not_draw_from_the_cpu_generator():
    fake = FakeTensorMode()
    before = torch.get_rng_state()
    with fake, known_values([]):
        drawn = torch.rand(4) + torch.arange(4)
        with pytest.raises(DataDependentOutputException):
            drawn.sum().item()
    assert torch.equal(torch.get_rng_state(), before)


def test_transformers_sees_data_only_where_values_are_known():
    pytest.importorskip("transformers")
    from transformers.utils import import_utils
    from transformers.utils.import_utils import is_tracing

    original = import_utils.is_fake_tensor
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    ids = torch.ones(2, 3, dtype=torch.long)
    with fake:
        fake_ids = fake.from_tensor(ids)
        unknown = torch.empty(2, 3)
    with fake, known_values([(fake_ids, ids)]):
        assert not is_tracing(fake_ids) and not is_tracing(fake_ids.bool())
        assert is_tracing(unknown)
    assert import_utils.is_fake_tensor is original
    assert is_tracing(fake_ids)


class _ReadsItsOutput(nn.Module):
    """Branches on a value computed from its weights: no fake run can know it."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

    def forward(self, x):
        x = self.layers[0](x)
        if x.sum().item() > 0:
            x = x.relu()
        return self.layers[1](x)


def test_a_meta_run_that_reads_unknown_values_names_the_module():
    with torch.device("meta"):
        model = _ReadsItsOutput()
    x = torch.randn(2, 8)
    with pytest.raises(
        remat.PlanError, match=r"profile: on meta, module '_ReadsItsOutput' .* reads the values"
    ):
        remat.profile(model, x)
    with pytest.raises(remat.PlanError, match="remat.estimate: on meta"):
        remat.estimate(model, x)


def test_transformers_padding_warning_reads_the_input_ids_values():
    """BERT-like encoders warn about padding by reading ``input_ids[:, [-1, 0]]``, whose
    Python-list index PyTorch makes on meta, without values: the warning now reads the
    CPU input ids, and the meta profile is the CPU one."""
    transformers = pytest.importorskip("transformers")
    config = transformers.RoFormerConfig(
        hidden_size=32,
        embedding_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=64,
        max_position_embeddings=64,
    )
    ids = torch.randint(1, 64, (2, 16))
    profiles = []
    for device in ("cpu", "meta"):
        torch.manual_seed(0)
        with torch.device(device):
            model = transformers.RoFormerForMaskedLM(config).train()
        prof = remat.profile(model, input_ids=ids, labels=ids, target_device="cpu")
        profiles.append(
            [(r.name, r.input_bytes, r.saved_bytes, r.output_bytes) for r in prof.regions]
        )
    assert profiles[1] == profiles[0]
