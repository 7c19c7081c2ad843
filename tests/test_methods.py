"""Transfer methods: after training steps exactly the intended parameters have changed."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from roli_sweep.config import BackboneConfig
from roli_sweep.models.backbone import build_backbone
from roli_sweep.models.methods import METHODS, apply_method, trainable_parameter_count
from tests.conftest import TINY_KWARGS


def _intended(name: str, method: str, original: set[str]) -> bool:
    """Which parameters each method is meant to train; ``original`` = the backbone's own parameter names."""
    if name.startswith("net.head."):
        return True
    if method == "linear":
        return False
    if method == "full":
        return True
    if method == "bias":
        return "bias" in name and name in original  # Swin's relative_position_bias_table too (the reference's BitFit)
    if method == "prompt":
        return name.endswith(".prompts")
    # lora, adapter, peft: exactly the parameters they add (peft renames wrapped layers' own
    # weights to ``<layer>.base_layer.*``; those stay frozen)
    return name not in original and ".base_layer." not in name


SWIN = BackboneConfig(name="swin_base_patch4_window7_224", mean=[0.5] * 3, std=[0.5] * 3, input_size=56, kwargs={
    "img_size": 56, "embed_dim": 8, "depths": [2], "num_heads": [2], "window_size": 7, "drop_path_rate": 0.0})
"""A scaled-down Swin-B (the paper's backbone family): one stage of two blocks on 14x14 tokens (4 windows of
7x7), the second with shifted windows."""


def _backbone(arch: str, tiny_weights) -> torch.nn.Module:
    if arch == "swin":
        return build_backbone(SWIN, num_classes=4)
    return build_backbone(BackboneConfig(name="vit_tiny_patch16_224", kwargs=TINY_KWARGS, weights=str(tiny_weights)),
                          num_classes=4)


@pytest.mark.parametrize("arch", ["vit", "swin"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_only_intended_parameters_change(method, arch, tiny_weights):
    torch.manual_seed(0)
    model = _backbone(arch, tiny_weights)
    channels = 3 if arch == "swin" else 1
    original = {n for n, _ in model.named_parameters()}
    apply_method(model, method, METHODS[method].Params().model_dump())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in before if _intended(n, method, original)}
    assert method == "linear" or trainable - {"net.head.weight", "net.head.bias"}
    assert trainable_parameter_count(model) == sum(before[n].numel() for n in trainable)
    # Adam moves every parameter with a non-zero gradient by about lr, however small the gradient
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    x, y = torch.rand(16, channels, 8, 8), torch.randint(0, 4, (16,))
    for _ in range(2):  # two steps: LoRA's A (adapter's down) only gets a gradient once B (up) has left zero
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable
    if arch == "swin" and method == "bias":
        assert any("relative_position_bias_table" in n for n in trainable)


def test_lora_starts_as_identity_with_random_a_and_zero_b(tiny_weights):
    cfg = BackboneConfig(name="vit_tiny_patch16_224", kwargs=TINY_KWARGS, weights=str(tiny_weights))
    plain = build_backbone(cfg, num_classes=4).eval()
    torch.manual_seed(0)
    adapted = build_backbone(cfg, num_classes=4).eval()
    adapted.load_state_dict(plain.state_dict())
    apply_method(adapted, "lora", {"r": 4})
    a = [p for n, p in adapted.named_parameters() if "lora_A" in n]
    b = [p for n, p in adapted.named_parameters() if "lora_B" in n]
    assert a and all(p.abs().sum() > 0 for p in a)  # never both zero (the reference code's bug)
    assert b and all(p.abs().sum() == 0 for p in b)
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(plain(x), adapted(x), atol=1e-6)


@pytest.mark.parametrize("method,params", [("adapter", {"reduction_factor": 4}), ("prompt", {"length": 3, "deep": True}),
                                           ("prompt", {"length": 3, "deep": False, "dropout": 0.0})])
def test_adapter_and_prompt_keep_output_shape_and_adapter_starts_as_identity(tiny_weights, method, params):
    cfg = BackboneConfig(name="vit_tiny_patch16_224", kwargs=TINY_KWARGS, weights=str(tiny_weights))
    plain = build_backbone(cfg, num_classes=4).eval()
    adapted = build_backbone(cfg, num_classes=4).eval()
    adapted.load_state_dict(plain.state_dict())
    apply_method(adapted, method, params)
    adapted.eval()
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        out = adapted(x)
        assert out.shape == (3, 4)
        if method == "adapter":
            assert torch.allclose(out, plain(x), atol=1e-6)
        else:
            assert not torch.allclose(out, plain(x)), "prompts change the features"
            assert torch.equal(adapted(x), out), "no prompt dropout in eval mode"


def test_swin_prompts_join_every_window_attention():
    """Prompted window attention = timm's window attention over [prompts; window] keys, for the window tokens.

    Checked per block against a plain re-computation, in the unshifted and the shifted (masked) block.
    """
    from roli_sweep.models.methods.prompt import PromptedWindowAttention

    torch.manual_seed(0)
    model = build_backbone(SWIN, num_classes=4)
    apply_method(model, "prompt", {"length": 3})
    model.eval()
    blocks = model.net.layers[0].blocks
    assert all(isinstance(b.attn, PromptedWindowAttention) for b in blocks) and any(blocks[1].shift_size)
    for block in blocks:
        wrapped, attn = block.attn, block.attn.attn
        x = torch.randn(2 * 4, attn.window_area, 8)  # (nW * B, N, C): 4 windows of 7x7 at 14x14 tokens
        mask = block.attn_mask  # None without shift, (nW, N, N) with
        tokens = torch.cat([wrapped.prompts.expand(len(x), -1, -1), x], dim=1)
        q, k, v = attn.qkv(tokens).reshape(len(x), 3 + attn.window_area, 3, 2, -1).permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-2, -1)) * attn.scale  # (nW*B, heads, L + N, L + N)
        logits[..., 3:, 3:] += attn._get_rel_pos_bias()[0]
        if mask is not None:
            logits = logits.view(2, 4, 2, 3 + attn.window_area, -1)
            logits[..., 3:, 3:] += mask.unsqueeze(1)
            logits = logits.view(8, 2, 3 + attn.window_area, -1)
        expected = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(8, 3 + attn.window_area, -1))[:, 3:]
        with torch.no_grad():
            assert torch.allclose(wrapped(x, mask), expected, atol=1e-5)


