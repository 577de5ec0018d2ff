"""Plug-in resolution: 'package.module:attr', entry points, and the three calling conventions."""

from __future__ import annotations

import dataclasses
import importlib
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from harness.quant import plugins
from harness.quant.linear import fp8_linear
from harness.quant.plugins import PluginCallError, PluginError, detect_convention, load_attention, load_linear, resolve
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
        f"my_attn = {PKG}:attention_layout\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield PKG
    sys.modules.pop(PKG, None)


def _operands():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 32, generator=g).to(torch.bfloat16)
    w = round_to_format(torch.randn(16, 32, generator=g) * 8, "e4m3").to(torch.float8_e4m3fn)
    return x, w, torch.tensor(0.125), torch.randn(16, generator=g).to(torch.bfloat16)


@pytest.mark.parametrize(
    "spec,convention",
    [
        (f"{PKG}:op", "op"),
        (f"{PKG}:fp8_linear_forward", "forward"),
        (f"{PKG}:PatchedLinear", "module"),
        ("my_op", "op"),
        ("my_forward", "forward"),
        ("my_module", "module"),
    ],
)
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


@pytest.mark.parametrize(
    "spec,match",
    [
        (
            "nonexistent_pkg_xyz.mod:fn",
            r"plug-in 'nonexistent_pkg_xyz.mod:fn': no module named 'nonexistent_pkg_xyz.mod' "
            r"\(run from the directory that holds it",
        ),
        (f"{PKG}:missing_fn", rf"plug-in '{PKG}:missing_fn': {PKG} has no attribute 'missing_fn'"),
        ("no_such_entry_point", r"plug-in 'no_such_entry_point' is neither 'package.module:attr' nor an entry point"),
        ("broken", r"entry point 'broken' .* failed to load"),
        ("a:b:c", r"must be named 'package.module:attr'"),
        (f"{PKG}:NOT_CALLABLE", r"is not callable"),
        (f"{PKG}:one_arg", r"takes 1 positional argument\(s\) \['input'\]"),
    ],
)
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


# ---------------------------------------------------------------------------
# Honest verdicts for a user's kernel: run what the signature can take, unsupported for what it cannot

KERNELS = textwrap.dedent('''
    import torch
    from torch import nn

    def _mm(x, w):
        return (x.float().contiguous() @ w.float().T).to(x.dtype)

    def my_linear(x, w):
        """the user's kernel: clamps the caller's activation in place"""
        x.clamp_(-448.0, 448.0)
        return _mm(x, w)

    def clean_linear(x, w):
        return _mm(x, w)

    def needs_scale(x, w, scale):
        """a required argument the harness has no value for"""
        return _mm(x, w) * scale

    def refuses(x, w):
        if not x.is_contiguous():
            raise ValueError("refuses: x must be contiguous")
        return _mm(x, w)

    def inner_type_error(x, w):
        return torch.matmul(x, w, w)  # a TypeError raised inside the kernel is still the kernel's own

    class TwoInputLinear(nn.Linear):
        def forward(self, input, other):
            return input

    def attn_needs_mask(q, k, v, mask):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
''')


