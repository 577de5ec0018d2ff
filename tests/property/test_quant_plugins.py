"""Plug-in resolution: 'package.module:attr', entry points, and the three calling conventions."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from harness.quant import plugins
from harness.quant.linear import fp8_linear
from harness.quant.plugins import (PluginCallError, PluginError, detect_convention, load_attention, load_linear,
                                   resolve)
from harness.reference.formats import round_to_format
from harness.verdicts import Unsupported

PKG = "harness_test_plugin_pkg"

SOURCE = textwrap.dedent('''
    import torch
    from torch import nn
    from harness.quant.linear import fp8_linear

    def op(input, weight, weight_scale=None, bias=None, out_dtype=None):
        """convention "op": the tensors are the arguments (no input_scale parameter)"""
        return fp8_linear(input, weight, weight_scale, None, bias, out_dtype, backend="emulate")

    def fp8_linear_forward(cls, base_dtype, input):
        """convention "forward": WanVideoWrapper style"""
        return fp8_linear(input, cls.weight, cls.scale_weight, cls.scale_input, cls.bias, base_dtype,
                          backend="emulate")

    class PatchedLinear(nn.Linear):
        """convention "module": a Linear whose forward knows FP8 weights"""
        def forward(self, input):
            return fp8_linear(input, self.weight, getattr(self, "scale_weight", None),
                              getattr(self, "scale_input", None), self.bias, backend="emulate")

    def attention_hnd(q, k, v, scale=None):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)

    def attention_layout(q, k, v, tensor_layout="HND"):
        if tensor_layout == "NHD":
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return o.transpose(1, 2) if tensor_layout == "NHD" else o

    NOT_CALLABLE = 3

    def one_arg(input):
        return input
''')


@pytest.fixture
def plugin_pkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A throwaway package on sys.path, with a dist-info declaring entry points in both groups."""
    (tmp_path / f"{PKG}.py").write_text(SOURCE)
    dist = tmp_path / "harness_test_plugin_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: harness-test-plugin-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[harness.fp8_linear]\n"
        f"my_op = {PKG}:op\nmy_forward = {PKG}:fp8_linear_forward\nmy_module = {PKG}:PatchedLinear\n"
        f"broken = {PKG}_missing:thing\n"
        "[harness.attention]\n"
        f"my_attn = {PKG}:attention_layout\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield PKG
    sys.modules.pop(PKG, None)


def _operands():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 32, generator=g).to(torch.bfloat16)
    w = round_to_format(torch.randn(16, 32, generator=g) * 8, "e4m3").to(torch.float8_e4m3fn)
    return x, w, torch.tensor(0.125), torch.randn(16, generator=g).to(torch.bfloat16)


@pytest.mark.parametrize("spec,convention", [
    (f"{PKG}:op", "op"), (f"{PKG}:fp8_linear_forward", "forward"), (f"{PKG}:PatchedLinear", "module"),
    ("my_op", "op"), ("my_forward", "forward"), ("my_module", "module"),
])
def test_three_conventions_give_the_same_answer(plugin_pkg: str, spec: str, convention: str) -> None:
    p = resolve(spec)
    assert p.convention == convention
    x, w, sw, b = _operands()
    x0 = x.clone()
    got = p.as_linear_op()(x, w, weight_scale=sw, bias=b, out_dtype=torch.bfloat16)
    want = fp8_linear(x, w, sw, None, b, torch.bfloat16, backend="emulate")
    assert torch.equal(got, want)
    assert torch.equal(x, x0)


def test_module_instance_is_reused_with_the_cases_weights(plugin_pkg: str) -> None:
    mod = importlib.import_module(plugin_pkg)
    inst = mod.PatchedLinear(32, 16, bias=True)
    p = resolve(inst)
    assert p.convention == "module"
    x, w, sw, b = _operands()
    got = p.as_linear_op()(x, w, weight_scale=sw, bias=b)
    assert torch.equal(got, fp8_linear(x, w, sw, None, b, backend="emulate"))
    assert inst.weight.dtype == torch.float8_e4m3fn