def test_prompt_refuses_backbones_without_tokens():
    model = build_backbone(BackboneConfig(name="resnet18", kwargs={"in_chans": 1}), num_classes=3)
    with pytest.raises(ValueError, match="VisionTransformer"):
        apply_method(model, "prompt", {})


@pytest.mark.parametrize("tuner,config", [
    ("LORA", {"target_modules": ["qkv"], "r": 4, "use_dora": True}),
    ("LOHA", {"target_modules": ["qkv"], "r": 4}),
    ("LOKR", {"target_modules": ["qkv"], "r": 4}),
    ("IA3", {"target_modules": ["qkv", "fc2"], "feedforward_modules": ["fc2"]}),
])
def test_peft_tuners_by_name_train_their_own_parameters(tiny_weights, tuner, config):
    model = build_backbone(BackboneConfig(name="vit_tiny_patch16_224", kwargs=TINY_KWARGS,
                                          weights=str(tiny_weights)), num_classes=4)
    original = {n for n, _ in model.named_parameters()}
    apply_method(model, "peft", {"tuner": tuner, "config": config})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    added = trainable - original
    assert added and trainable - added == {"net.head.weight", "net.head.bias"}


def test_unknown_peft_tuner_is_a_config_error(trial_dict):
    from roli_sweep.config import ConfigError, TrialConfig, apply_overrides

    with pytest.raises(ConfigError, match="NOT_A_TUNER"):
        apply_overrides(TrialConfig.model_validate(trial_dict),
                        {"finetune.method": "peft", "finetune.method_params": {"tuner": "NOT_A_TUNER"}})


def test_adapter_hidden_size_alone_and_prompt_tuners_refused(trial_dict):
    from roli_sweep.config import ConfigError, TrialConfig, apply_overrides

    base = TrialConfig.model_validate(trial_dict)
    cfg = apply_overrides(base, {"finetune.method": "adapter", "finetune.method_params": {"hidden_size": 5}})
    assert cfg.finetune.method_params == {"reduction_factor": None, "hidden_size": 5}
    with pytest.raises(ConfigError, match="prompt-learning"):
        apply_overrides(base, {"finetune.method": "peft",
                               "finetune.method_params": {"tuner": "PROMPT_TUNING", "config": {"num_virtual_tokens": 4}}})