@pytest.fixture
def kernels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A user's kernel module in the current directory, found the way ``python -m`` finds it (cwd on sys.path)."""
    name = f"user_kernels_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(KERNELS)
    (tmp_path / "needs_dep.py").write_text("import harness_no_such_dependency_xyz\n")
    (tmp_path / f"{name}_pkg").mkdir()
    (tmp_path / f"{name}_pkg" / "__init__.py").write_text("")
    (tmp_path / f"{name}_pkg" / "fp8.py").write_text(f"import {name}_pkg.helpers  # deleted from the package\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    yield name
    for mod in [m for m in sys.modules if m == name or m.startswith(f"{name}_pkg")]:
        sys.modules.pop(mod, None)


def _target(spec: str):
    from harness.runner.targets import get_target
    from harness.targets import register_plugin

    return get_target(register_plugin(spec))


def test_unsupported_is_a_failure_of_the_run() -> None:
    from harness.matrix import is_failure
    from harness.verdicts import BENIGN, Verdict

    v = Verdict.parse("unsupported")
    assert v is Verdict.UNSUPPORTED and v.failed and not v.kills_worker and v not in BENIGN
    assert is_failure("unsupported") and not is_failure("rejected")


def test_cases_fit_a_two_argument_kernel_and_its_in_place_clamp_is_found(kernels: str) -> None:
    from harness.runner.execute import run_case

    t = _target(f"{kernels}:my_linear")
    classes = t.layout_classes()
    case = classes["values_beyond_448"].build(0)
    assert case.params["plugin"] == {"spec": f"{kernels}:my_linear", "kind": "linear", "convention": "op", "takes": []}
    assert case.params["weight_scale"] is None and "bias" not in case.layouts  # what my_linear(x, w) can take
    r = run_case(case, "cpu")
    assert r.verdict.value == "input_mutation" and "x:" in r.message, r.format()
    assert run_case(classes["contiguous"].build(0), "cpu").verdict.value == "pass"
    # the same values through a kernel that does not clamp pass: the verdict is the clamp's doing
    clean = dataclasses.replace(case, op=_target(f"{kernels}:clean_linear").name)
    assert run_case(clean, "cpu").verdict.value == "pass"


def test_what_the_harness_cannot_call_is_unsupported_and_the_ops_own_errors_stay_rejected(kernels: str) -> None:
    from harness.runner.execute import run_case

    full = _target("harness.quant.linear:fp8_linear").layout_classes()["transposed"].build(0)
    assert full.params["weight_scale"] is not None and "bias" in full.layouts
    plain = _target(f"{kernels}:clean_linear").layout_classes()["transposed"].build(0)

    def verdict(case, spec):
        r = run_case(dataclasses.replace(case, op=_target(spec).name), "cpu")
        return r.verdict.value, r.message

    v, msg = verdict(full, f"{kernels}:my_linear")  # a case file that needs weight_scale
    assert v == "unsupported" and "takes no 'weight_scale' argument" in msg
    v, msg = verdict(plain, f"{kernels}:needs_scale")
    assert v == "unsupported" and "missing a required argument: 'scale'" in msg
    v, msg = verdict(plain, f"{kernels}:TwoInputLinear")  # module convention, forward(input, other)
    assert v == "unsupported" and "module(input)" in msg
    v, msg = verdict(plain, f"{kernels}:missing_attr")
    assert v == "unsupported" and "has no attribute 'missing_attr'" in msg
    v, msg = verdict(plain, "user_kernels_nowhere:fn")
    assert v == "unsupported" and "no module named 'user_kernels_nowhere'" in msg
    v, msg = verdict(plain, "needs_dep:fn")  # a package the kernel needs is not installed: cannot run here
    assert v == "unavailable" and "needs 'harness_no_such_dependency_xyz'" in msg
    v, msg = verdict(plain, f"{kernels}_pkg.fp8:fn")  # a module of the kernel's own package is missing: broken
    assert v == "unsupported" and f"No module named '{kernels}_pkg.helpers'" in msg
    v, msg = verdict(plain, f"{kernels}:refuses")
    assert v == "rejected" and "refuses: x must be contiguous" in msg
    v, msg = verdict(plain, f"{kernels}:inner_type_error")
    assert v == "rejected" and "TypeError" in msg


def test_attention_plugin_cases_record_it_and_a_signature_that_does_not_fit_is_unsupported(kernels: str) -> None:
    from harness.runner.execute import run_case
    from harness.runner.targets import get_target
    from harness.targets import register_attention_plugin

    good = get_target(register_attention_plugin("torch.nn.functional:scaled_dot_product_attention"))
    case = good.layout_classes()["nhd_contiguous"].build(0)
    assert case.params["plugin"]["kind"] == "attention" and case.params["plugin"]["convention"] == "op"
    bad = get_target(register_attention_plugin(f"{kernels}:attn_needs_mask"))
    r = run_case(dataclasses.replace(case, op=bad.name), "cpu")
    assert r.verdict.value == "unsupported" and "missing a required argument: 'mask'" in r.message, r.format()


def test_a_plugin_target_is_registered_on_demand_from_its_name(kernels: str) -> None:
    from harness.runner.targets import TargetError, get_target

    t = get_target(f"plugin.{kernels}:refuses")  # never registered: a case file's op name is enough
    assert t.name == f"plugin.{kernels}:refuses" and t.spec == f"{kernels}:refuses"
    a = get_target(f"plugin_attn.{kernels}:attn_needs_mask")
    assert a.kind == "attention" and a.spec == f"{kernels}:attn_needs_mask"
    with pytest.raises(TargetError, match="unknown target 'plugin.a:b:c'"):
        get_target("plugin.a:b:c")


def test_probe_resolves_in_a_subprocess_and_names_what_fails(kernels: str) -> None:
    info = plugins.probe(f"{kernels}:my_linear")
    assert info == {"spec": f"{kernels}:my_linear", "kind": "linear", "convention": "op", "takes": []}
    assert kernels not in sys.modules  # the probe imported it, not this process
    with pytest.raises(PluginError, match="no module named 'user_kernels_nowhere'"):
        plugins.probe("user_kernels_nowhere:fn")
    with pytest.raises(PluginError, match="needs 'harness_no_such_dependency_xyz'") as e:
        plugins.probe("needs_dep:fn")
    assert e.value.missing == "harness_no_such_dependency_xyz"