def test_op_without_an_argument_the_case_needs(plugin_pkg: str) -> None:
    x, w, sw, b = _operands()
    op = load_linear(f"{PKG}:op")
    with pytest.raises(PluginCallError, match=r"takes no 'input_scale' argument") as info:
        op(x, w, weight_scale=sw, input_scale=torch.tensor(1.0))
    assert isinstance(info.value, Unsupported)  # the runner's verdict: unsupported, never rejected


def test_attention_plugins(plugin_pkg: str) -> None:
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 12, 16, generator=g) for _ in range(3))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    for spec in (f"{PKG}:attention_hnd", f"{PKG}:attention_layout", "my_attn"):
        op = load_attention(spec)
        assert torch.allclose(op(q, k, v, "HND"), want, rtol=0, atol=0)
        out_nhd = op(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), "NHD")
        assert torch.equal(out_nhd.transpose(1, 2), want)


def test_entry_point_names(plugin_pkg: str) -> None:
    assert {"my_op", "my_forward", "my_module", "broken"} <= set(plugins.entry_point_names("harness.fp8_linear"))
    assert "my_attn" in plugins.entry_point_names("harness.attention")


@pytest.mark.parametrize("spec,match", [
    ("nonexistent_pkg_xyz.mod:fn", r"plug-in 'nonexistent_pkg_xyz.mod:fn': no module named 'nonexistent_pkg_xyz.mod' "
     r"\(run from the directory that holds it"),
    (f"{PKG}:missing_fn", rf"plug-in '{PKG}:missing_fn': {PKG} has no attribute 'missing_fn'"),
    ("no_such_entry_point", r"plug-in 'no_such_entry_point' is neither 'package.module:attr' nor an entry point"),
    ("broken", r"entry point 'broken' .* failed to load"),
    ("a:b:c", r"must be named 'package.module:attr'"),
    (f"{PKG}:NOT_CALLABLE", r"is not callable"),
    (f"{PKG}:one_arg", r"takes 1 positional argument\(s\) \['input'\]"),
])
def test_unresolvable_names_are_named(plugin_pkg: str, spec: str, match: str) -> None:
    with pytest.raises(PluginError, match=match):
        load_linear(spec)


def test_detect_convention_on_plain_objects() -> None:
    def fwd(module, base_dtype, input):
        return input

    def op(x, w):
        return x

    assert detect_convention(fwd) == "forward"
    assert detect_convention(op) == "op"
    assert detect_convention(torch.nn.Linear) == "module"
    assert detect_convention(torch.nn.Linear(2, 2)) == "module"
    with pytest.raises(PluginError, match="not an nn.Module subclass"):
        detect_convention(dict)


def test_a_forward_that_writes_its_weight_is_not_hidden_by_a_copy() -> None:
    """The ops under test hand plug-ins the caller's own FP8 weight (no per-call copy), so a forward that
    writes it changes the case's input -- which the runner's input-mutation check then reports."""
    from harness.quant import plugins
    from harness.quant.legacy import make_fp8_module

    w8 = torch.randn(16, 32).to(torch.float8_e4m3fn)
    before = w8.clone()

    def writes_weight(module, base_dtype, x):
        module.weight.data.zero_()
        return x.new_zeros(x.shape[:-1] + (module.out_features,))

    plugins._wrap_forward("writer", writes_weight)(torch.randn(2, 32), w8, torch.ones(()))
    assert not torch.equal(w8.view(torch.uint8), before.view(torch.uint8))
    # make_fp8_module's default still protects whoever builds a module for their own use
    held = make_fp8_module(before, torch.ones(()))
    held.weight.data.zero_()
    assert held.weight.data_ptr() != before.data_ptr() and before.float().abs().sum() > 0
