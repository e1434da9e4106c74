import pytest
import torch
import torchvision
from torch import nn

from senet_pl.model import LAYERS, BasicBlock, Bottleneck, GlobalAvgPool2d, SEBlock, SEResNet


@pytest.mark.parametrize("depth", sorted(LAYERS))
@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_output_shape_every_depth_and_stem(depth: int, stem: str) -> None:
    model = SEResNet(depth=depth, stem=stem, in_channels=1, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("depth", sorted(LAYERS))
def test_every_block_has_se_exactly_when_asked(depth: int) -> None:
    blocks = [m for m in SEResNet(depth=depth).modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert len(blocks) == sum(LAYERS[depth][1])
    assert all(isinstance(b.se, SEBlock) for b in blocks)
    plain = [m for m in SEResNet(depth=depth, se=False).modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert all(isinstance(b.se, nn.Identity) for b in plain)
    assert not any(isinstance(m, SEBlock) for m in SEResNet(depth=depth, se=False).modules())


def test_se_output_is_input_times_per_channel_gate_in_unit_interval() -> None:
    torch.manual_seed(0)
    se = SEBlock(channels=32, reduction=4)
    gates = []
    se.scale_activation.register_forward_hook(lambda module, inputs, output: gates.append(output))
    x = torch.randn(3, 32, 5, 6) * 4
    out = se(x)
    (gate,) = gates
    assert gate.shape == (3, 32, 1, 1)  # one scalar per sample and channel, broadcast over H, W
    assert ((gate > 0) & (gate < 1)).all()
    torch.testing.assert_close(out, x * gate)
    # the gate depends on the input (it is computed from the squeezed x), not a constant
    se(torch.randn(3, 32, 5, 6))
    assert not torch.allclose(gates[0], gates[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_se_squeeze_is_the_mean_and_keeps_channels_last_gradients(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 16, 7, 5, dtype=dtype)
    torch.testing.assert_close(GlobalAvgPool2d()(x), nn.AdaptiveAvgPool2d(1)(x))
    u = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    z = GlobalAvgPool2d()(u)
    (grad,) = torch.autograd.grad(z, u, torch.randn_like(z))
    # The reason for the class: AdaptiveAvgPool2d(1)'s gradient here is written out in NCHW, which is
    # slow to add to a channels_last one; a broadcast view (stride 0 over H and W) is not.
    assert grad.stride()[2:] == (0, 0)
    # The SE block's input gradient equals that of the same block squeezing with AdaptiveAvgPool2d(1).
    se = SEBlock(channels=16, reduction=4).to(dtype=dtype, memory_format=torch.channels_last)
    grad_out = torch.randn_like(u)
    (grad,) = torch.autograd.grad(se(u), u, grad_out)
    assert grad.is_contiguous(memory_format=torch.channels_last)
    reference = SEBlock(channels=16, reduction=4)
    reference.load_state_dict(se.state_dict())
    reference.avgpool = nn.AdaptiveAvgPool2d(1)
    u32 = x.float().requires_grad_()
    (expected,) = torch.autograd.grad(reference(u32), u32, grad_out.float())
    tolerance = {} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.05}
    torch.testing.assert_close(grad.float(), expected, **tolerance)


def test_se_widths_follow_reduction_ratio() -> None:
    se = SEBlock(channels=256, reduction=16)
    assert se.fc1.in_channels == 256 and se.fc1.out_channels == 16
    assert se.fc2.in_channels == 16 and se.fc2.out_channels == 256
    assert SEBlock(channels=8, reduction=16).fc1.out_channels == 1  # never zero-width
    with pytest.raises(ValueError, match="reduction"):
        SEBlock(channels=8, reduction=0)


def test_se_rescales_residual_branch_once_before_the_addition() -> None:
    """The tutorial's bug multiplied the SE output by the branch again; here a gate of 0 leaves only the identity."""
    torch.manual_seed(0)
    block = BasicBlock(8, 8, attn_layer=lambda c: SEBlock(c, 4)).eval()
    x = torch.randn(2, 8, 6, 6)
    nn.init.constant_(block.se.fc2.bias, -1e4)  # sigmoid -> 0: the residual branch is switched off
    with torch.no_grad():
        torch.testing.assert_close(block(x), torch.relu(x))
        nn.init.constant_(block.se.fc2.bias, 1e4)  # sigmoid -> 1: exactly the plain block
        plain = BasicBlock(8, 8).eval()
        plain.load_state_dict(block.state_dict(), strict=False)
        torch.testing.assert_close(block(x), plain(x))


@pytest.mark.parametrize("depth", [18, 50])
def test_gradients_reach_every_parameter(depth: int) -> None:
    model = SEResNet(depth=depth, num_classes=10)
    loss = nn.functional.cross_entropy(model(torch.randn(2, 1, 16, 16)), torch.tensor([1, 2]))
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize(
    ("depth", "reference", "count"),
    [(18, torchvision.models.resnet18, 11_689_512), (50, torchvision.models.resnet50, 25_557_032)],
)
def test_plain_variant_matches_torchvision_resnet(depth: int, reference, count: int) -> None:
    ours = SEResNet(depth=depth, stem="imagenet", in_channels=3, num_classes=1000, se=False)
    theirs = reference()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == count
    # Same structure, names included: torchvision's weights load strictly and give the same outputs.
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))


def test_se_adds_the_paper_parameter_count() -> None:
    """Each SE block adds 2C^2/r weights (plus biases C/r + C), as in Sec. 4 of the paper."""
    plain = sum(p.numel() for p in SEResNet(depth=50, se=False).parameters())
    se = sum(p.numel() for p in SEResNet(depth=50, se=True, reduction=16).parameters())
    channels = [c for c, n in zip((256, 512, 1024, 2048), LAYERS[50][1]) for _ in range(n)]
    assert se - plain == sum(2 * c * c // 16 + c // 16 + c for c in channels)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="depth"):
        SEResNet(depth=20)
    with pytest.raises(ValueError, match="stem"):
        SEResNet(stem="tiny")  # type: ignore[arg-type]


@pytest.mark.parametrize("depth", sorted(LAYERS))
def test_builders_name_the_variants(depth: int) -> None:
    import senet_pl.model as models

    se, plain = getattr(models, f"se_resnet{depth}")(num_classes=7), getattr(models, f"resnet{depth}")(num_classes=7)
    reference = SEResNet(depth=depth, num_classes=7)
    assert [tuple(p.shape) for p in se.parameters()] == [tuple(p.shape) for p in reference.parameters()]
    assert any(isinstance(m, SEBlock) for m in se.modules()) and not any(isinstance(m, SEBlock) for m in plain.modules())
    block, blocks = LAYERS[depth]
    assert [len(getattr(se, f"layer{i}")) for i in range(1, 5)] == list(blocks)  # _make_layer: one stage each
    assert se.fc.in_features == 512 * block.expansion
